"""Workload W2 (``../shared/BENCHMARKS.md``): one round of local training, the trainer's modes
interleaved in one process.

Shared by ``test_bench_round.py`` (pytest-benchmark) and runnable as a script that prints the
README's W2 table (medians of per-repetition ratios, wall clock and process CPU time)::

    python tests/benchmarks/round_report.py                      # all workloads, 2 threads
    python tests/benchmarks/round_report.py --workloads gru mlp --rounds 15 --threads 1
    python tests/benchmarks/round_report.py --workloads gru --functorch-loop
    python tests/benchmarks/round_report.py --workloads cifar_cnn --modes loop grouped --precision fp32 bf16

Workloads (synthetic data; one repetition = one round for every client):

* ``cifar_cnn`` — pFedHN's CIFAR CNN (``tasks.models.PFedHNCNN``) × 50 clients, 3×32×32 inputs
  (128 per client), batch 64, **2 local steps instead of W2's 50** (the per-step cost is what the
  modes differ in; a 50-step loop round takes minutes on 2 threads).
* ``mlp`` — the digits MLP (64 → 128 → 10) × 64 clients, batch 64, 10 local steps.
* ``gru`` — the GRU forecaster (2 features → 32 hidden, windows 12 → 12) × 207 clients, batch 64,
  2 local steps.

Modes are timed in turn within each repetition, the order rotated every repetition, so load that
drifts on a shared machine hits them alike; a ratio is the median over repetitions of the
per-repetition ratio. ``--functorch-loop`` adds ``loop_functorch``: the per-client loop taking
gradients with ``torch.func.grad_and_value`` as it did before the loop switched to plain autograd
(the path behind the README's first W2 figures). ``--precision fp32 bf16`` adds every mode once more
with ``local.precision = "bf16"``, named ``<mode>+bf16``; all ratios stay relative to the fp32 loop.
``--modes`` restricts the modes timed (the fp32 loop always runs: it is every ratio's reference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad_and_value

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # running as a script from anywhere
    sys.path.insert(0, str(REPO))

from shn.config import LocalConfig  # noqa: E402
from shn.federated.grouped import grouped_unsupported  # noqa: E402
from shn.federated.local import ClientStore, LocalTrainer  # noqa: E402
from shn.target import module_params  # noqa: E402
from tasks.base import ClientData, classification_loss  # noqa: E402
from tasks.models import MLP, PFedHNCNN  # noqa: E402

DEVICE = torch.device(os.environ.get("SHN_BENCH_DEVICE", "cpu"))


def mse(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (output - y).pow(2).mean()


@dataclass(frozen=True)
class Workload:
    build: Callable[[], nn.Module]
    clients: int
    samples: int  # training samples per client
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...] | None  # None: class labels
    classes: int
    steps: int
    loss: Callable[..., torch.Tensor]
    batch_size: int = 64


def _gru() -> nn.Module:
    from tasks.forecast_models import GRUForecaster

    return GRUForecaster(2, 1, 12, hidden=32)


WORKLOADS = {
    "cifar_cnn": Workload(lambda: PFedHNCNN(3, 10), 50, 128, (3, 32, 32), None, 10, 2, classification_loss),
    "mlp": Workload(lambda: MLP(64, 10), 64, 128, (1, 8, 8), None, 10, 10, classification_loss),
    "gru": Workload(_gru, 207, 128, (12, 2), (12, 1), 0, 2, mse),
}
try:
    import tasks.forecast_models  # noqa: F401
except ImportError:  # pragma: no cover - the forecasting models are optional
    del WORKLOADS["gru"]

_CACHE: dict[str, tuple] = {}


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def prepared(name: str):
    """(template, store, stacked start params, clients) for a workload, built once."""
    if name not in _CACHE:
        w = WORKLOADS[name]
        g = torch.Generator().manual_seed(0)
        data = {}
        for c in range(w.clients):
            def split(n):
                x = torch.randn(n, *w.x_shape, generator=g)
                y = (torch.randn(n, *w.y_shape, generator=g) if w.y_shape is not None
                     else torch.randint(0, w.classes, (n,), generator=g))
                return x, y
            data[c] = ClientData(split(w.samples), split(2), split(2))
        store = ClientStore(data, DEVICE)
        torch.manual_seed(0)
        template = w.build().to(DEVICE)
        base = module_params(template)
        noise = torch.Generator().manual_seed(1)
        params = {k: (v.cpu().unsqueeze(0) + 0.01 * torch.randn(w.clients, *v.shape, generator=noise)).to(DEVICE)
                  for k, v in base.items()}
        _CACHE[name] = (template, store, params, list(range(w.clients)))
    return _CACHE[name]


def modes_for(name: str) -> tuple[str, ...]:
    """The trainer modes that can run a workload (``grouped`` needs a convolutional target)."""
    supported = grouped_unsupported(WORKLOADS[name].build()) is None
    return ("vmap", "loop", "grouped", "auto") if supported else ("vmap", "loop", "auto")


def with_precision(modes: tuple[str, ...], precisions: tuple[str, ...]) -> tuple[str, ...]:
    """``modes`` once per precision: fp32 as named, others as ``<mode>+<precision>``."""
    return tuple(m if p == "fp32" else f"{m}+{p}" for p in precisions for m in modes)


def make_round(name: str, mode: str):
    """(a function running one round of local training in ``mode``, the mode ``auto`` resolves to).
    ``mode = "loop_functorch"``: the loop with ``torch.func.grad_and_value`` per client;
    ``"<mode>+bf16"``: ``mode`` with ``local.precision = "bf16"``."""
    w = WORKLOADS[name]
    template, store, params, clients = prepared(name)
    mode, _, precision = mode.partition("+")
    cfg = LocalConfig(steps=w.steps, batch_size=w.batch_size, precision=precision or "fp32",
                      mode="loop" if mode == "loop_functorch" else mode)  # pFedHN's lr/momentum/wd/clip
    trainer = LocalTrainer(template, w.loss, cfg)
    if mode == "loop_functorch":
        trainer._grad = grad_and_value(lambda p, x, *t: w.loss(functional_call(template, p, (x,)), *t))

    def one_round():
        result = trainer.train(params, store, clients, torch.Generator().manual_seed(0))
        sync()
        return result

    return one_round, trainer.resolve_mode(DEVICE)


def interleaved(name: str, modes: tuple[str, ...], rounds: int) -> dict[str, dict[str, list[float]]]:
    """``{mode: {"wall": [s], "cpu": [s]}}`` over ``rounds`` repetitions after one warm-up, the
    modes timed in turn within each repetition and their order rotated every repetition."""
    runs = {m: make_round(name, m)[0] for m in modes}
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in modes}
    order = list(modes)
    for rep in range(rounds + 1):
        for m in order:
            w0, c0 = time.perf_counter(), time.process_time()
            runs[m]()
            if rep:  # repetition 0 is the warm-up
                times[m]["wall"].append(time.perf_counter() - w0)
                times[m]["cpu"].append(time.process_time() - c0)
        order.append(order.pop(0))
    return times


def ratio(times, a: str, b: str, kind: str = "wall") -> float:
    """Median over repetitions of time(a) / time(b)."""
    return statistics.median(x / y for x, y in zip(times[a][kind], times[b][kind]))


def bf16_instructions() -> str:
    """The CPU's bfloat16 instruction sets named in /proc/cpuinfo (Linux), or a note why not."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    found = sorted(f for f in flags.split(":", 1)[1].split() if "bf16" in f)
    return ", ".join(found) or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=sorted(WORKLOADS), choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=7, help="repetitions after one warm-up (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--functorch-loop", action="store_true",
                        help="also time the loop with torch.func.grad_and_value (before it used autograd)")
    parser.add_argument("--modes", nargs="+", default=["vmap", "loop", "grouped"], choices=["vmap", "loop", "grouped"],
                        help="modes to time where the workload supports them (default all)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="local.precision values to time every mode in (default fp32; bf16 modes are '<mode>+bf16')")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu_bf16 = f", CPU bfloat16 instructions: {bf16_instructions()}" if DEVICE.type == "cpu" else ""
    print(f"W2, {args.threads} threads, {args.rounds} interleaved repetitions, {DEVICE}, "
          f"load average at start {load:.1f} on {os.cpu_count()} CPUs{cpu_bf16 if 'bf16' in args.precision else ''}\n")
    print("| target × clients (steps) | median s per round | time / loop time: wall (process CPU) | `auto` picks |")
    print("|---|---|---|---|")
    for name in args.workloads:
        w = WORKLOADS[name]
        supported = tuple(m for m in modes_for(name) if m != "auto" and m in args.modes)
        modes = with_precision(supported, tuple(dict.fromkeys(args.precision)))
        if "loop" not in modes:
            modes = ("loop",) + modes  # the reference of every ratio
        if args.functorch_loop:
            modes += ("loop_functorch",)
        t = interleaved(name, modes, args.rounds)
        medians = ", ".join(f"{m} {statistics.median(t[m]['wall']):.3g}" for m in modes)
        ratios = ", ".join(f"{m} {ratio(t, m, 'loop'):.2f} ({ratio(t, m, 'loop', 'cpu'):.2f})"
                           for m in modes if m != "loop")
        picks = make_round(name, "auto")[1]
        print(f"| {name} × {w.clients} ({w.steps}) | {medians} | {ratios} | {picks} |", flush=True)


if __name__ == "__main__":
    main()
