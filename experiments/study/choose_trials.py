"""Phase B of the issue-19 study: choose each method's trial of a phase-A grid on validation and
write the paired 5-seed suite with the chosen values.

    python experiments/study/choose_trials.py losloop     # reads experiments/results/study/losloop-grid
                                                   # writes experiments/study/losloop_tuned.toml and
                                                   # experiments/results/study/losloop-grid/trials.csv

Selection: the validation value of the setting's primary metric at each trial's best validation
round (``summary.json`` ``best_val``); test metrics are not read. Graph methods on the inferred
kNN graph use the values chosen for the same method on the given graph.
"""

from __future__ import annotations

import csv
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# issue 16's client-side baselines: in phase B only where their phase-A trials were run
OPTIONAL = ("fedprox", "ditto", "fedrep")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_grids  # noqa: E402


def trials(setting: str, results: Path | None = None, suite_file: Path | None = None) -> list[dict]:
    """Phase-A rows (or those of ``suite_file``, e.g. phase C's suite)."""
    grid = tomllib.loads((suite_file or HERE / f"{setting}_grid.toml").read_text())
    entry = grid["runs"][0]
    out_dir = (results or ROOT / grid["out"]) / entry["name"]
    rows = []
    missing = {v["method"] for v in entry["methods"] if not (out_dir / v["name"] / "seed0" / "summary.json").is_file()}
    for m in sorted(missing & set(OPTIONAL)):
        print(f"select: {m} left out of {setting}: its trials have not all run", file=sys.stderr)
    for variant in entry["methods"]:
        summary_path = out_dir / variant["name"] / "seed0" / "summary.json"
        if variant["method"] in OPTIONAL and variant["method"] in missing:
            continue  # an optional method not (fully) tuned on this setting: left out of its phase B
        if not summary_path.is_file():
            raise SystemExit(f"select: {summary_path} is missing: run shn suite experiments/study/{setting}_grid.toml first")
        summary = json.loads(summary_path.read_text())
        name = summary["primary_metric"].removeprefix("test_")
        value = summary["best_val"]["metrics"].get(f"val_{name}")
        rows.append({"method": variant["method"], "trial": variant["name"], "set": list(variant["set"]),
                     "metric": f"val_{name}", "value": value, "best_round": summary["best_val"]["round"],
                     "lower_is_better": name not in ("accuracy",)})
    return rows


def choose(rows: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for r in rows:
        if r["value"] is None:
            continue
        cur = best.get(r["method"])
        better = cur is None or (r["value"] < cur["value"] if r["lower_is_better"] else r["value"] > cur["value"])
        if better:
            best[r["method"]] = r
    return best


def tuned_suite(setting: str, best: dict[str, dict]) -> str:
    grid = tomllib.loads((HERE / f"{setting}_grid.toml").read_text())
    entry = grid["runs"][0]
    name, out = make_grids.STUDY.get(setting, (setting, f"experiments/results/study/{setting}"))
    rounds = make_grids.rounds(grid["set"])
    total = rounds * _clients(entry, grid["set"])
    knn = ['graph.kind="knn"', f"graph.stage1_rounds={rounds // 2}", f"rounds={rounds // 2}", 'graph.stage3_init="full"']

    def variant(name: str, method: str, extra: list[str] = ()) -> str:
        sets = [s for s in best[method]["set"]] + list(extra)
        return f"    {{ name = \"{name}\", method = \"{method}\", set = {json.dumps(sets)} }},"

    if setting in make_grids.KNN_ONLY:  # graph methods were tuned on the kNN graph already
        graph = [variant("ghn-knn", "ghn"), variant("panacea-knn", "panacea"), variant("shn-knn", "shn"),
                 # ablation: the old stage 3 (only the stage-1 embeddings kept, the SHN paper's architecture)
                 variant("shn-knn-fresh", "shn", ['graph.stage3_init="embeddings"', 'hypernetwork.graph_branch="replace"'])]
    else:
        graph = [variant("ghn-given", "ghn", ['graph.kind="given"']),
                 variant("panacea-given", "panacea", ['graph.kind="given"']),
                 variant("shn-given", "shn", ['graph.kind="given"']),
                 variant("ghn-knn", "ghn", knn), variant("shn-knn", "shn", knn),
                 # ablation: the SHN paper's architecture (the trunk reads the sheaf output), same values
                 variant("shn-given-replace", "shn", ['graph.kind="given"', 'hypernetwork.graph_branch="replace"'])]
    lines = [
        f"# Phase B of the issue-19 study on {setting}: paired seeds 0-4, each method with the trial",
        f"# experiments/study/choose_trials.py chose on validation (experiments/results/study/{setting}-grid/trials.csv).",
        f"# Equal budget: {total} client updates per run; kNN-graph methods spend {total // 2} in stage 1 (pFedHN)",
        f"# and {total // 2} in stage 3, continuing from the whole stage-1 hypernetwork. Generated; do not edit.",
        f'out = "{out}"',
        "set = " + json.dumps(grid["set"]),
        "",
        "[[runs]]",
        f'name = "{name}"',
        f'config = "{entry["config"]}"',
        "seeds = [0, 1, 2, 3, 4]",
        "methods = [",
        variant("pfedhn", "pfedhn"), variant("fedavg", "fedavg"), variant("local", "local"),
        *graph,
        *(variant(m, m) for m in OPTIONAL if m in best),
        "]",
    ]
    return "\n".join(lines) + "\n"


def _clients(entry: dict, sets: list[str]) -> int:
    """Clients per round of a suite entry (its config, then the suite's sets)."""
    config = tomllib.loads((ROOT / entry["config"]).read_text())
    per_round = config.get("clients_per_round", 5)
    for s in sets:
        if s.startswith("clients_per_round="):
            per_round = int(s.split("=", 1)[1])
    return per_round


def write_tuned(setting: str, best: dict[str, dict], suite_out: Path | None = None) -> None:
    (suite_out or HERE / f"{setting}_tuned.toml").write_text(tuned_suite(setting, best))


def main(setting: str, results: Path | None = None, suite_out: Path | None = None) -> None:
    """``results``: the phase-A folder (default: the grid suite's ``out``); ``suite_out``: where
    to write the phase-B suite (default experiments/study/<setting>_tuned.toml)."""
    rows = trials(setting, results)
    best = choose(rows)
    grid = tomllib.loads((HERE / f"{setting}_grid.toml").read_text())
    table = (results or ROOT / grid["out"]) / "trials.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "trial", "metric", "value", "best_round", "chosen", "set"])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r[k] for k in ("method", "trial", "metric", "value", "best_round")},
                        "chosen": best.get(r["method"]) is r, "set": " ".join(r["set"])})
    write_tuned(setting, best, suite_out)
    print(json.dumps({m: b["trial"] for m, b in best.items()}))


if __name__ == "__main__":
    main(sys.argv[1], *(Path(a) for a in sys.argv[2:4]))
