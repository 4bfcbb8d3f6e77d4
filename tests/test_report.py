"""shn report: table, CSVs and every figure from two tiny real runs (pFedHN and SHN on an
inferred graph); mean ± std and bold-best from synthetic run folders; graph rewiring toward a
target homophily (the heterophily experiment's knob)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from shn.cli import main
from shn.config import dumps_toml, load_config
from shn.report import build_report, find_runs, group_runs, spring_layout
from shn.runner import make_task, run
from tests.conftest import tiny_digits_toml

TINY = tiny_digits_toml("pfedhn", rounds=3)


def test_report_on_two_tiny_runs(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.replace('partition = "pathological"', 'partition = "clustered"\nnum_groups = 2'))
    runs = tmp_path / "runs"
    run(load_config(cfg), run_dir=runs / "pfedhn", progress=False)
    run(load_config(cfg, ['method="shn"', 'graph.kind="knn"', "graph.k=2", "graph.stage1_rounds=2"]),
        run_dir=runs / "shn", progress=False)
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    assert not (out / "depth_digits.png").exists()  # one depth, one graph: no study plots
    assert not (out / "heterophily_digits.png").exists()
    run(load_config(cfg, ['method="shn"', 'graph.kind="knn"', "graph.k=2", "graph.stage1_rounds=2",
                          "encoder.layers=1", "graph.rewire_homophily=0.0"]),
        run_dir=runs / "shn-rewired", progress=False)
    assert main(["report", str(runs), "--out", str(out)]) == 0

    pngs = ["curves_digits.png", "graph_digits_knn.png", "graph_digits_knn-h0.png", "depth_digits.png",
            "heterophily_digits.png"]
    for name in pngs + ["report.md", "results.csv", "runs.csv"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert set(re.findall(r"\]\(([^)]+\.png)\)", md)) == set(pngs)  # every figure referenced exists

    summaries = {m: json.loads((runs / m / "summary.json").read_text()) for m in ("pfedhn", "shn", "shn-rewired")}
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    shn_label = "shn (encoder.layers=2, graph.kind=knn)"  # labels name what varies between runs
    assert set(rows) == {"pfedhn", shn_label, "shn (encoder.layers=1, graph.kind=knn, graph.rewire_homophily=0)"}
    for method, label in (("pfedhn", "pfedhn"), ("shn", shn_label)):
        metrics = summaries[method]["metrics"]
        for key in ("test_accuracy", "test_loss", "val_accuracy"):
            assert float(rows[label][f"{key}_mean"]) == metrics[key]  # exactly the recorded number
        assert f"| {label} | " + (f"**{metrics['test_accuracy']:.4f}**" if metrics["test_accuracy"] == max(
            s["metrics"]["test_accuracy"] for s in summaries.values()) else f"{metrics['test_accuracy']:.4f}") in md
    energy = summaries["shn"].get("encoder_dirichlet_energy")
    if energy is not None:  # recorded by SHN runs: the table and results.csv carry it
        last = energy[-1] if isinstance(energy, list) else energy
        assert float(rows[shn_label]["encoder_dirichlet_energy_mean"]) == pytest.approx(last)


def _fake_run(root: Path, method: str, seed: int, acc: float, **config) -> None:
    root.mkdir(parents=True)
    data = {"method": method, "seed": seed, "rounds": 2, "task": {"name": "digits", "num_clients": 4}, **config}
    (root / "config.toml").write_text(dumps_toml(data))
    metrics = {"test_accuracy": acc, "test_loss": 1 - acc, "val_accuracy": acc}
    (root / "summary.json").write_text(json.dumps({"method": method, "task": "digits", "seed": seed,
                                                   "primary_metric": "test_accuracy", "metrics": metrics,
                                                   "wall_time_s": 1.0}))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "val_accuracy": acc * r / 2}) + "\n"
                                                for r in (1, 2)))


def test_grouping_mean_std_and_bold(tmp_path):
    for seed, acc in ((0, 0.5), (1, 0.7)):
        _fake_run(tmp_path / "a" / f"seed{seed}", "pfedhn", seed, acc)
        _fake_run(tmp_path / "b" / f"seed{seed}", "fedavg", seed, acc - 0.2)
        _fake_run(tmp_path / "c" / f"seed{seed}", "fedavg", seed, acc - 0.4, local={"lr": 0.1})
    (tmp_path / "a" / "seed0" / "stage1_pfedhn").mkdir()  # nested summaries belong to their run
    (tmp_path / "a" / "seed0" / "stage1_pfedhn" / "summary.json").write_text('{"metrics": {}}')
    groups = group_runs(find_runs([tmp_path]))
    assert sorted(g.method for g in groups) == ["fedavg (local.lr=0.005)", "fedavg (local.lr=0.1)", "pfedhn"]
    assert all(len(g.runs) == 2 for g in groups)
    out = tmp_path / "report"
    build_report([tmp_path / "a", tmp_path / "b", tmp_path / "c"], out)
    md = (out / "report.md").read_text()
    assert "| pfedhn | **0.6000 ± 0.1414** |" in md  # mean ± sample std of 0.5 and 0.7, best in bold
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(rows["pfedhn"]["test_accuracy_mean"]) == pytest.approx(0.6)
    assert float(rows["pfedhn"]["test_loss_std"]) == pytest.approx(0.1414213562)
    assert (out / "curves_digits.png").stat().st_size > 0


def test_a_key_added_since_a_run_was_recorded_counts_as_its_default(tmp_path):
    """An old run's config.toml lacks keys added later (here task.allow_pickle, local.precision):
    it is the same setting and method as a new run that records their defaults, not a group of
    its own; a key set to a non-default value still splits."""
    _fake_run(tmp_path / "old", "pfedhn", 0, 0.5)
    _fake_run(tmp_path / "new", "pfedhn", 1, 0.7, task={"name": "digits", "num_clients": 4, "allow_pickle": False},
              local={"precision": "fp32"})
    _fake_run(tmp_path / "bf16", "pfedhn", 0, 0.6, local={"precision": "bf16"})
    groups = group_runs(find_runs([tmp_path]))
    assert sorted((g.setting, g.method, len(g.runs)) for g in groups) == [
        ("digits", "pfedhn (local.precision=bf16)", 1), ("digits", "pfedhn (local.precision=fp32)", 2)]


def test_forecasting_report_has_a_per_horizon_table(tmp_path):
    for seed, mae in ((0, 2.0), (1, 4.0)):
        root = tmp_path / "fc" / f"seed{seed}"
        root.mkdir(parents=True)
        (root / "config.toml").write_text(dumps_toml({"method": "fedavg", "seed": seed, "task": {"name": "traffic"}}))
        metrics = {"test_mse": mae ** 2, "test_mae": mae, "test_mae_h3": mae / 2, "test_mae_h12": mae * 2,
                   "test_rmse_h3": mae, "test_rmse_h12": mae * 3, "val_mse": mae ** 2}
        (root / "summary.json").write_text(json.dumps({"method": "fedavg", "task": "traffic", "seed": seed,
                                                       "primary_metric": "test_mse", "metrics": metrics}))
    md = build_report([tmp_path / "fc"], tmp_path / "report").read_text()
    assert "| method | test_mae_h3 | test_mae_h12 | test_rmse_h3 | test_rmse_h12 |" in md
    assert "| fedavg | 1.5000 ± 0.7071 | 6.0000 ± 2.8284 | 3.0000 ± 1.4142 | 9.0000 ± 4.2426 |" in md
    assert "test_mae_h3" not in md.split("Per forecast horizon")[0]  # not in the detail table


def test_novel_client_metrics_get_their_columns(tmp_path):
    for seed, (acc, novel) in enumerate(((0.5, 0.3), (0.7, 0.5))):
        _fake_run(tmp_path / "a" / f"seed{seed}", "pfedhn", seed, acc)
        path = tmp_path / "a" / f"seed{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "novel_test_accuracy": novel, "novel_init_test_accuracy": 0.1}))
    md = build_report([tmp_path / "a"], tmp_path / "report").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | test_accuracy | test_loss"))
    assert header.split(" | ")[-5:-3] == ["novel_test_accuracy", "novel_init_test_accuracy"]
    assert "| 0.4000 ± 0.1414 | 0.1000 ± 0.0000 |" in md


def test_spring_layout_is_finite_and_deterministic():
    adj = torch.zeros(6, 6)
    for i in range(6):
        adj[i, (i + 1) % 6] = adj[(i + 1) % 6, i] = 1
    a, b = spring_layout(adj.numpy(), seed=3), spring_layout(adj.numpy(), seed=3)
    assert a.shape == (6, 2) and (a == b).all() and torch.isfinite(torch.tensor(a)).all()


def test_rewire_homophily_in_graph_inference():
    import tomllib

    from shn.config import config_from_dict
    from shn.graph import edge_homophily
    from shn.pipeline import infer_graph

    def config(extra: str = ""):
        text = TINY.replace("num_clients = 4", "num_clients = 10") + '\n[graph]\nkind = "knn"\nk = 3\n' + extra
        return config_from_dict(tomllib.loads(text))

    task = make_task(config())
    emb = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    plain = infer_graph(config(), task, emb, range(10))
    h0 = edge_homophily(plain, sets=task.label_sets())["homophily"]
    for target in (0.0, 1.0):
        g = infer_graph(config(f"rewire_homophily = {target}\n"), task, emb, range(10))
        again = infer_graph(config(f"rewire_homophily = {target}\n"), task, emb, range(10))
        assert g.num_edges == plain.num_edges and g.is_symmetric() and torch.equal(g.edge_index, again.edge_index)
        h = edge_homophily(g, sets=task.label_sets())["homophily"]
        assert abs(h - target) < abs(h0 - target) or h == target


def test_two_runs_with_the_same_config_and_seed_are_one_run_not_two_seeds(tmp_path, caplog):
    """`shn report runs/cmp/* runs/pipe` printed "pfedhn 0.3840 ± 0.0000 (n=2)" for two seed-0
    runs of one config. They are one experiment: counted once (the newer kept), with a warning."""
    import os

    _fake_run(tmp_path / "cmp" / "pfedhn", "pfedhn", 0, 0.384)
    _fake_run(tmp_path / "pipe", "pfedhn", 0, 0.384, device="cuda")  # where it ran does not matter
    os.utime(tmp_path / "pipe" / "summary.json", (2e9, 2e9))
    _fake_run(tmp_path / "cmp" / "pfedhn-1", "pfedhn", 1, 0.5)
    groups = group_runs(find_runs([tmp_path]))
    (g,) = groups
    assert sorted(r.seed for r in g.runs) == [0, 1] and g.stats("test_accuracy")[2] == 2
    assert [(d.path.name, k.path.name) for d, k in g.duplicates] == [("pfedhn", "pipe")]
    assert "same config with seed 0: counted once" in caplog.text
    out = tmp_path / "report"
    build_report([tmp_path], out=out)
    md = (out / "report.md").read_text()
    assert "2 runs in 1 groups" in md and "Duplicates counted once** (1)" in md
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert rows[0]["runs"] == "2" and rows[0]["seeds"] == "0 1"


def _study_run(root: Path, method: str, seed: int, acc: float, *, summary_extra=None, history=None, **config):
    _fake_run(root, method, seed, acc, **config)
    path = root / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **(summary_extra or {})}))
    if history is not None:
        (root / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def test_curves_are_labelled_and_on_a_client_update_axis_that_counts_stage_one(tmp_path):
    from shn.report import plot_curves

    hist = [{"round": 1, "client_updates": 5, "val_accuracy": 0.3}, {"round": 2, "client_updates": 10, "val_accuracy": 0.5}]
    for seed in (0, 1):
        _study_run(tmp_path / "pf" / f"s{seed}", "pfedhn", seed, 0.5, history=hist)
        # a pipeline run: stage 1 (pFedHN) spent 10 client updates before stage 3's curve
        _study_run(tmp_path / "shn" / f"s{seed}", "shn", seed, 0.6, history=hist, graph={"kind": "knn"},
                   summary_extra={"budget": {"client_updates": 20, "stage1_client_updates": 10,
                                             "stage3_client_updates": 10}})
    groups = group_runs(find_runs([tmp_path]))
    drawn = plot_curves(groups, tmp_path / "c.png")
    assert drawn["ylabel"] == "validation accuracy (val_accuracy)"
    assert drawn["xlabel"].startswith("client updates") and "stage 1" in drawn["xlabel"]
    assert "n = 2" in drawn["title"] and "the tables report test" in drawn["title"]
    assert drawn["series"]["pfedhn"]["x"] == [5, 10] and drawn["series"]["shn (graph.kind=knn)"]["x"] == [15, 20]
    assert drawn["series"]["pfedhn"]["n"] == 2 and drawn["seeds"] == [0, 1]
    md = build_report([tmp_path], tmp_path / "report").read_text()
    assert "bands: ±1 sample std" in md


def test_curves_against_cumulative_bytes(tmp_path):
    """``shn report --x bytes``: validation accuracy vs the records' bytes_total (MB), a pipeline's
    stage-1 bytes included; records without byte counts (older runs) are left out."""
    from shn.report import plot_curves

    hist = [{"round": 1, "client_updates": 5, "val_accuracy": 0.3, "bytes_total": 2_000_000},
            {"round": 2, "client_updates": 10, "val_accuracy": 0.5, "bytes_total": 4_000_000}]
    topk = [{**h, "bytes_total": h["bytes_total"] // 4} for h in hist]
    for seed in (0, 1):
        _study_run(tmp_path / "dense" / f"s{seed}", "fedavg", seed, 0.5, history=hist)
        _study_run(tmp_path / "topk" / f"s{seed}", "fedavg", seed, 0.45, history=topk, compression={"kind": "topk"})
        _study_run(tmp_path / "shn" / f"s{seed}", "shn", seed, 0.6, history=hist, graph={"kind": "knn"},
                   summary_extra={"budget": {"bytes_total": 5_000_000, "stage1_bytes_total": 1_000_000}})
        _study_run(tmp_path / "old" / f"s{seed}", "pfedhn", seed, 0.6, history=[
            {k: v for k, v in h.items() if k != "bytes_total"} for h in hist])
        # a pipeline run whose stage 1 came from a cache entry written before byte counting
        _study_run(tmp_path / "ghn" / f"s{seed}", "ghn", seed, 0.6, history=hist, graph={"kind": "knn"},
                   summary_extra={"budget": {"bytes_total": None, "stage1_bytes_total": None}})
    groups = group_runs(find_runs([tmp_path]))
    drawn = plot_curves(groups, tmp_path / "b.png", x="bytes")
    assert drawn["xlabel"].startswith("cumulative communication, MB") and "stage 1" in drawn["xlabel"]
    assert drawn["ylabel"] == "validation accuracy (val_accuracy)"
    series = drawn["series"]
    assert series["fedavg (compression.kind=none)"]["x"] == [2.0, 4.0]
    assert series["fedavg (compression.kind=topk)"]["x"] == [0.5, 1.0]
    assert series["shn (graph.kind=knn)"]["x"] == [3.0, 5.0] and "pfedhn" not in series
    assert not any(name.startswith("ghn") for name in series)
    with pytest.raises(ValueError, match="'flops' is not a curve axis; allowed: updates, bytes"):
        plot_curves(groups, tmp_path / "x.png", x="flops")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report"), "--x", "bytes"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "curves-bytes_" in md and "vs cumulative communication, MB" in md
    assert not list((tmp_path / "report").glob("curves_*.png"))


def test_study_figures_only_for_studies_present_and_depth_on_a_log2_axis(tmp_path):
    from shn.report import plot_xy
    from shn.report.figures import _layers

    # two seeds of one SHN config whose inferred graphs differ in homophily: no heterophily study
    for seed, h in ((0, 0.3), (1, 0.6)):
        _study_run(tmp_path / "a" / f"s{seed}", "shn", seed, 0.5, graph={"kind": "knn"},
                   summary_extra={"graph": {"set_homophily": {"homophily": h}}})
    build_report([tmp_path / "a"], tmp_path / "r1")
    assert not list((tmp_path / "r1").glob("heterophily_*.png")) and not list((tmp_path / "r1").glob("depth_*.png"))
    # rewired to two targets: a heterophily study
    for seed, (h, target) in enumerate(((0.1, 0.0), (0.9, 1.0))):
        _study_run(tmp_path / "b" / f"t{target}", "shn", 0, 0.5 + h / 10, graph={"kind": "knn", "rewire_homophily": target},
                   summary_extra={"graph": {"set_homophily": {"homophily": h}}})
    build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "r2")
    assert list((tmp_path / "r2").glob("heterophily_*.png"))
    # depth study L = 1, 2, 4, 8 with GHN's energy falling to 0: log2 x, symlog energy, n in the title
    for layers in (1, 2, 4, 8):
        for seed in (0, 1):
            _study_run(tmp_path / "d" / f"L{layers}s{seed}", "ghn", seed, 0.5, graph={"kind": "knn"},
                       encoder={"layers": layers}, summary_extra={"encoder_dirichlet_energy": 0.0 if layers == 8 else 1.0 / layers})
    groups = group_runs(find_runs([tmp_path / "d"]))
    drawn = plot_xy(groups, _layers, "encoder layers L", "encoder.layers", tmp_path / "depth.png", "depth",
                    energy=True, log2_x=True)
    assert drawn["xscale"] == "log2" and drawn["xlabel"] == "encoder layers L (log2 scale)"
    assert drawn["energy_scale"] == "symlog" and "n = 2 seeds per point" in drawn["title"]
    assert drawn["series"] == {"ghn (graph.kind=knn)": [1.0, 2.0, 4.0, 8.0]}
    md = build_report([tmp_path / "d"], tmp_path / "r3").read_text()
    assert "depth_digits.png" in md and "n = 2 seeds per point" in md
