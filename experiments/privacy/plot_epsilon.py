"""Test metric against the privacy spent (epsilon at the run's delta) for a DP sweep such as
experiments/privacy/losloop_dp.toml:

    python experiments/privacy/plot_epsilon.py experiments/results/privacy/losloop

Reads <root>/<method>/privacy.noise_multiplier=<sigma>/seed<s>/summary.json and writes
epsilon.csv, epsilon.md and epsilon.png into <root>. The test metric is read at the best
validation round; runs with sigma = 0 (clipping only, epsilon = infinity) are drawn as a
dashed line per method.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def rows(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.glob("*/privacy.noise_multiplier=*/seed*/summary.json")):
        s = json.loads(path.read_text())
        metric = s["primary_metric"]
        p = s["privacy"]
        out.append({"method": path.parts[-4], "sigma": float(path.parts[-3].split("=", 1)[1]),
                    "seed": int(path.parts[-2][4:]), "epsilon": p.get("epsilon"), "delta": p.get("delta"),
                    "clip_norm": p.get("clip_norm"), "metric": metric,
                    "value": s["best_val"]["metrics"][metric]})
    return out


def main(root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(root)
    if not data:
        raise SystemExit(f"plot_epsilon: no runs under {root}/<method>/privacy.noise_multiplier=<sigma>/seed<s>/")
    with open(root / "epsilon.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)
    metric = data[0]["metric"]
    lines = [f"| method | σ | ε (δ = {data[0]['delta']:g}) | {metric} (best val) | seeds |", "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, method in enumerate(sorted({r["method"] for r in data})):
        by_sigma: dict[float, list[dict]] = {}
        for r in data:
            if r["method"] == method:
                by_sigma.setdefault(r["sigma"], []).append(r)
        pts = []
        for sigma, rs in sorted(by_sigma.items()):
            v = statistics.fmean(r["value"] for r in rs)
            eps = rs[0]["epsilon"]
            lines.append(f"| {method} | {sigma:g} | {'∞' if eps is None else f'{eps:.3g}'} | {v:.4g} | {len(rs)} |")
            if eps is None:
                ax.axhline(v, color=f"C{i}", ls="--", lw=1, label=f"{method}, clipping only (ε = ∞)")
            else:
                pts.append((eps, v))
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"{method}, σ ∈ {{{', '.join(f'{s:g}' for s in sorted(by_sigma) if s)}}}")
    n = len({r["seed"] for r in data})
    ax.set_xscale("log")
    if "accuracy" not in metric:  # errors span orders of magnitude once the noise dominates
        ax.set_yscale("log")
    ax.set_xlabel(f"ε at δ = {data[0]['delta']:g} (client-level, RDP accountant)")
    ax.set_ylabel(f"test {metric.removeprefix('test_')} at the best validation round")
    ax.set_title(f"{root.name}: C = {data[0]['clip_norm']:g}, n = {n} seed{'s' if n > 1 else ''}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(root / "epsilon.png", dpi=120)
    (root / "epsilon.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
