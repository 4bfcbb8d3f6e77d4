"""Paired SHN-vs-GHN tables of the depth and heterophily studies (experiments/study/depth_heterophily.toml):

    python experiments/study/grid_studies.py      # writes experiments/results/study/<study>/paired.md

Per grid value (encoder depth L, or the target edge homophily h): each method's test accuracy at
its best validation round (mean ± std over seeds), the paired difference SHN − GHN with a 95 %
t-interval over the seeds, a win / tie / loss verdict for SHN, and the scale-free Rayleigh
quotient of the encoder output (last layer; 0 = constant over the graph, i.e. over-smoothed).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shn.paired import t_interval, verdict  # noqa: E402

STUDIES = {"depth": ("encoder.layers", "L"), "heterophily": ("graph.rewire_homophily", "target h")}
METHODS = ("shn", "ghn")


def load(study: Path, key: str) -> dict[str, dict[str, dict[int, dict]]]:
    """{grid value: {method: {seed: summary}}} from <study>/<method>/<key>=<value>/seed<s>/."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for path in sorted(study.glob(f"*/{key}=*/seed*/summary.json")):
        method, value, seed = path.parts[-4], path.parts[-3].split("=", 1)[1], int(path.parts[-2][4:])
        out.setdefault(value, {}).setdefault(method, {})[seed] = json.loads(path.read_text())
    return out


def _test(summary: dict) -> float:
    return summary["best_val"]["metrics"]["test_accuracy"]


def _ms(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def table(study: Path, key: str, label: str) -> str:
    runs = load(study, key)
    lines = [f"| {label} | SHN test acc. | GHN test acc. | Δ SHN − GHN [95 % CI] | SHN | seeds | "
             "Rayleigh q. SHN / GHN | reached homophily |",
             "|---|---|---|---|---|---|---|---|"]
    for value in sorted(runs, key=float):
        by = runs[value]
        seeds = sorted(set(by.get("shn", {})) & set(by.get("ghn", {})))
        if len(seeds) < 2:
            continue
        shn = [_test(by["shn"][s]) for s in seeds]
        ghn = [_test(by["ghn"][s]) for s in seeds]
        mean, low, high = t_interval([a - b for a, b in zip(shn, ghn)])
        rq = {m: statistics.fmean(by[m][s]["encoder_rayleigh_quotient"][-1] for s in seeds) for m in METHODS}
        hom = [by["shn"][s].get("graph", {}).get("set_homophily", {}).get("homophily") for s in seeds]
        reached = f"{statistics.fmean(hom):.2f}" if all(h is not None for h in hom) else "–"
        lines.append(f"| {value} | {_ms(shn)} | {_ms(ghn)} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] | "
                     f"{verdict(low, high, True)} | {len(seeds)} | {rq['shn']:.2f} / {rq['ghn']:.2f} | {reached} |")
    return "\n".join(lines) + "\n"


def main() -> dict[str, str]:
    out = {}
    for name, (key, label) in STUDIES.items():
        study = ROOT / "experiments" / "results" / "study" / name
        if study.is_dir():
            out[name] = table(study, key, label)
            (study / "paired.md").write_text(out[name])
            print(f"## {name}\n{out[name]}")
    return out


if __name__ == "__main__":
    main()
