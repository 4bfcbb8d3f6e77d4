"""How informative the graphs of the issue-19 study are: for every graph-method run on a
classification task (a stage-2 kNN graph, or a graph it did not infer, e.g. the oracle
``graph.kind = "labels"``), the label-distribution similarity of its edges against chance and the
best graph with as many edges (:func:`shn.graph.feature_similarity`).

    python experiments/study/graph_quality.py [ROOT ...]   # default: the CIFAR-10 roots below

Reads each run's ``stage2_graph/graph.json`` and rebuilds its task from ``stage3_*/config.toml``
(same seed, so the same partition; tasks are cached by config and seed), or rebuilds a
non-inferred graph from the run's ``config.toml``; writes
``experiments/results/study/graph_quality.csv`` (one row per run) and prints the mean per
(root, method), with ``reached`` = (edges − chance) / (oracle − chance): 0 is a random graph, 1
the best one. Runs on tasks without label distributions (the forecasts) are skipped.
"""

from __future__ import annotations

import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shn.build import make_task  # noqa: E402
from shn.config import config_to_dict, load_config  # noqa: E402
from shn.graph import ClientGraph, feature_similarity  # noqa: E402
from shn.run_graph import resolve_graph  # noqa: E402
from shn.runner import INFERRED_GRAPHS  # noqa: E402
from tasks.base import client_attribute  # noqa: E402

STUDY = ROOT / "experiments/results/study"
DEFAULT_ROOTS = ("cifar10-tuned", "cifar10-tuned-oracle", "cifar10-dir0.1", "depth")
GRAPH_METHODS = ("shn", "ghn", "panacea")
OUT = STUDY / "graph_quality.csv"
FIELDS = ("root", "run", "method", "seed", "edges", "chance", "oracle", "reached")


def runs(root: Path):
    """``(run dir, graph.json or None, config)`` of every finished graph-method run under ``root``:
    with a stage-2 graph and its stage-3 config, or on a graph it did not infer (None)."""
    for summary in sorted(root.rglob("summary.json")):
        run = summary.parent
        graph = run / "stage2_graph" / "graph.json"
        configs = sorted(run.glob("stage3_*/config.toml"))
        if graph.is_file() and configs:
            yield run, graph, load_config(configs[0])
        elif not run.name.startswith("stage") and (run / "config.toml").is_file() and not graph.exists():
            config = load_config(run / "config.toml")
            if config.method in GRAPH_METHODS and config.graph.kind not in INFERRED_GRAPHS:
                yield run, None, config


def measure(roots: list[str]) -> list[dict]:
    tasks: dict[str, object] = {}
    rows = []
    for name in roots:
        root = STUDY / name
        if not root.is_dir():
            raise SystemExit(f"{root}: no such study folder")
        for run, graph_file, config in runs(root):
            key = repr((config_to_dict(config)["task"], config.seed))
            if key not in tasks:
                tasks[key] = make_task(config)
            dists = client_attribute(tasks[key], "label_distributions")
            if dists is None:
                continue
            graph = ClientGraph.load(graph_file) if graph_file is not None else resolve_graph(config, tasks[key])
            sim = feature_similarity(graph.to("cpu"), dists)
            gain = sim["oracle"] - sim["chance"]
            rel = run.relative_to(root)
            rows.append({"root": name, "run": str(rel), "method": str(rel.parent), "seed": config.seed,
                         "edges": sim["edges"], "chance": sim["chance"], "oracle": sim["oracle"],
                         "reached": (sim["edges"] - sim["chance"]) / gain if gain > 0 else None})
            print(f"{name}/{rel}: edges {sim['edges']:.3f}, chance {sim['chance']:.3f}, oracle {sim['oracle']:.3f}",
                  flush=True)
    return rows


def main(argv: list[str]) -> int:
    rows = measure(argv or list(DEFAULT_ROOTS))
    with OUT.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["root"], r["method"])].append(r)
    for (root, method), rs in groups.items():
        mean = {k: statistics.fmean(r[k] for r in rs) for k in ("edges", "chance", "oracle", "reached")}
        print(f"{root} {method} ({len(rs)} runs): edges {mean['edges']:.3f}, chance {mean['chance']:.3f}, "
              f"oracle {mean['oracle']:.3f}, reached {mean['reached']:.2f}")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
