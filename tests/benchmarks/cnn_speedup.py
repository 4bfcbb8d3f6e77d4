"""The CIFAR CNN's local-training speed-up against the per-client loop as it ran before
``shn --allocator keep`` (W2's ``cifar_cnn`` round: pFedHN's CNN × 50 clients, batch 64, W2's 50 local steps or fewer), in
one run.

    python tests/benchmarks/cnn_speedup.py                      # 2 threads, 50 steps, 5 repetitions
    python tests/benchmarks/cnn_speedup.py --steps 2 --repetitions 7 --threads 1
    python tests/benchmarks/cnn_speedup.py --variants 3 5         # the reference, and VARIANTS[3], [5]

The allocator is a per-process setting, so each variant runs in a child process of its own; a
repetition starts one child per variant, in an order rotated every repetition, so load that drifts
on a shared machine hits them alike. A child builds the workload, runs a warm-up round of 2 local steps and
then ``--rounds`` timed rounds; its time is their median. Every ratio is a variant's time over the
reference's in the same repetition (the reference: ``loop`` in float32 with glibc's default
malloc, the path before this change), and the table gives the median over repetitions with the
range. ``keep`` changes no number (``tests/test_allocator.py``); ``bf16`` changes numbers within the
tolerance the README documents (``experiments/bf16_tolerance.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (name, local.mode, local.precision, allocator); the first is every ratio's reference
VARIANTS = (
    ("loop fp32, system malloc", "loop", "fp32", "system"),
    ("loop fp32, keep", "loop", "fp32", "keep"),
    ("grouped fp32, system malloc", "grouped", "fp32", "system"),
    ("grouped fp32, keep", "grouped", "fp32", "keep"),
    ("grouped bf16, system malloc", "grouped", "bf16", "system"),
    ("grouped bf16, keep", "grouped", "bf16", "keep"),
)


def child(mode: str, precision: str, allocator: str, threads: int, rounds: int, steps: int) -> dict:
    """Time ``rounds`` W2 CIFAR rounds in this process (after one warm-up): wall and CPU seconds,
    and the page faults of the timed rounds."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import resource
    import time

    import torch

    from tests.benchmarks import round_report

    torch.set_num_threads(threads)
    name = mode if precision == "fp32" else f"{mode}+{precision}"
    workload = round_report.WORKLOADS["cifar_cnn"]
    # a short warm-up round (the trace, kernel caches, the heap), then the timed rounds
    round_report.WORKLOADS["cifar_cnn"] = dataclasses.replace(workload, steps=min(2, steps))
    round_report.make_round("cifar_cnn", name)[0]()
    round_report.WORKLOADS["cifar_cnn"] = dataclasses.replace(workload, steps=steps)
    one_round = round_report.make_round("cifar_cnn", name)[0]
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        one_round()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "page_faults": faults / rounds}


def run_child(variant: tuple[str, str, str, str], threads: int, rounds: int, steps: int) -> dict:
    _, mode, precision, allocator = variant
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # "system": glibc's defaults
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), SHN_ALLOCATOR=allocator)  # read by LocalTrainer
    out = subprocess.run([sys.executable, __file__, "--child", mode, precision, allocator, "--threads", str(threads),
                          "--rounds", str(rounds), "--steps", str(steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(threads: int = 2, repetitions: int = 5, rounds: int = 1, steps: int = 50,
            variants: tuple = VARIANTS) -> dict[str, list[dict]]:
    """``{variant name: [child result per repetition]}``, children interleaved, order rotated."""
    results: dict[str, list[dict]] = {v[0]: [] for v in variants}
    order = list(variants)
    for _ in range(repetitions):
        for v in order:
            results[v[0]].append(run_child(v, threads, rounds, steps))
        order.append(order.pop(0))
    return results


def ratios(results: dict[str, list[dict]], kind: str = "wall") -> dict[str, list[float]]:
    """Per repetition, every variant's time over the reference's (the first variant)."""
    ref = next(iter(results.values()))
    return {name: [r[kind] / q[kind] for r, q in zip(rs, ref)] for name, rs in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per child (default 1)")
    parser.add_argument("--steps", type=int, default=50, help="local steps per round (default: W2's 50)")
    parser.add_argument("--variants", nargs="+", type=int, default=None,
                        help="indices into VARIANTS to time (the reference, 0, always runs)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "PRECISION", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.threads, args.rounds, args.steps)))
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"W2 cifar_cnn round ({args.steps} local steps), {args.threads} threads, {args.repetitions} interleaved repetitions of "
          f"{args.rounds} rounds per variant, load average at start {load:.1f} on {os.cpu_count()} CPUs\n")
    chosen = VARIANTS if args.variants is None else tuple(VARIANTS[i] for i in sorted({0, *args.variants}))
    results = measure(args.threads, args.repetitions, args.rounds, args.steps, chosen)
    wall, cpu = ratios(results, "wall"), ratios(results, "cpu")
    print("| variant | median s per round | time / reference: wall, median [range] | process CPU | page faults per round |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {statistics.median(r['wall'] for r in rs):.3g} | {statistics.median(wall[name]):.2f} "
              f"[{min(wall[name]):.2f}, {max(wall[name]):.2f}] | {statistics.median(cpu[name]):.2f} | "
              f"{statistics.median(r['page_faults'] for r in rs):,.0f} |")


if __name__ == "__main__":
    main()
