"""shn sweep: search-space validation, a 2-worker SQLite sweep that prunes, resumes after an
interruption without repeating trials and writes a runnable best config, the exact trial budget
under concurrent workers (--trials N adds N), a resumed study's new trials differ from its old
ones, --trials 0, and seed → trial-sequence determinism (tiny digits runs)."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import optuna
import pytest

from shn.cli import main
from shn.config import ConfigError, load_config
from shn.sweep import Objective, _Spec, _work, open_storage, parse_space, sweep
from tests.conftest import tiny_digits_toml

TINY = tiny_digits_toml("local", rounds=3)


def write_config(tmp_path: Path, sweep_table: str, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(TINY + "\n[sweep]\n" + sweep_table)
    return path


@pytest.mark.parametrize("table, message", [
    ({"server.lr": {"type": "normal", "low": 0, "high": 1}}, r"sweep\.'server\.lr'\.type: 'normal' is not allowed"),
    ({"server.lr": {"type": "float", "low": 1.0, "high": 0.1}}, r"low = 1\.0 is greater than high = 0\.1"),
    ({"server.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, r"log = true needs low > 0"),
    ({"server.lr": {"type": "float", "high": 0.1}}, r"\.low: required"),
    ({"local.steps": {"type": "int", "low": 1.5, "high": 4}}, r"\.low: expected an integer"),
    ({"encoder.sheaf_type": {"type": "categorical", "choices": []}}, r"\.choices: expected a non-empty list"),
    ({"server.lr": {"type": "float", "low": 0.1, "high": 0.2, "scale": 2}}, r"\.scale: unknown key"),
    ({"server.lr": 0.1}, r"expected a distribution table"),
])
def test_space_validation(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(table)


def test_space_must_name_valid_config_values(tmp_path):
    cfg = write_config(tmp_path, '"server.lrr" = { type = "float", low = 0.01, high = 0.1 }\n')
    with pytest.raises(ConfigError, match=r"server\.lrr.*unknown key"):
        sweep(cfg, trials=1, out=tmp_path / "out")
    cfg = write_config(tmp_path, '"encoder.sheaf_type" = { type = "categorical", choices = ["diag", "round"] }\n')
    with pytest.raises(ConfigError, match=r"encoder\.sheaf_type = 'round' does not make a valid config"):
        sweep(cfg, trials=1, out=tmp_path / "out")
    cfg = tmp_path / "plain.toml"
    cfg.write_text(TINY)
    with pytest.raises(ConfigError, match=r"no \[sweep\] table"):
        sweep(cfg, trials=1, out=tmp_path / "out")


def test_sqlite_two_workers_prune_resume_and_best_config(tmp_path):
    """2 trials, then an interruption (a trial left RUNNING), then 2 more trials: 2 new trials
    run, the interrupted one is not counted, the bad ones are pruned at their first
    report by an aggressive MedianPruner, and best.toml runs with `shn run`."""
    cfg = write_config(tmp_path, '"local.lr" = { type = "categorical", choices = [0.05, 0.0] }\n')
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "sweep"
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    for _ in range(2):  # lr = 0.05 learns (val acc ~0.6), lr = 0.0 does not (~0.2)
        study.enqueue_trial({"local.lr": 0.05})
    aggressive = dict(pruner="median", n_startup_trials=1, n_warmup_steps=0)

    first = sweep(cfg, trials=2, storage=storage, workers=2, study_name="tiny", out=out, progress=False, **aggressive)
    assert (first["trials"], first["complete"]) == (2, 2)
    assert (out / ".sweep-spec.json").is_file() and not list(out.glob("*.pkl"))  # workers get JSON
    done = {t.number: t.datetime_complete for t in study.get_trials()}
    summaries = {n: (out / "trials" / f"{n:04d}" / "summary.json").stat().st_mtime_ns for n in done}

    study.ask()  # a worker killed mid-trial leaves a RUNNING trial behind
    for _ in range(2):
        study.enqueue_trial({"local.lr": 0.0})
    second = sweep(cfg, trials=2, storage=storage, workers=2, study_name="tiny", out=out, progress=False, **aggressive)

    trials = study.get_trials()
    assert len(trials) == 5 and second["interrupted"] == [2]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "PRUNED"]
    assert {t.number: t.datetime_complete for t in trials[:2]} == done  # finished trials not re-run
    assert {n: (out / "trials" / f"{n:04d}" / "summary.json").stat().st_mtime_ns for n in done} == summaries
    assert all(sorted(t.intermediate_values) == [1] for t in trials[3:])  # pruned at the first report
    assert second["pruned"] == 2 and second["best_params"] == {"local.lr": 0.05}

    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "PRUNED"]
    assert [r["interrupted"] for r in rows] == ["False", "False", "True", "False", "False"]
    best = out / "best.toml"
    assert "[sweep]" not in best.read_text()
    config = load_config(best)
    assert config.local.lr == 0.05 and config.method == "local" and not config.sweep
    assert main(["run", str(best), "--out", str(tmp_path / "best_run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "best_run" / "summary.json").read_text())
    assert summary["metrics"]["val_accuracy"] == pytest.approx(second["best_value"])  # same config, same seed

    other = write_config(tmp_path, '"local.lr" = { type = "float", low = 0.01, high = 0.1 }\n', "other.toml")
    with pytest.raises(ConfigError, match="different \\[sweep\\] table"):
        sweep(other, trials=5, storage=storage, study_name="tiny", out=out, progress=False)


class _Sleepy(Objective):
    """A stand-in objective (no training) to test how concurrent workers share the budget."""

    def __call__(self, trial):
        import time

        time.sleep(0.05)
        return trial.suggest_float("x", 0.0, 1.0)


def test_concurrent_workers_share_an_exact_budget(tmp_path):
    storage = str(tmp_path / "journal.log")
    optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    spec = _Spec({}, {}, storage, "s", 7, str(tmp_path), 0, optuna.pruners.NopPruner(),
                 str(tmp_path / "claim.lock"), None, False)
    threads = [threading.Thread(target=_work, args=(spec, w, _Sleepy({}, {}, tmp_path))) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = optuna.load_study(study_name="s", storage=open_storage(storage)).get_trials()
    assert len(trials) == 7 and all(t.state.name == "COMPLETE" for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1, 2}


def test_same_seed_same_trial_sequence(tmp_path):
    cfg = write_config(tmp_path, '"local.lr" = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
                                 '"local.batch_size" = { type = "categorical", choices = [8, 16] }\n')
    runs = []
    for name in ("a", "b"):
        sweep(cfg, trials=3, storage=str(tmp_path / f"{name}.journal"), out=tmp_path / name, overrides=["rounds=1"],
              progress=False)
        study = optuna.load_study(study_name="tiny", storage=open_storage(str(tmp_path / f"{name}.journal")))
        runs.append([t.params for t in study.get_trials()])
    assert len(runs[0]) == 3 and runs[0] == runs[1]
    assert len({json.dumps(p, sort_keys=True) for p in runs[0]}) == 3


def test_a_resumed_study_never_repeats_its_trials(tmp_path):
    """Resuming re-seeds the sampler from the study's trial count: the new trials are not the
    old ones replayed (an identically re-seeded sampler proposed exactly those), and --trials N
    adds N (also with 2 workers)."""
    cfg = write_config(tmp_path, '"local.lr" = { type = "float", low = 1e-3, high = 1e-1, log = true }\n'
                                 '"local.momentum" = { type = "float", low = 0.0, high = 0.9 }\n')
    storage, out = str(tmp_path / "s.journal"), tmp_path / "out"
    kwargs = dict(storage=storage, out=out, overrides=["rounds=1"], progress=False, pruner="none")
    sweep(cfg, trials=2, **kwargs)
    second = sweep(cfg, trials=2, workers=2, **kwargs)
    assert second["trials"] == 4 and second["complete"] == 4
    trials = optuna.load_study(study_name="tiny", storage=open_storage(storage)).get_trials()
    old = [json.dumps(t.params, sort_keys=True) for t in trials[:2]]
    new = [json.dumps(t.params, sort_keys=True) for t in trials[2:]]
    assert not set(old) & set(new), (old, new)
    third = sweep(cfg, trials=1, **kwargs)
    assert third["trials"] == 5
    params = [json.dumps(t.params, sort_keys=True) for t in
              optuna.load_study(study_name="tiny", storage=open_storage(storage)).get_trials()]
    assert len(set(params)) == 5


def test_trials_zero_on_a_finished_study_says_so_in_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path, '"local.lr" = { type = "float", low = 1e-3, high = 1e-1, log = true }\n')
    args = ["sweep", str(cfg), "--storage", str(tmp_path / "s.journal"), "--out", str(tmp_path / "out"),
            "--no-progress", "--set", "rounds=1"]
    assert main(args + ["--trials", "0"]) == 2  # no study yet: nothing to report
    assert "does not exist" in capsys.readouterr().err
    assert main(args + ["--trials", "1"]) == 0
    capsys.readouterr()
    (tmp_path / "out" / "trials.csv").unlink()
    assert main(args + ["--trials", "0"]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "already has 1 trials (1 complete" in err and "--trials 0 adds none" in err
    assert json.loads(captured.out)["trials"] == 1 and (tmp_path / "out" / "trials.csv").is_file()
    assert main(args + ["--trials", "-1"]) == 2
    assert "--help" not in capsys.readouterr().err


def test_python_api_objective_example(tmp_path):
    """experiments/objective.py: an optuna objective over shn.run, importable and runnable."""
    import importlib.util

    from shn.config import config_from_dict
    import tomllib

    path = Path(__file__).resolve().parents[1] / "experiments" / "objective.py"
    spec = importlib.util.spec_from_file_location("objective_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = config_from_dict(tomllib.loads(TINY.replace("rounds = 3", "rounds = 1")))
    objective, direction = module.make_objective(config, run_root=str(tmp_path))
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=1)
    assert direction == "maximize" and 0.0 <= study.best_value <= 1.0
    assert set(study.best_params) == {"server.lr", "local.lr", "local.steps"}
    assert (tmp_path / "trial0000" / "summary.json").is_file()


# -- hostile inputs (issue 15): the worker spec, broken storages, a second command -------------------

class _Marker:
    """Unpickling this creates the file ``path`` (what a crafted pickle would do)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_worker_spec_travels_as_json_and_a_pickle_is_never_read(tmp_path):
    import pickle

    from shn.sweep import _worker_main

    space = parse_space({"local.lr": {"type": "categorical", "choices": [0.05, 0.0]},
                         "server.lr": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True}})
    spec = _Spec({"method": "local"}, space, "j.log", "s", 3, str(tmp_path), 0, None, "x.lock", 2, False,
                 pruner_args={"pruner": "median", "n_startup_trials": 2, "n_warmup_steps": 1})
    back = _Spec.from_json(spec.to_json())
    assert back.space == space and back.base_data == spec.base_data and back.trials == 3 and back.threads == 2
    assert isinstance(back.pruner, optuna.pruners.MedianPruner)
    with pytest.raises(ConfigError, match="pruner object cannot be sent"):
        _Spec({}, space, "j", "s", 1, "o", 0, optuna.pruners.NopPruner(), "l", None, False).to_json()
    hostile = tmp_path / ".sweep-spec.pkl"
    hostile.write_bytes(pickle.dumps(_Marker(tmp_path / "pwned")))
    with pytest.raises(ValueError):  # not JSON: refused, never unpickled
        _worker_main(str(hostile), 1)
    assert not (tmp_path / "pwned").exists()


def _corrupt_journal(path: Path) -> str:
    study = optuna.create_study(study_name="s", storage=open_storage(str(path)))
    study.enqueue_trial({"x": 0.5})
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + ["{garbage"] + lines[1:]) + "\n")
    return str(path)


@pytest.mark.parametrize("make_url, message", [
    (lambda d: (d / "bad.db").write_bytes(b"not a database " * 200) and f"sqlite:///{d / 'bad.db'}",
     "cannot open the study storage"),
    (lambda d: _corrupt_journal(d / "bad.journal"), "cannot open the study storage"),
    (lambda d: "postgresql://user@127.0.0.1:1/db", "database driver for 'postgresql' is not installed"),
    (lambda d: "bogus://x", "unknown database scheme 'bogus'"),
])
def test_broken_storage_is_one_line_exit_2(tmp_path, capsys, make_url, message):
    pytest.importorskip("sqlalchemy")
    url = make_url(tmp_path)
    if url.startswith("postgresql"):
        try:
            import psycopg2  # noqa: F401
            pytest.skip("psycopg2 is installed here")
        except ImportError:
            pass
    cfg = write_config(tmp_path, '"local.lr" = { type = "float", low = 0.01, high = 0.1 }\n')
    assert main(["sweep", str(cfg), "--trials", "1", "--storage", url, "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and url in err


def test_a_second_command_never_fails_the_live_commands_trial(tmp_path):
    """A live command holds the study's command lock (simulated here by holding it shared, as
    each worker does): a second command joins and shares the budget, leaving the first's
    RUNNING trial alone; once nobody holds the lock, a RUNNING trial is an interrupted one."""
    import fcntl

    from shn.sweep_storage import command_lock_path, lock_path

    cfg = write_config(tmp_path, '"local.lr" = { type = "categorical", choices = [0.05, 0.0] }\n')
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "sweep"
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    live = study.ask()  # the first command's trial, still running
    held = open(command_lock_path(lock_path(storage, out), "tiny"), "a")
    fcntl.flock(held, fcntl.LOCK_SH)
    try:
        second = sweep(cfg, trials=2, storage=storage, study_name="tiny", out=out, progress=False, overrides=["rounds=1"])
        assert study.get_trials()[live.number].state.name == "RUNNING"
        # the command adds its own 2 trials; the live command's trial is left alone
        assert second["running"] == 1 and second["complete"] == 2 and second["interrupted"] == []
        study.tell(live, 0.5)  # the first command finishes its trial normally
    finally:
        held.close()
    assert study.get_trials()[live.number].state.name == "COMPLETE"
    orphan = study.ask()  # now left RUNNING by a command that died
    third = sweep(cfg, trials=1, storage=storage, study_name="tiny", out=out, progress=False, overrides=["rounds=1"])
    assert third["interrupted"] == [orphan.number] and third["complete"] == 4
