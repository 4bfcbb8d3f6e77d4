"""Robustness grid: attack type × method → honest clients' mean test accuracy, with and without
the robust option, on the digits quickstart (experiments/configs/quickstart.toml).

    python experiments/robustness.py                # the whole grid (40 runs), resumable
    python experiments/robustness.py --rounds 150 --steps 20 --model auto   # the quickstart itself
    python experiments/robustness.py --methods ghn panacea shn --attacks none label_flip   # a part

Methods: pFedHN without / with per-client delta clipping (``validation.clip_norm``), FedAvg with
the weighted mean / coordinate-wise median / trimmed mean (``methods.fedavg.aggregation``), and
the graph hypernetworks GHN, Panacea (whose graph regulariser is claimed to add robustness) and
SHN on the kNN graph inferred from pFedHN's embeddings (three-stage pipeline).
Attacks (``[attack]``): none, scale, sign_flip, random, label_flip, by ``--fraction`` of the
clients (chosen from the run seed, the same clients for every method). The budget is reduced
from the quickstart's 150 rounds × 20 local steps with its small CNN to 50 rounds × 10 steps
with the MLP target (``task.model = "mlp"``, ~5× cheaper per round on CPU) so that the grid's 40
runs take about 15 CPU-minutes; the budget used is written
next to the table.

Writes ``<out>/robustness.csv`` (one row per run, appended as runs finish, so an interrupted grid
resumes where it stopped) and ``<out>/robustness.md`` (the table).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Graph methods run the three-stage pipeline on the inferred kNN graph; the pFedHN run of the same
# attack is their stage 1 (graph.stage1_cache), so the graph columns cost one run each.
GRAPH = ['graph.kind="knn"', "graph.k=3", 'graph.stage1_cache="{stage1_cache}"']
METHODS = {  # name -> (method, robust option?, overrides, column title)
    "pfedhn": ("pfedhn", False, GRAPH, "pFedHN"),
    "pfedhn+clip": ("pfedhn", True, ["validation.clip_norm={clip_norm}"], "pFedHN + clip"),
    "fedavg": ("fedavg", False, [], "FedAvg (mean)"),
    "fedavg+median": ("fedavg", True, ["methods.fedavg.aggregation=median"], "FedAvg + median"),
    "fedavg+trimmed_mean": ("fedavg", True, ["methods.fedavg.aggregation=trimmed_mean",
                                             "methods.fedavg.trim_fraction={trim_fraction}"], "FedAvg + trimmed mean"),
    "ghn": ("ghn", False, GRAPH, "GHN (kNN)"),
    "panacea": ("panacea", False, GRAPH, "Panacea (kNN)"),
    "shn": ("shn", False, GRAPH, "SHN (kNN)"),
}
ATTACKS = ("none", "scale", "sign_flip", "random", "label_flip")
FIELDS = ["method", "variant", "attack", "fraction", "malicious_clients", "honest_test_accuracy", "test_accuracy",
          "rejected_updates", "rounds", "local_steps", "model", "seed", "wall_time_s", "cpu_time_s"]


def overrides_for(variant: str, attack: str, args: argparse.Namespace) -> list[str]:
    method, _, extra, _ = METHODS[variant]
    out = [f"method={method}", f"rounds={args.rounds}", f"eval_every={args.rounds}", f"local.steps={args.steps}",
           f"seed={args.seed}", f"task.model={args.model}"]
    out += [e.format(clip_norm=args.clip_norm, trim_fraction=args.trim_fraction,
                     stage1_cache=Path(args.out) / "_stage1") for e in extra]
    if attack != "none":
        out += [f"attack.kind={attack}", f"attack.fraction={args.fraction}"]
    return out


def run_one(variant: str, attack: str, args: argparse.Namespace) -> dict:
    from shn.config import load_config
    from shn.runner import run

    config = load_config(args.config, overrides_for(variant, attack, args))
    t0, c0 = time.perf_counter(), time.process_time()
    result = run(config, progress=False)
    summary = result.summary
    honest = summary.get("honest_test_accuracy", summary["metrics"]["test_accuracy"])  # no attack: all are honest
    return {
        "method": config.method, "variant": variant, "attack": attack, "fraction": args.fraction if attack != "none" else 0.0,
        "malicious_clients": " ".join(map(str, summary.get("malicious_clients", []))),
        "honest_test_accuracy": f"{honest:.4f}", "test_accuracy": f"{summary['metrics']['test_accuracy']:.4f}",
        "rejected_updates": summary["rejected_updates"], "rounds": config.rounds, "local_steps": config.local.steps,
        "model": args.model, "seed": config.seed, "wall_time_s": f"{time.perf_counter() - t0:.1f}",
        "cpu_time_s": f"{time.process_time() - c0:.1f}",
    }


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_markdown(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    from shn.config import AttackConfig

    attack = AttackConfig()
    cell = {(r["variant"], r["attack"]): float(r["honest_test_accuracy"]) for r in rows}
    malicious = next((r["malicious_clients"] for r in rows if r["malicious_clients"]), "")
    lines = [
        "Honest clients' mean test accuracy on the digits quickstart (10 clients, 2 classes each, "
        f"{args.fraction:g} of them malicious: clients {malicious or '-'}), seed {args.seed}, "
        f"{args.rounds} rounds × {args.steps} local steps, `task.model = \"{args.model}\"` (the quickstart runs 150 × 20 "
        "with its small CNN). Robust options: "
        f"pFedHN `validation.clip_norm = {args.clip_norm:g}`; FedAvg `methods.fedavg.aggregation = \"median\"` / "
        f"`\"trimmed_mean\"` (`trim_fraction = {args.trim_fraction:g}`). Attacks (`[attack] kind`): scale = "
        f"{attack.scale:g}× the update, sign_flip = −{attack.scale:g}× the update, random = N(0, {attack.noise_std:g}²) "
        "noise instead of the update, "
        "label_flip = training on permuted labels. Measured by `experiments/robustness.py`.",
        "",
        "| attack | " + " | ".join(m[3] for m in METHODS.values()) + " |",
        "|---" * (len(METHODS) + 1) + "|",
    ]
    for attack in ATTACKS:
        vals = [cell.get((v, attack)) for v in METHODS]
        lines.append(f"| {attack} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in vals) + " |")
    wall = sum(float(r["wall_time_s"]) for r in rows)
    cpu = sum(float(r["cpu_time_s"]) for r in rows)
    lines += ["", f"{len(rows)} runs: {cpu / 60:.1f} CPU-minutes, {wall / 60:.1f} min of wall time on the machine used."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "experiments/configs/quickstart.toml"))
    p.add_argument("--out", default=str(REPO / "experiments/results/robustness"))
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--model", default="mlp", help="task.model (the quickstart's own: auto = small CNN)")
    p.add_argument("--clip-norm", type=float, default=0.7,
                   help="about the median honest pFedHN delta norm at the default budget (0.67)")
    p.add_argument("--trim-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore rows already in the CSV")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "robustness.csv"
    if args.fresh and csv_path.exists():
        csv_path.unlink()
    key = lambda r: (r["variant"], r["attack"], str(r["rounds"]), str(r["local_steps"]), r["model"], str(r["seed"]))  # noqa: E731
    done = {key(r) for r in read_rows(csv_path)}
    for attack in args.attacks:
        for variant in args.methods:
            wanted = (variant, attack, str(args.rounds), str(args.steps), args.model, str(args.seed))
            if wanted in done:
                continue
            row = run_one(variant, attack, args)
            new = not csv_path.exists()
            with open(csv_path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                w.writerow(row)
            print(f"{attack:>10} {variant:<20} honest acc {row['honest_test_accuracy']}  ({row['wall_time_s']} s)", flush=True)
    rows = [r for r in read_rows(csv_path)
            if (r["rounds"], r["local_steps"], r["model"], r["seed"]) == (str(args.rounds), str(args.steps), args.model, str(args.seed))]
    write_markdown(rows, out / "robustness.md", args)
    print(out / "robustness.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
