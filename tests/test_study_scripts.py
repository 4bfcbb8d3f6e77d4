"""The issue-19 study's suite generators (experiments/study): every generated suite parses, every
trial of a setting gets the same client-update budget, and a setting without a given graph tunes
and runs its graph methods on the inferred kNN graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments" / "study"))

import choose_trials  # noqa: E402
import make_grids  # noqa: E402

from shn.suite import load_suite  # noqa: E402


def _budget(job) -> int:
    """Client updates of a run, stage 1 included."""
    cfg = job.config()
    stage1 = cfg.graph.stage1_rounds if cfg.method in ("shn", "ghn", "panacea") and cfg.graph.kind == "knn" else 0
    return (cfg.rounds + (stage1 or 0)) * cfg.clients_per_round


def _jobs(text: str, tmp_path: Path, monkeypatch) -> list:
    monkeypatch.chdir(ROOT)  # suites name their configs relative to the repository
    path = tmp_path / "suite.toml"
    path.write_text(text)
    jobs, _ = load_suite(path, out=tmp_path / "out")
    return jobs


@pytest.mark.parametrize("setting", sorted(make_grids.SETTINGS))
def test_grid_is_committed_and_budgets_are_equal(setting, tmp_path, monkeypatch):
    text = make_grids.grid_text(setting)
    assert (ROOT / "experiments" / "study" / f"{setting}_grid.toml").read_text() == text, \
        "the committed grid is stale: run python experiments/study/make_grids.py"
    jobs = _jobs(text, tmp_path, monkeypatch)
    assert len(jobs) == 4 * 9  # 4 trials for each of the 9 methods
    assert len({_budget(j) for j in jobs}) == 1
    graph_jobs = [j for j in jobs if j.method in ("shn", "ghn", "panacea")]
    kinds = {j.config().graph.kind for j in graph_jobs}
    if setting in make_grids.KNN_ONLY:
        assert kinds == {"knn"}
        assert {j.config().graph.stage3_init for j in graph_jobs} == {"full"}
        assert {j.config().hypernetwork.graph_branch for j in graph_jobs} == {"residual"}
    else:
        assert kinds == {"given"}


def _fake_best(setting: str) -> dict[str, dict]:
    """Each method's first phase-A trial as its choice (the selection itself is not under test)."""
    import tomllib

    grid = tomllib.loads(make_grids.grid_text(setting))
    best: dict[str, dict] = {}
    for v in grid["runs"][0]["methods"]:
        best.setdefault(v["method"], {"set": list(v["set"])})
    return best


@pytest.mark.parametrize("setting", ["cifar10", "losloop"])
def test_tuned_suite_pairs_methods_at_equal_budget(setting, tmp_path, monkeypatch):
    import shn  # noqa: F401  (registers the methods)

    text = choose_trials.tuned_suite(setting, _fake_best(setting))
    jobs = _jobs(text, tmp_path, monkeypatch)
    budgets = {_budget(j) for j in jobs}
    assert len(budgets) == 1
    assert f"Equal budget: {budgets.pop()} client updates" in text
    assert {j.seed for j in jobs} == {0, 1, 2, 3, 4}
    names = {j.variant for j in jobs}
    if setting in make_grids.KNN_ONLY:
        assert names == {"pfedhn", "fedavg", "local", "ghn-knn", "panacea-knn", "shn-knn", "shn-knn-fresh",
                         "fedprox", "ditto", "fedrep"}
        assert {j.entry for j in jobs} == {"cifar10-dir0.1"}  # the paired table's setting name
        fresh = next(j for j in jobs if j.variant == "shn-knn-fresh").config()
        assert (fresh.graph.stage3_init, fresh.hypernetwork.graph_branch) == ("embeddings", "replace")
        assert all(j.config().graph.kind == "knn" for j in jobs if j.method in ("shn", "ghn", "panacea"))
    else:
        assert {"ghn-given", "shn-given", "shn-knn", "ghn-knn", "shn-given-replace"} <= names


def test_readme_switches_to_the_tuned_suite_only_once_all_its_runs_finished(tmp_path, monkeypatch):
    import update_readme

    monkeypatch.chdir(ROOT)
    suite = tmp_path / "tuned.toml"
    suite.write_text('[[runs]]\nname = "s"\nconfig = "experiments/configs/quickstart.toml"\nseeds = [0, 1]\n'
                     'methods = ["pfedhn", "fedavg"]\n')
    monkeypatch.setitem(update_readme.TUNED, "s", (str(suite), "s-tuned"))
    study = tmp_path / "study"
    assert update_readme.setting_root(study, "s") == study / "s"  # nothing of it ran yet
    jobs, _ = load_suite(suite, out=study / "s-tuned")
    for job in jobs[:-1]:
        job.run_dir.mkdir(parents=True)
        (job.run_dir / "summary.json").write_text("{}")
    assert update_readme.setting_root(study, "s") == study / "s"  # one run missing
    jobs[-1].run_dir.mkdir(parents=True)
    (jobs[-1].run_dir / "summary.json").write_text("{}")
    assert update_readme.setting_root(study, "s") == study / "s-tuned"
    assert update_readme.setting_root(study, "losloop") == study / "losloop"  # no tuned suite of its own
