"""``shn --allocator keep`` (shn/allocator.py): fewer page faults, the same numbers, the user's
own settings respected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shn.allocator import ENV, is_glibc
from shn.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(not is_glibc(), reason="mallopt settings exist only in glibc's malloc")

# a step's pattern: a 40 MiB activation (beyond glibc's largest dynamic mmap threshold, 32 MiB) and
# two smaller ones, alive at once, then freed; page faults counted in the steady state
FAULTS = """
import json, resource, sys
if sys.argv[1] == "keep":
    from shn.allocator import keep_freed_memory
    assert keep_freed_memory()
import torch
def step():
    a = torch.ones(10 * 2**20)
    b = torch.ones(3 * 2**20)
    c = a * 2
    return float(c[0] + b[0])
for _ in range(10):  # the heap grows to its steady size first
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _child(code: str, *args: str, env: dict | None = None) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SHN_ALLOCATOR"))}
    base.update(env or {}, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, *args], env=base, capture_output=True, text=True, check=True,
                         cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_keep_avoids_page_faults_of_freed_blocks():
    system = _child(FAULTS, "system")["faults"]
    keep = _child(FAULTS, "keep")["faults"]
    # glibc's defaults map the 40 MiB blocks afresh at every step (10,240 pages each, two a step);
    # kept, the heap's blocks are reused
    assert system > 40 * 10_240, system
    assert keep <= 10_240, keep


@glibc_only
def test_keep_exports_its_settings_and_respects_the_users():
    code = ("import json, os; from shn.allocator import keep_freed_memory, ENV; ok = keep_freed_memory(); "
            "print(json.dumps({'ok': ok, **{k: os.environ.get(k) for k in ENV}}))")
    mine = _child(code)
    assert mine == {"ok": True, **{k: str(v) for k, v in ENV.items()}}
    theirs = _child(code, env={"MALLOC_TRIM_THRESHOLD_": "12345"})
    assert theirs == {"ok": True, "MALLOC_TRIM_THRESHOLD_": "12345", "MALLOC_MMAP_THRESHOLD_": None}


@glibc_only
def test_every_local_trainer_applies_the_default_unless_told_not_to():
    code = ("import json, os; from shn.federated.local import LocalTrainer; from shn.config import LocalConfig; "
            "from torch import nn; from tasks.base import classification_loss; "
            "LocalTrainer(nn.Linear(2, 2), classification_loss, LocalConfig()); "
            "print(json.dumps({k: os.environ.get(k) for k in ('MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_')}))")
    assert _child(code) == {k: str(v) for k, v in ENV.items()}
    assert _child(code, env={"SHN_ALLOCATOR": "system"}) == {k: None for k in ENV}


def test_a_bad_allocator_setting_is_one_clear_error(monkeypatch):
    from shn.allocator import apply_default

    monkeypatch.setenv("SHN_ALLOCATOR", "tcmalloc")
    with pytest.raises(ValueError, match="SHN_ALLOCATOR: 'tcmalloc' is not allowed"):
        apply_default()


def test_allocator_flag_is_checked(capsys):
    assert build_parser().parse_args(["run", "x.toml"]).allocator == "keep"
    assert build_parser().parse_args(["--allocator", "system", "run", "x.toml"]).allocator == "system"
    with pytest.raises(SystemExit) as exc:
        main(["--allocator", "jemalloc", "run", "x.toml"])
    assert exc.value.code == 2
    assert "--allocator" in capsys.readouterr().err


RUN = """
import json, sys
from shn.cli import main
sys.exit(main(sys.argv[1:]))
"""


@glibc_only
def test_keep_changes_no_number(tmp_path):
    """The same run under both settings: identical metrics (grouped CNN training included)."""
    config = tmp_path / "c.toml"
    config.write_text("""
method = "pfedhn"
seed = 3
rounds = 3
clients_per_round = 4
[task]
name = "digits"
num_clients = 6
model = "cnn"
[local]
steps = 3
mode = "grouped"
""")
    outs = {}
    for allocator in ("keep", "system"):
        out = tmp_path / allocator
        subprocess.run([sys.executable, "-c", RUN, "--threads", "1", "--allocator", allocator, "run", str(config),
                        "--out", str(out)], check=True, cwd=REPO, capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SHN_"))},
                            "PYTHONPATH": str(REPO)})
        outs[allocator] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if "elapsed" not in k and not k.endswith("_s")} for r in rows]  # noqa: E731
    assert strip(outs["keep"]) == strip(outs["system"])
