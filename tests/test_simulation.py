"""End-to-end runs of the in-process engine on digits: learning, determinism, exact resume
(in-process crash and a SIGKILLed CLI process), corrupt checkpoints, the run directory."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import baselines  # noqa: F401 - registers the methods
from shn.config import load_config
from shn.federated.records import CheckpointError, load_checkpoint, read_jsonl
from shn.federated.simulation import Simulation
from shn.runner import run

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "configs" / "quickstart.toml"

# Small and fast: the MLP target trains all clients of a round in one vmapped call; a server lr
# of 0.03 (pFedHN's default is 0.01) reaches ~0.95 in 30 rounds of 5 clients.
LEARN = ["rounds=30", "eval_every=10", "local.steps=20", "task.model=mlp", "server.lr=0.03"]
# For determinism / resume: the default (convolutional, per-client loop) target, a few rounds;
# checkpoints fall between evaluations so a checkpoint carries pending training losses.
TINY = ["rounds=7", "eval_every=3", "checkpoint_every=2", "local.steps=3", "task.num_clients=4",
        "clients_per_round=2"]
# The killed CLI run: longer, with the (vmapped) MLP target to keep it cheap.
KILLED = (*TINY, "rounds=20", "task.model=mlp")
TIMING_KEYS = ("wall_time_s", "elapsed_s", "elapsed")


def config(*overrides: str):
    return load_config(QUICKSTART, list(overrides))


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return without_timing(summary), without_timing(read_jsonl(run_dir / "metrics.jsonl"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted TINY run with checkpoints (the resume tests compare against it)."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("reference")
    run(config(*TINY), run_dir=out, progress=False)
    return out


# -- learning -----------------------------------------------------------------------------------

def test_pfedhn_learns_digits():
    result = run(config(*LEARN), progress=False)
    m = result.summary["metrics"]
    # clients hold 2 classes each: chance is 0.5
    assert m["test_accuracy"] >= 0.85, m
    assert m["val_accuracy"] >= 0.8, m
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert result.summary["rejected_updates"] == 0


@pytest.mark.parametrize("method", ["fedavg", "local"])
def test_baselines_run_and_learn(method):
    result = run(config(*LEARN, "rounds=20", "local.steps=10", f"method={method}"), progress=False)
    m = result.summary["metrics"]
    assert result.summary["method"] == method
    assert m["test_accuracy"] >= 0.7, m
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses


# -- determinism --------------------------------------------------------------------------------

def test_same_config_and_seed_give_identical_metrics(tmp_path, reference):
    run(config(*TINY), run_dir=tmp_path / "again", progress=False)
    assert read_run(tmp_path / "again") == read_run(reference)
    other = run(config(*TINY, "seed=1"), progress=False)
    assert without_timing(other.summary)["metrics"] != read_run(reference)[0]["metrics"]


def test_client_sampling_stream_is_the_same_for_every_method():
    seen = {}
    for method in ("pfedhn", "fedavg", "local"):
        calls = []
        original = Simulation.run_round

        def spy(self, r, _orig=original, _calls=calls):
            _calls.append(self.sampler.clients(r))
            return _orig(self, r)

        Simulation.run_round = spy
        try:
            run(config(*TINY, "rounds=3", f"method={method}", "checkpoint_every=0"), progress=False)
        finally:
            Simulation.run_round = original
        seen[method] = calls
    assert seen["pfedhn"] == seen["fedavg"] == seen["local"]
    assert len(seen["pfedhn"]) == 3 and all(len(c) == 2 for c in seen["pfedhn"])


# -- the run directory --------------------------------------------------------------------------

def test_run_directory_contents(reference):
    summary = json.loads((reference / "summary.json").read_text())
    for key in ("method", "task", "seed", "rounds", "metrics", "per_client", "rejected_updates", "wall_time_s"):
        assert key in summary, key
    assert (summary["method"], summary["task"], summary["seed"], summary["rounds"]) == ("pfedhn", "digits", 0, 7)
    for key in ("test_accuracy", "val_accuracy"):
        assert 0.0 <= summary["metrics"][key] <= 1.0
    assert sorted(summary["per_client"], key=int) == ["0", "1", "2", "3"]
    assert all("test_accuracy" in row for row in summary["per_client"].values())
    mean = sum(row["test_accuracy"] for row in summary["per_client"].values()) / 4
    assert summary["metrics"]["test_accuracy"] == pytest.approx(mean)
    assert summary["rejected_updates"] == 0
    assert isinstance(summary["wall_time_s"], float) and summary["wall_time_s"] >= 0
    records = read_jsonl(reference / "metrics.jsonl")
    assert [r["round"] for r in records] == [3, 6, 7]  # every eval_every rounds and after the last
    assert all("test_accuracy" in r and "val_accuracy" in r and "train_loss" in r for r in records)
    assert load_config(reference / "config.toml") == config(*TINY)
    assert (reference / "checkpoint.pt").is_file()
    assert load_checkpoint(reference)["round"] == 7


# -- resume ---------------------------------------------------------------------------------------

class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_at", [5, 7])
def test_resume_after_in_process_crash_is_exact(tmp_path, reference, monkeypatch, crash_at):
    original = Simulation.run_round

    def crashing(self, r):
        if r == crash_at:
            raise Crash(f"simulated crash in round {r}")
        return original(self, r)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(Simulation, "run_round", crashing)
    with pytest.raises(Crash):
        run(config(*TINY), run_dir=run_dir, progress=False)
    assert not (run_dir / "summary.json").exists()
    last_saved = (crash_at - 1) // 2 * 2
    assert load_checkpoint(run_dir)["round"] == last_saved

    rounds_run = []

    def counting(self, r):
        rounds_run.append(r)
        return original(self, r)

    monkeypatch.setattr(Simulation, "run_round", counting)
    run(config(*TINY), run_dir=run_dir, resume=True, progress=False)  # a fresh build, as a new process
    assert rounds_run == list(range(last_saved + 1, 8))
    assert read_run(run_dir) == read_run(reference)


def test_resume_of_a_finished_run_changes_nothing(tmp_path, reference):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    run(config(*TINY), run_dir=run_dir, resume=True, progress=False)
    assert read_run(run_dir) == read_run(reference)


def test_resume_after_sigkill_of_the_cli_is_exact(tmp_path, reference):
    run_dir = tmp_path / "killed"
    args = [sys.executable, "-m", "shn.cli", "run", str(QUICKSTART), "--out", str(run_dir), "--no-progress"]
    for o in KILLED:
        args += ["--set", o]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        # kill once two checkpoints and an evaluation exist (so metrics.jsonl must be rewritten)
        while not ((run_dir / "checkpoint.prev.pt").exists() and (run_dir / "metrics.jsonl").exists()
                   and (run_dir / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = load_checkpoint(run_dir)["round"]
    assert 2 <= killed_at < 20

    resumed = subprocess.run(args + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    uninterrupted = tmp_path / "uninterrupted"
    run(config(*KILLED), run_dir=uninterrupted, progress=False)
    summary, records = read_run(run_dir)
    assert (summary, records) == read_run(uninterrupted)
    assert [r["round"] for r in records] == [3, 6, 9, 12, 15, 18, 20]  # no duplicates, none lost
    printed = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert printed["test_accuracy"] == round(summary["metrics"]["test_accuracy"], 4)


# -- corrupt checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, caplog, damage):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoint.pt"
    data = newest.read_bytes()
    newest.write_bytes({"garbage": b"not a checkpoint" * 100, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(run_dir)
    assert state["round"] == 6  # checkpoint.prev.pt
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint.pt" in w and "corrupt" in w for w in warnings), warnings
    # resuming from the previous checkpoint still gives exactly the uninterrupted numbers
    (run_dir / "summary.json").unlink()
    newest.write_bytes({"garbage": b"not a checkpoint" * 100, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    run(config(*TINY), run_dir=run_dir, resume=True, progress=False)
    assert read_run(run_dir) == read_run(reference)
    assert load_checkpoint(run_dir)["round"] == 7


def test_all_checkpoints_corrupt_is_a_checkpoint_error_naming_the_file(tmp_path, reference, capsys):
    import shutil

    from shn import cli

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "checkpoint.pt").write_bytes(b"\x00" * 64)
    (run_dir / "checkpoint.prev.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(run_dir)
    assert str(run_dir / "checkpoint.pt") in str(info.value)
    assert str(run_dir / "checkpoint.prev.pt") in str(info.value)
    # the files are left for the user to inspect
    assert (run_dir / "checkpoint.pt").read_bytes() == b"\x00" * 64
    # and the CLI reports it as one line, exit 2
    argv = ["run", str(QUICKSTART), "--out", str(run_dir), "--resume", "--no-progress"]
    for o in TINY:
        argv += ["--set", o]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "checkpoint.pt" in lines[0]


def test_resume_without_checkpoint_starts_fresh(tmp_path, reference):
    run(config(*TINY), run_dir=tmp_path / "fresh", resume=True, progress=False)
    assert read_run(tmp_path / "fresh") == read_run(reference)


def test_metrics_are_finite_numbers(reference):
    summary, records = read_run(reference)
    for rec in records + [summary["metrics"]]:
        for k, v in rec.items():
            if isinstance(v, float):
                assert math.isfinite(v), (k, v)
