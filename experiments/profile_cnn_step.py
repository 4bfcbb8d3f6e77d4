"""Where the CPU time of a CIFAR-CNN client update goes: torch.profiler's top ops.

    python experiments/profile_cnn_step.py                       # loop and grouped, 2 threads
    python experiments/profile_cnn_step.py --modes loop --steps 50 --rows 20
    python experiments/profile_cnn_step.py --precision bf16        # local.precision = "bf16"

One client update = ``--steps`` local SGD steps (pFedHN: 50) of batch 64 on pFedHN's CIFAR CNN,
synthetic 3×32×32 inputs. ``loop`` trains one client (the per-client path); ``grouped`` trains a
cohort of ``--clients`` at once and its times are divided by the cohort size. Each table lists
ops by self CPU time with their share; the header gives wall milliseconds per client step. On a
machine shared with other jobs read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shn.config import LocalConfig  # noqa: E402
from shn.federated.local import ClientStore, LocalTrainer  # noqa: E402
from shn.target import module_params  # noqa: E402
from tasks.base import ClientData, classification_loss  # noqa: E402
from tasks.models import PFedHNCNN  # noqa: E402


def cohort(clients: int, samples: int = 256):
    g = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    store = ClientStore({c: ClientData(split(samples), split(2), split(2)) for c in range(clients)})
    torch.manual_seed(0)
    template = PFedHNCNN(3, 10)
    params = {k: v.unsqueeze(0).repeat(clients, *[1] * v.dim()) for k, v in module_params(template).items()}
    return template, store, params


def profile_mode(mode: str, clients: int, steps: int, rows: int, precision: str = "fp32") -> None:
    template, store, params = cohort(clients)
    trainer = LocalTrainer(template, classification_loss, LocalConfig(steps=steps, mode=mode, precision=precision))
    ids = list(range(clients))
    trainer.train(params, store, ids, torch.Generator().manual_seed(0))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        trainer.train(params, store, ids, torch.Generator().manual_seed(0))
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{mode} ({precision}): {clients} client(s) x {steps} steps, {torch.get_num_threads()} threads: "
          f"{wall / (clients * steps) * 1e3:.1f} ms wall per client step")
    print("| op | share of aten self CPU | ms per client step | calls per client step |")
    print("|---|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / total:.1%} | "
              f"{e.self_cpu_time_total / 1e3 / (clients * steps):.2f} | {e.count / (clients * steps):.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["loop", "grouped"], choices=["loop", "grouped", "vmap"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--clients", type=int, default=5, help="cohort size for grouped and vmap (loop: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="local.precision")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for mode in args.modes:
        profile_mode(mode, 1 if mode == "loop" else args.clients, args.steps, args.rows, args.precision)


if __name__ == "__main__":
    main()
