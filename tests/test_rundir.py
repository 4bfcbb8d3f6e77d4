"""The run directory (shn.rundir, issue 15 items 9-12 and 18): a finished or unfinished run is not
replaced without --resume or --force, two processes never write one directory, a resume continues
the same run (another training config is refused before anything is written; rounds may only
grow, which extends the run exactly), and an --out that cannot be a directory is one line."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shn.cli import main
from shn.config import config_from_dict, dumps_toml, load_config
from shn.federated.records import read_jsonl
from shn.runner import load_run, run
from shn.rundir import LOCK, RunDirError, resume_conflicts
from tests.conftest import state_hash, with_changes

REPO = Path(__file__).resolve().parents[1]
TINY = {"seed": 0, "rounds": 2, "clients_per_round": 3, "eval_every": 1, "checkpoint_every": 1,
        "task": {"name": "digits", "num_clients": 4, "model": "mlp"}, "local": {"steps": 1, "batch_size": 16}}


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv] + ["--no-progress"])
    return code, capsys.readouterr().err.strip()


def _one_line(err: str, *words: str) -> None:
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file() and p.name != LOCK}


@pytest.fixture
def finished(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml(TINY))
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--no-progress"]) == 0
    return cfg, run_dir


class _Crash(Exception):
    pass


def _crash_at(round_: int):
    def on_eval(r, record):
        if r == round_:
            raise _Crash

    return on_eval


# -- 9: a finished run is not replaced silently -----------------------------------------------------

def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(finished, capsys):
    cfg, run_dir = finished
    before = _snapshot(run_dir)
    code, err = _cli(capsys, "run", cfg, "--out", run_dir, "--set", "server.lr=0.5")
    assert code == 2
    _one_line(err, str(run_dir), "finished run", "--resume", "--force")
    assert _snapshot(run_dir) == before


def test_force_replaces_the_run_and_keeps_nothing_of_it(finished, capsys):
    cfg, run_dir = finished
    code, _ = _cli(capsys, "run", cfg, "--out", run_dir, "--force", "--set", "rounds=1", "--set", "checkpoint_every=0")
    assert code == 0
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert not (run_dir / "checkpoint.prev.pt").exists()  # the old run's checkpoints are gone, not resumable
    assert load_run(run_dir).summary["rounds"] == 1 and load_config(run_dir / "config.toml").rounds == 1
    with pytest.raises(SystemExit) as info:  # argparse: the two exclude each other
        main(["run", str(cfg), "--out", str(run_dir), "--force", "--resume"])
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_python_api_refuses_unless_resume_or_overwrite(finished):
    cfg, run_dir = finished
    config = load_config(cfg)
    before = _snapshot(run_dir)
    with pytest.raises(RunDirError, match="holds a finished run"):
        run(config, run_dir=run_dir, progress=False)
    with pytest.raises(RunDirError, match="exclude each other"):
        run(config, run_dir=run_dir, resume=True, overwrite=True, progress=False)
    assert _snapshot(run_dir) == before
    resumed = run(config, run_dir=run_dir, resume=True, progress=False)  # nothing left to do
    assert resumed.summary["metrics"] == load_run(run_dir).summary["metrics"]
    again = run(config, run_dir=run_dir, overwrite=True, progress=False)
    assert again.summary["metrics"] == resumed.summary["metrics"]


def test_unfinished_run_is_continued_only_with_resume(tmp_path):
    config = config_from_dict(with_changes(TINY, rounds=3))
    ref = run(config, progress=False)
    with pytest.raises(_Crash):
        run(config, run_dir=tmp_path, progress=False, on_eval=_crash_at(2))
    with pytest.raises(RunDirError, match=r"holds an unfinished run \(checkpoint.pt\); use --resume"):
        run(config, run_dir=tmp_path, progress=False)
    got = run(config, run_dir=tmp_path, resume=True, progress=False)
    assert state_hash(got.algorithm.state_dict()) == state_hash(ref.algorithm.state_dict())


# -- 18: --out that cannot be a directory ------------------------------------------------------------

@pytest.mark.parametrize("below", ["", "inner"])
def test_out_naming_a_file_is_one_line(tmp_path, capsys, below):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml(TINY))
    file = tmp_path / "file"
    file.write_text("keep me")
    out = file / below if below else file
    code, err = _cli(capsys, "run", cfg, "--out", out)
    assert code == 2
    _one_line(err, str(out))
    assert ("is not a directory" in err) if not below else ("cannot create the run directory" in err)
    assert file.read_text() == "keep me"


# -- 10: one writer per run directory -----------------------------------------------------------------

HOLD = "import sys\nfrom shn.rundir import locked\nwith locked(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"


def test_a_second_process_on_a_locked_run_dir_exits_2_naming_the_holder(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml(TINY))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--resume"], ["--force"]):
            code, err = _cli(capsys, "run", cfg, "--out", run_dir, *extra)
            assert code == 2
            _one_line(err, str(run_dir), "in use by another shn process", f"pid {holder.pid}")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    code, _ = _cli(capsys, "run", cfg, "--out", run_dir)
    assert code == 0


def _free(run_dir: Path) -> bool:
    """Can another process take the lock right now?"""
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", probe, str(run_dir / LOCK)]).returncode == 0


def test_the_lock_is_held_during_the_run_and_released_after_it_even_after_a_failure(tmp_path):
    config = config_from_dict(TINY)
    seen = []
    run(config, run_dir=tmp_path / "a", progress=False, on_eval=lambda r, rec: seen.append(_free(tmp_path / "a")))
    assert seen == [False, False] and _free(tmp_path / "a")
    with pytest.raises(_Crash):
        run(config, run_dir=tmp_path / "b", progress=False, on_eval=_crash_at(1))
    assert _free(tmp_path / "b")
    fd = os.open(tmp_path / "b" / LOCK, os.O_RDWR)  # and this process does not keep it either
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# -- 11: resume continues the same run --------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("server.lr=0.5", "server.lr"),
    ('method="fedavg"', "method"),
    ("local.steps=2", "local.steps"),
    ("task.num_clients=5", "task.num_clients"),
    ("seed=1", "seed"),
    ("validation.max_norm=10", "validation.max_norm"),
])
def test_resume_with_another_training_config_is_refused_before_anything_is_written(finished, capsys, override, key):
    cfg, run_dir = finished
    before = _snapshot(run_dir)
    code, err = _cli(capsys, "run", cfg, "--out", run_dir, "--resume", "--set", override)
    assert code == 2
    _one_line(err, str(run_dir), "cannot resume with another config", key, "config.toml", "--force")
    assert _snapshot(run_dir) == before


def test_resume_of_an_unfinished_run_with_another_lr_writes_nothing(tmp_path):
    config = config_from_dict(with_changes(TINY, rounds=3))
    with pytest.raises(_Crash):
        run(config, run_dir=tmp_path, progress=False, on_eval=_crash_at(2))
    before = _snapshot(tmp_path)
    other = config_from_dict(with_changes(TINY, rounds=3, **{"local.lr": 0.5}))
    with pytest.raises(RunDirError, match=r"local.lr: 0.005 -> 0.5"):
        run(other, run_dir=tmp_path, resume=True, progress=False)
    assert _snapshot(tmp_path) == before


def test_resume_may_change_where_it_runs_and_what_it_evaluates(finished, capsys):
    cfg, run_dir = finished
    code, _ = _cli(capsys, "run", cfg, "--out", run_dir, "--resume", "--set", 'device="cpu"', "--set", "eval_every=2",
                   "--set", "checkpoint_every=0", "--set", 'methods.fedavg.aggregation="median"')
    assert code == 0
    stored = load_config(run_dir / "config.toml")
    assert stored.eval_every == 2  # the run's config records the values it continued with


def test_resume_conflicts_lists_only_training_keys():
    a = config_from_dict(TINY)
    b = config_from_dict(with_changes(TINY, rounds=9, eval_every=3, device="cpu", **{"local.lr": 0.1, "novel.steps": 7,
                                                                                     "sweep": {"local.lr": {"low": 0.1}}}))
    assert resume_conflicts(a, b) == ["local.lr"]
    assert resume_conflicts(a, b, ignore=("local",)) == []
    fedavg = with_changes(TINY, method="fedavg")
    defaults_given = config_from_dict(with_changes(fedavg, **{"methods.fedavg.aggregation": "mean"}))
    assert resume_conflicts(config_from_dict(fedavg), defaults_given) == []  # the same options, spelt out
    median = config_from_dict(with_changes(fedavg, **{"methods.fedavg.aggregation": "median"}))
    assert resume_conflicts(config_from_dict(fedavg), median) == ["methods.fedavg.aggregation"]


# -- 12: rounds may grow, not shrink ---------------------------------------------------------------

def test_resume_with_fewer_rounds_is_refused(finished, capsys):
    cfg, run_dir = finished
    before = _snapshot(run_dir)
    code, err = _cli(capsys, "run", cfg, "--out", run_dir, "--resume", "--set", "rounds=1")
    assert code == 2
    _one_line(err, "rounds: 1 is fewer than the 2 rounds", "keeps or extends")
    assert _snapshot(run_dir) == before


def test_resume_with_more_rounds_extends_the_run_exactly(finished, capsys):
    cfg, run_dir = finished
    code, _ = _cli(capsys, "run", cfg, "--out", run_dir, "--resume", "--set", "rounds=4")
    assert code == 0
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    extended = load_run(run_dir)
    assert extended.summary["rounds"] == 4 and extended.config.rounds == 4
    ref = run(config_from_dict(with_changes(TINY, rounds=4)), progress=False)
    assert state_hash(extended.algorithm.state_dict()) == state_hash(ref.algorithm.state_dict())
    assert extended.summary["metrics"] == ref.summary["metrics"]


# -- the pipeline's run directory and its stages ----------------------------------------------------

def test_pipeline_run_dir_is_refused_resumed_extended_and_forced(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml(with_changes(TINY, method="shn", **{"graph.kind": "knn", "graph.k": 2,
                                                                  "hypernetwork.hidden": 16, "encoder.layers": 1})))
    out = tmp_path / "run"
    assert _cli(capsys, "pipeline", cfg, "--out", out)[0] == 0
    before = _snapshot(out / "stage3_shn")
    code, err = _cli(capsys, "pipeline", cfg, "--out", out)
    assert code == 2
    _one_line(err, "finished pipeline run", "--resume", "--force")
    code, err = _cli(capsys, "run", cfg, "--out", out, "--resume", "--set", "rounds=3")  # stage 1 would change
    assert code == 2
    _one_line(err, "stage 3 was trained on the graph of a 2-round stage 1", "graph.stage1_rounds = 2")
    code, err = _cli(capsys, "run", cfg, "--out", out, "--resume", "--set", "encoder.layers=2")
    assert code == 2
    _one_line(err, "stage3_shn", "encoder.layers")
    assert _snapshot(out / "stage3_shn") == before
    code, _ = _cli(capsys, "run", cfg, "--out", out, "--resume", "--set", "rounds=3", "--set", "graph.stage1_rounds=2")
    assert code == 0
    assert [r["round"] for r in read_jsonl(out / "stage3_shn" / "metrics.jsonl")] == [1, 2, 3]
    assert [r["round"] for r in read_jsonl(out / "stage1_pfedhn" / "metrics.jsonl")] == [1, 2]
    assert _cli(capsys, "pipeline", cfg, "--out", out, "--force")[0] == 0
    assert [r["round"] for r in read_jsonl(out / "stage3_shn" / "metrics.jsonl")] == [1, 2]
