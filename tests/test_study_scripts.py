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


def test_lr_control_is_committed_and_drops_only_the_graph(tmp_path, monkeypatch):
    import shn  # noqa: F401  (registers the methods)
    import lr_control

    text = lr_control.control_suite("cifar10")
    assert (ROOT / "experiments" / "study" / "cifar10_control.toml").read_text() == text, \
        "the committed control suite is stale: run python experiments/study/lr_control.py cifar10"
    tuned = {j.label: j for j in _jobs((ROOT / "experiments/study/cifar10_tuned.toml").read_text(), tmp_path, monkeypatch)}
    (tmp_path / "control").mkdir()
    jobs = _jobs(text, tmp_path / "control", monkeypatch)
    assert {j.variant for j in jobs} == {"pfedhn-as-shn-knn", "pfedhn-as-ghn-knn"}
    for job in jobs:
        cfg = job.config()
        graph = next(t for t in tuned.values() if t.variant == job.variant.removeprefix("pfedhn-as-")
                     and t.seed == job.seed)
        assert cfg.method == "pfedhn" and job.entry == "cifar10-dir0.1"
        assert (cfg.server, cfg.local) == (graph.config().server, graph.config().local)  # its learning rates
        assert _budget(job) == _budget(graph) == 500


def test_control_rows_pair_each_graph_method_with_its_control(tmp_path):
    import json

    import update_readme

    def write(root: Path, method: str, values: list[float]) -> None:
        for seed, v in enumerate(values):
            d = root / "s" / method / f"seed{seed}"
            d.mkdir(parents=True)
            summary = {"primary_metric": "test_accuracy", "metrics": {"test_accuracy": v},
                       "best_val": {"round": 1, "metrics": {"test_accuracy": v}}, "budget": {"client_updates": 10}}
            (d / "summary.json").write_text(json.dumps(summary))

    root = tmp_path / "s-tuned"
    write(root, "pfedhn", [0.5, 0.6, 0.7])
    write(root, "shn-knn", [0.7, 0.8, 0.9])
    assert update_readme.control_rows([root]) == []  # no control folder yet
    write(tmp_path / "s-tuned-control", "pfedhn-as-shn-knn", [0.6, 0.7, 0.8])
    rows = {r.method: r for r in update_readme.control_rows([root])}
    assert set(rows) == {"pfedhn-as-shn-knn vs pfedhn", "shn-knn vs pfedhn-as-shn-knn"}
    assert abs(rows["pfedhn-as-shn-knn vs pfedhn"].diff_mean - 0.1) < 1e-9
    assert abs(rows["shn-knn vs pfedhn-as-shn-knn"].diff_mean - 0.1) < 1e-9


def test_oracle_suite_changes_only_the_graph_of_the_tuned_methods(tmp_path, monkeypatch):
    """cifar10_oracle.toml is hand-written: each oracle run must be its tuned kNN twin with the
    label graph in place of stage 1 + kNN graph, at the same 500 client updates."""
    import shn  # noqa: F401  (registers the methods)

    tuned = _jobs((ROOT / "experiments/study/cifar10_tuned.toml").read_text(), tmp_path, monkeypatch)
    (tmp_path / "oracle").mkdir()
    jobs = _jobs((ROOT / "experiments/study/cifar10_oracle.toml").read_text(), tmp_path / "oracle", monkeypatch)
    assert {j.variant for j in jobs} == {"shn-labels", "ghn-labels"} and {j.seed for j in jobs} == set(range(5))
    for job in jobs:
        cfg = job.config()
        twin = next(t for t in tuned if t.variant == job.variant.replace("-labels", "-knn") and t.seed == job.seed)
        ref = twin.config()
        assert cfg.graph.kind == "labels" and cfg.graph.k == ref.graph.k
        assert (cfg.method, cfg.server, cfg.local, cfg.encoder) == (ref.method, ref.server, ref.local, ref.encoder)
        assert cfg.hypernetwork == ref.hypernetwork and cfg.task == ref.task and job.entry == twin.entry
        assert _budget(job) == _budget(twin) == 500


def test_oracle_rows_read_the_oracle_folder(tmp_path):
    import json

    import update_readme

    for root, method, values in (("s-tuned", "pfedhn", [0.5, 0.6]), ("s-tuned", "shn-knn", [0.6, 0.6]),
                                 ("s-tuned-oracle", "shn-labels", [0.7, 0.9])):
        for seed, v in enumerate(values):
            d = tmp_path / root / "s" / method / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({
                "primary_metric": "test_accuracy", "metrics": {"test_accuracy": v},
                "best_val": {"round": 1, "metrics": {"test_accuracy": v}}, "budget": {"client_updates": 10}}))
    rows = {r.method: r for r in update_readme.control_rows([tmp_path / "s-tuned"], "oracle", update_readme.ORACLE_PAIRS)}
    assert set(rows) == {"shn-labels vs pfedhn", "shn-labels vs shn-knn"}
    assert abs(rows["shn-labels vs pfedhn"].diff_mean - 0.25) < 1e-9 and abs(rows["shn-labels vs shn-knn"].diff_mean - 0.2) < 1e-9


def test_graph_quality_scores_inferred_and_given_graphs(tmp_path, monkeypatch):
    import graph_quality

    from shn.config import config_from_dict
    from shn.runner import run

    base = {"seed": 0, "rounds": 1, "clients_per_round": 3, "eval_every": 1,
            "task": {"name": "digits", "num_clients": 6, "model": "mlp"}, "local": {"steps": 1, "batch_size": 16},
            "hypernetwork": {"hidden": 16}, "encoder": {"layers": 1}, "graph": {"k": 2}}
    root = tmp_path / "x" / "s"
    run(config_from_dict({**base, "method": "shn", "graph": {"kind": "labels", "k": 2}}), run_dir=root / "shn-labels" / "seed0",
        progress=False)
    run(config_from_dict({**base, "method": "shn", "graph": {"kind": "knn", "k": 2}}), run_dir=root / "shn-knn" / "seed0",
        progress=False)
    run(config_from_dict({**base, "method": "pfedhn"}), run_dir=root / "pfedhn" / "seed0", progress=False)
    monkeypatch.setattr(graph_quality, "STUDY", tmp_path)
    rows = {r["method"]: r for r in graph_quality.measure(["x"])}
    assert set(rows) == {"s/shn-labels", "s/shn-knn"}  # pFedHN has no graph
    assert rows["s/shn-labels"]["reached"] > 0.5  # the label graph is near the best with its edge count
    for r in rows.values():
        assert r["oracle"] >= r["edges"] and r["seed"] == 0
