"""The three-stage pipeline's stage-1 cache: a plain pFedHN run of the same config and seed
publishes itself as stage 1, so the graph methods of a suite do not train pFedHN again."""

from __future__ import annotations

import json

import pytest

import baselines  # noqa: F401 - registers the methods
from shn.config import load_config
from shn.runner import make_task, run

QUICKSTART = "experiments/configs/quickstart.toml"
TINY = ["task.num_clients=6", "clients_per_round=3", 'task.model="mlp"', "rounds=2", "eval_every=2",
        "local.steps=2", "hypernetwork.hidden=16", "hypernetwork.n_hidden=1", 'graph.kind="knn"', "graph.k=2",
        "encoder.layers=1", "novel.fraction=0.34", "novel.steps=2"]


def config(method: str, cache, *overrides: str):
    return load_config(QUICKSTART, TINY + [f"method={method}", f'graph.stage1_cache="{cache}"', *overrides])


@pytest.fixture(scope="module")
def task():
    return make_task(config("pfedhn", "unused"))


def test_pfedhn_run_is_reused_as_stage1_and_changes_nothing(task, tmp_path):
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    pfedhn = run(config("pfedhn", shared), task=task, run_dir=tmp_path / "pfedhn", progress=False)
    (entry,) = list(shared.iterdir())
    assert (entry / "embeddings.pt").is_file()
    assert "novel_test_accuracy" in pfedhn.summary  # its own novel-client fit still ran, after publishing
    assert "novel_test_accuracy" not in json.loads((entry / "summary.json").read_text())

    reused = run(config("shn", shared), task=task, run_dir=tmp_path / "reused", progress=False)
    assert list(shared.iterdir()) == [entry]  # no second stage 1
    assert reused.summary["stage1_metrics"] == pfedhn.summary["metrics"]
    trained = run(config("shn", fresh), task=task, run_dir=tmp_path / "trained", progress=False)
    assert trained.summary["stage1_metrics"] == pfedhn.summary["metrics"]
    assert trained.summary["metrics"] == reused.summary["metrics"]
    assert trained.summary["novel_test_accuracy"] == reused.summary["novel_test_accuracy"]
    # the budget counts stage 1's bytes too, whether stage 1 was trained or reused
    budget = reused.summary["budget"]
    assert budget["stage1_bytes_total"] == pfedhn.summary["budget"]["bytes_total"] > 0
    assert budget["bytes_total"] == budget["stage1_bytes_total"] + budget["stage3_bytes_total"]
    assert trained.summary["budget"] == budget


def test_stage1_cache_keys_from_before_compression_stay_valid(task, tmp_path, caplog):
    """Default [compression] leaves the cache key as it was before the table existed (no
    retraining of cached stage 1s); another compression is another stage 1. An entry written
    before byte counting leaves the pipeline's byte budget unknown, with a warning."""
    import hashlib

    from shn.config import config_to_dict, dumps_toml
    from shn.pipeline import _stage1_cache_dir, stage1_config

    cfg = config("shn", tmp_path / "cache")
    key = config_to_dict(stage1_config(cfg))
    for irrelevant in ("graph", "encoder", "methods", "sweep", "compression"):
        key.pop(irrelevant, None)
    old = hashlib.sha256((dumps_toml(key) + repr([])).encode()).hexdigest()[:16]
    assert _stage1_cache_dir(cfg, stage1_config(cfg), []).name == old
    topk = config("shn", tmp_path / "cache", "compression.kind=topk")
    assert _stage1_cache_dir(topk, stage1_config(topk), []).name != old

    run(cfg, task=task, progress=False)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if (p / "summary.json").is_file()]
    summary = json.loads((entry / "summary.json").read_text())
    del summary["budget"]["bytes_total"]
    (entry / "summary.json").write_text(json.dumps(summary))
    again = run(cfg, task=task, progress=False)
    assert again.summary["budget"]["bytes_total"] is None and again.summary["budget"]["stage1_bytes_total"] is None
    assert "predates byte counting" in caplog.text


def test_pfedhn_run_with_another_budget_is_not_stage1(task, tmp_path):
    run(config("pfedhn", tmp_path / "cache", "graph.stage1_rounds=1"), task=task, progress=False)
    assert not any((tmp_path / "cache").glob("*/embeddings.pt"))


def test_pipeline_files_are_strict_json(task, tmp_path, monkeypatch):
    """A non-finite number anywhere in what the pipeline writes is null, never a bare NaN."""
    import math

    import shn.pipeline

    real = shn.pipeline.describe_graph
    monkeypatch.setattr(shn.pipeline, "describe_graph", lambda g, t: {**real(g, t), "homophily": math.nan})

    def strict(path):
        def refuse(name):
            raise ValueError(f"{path}: non-standard JSON constant {name}")

        return json.loads(path.read_text(), parse_constant=refuse)

    out = tmp_path / "run"
    run(config("shn", tmp_path / "cache"), task=task, run_dir=out, progress=False)
    assert strict(out / "summary.json")["graph"]["homophily"] is None
    assert strict(out / "stage3_shn" / "summary.json")["graph"]["homophily"] is None
    graph = strict(out / "stage2_graph" / "graph_summary.json")
    assert graph["homophily"] is None
    # a classification task scores its inferred graph against the clients' label distributions
    sim = graph["feature_similarity"]
    assert sim["oracle"] >= sim["edges"] and -1 <= sim["chance"] <= 1
    (entry,) = list((tmp_path / "cache").iterdir())
    strict(entry / "summary.json")


def test_shn_pipeline_on_a_method_without_a_graph_is_a_one_line_error(tmp_path, capsys):
    """`shn pipeline` with method = "pfedhn" used to train pFedHN, a graph, then pFedHN again."""
    from shn.cli import main

    code = main(["pipeline", QUICKSTART, "--set", "rounds=1", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'pfedhn' uses no client graph" in err and "shn" in err and not (tmp_path / "p").exists()
