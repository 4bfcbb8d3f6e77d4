"""Issue 18 item 1: one shared hypernetwork for clients of three widths vs a separate pFedHN per
width group, paired by seed, at an equal budget in client updates.

    python experiments/widths/width_study.py --seeds 0 1 2 [--config experiments/widths/cifar10_widths.toml]
        [--out experiments/results/widths/cifar10] [--threads 1]

For each seed: ``shared/seed<s>`` is the config as it is (every client, one pFedHN generating the
widest CNN); ``separate-w<w>/seed<s>`` is pFedHN on the clients of width ``w`` only (the same task,
partition and seed; the training and evaluation pool restricted to that group) for ``rounds / G``
rounds, so the G groups together spend the shared run's client updates. A finished run directory
is skipped (the study resumes where it stopped). Then ``widths.csv``, ``widths.md`` and
``widths.png`` in ``--out`` (and, with ``--readme``, the README's ``<!-- widths -->`` block): per width, the mean test accuracy of its clients at the last round
(no selection in either arm; the same rule for both) over seeds, and the paired difference shared −
separate with a 95 % t-interval over seeds.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from shn.build import build, execute  # noqa: E402
from shn.config import load_config  # noqa: E402
from shn.paired import t_interval, verdict  # noqa: E402
from shn.runner import run, torch_threads  # noqa: E402


def groups_of(task) -> dict[float, list[int]]:
    out: dict[float, list[int]] = {}
    for c in range(task.num_clients):
        out.setdefault(task.width_of(c), []).append(c)
    return out


def run_seed(config_path: Path, out: Path, seed: int, overrides: list[str]) -> None:
    config = load_config(config_path, [*overrides, f"seed={seed}"])
    shared = out / "shared" / f"seed{seed}"
    if not (shared / "summary.json").is_file():
        print(f"seed {seed}: shared hypernetwork", flush=True)
        run(config, run_dir=shared, resume=(shared / "config.toml").is_file())
    built = build(config)
    groups = groups_of(built.task)
    rounds = config.rounds // len(groups)
    for width, clients in groups.items():
        path = out / f"separate-w{width:g}" / f"seed{seed}"
        if (path / "summary.json").is_file():
            continue
        print(f"seed {seed}: separate pFedHN for width {width:g} ({len(clients)} clients, {rounds} rounds)", flush=True)
        part = build(dataclasses.replace(config, rounds=rounds))
        path.mkdir(parents=True, exist_ok=True)
        (path / "pool.json").write_text(json.dumps({"width": width, "clients": clients, "rounds": rounds}) + "\n")
        execute(part, run_dir=path, pool=clients, resume=(path / "config.toml").is_file())


def per_width(summary: dict, widths_of: dict[int, float]) -> dict[float, float]:
    rows: dict[float, list[float]] = {}
    for c, row in summary["per_client"].items():
        rows.setdefault(widths_of[int(c)], []).append(float(row["test_accuracy"]))
    return {w: statistics.fmean(v) for w, v in rows.items()}


def report(config_path: Path, out: Path, seeds: list[int], overrides: list[str], update_readme: bool = False) -> None:
    config = load_config(config_path, overrides)
    task = build(config).task
    widths_of = {c: task.width_of(c) for c in range(task.num_clients)}
    table = []
    for seed in seeds:
        shared = json.loads((out / "shared" / f"seed{seed}" / "summary.json").read_text())
        got = per_width(shared, widths_of)
        for width in sorted(set(widths_of.values())):
            sep = json.loads((out / f"separate-w{width:g}" / f"seed{seed}" / "summary.json").read_text())
            table.append({"seed": seed, "width": width, "shared": got[width],
                          "separate": per_width(sep, widths_of)[width]})
    with open(out / "widths.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["seed", "width", "shared", "separate"])
        w.writeheader()
        w.writerows(table)
    lines = ["| width | clients | shared pFedHN | separate pFedHN per width | Δ shared − separate [95 % CI] | verdict |",
             "|---|---|---|---|---|---|"]
    summary_rows = []
    for width in sorted(set(widths_of.values())):
        rows = [r for r in table if r["width"] == width]
        a, b = [r["shared"] for r in rows], [r["separate"] for r in rows]
        mean, low, high = t_interval([x - y for x, y in zip(a, b)]) if len(rows) > 1 else (a[0] - b[0],) * 3
        n = sum(1 for v in widths_of.values() if v == width)
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        lines.append(f"| ×{width:g} | {n} | {statistics.fmean(a):.4f} ± {sd(a):.4f} | {statistics.fmean(b):.4f} ± "
                     f"{sd(b):.4f} | {mean:+.4f} [{low:+.4f}, {high:+.4f}] | {verdict(low, high, True)} |")
        summary_rows.append((width, statistics.fmean(a), statistics.fmean(b), sd(a), sd(b)))
    text = (f"Test accuracy at the last round, mean over the width's clients, mean ± std over seeds "
            f"{seeds}; paired by seed.\n\n" + "\n".join(lines) + "\n")
    (out / "widths.md").write_text(text)
    print(text)
    readme = REPO / "README.md"
    if update_readme and "<!-- widths:start -->" in readme.read_text():
        block = f"<!-- widths:start -->\n{text}<!-- widths:end -->"
        readme.write_text(re.sub(r"<!-- widths:start -->.*?<!-- widths:end -->", lambda _: block,
                                 readme.read_text(), flags=re.S))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = range(len(summary_rows))
    ax.bar([x - 0.18 for x in xs], [r[1] for r in summary_rows], 0.36, yerr=[r[3] for r in summary_rows],
           label="one shared pFedHN", capsize=3)
    ax.bar([x + 0.18 for x in xs], [r[2] for r in summary_rows], 0.36, yerr=[r[4] for r in summary_rows],
           label="a pFedHN per width", capsize=3)
    ax.set_xticks(list(xs), [f"width ×{r[0]:g}" for r in summary_rows])
    ax.set_ylabel("test accuracy (last round)")
    ax.set_title(f"{task.name}: clients of three widths, {len(seeds)} seeds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "widths.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "experiments/widths/cifar10_widths.toml")
    p.add_argument("--out", type=Path, default=REPO / "experiments/results/widths/cifar10")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--readme", action="store_true", help="also replace the README's <!-- widths --> block")
    args = p.parse_args()
    with torch_threads(args.threads):
        if not args.report_only:
            for seed in args.seeds:
                run_seed(args.config, args.out, seed, args.overrides)
        report(args.config, args.out, args.seeds, args.overrides, args.readme)


if __name__ == "__main__":
    main()
