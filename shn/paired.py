"""Paired comparisons over seeds: per setting and method, mean ± std over seeds of the test metric
at the best validation round (and at the last round), and each method's per-seed difference to a
reference method with a 95 % t-interval and a win / tie / loss verdict.

Runs are read in the suite layout ``<root>/<setting>/<method>/seed<s>/summary.json``. Seeds pair
runs: with the paired initialisation and client streams, seed ``s`` of every method starts from
the same embeddings, trunk and heads and sees the same clients, so the per-seed difference
removes most of the seed-to-seed noise. Only seeds present for both methods are paired.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

HIGHER_IS_BETTER = ("accuracy",)


@dataclass(frozen=True)
class PairedRow:
    setting: str
    method: str
    metric: str
    n: int
    mean: float
    std: float
    last_mean: float
    client_updates: int | None
    diff_mean: float | None = None  # method − reference over paired seeds
    ci_low: float | None = None
    ci_high: float | None = None
    n_paired: int = 0
    verdict: str = ""  # "win" | "tie" | "loss" | "reference" | "" (fewer than 2 paired seeds)


def higher_is_better(metric: str) -> bool:
    return any(metric.endswith(k) for k in HIGHER_IS_BETTER)


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided ``level`` t-interval of ``diffs`` (n ≥ 2)."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, higher_better: bool) -> str:
    if low > 0:
        return "win" if higher_better else "loss"
    if high < 0:
        return "loss" if higher_better else "win"
    return "tie"


def load_runs(root: str | Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """``{setting: {method: {seed: summary}}}`` from ``root/<setting>/<method>/seed<s>/summary.json``."""
    root = Path(root)
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for path in sorted(root.glob("*/*/seed*/summary.json")):
        m = re.fullmatch(r"seed(\d+)", path.parent.name)
        if m is None:
            continue
        setting, method = path.parent.parent.parent.name, path.parent.parent.name
        out.setdefault(setting, {}).setdefault(method, {})[int(m.group(1))] = json.loads(path.read_text())
    return out


def _value(summary: dict[str, Any], metric: str, at: str) -> float | None:
    metrics = summary.get("best_val", {}).get("metrics", {}) if at == "best_val" else summary.get("metrics", {})
    v = metrics.get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def paired_rows(runs: dict[str, dict[int, dict[str, Any]]], setting: str, reference: str,
                metric: str | None = None) -> list[PairedRow]:
    """Rows of one setting (``runs``: ``{method: {seed: summary}}``), the reference first."""
    if not runs:
        return []
    any_summary = next(iter(next(iter(runs.values())).values()))
    metric = metric or any_summary.get("primary_metric", "test_accuracy")
    better_up = higher_is_better(metric)
    ref = runs.get(reference, {})
    rows = []
    for method in sorted(runs, key=lambda m: (m != reference, m)):
        seeds = runs[method]
        vals = {s: _value(v, metric, "best_val") for s, v in seeds.items()}
        vals = {s: v for s, v in vals.items() if v is not None}
        last = [v for v in (_value(x, metric, "last") for x in seeds.values()) if v is not None]
        if not vals:
            continue
        budgets = {int(x.get("budget", {}).get("client_updates", -1)) for x in seeds.values()}
        row = dict(setting=setting, method=method, metric=metric, n=len(vals), mean=statistics.fmean(vals.values()),
                   std=statistics.stdev(vals.values()) if len(vals) > 1 else 0.0,
                   last_mean=statistics.fmean(last) if last else math.nan,
                   client_updates=budgets.pop() if len(budgets) == 1 else None)
        if method == reference:
            rows.append(PairedRow(**row, verdict="reference"))
            continue
        ref_vals = {s: _value(v, metric, "best_val") for s, v in ref.items()}
        common = sorted(s for s in vals if ref_vals.get(s) is not None)
        if len(common) < 2:
            rows.append(PairedRow(**row, n_paired=len(common)))
            continue
        diffs = [vals[s] - ref_vals[s] for s in common]
        mean, low, high = t_interval(diffs)
        rows.append(PairedRow(**row, diff_mean=mean, ci_low=low, ci_high=high, n_paired=len(common),
                              verdict=verdict(low, high, better_up)))
    return rows


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"


def markdown(rows: Iterable[PairedRow], reference: str) -> str:
    lines = [f"| setting | method | n | test (best val) mean ± std | test (last) mean | Δ vs {reference} [95 % CI] | verdict | client updates |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = "–" if r.diff_mean is None else f"{_fmt(r.diff_mean)} [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"
        lines.append(f"| {r.setting} | {r.method} | {r.n} | {_fmt(r.mean)} ± {_fmt(r.std)} | {_fmt(r.last_mean)} | "
                     f"{diff} | {r.verdict or 'n < 2'} | {r.client_updates if r.client_updates is not None else 'mixed'} |")
    return "\n".join(lines) + "\n"


def compare(roots: Sequence[str | Path], reference: str = "pfedhn", metric: str | None = None,
            out: str | Path | None = None) -> list[PairedRow]:
    """Paired rows of every setting under ``roots``; with ``out``, writes ``paired.md`` and
    ``paired.csv`` there."""
    rows: list[PairedRow] = []
    for root in roots:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{root}: not a folder of <setting>/<method>/seed<s>/ runs")
        for setting, runs in load_runs(root).items():
            rows.extend(paired_rows(runs, setting, reference, metric))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "paired.md").write_text(
            f"Test metric at the best validation round, mean ± std over seeds; Δ = method − {reference} on the "
            "same seeds, 95 % t-interval; win / loss when the interval excludes 0.\n\n" + markdown(rows, reference))
        with open(out / "paired.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(PairedRow.__dataclass_fields__))
            w.writeheader()
            for r in rows:
                w.writerow(r.__dict__)
    return rows
