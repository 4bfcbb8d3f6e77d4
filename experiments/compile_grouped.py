"""Does ``torch.compile`` of the grouped network's loss speed up W2's CIFAR CNN round on CPU?

    python experiments/compile_grouped.py [THREADS]

Times one round (pFedHN's CNN × 50 clients, 2 local steps, batch 64; ``tests/benchmarks/
round_report.py``'s ``cifar_cnn`` workload) in the per-client loop, ``grouped``, ``grouped`` with
bfloat16, and both ``grouped`` variants with the grouped loss wrapped in ``torch.compile``
(inductor, static shapes); prints each mode's median over 5 interleaved repetitions after a
warm-up (which includes compilation) and its ratio to the fp32 loop.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from shn.federated.grouped import GroupedNet, grouped_loss  # noqa: E402
from shn.federated.local import autocast_loss, autograd_grad_and_value  # noqa: E402
from tests.benchmarks import round_report as rr  # noqa: E402


def compiled_round(precision: str):
    """A grouped round whose trainer takes gradients of the compiled grouped loss."""
    fn = rr.make_round("cifar_cnn", "grouped" if precision == "fp32" else "grouped+bf16")[0]
    trainer = next(c.cell_contents for c in fn.__closure__ if hasattr(c.cell_contents, "_grouped_grads"))
    trainer._grouped_net = GroupedNet(trainer.template)
    loss = grouped_loss(trainer._grouped_net, trainer.loss)
    trainer._grouped_grad = autograd_grad_and_value(autocast_loss(torch.compile(loss, dynamic=False), precision))
    return fn


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    rounds = {m: rr.make_round("cifar_cnn", m)[0] for m in ("loop", "grouped", "grouped+bf16")}
    rounds["grouped+compile"] = compiled_round("fp32")
    rounds["grouped+bf16+compile"] = compiled_round("bf16")
    for name, fn in rounds.items():
        t0 = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - t0:.2f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in rounds}
    for _ in range(5):
        for name, fn in rounds.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["loop"])
    for name, t in times.items():
        print(f"{name:<22} {statistics.median(t):.3f} s   / loop {statistics.median(t) / base:.3f}")


if __name__ == "__main__":
    main()
