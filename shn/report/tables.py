"""Report tables: the main table, per-setting detail and per-horizon tables (markdown), and the CSVs.

Cells are mean ± sample std over a group's seeds; the best mean of each column is bold, by the
metric's direction (:func:`better`).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any, Sequence

from shn.report.runs import Group

__all__ = ["MAXIMIZE", "MINIMIZE", "better", "cell", "detail_metrics", "detail_table", "horizon_table", "main_table",
           "markdown_table", "write_csvs"]

MAXIMIZE = ("accuracy", "acc", "f1", "auc", "r2")
MINIMIZE = ("loss", "mse", "mae", "rmse", "mape", "wall_time_s", "energy")


def better(metric: str) -> str:
    """"max" or "min" for a metric name (test_accuracy → max, test_mse → min)."""
    base = metric.removeprefix("test_").removeprefix("val_")
    if any(base == m or base.endswith("_" + m) or base.startswith(m) for m in MAXIMIZE):
        return "max"
    return "min"


def _fmt(x: float, metric: str = "") -> str:
    return f"{x:.1f}" if metric == "wall_time_s" or abs(x) >= 1000 else f"{x:.4f}"


def cell(stats: tuple[float, float, int] | None, metric: str = "") -> str:
    if stats is None:
        return "—"
    mean, std, n = stats
    return _fmt(mean, metric) if n == 1 else f"{_fmt(mean, metric)} ± {_fmt(std, metric)}"


def _bold_best(rows: list[list[str]], means: list[list[float | None]], directions: list[str | None],
               metrics: Sequence[str] = ()) -> None:
    """Bold the best mean of each column (ties as displayed are all bold)."""
    for j, direction in enumerate(directions):
        metric = metrics[j] if j < len(metrics) else ""
        if direction is None:
            continue
        col = [m[j] for m in means if m[j] is not None]
        if len(col) < 2:
            continue
        best = max(col) if direction == "max" else min(col)
        for i, m in enumerate(means):
            if m[j] is not None and _fmt(m[j], metric) == _fmt(best, metric):
                rows[i][j + 1] = f"**{rows[i][j + 1]}**"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_table(groups: Sequence[Group]) -> str:
    settings = sorted({g.setting for g in groups})
    methods = sorted({g.method for g in groups})
    index = {(g.setting, g.method): g for g in groups}
    primary = {s: next(g.primary for g in groups if g.setting == s) for s in settings}
    rows, means = [], []
    for m in methods:
        row, mrow = [m], []
        for s in settings:
            g = index.get((s, m))
            st = g.stats(primary[s]) if g else None
            row.append(cell(st))
            mrow.append(st[0] if st else None)
        rows.append(row)
        means.append(mrow)
    _bold_best(rows, means, [better(primary[s]) for s in settings])
    return markdown_table(["method"] + [f"{s}: {primary[s]}" for s in settings], rows)


def detail_metrics(groups: Sequence[Group]) -> list[str]:
    primary = groups[0].primary
    names = {k for g in groups for r in g.runs for k in r.summary.get("metrics", {})
             if k.startswith("test_") and isinstance(r.summary["metrics"][k], (int, float))
             and not re.search(r"_h\d+$", k)}  # per-horizon metrics: in results.csv only
    others = sorted(names - {primary}, key=lambda k: (k.endswith("loss"), k))
    val = "val_" + primary.removeprefix("test_")
    cols = [primary] + others + [val]
    if any(r.metric("encoder_dirichlet_energy") is not None for g in groups for r in g.runs):
        cols.append("encoder_dirichlet_energy")
    novel = ["novel_" + primary, "novel_init_" + primary]  # held-out clients (shn.novel)
    if any(r.metric(novel[0]) is not None for g in groups for r in g.runs):
        cols += novel
    return cols + ["wall_time_s"]


def _per_group_table(groups: Sequence[Group], cols: list[str], extra=None,
                     extra_header: Sequence[str] = ()) -> str:
    """One row per group: mean ± std of each column, the best mean per column in bold
    (Dirichlet energy is descriptive, never bolded); ``extra(group)`` appends trailing cells."""
    rows, means = [], []
    for g in groups:
        stats = [g.stats(c) for c in cols]
        rows.append([g.method] + [cell(s, c) for s, c in zip(stats, cols)]
                    + (extra(g) if extra else []))
        means.append([s[0] if s else None for s in stats])
    directions: list[str | None] = [better(c) if c != "encoder_dirichlet_energy" else None for c in cols]
    _bold_best(rows, means, directions, cols)
    return markdown_table(["method"] + cols + list(extra_header), rows)


def detail_table(groups: Sequence[Group]) -> str:
    return _per_group_table(
        groups, detail_metrics(groups),
        extra=lambda g: [str(len(g.runs)), ",".join(str(r.seed) for r in g.runs)],
        extra_header=["runs", "seeds"])


def horizon_table(groups: Sequence[Group]) -> str | None:
    """Forecasting: test MAE and RMSE at each recorded horizon (``test_mae_h3``, ...); None when
    the runs record no per-horizon metrics."""
    found = {k for g in groups for r in g.runs for k in r.summary.get("metrics", {})
             if re.fullmatch(r"test_(mae|rmse)_h\d+", k)}
    if not found:
        return None
    cols = sorted(found, key=lambda k: (k.split("_")[1], int(k.rsplit("_h", 1)[1])))
    return _per_group_table(groups, cols)


def write_csvs(groups: Sequence[Group], out: Path) -> None:
    metric_names = sorted({k for g in groups for r in g.runs for k, v in r.summary.get("metrics", {}).items()
                           if isinstance(v, (int, float)) and k.startswith(("test_", "val_"))})
    extra = ["wall_time_s"] + (["encoder_dirichlet_energy"] if any(
        r.metric("encoder_dirichlet_energy") is not None for g in groups for r in g.runs) else [])
    names = metric_names + extra
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "method", "primary_metric", "runs", "seeds"]
                   + [f"{n}_{s}" for n in names for s in ("mean", "std")])
        for g in groups:
            row: list[Any] = [g.setting, g.method, g.primary, len(g.runs), " ".join(str(r.seed) for r in g.runs)]
            for n in names:
                st = g.stats(n)
                row += [repr(st[0]), repr(st[1])] if st else ["", ""]
            w.writerow(row)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "method", "seed", "run_dir"] + names)
        for g in groups:
            for r in g.runs:
                vals = [r.metric(n) for n in names]
                w.writerow([g.setting, g.method, r.seed, str(r.path)] + ["" if v is None else repr(v) for v in vals])


def baselines_table(groups: Sequence[Group]) -> str | None:
    """The naive forecasts every forecasting run records (``summary.json`` ``baselines``:
    persistence, seasonal naive, training mean) on the same masked test targets as the methods,
    beside them so that no table hides a model worse than doing nothing. Their test windows do
    not depend on the method; the first run that has them is shown (mean over its clients)."""
    found = next((r.summary["baselines"] for g in groups for r in g.runs
                  if isinstance(r.summary.get("baselines"), dict) and r.summary["baselines"]), None)
    if not found:
        return None
    metrics = [m for m in ("test_mse", "test_mae", "test_rmse", "test_wape")
               if any(isinstance(v, dict) and m in v for v in found.values())]
    rows = [[name] + [_fmt(float(v[m]), m) if isinstance(v.get(m), (int, float)) else "—" for m in metrics]
            for name, v in found.items() if isinstance(v, dict)]
    return markdown_table(["naive forecast"] + metrics, rows)
