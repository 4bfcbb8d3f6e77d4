"""W2 benchmark (``../shared/BENCHMARKS.md``): one federated round.

Skipped by the default test run (``--benchmark-skip``); run with::

    pytest tests/benchmarks/test_bench_round.py --benchmark-only

Local training of one round, every client of the round at once, in the ``LocalTrainer`` modes
``vmap``, ``loop`` and ``auto``:

* ``cifar_cnn`` — pFedHN's CIFAR CNN (``tasks.models.PFedHNCNN``) × 50 clients, synthetic
  3×32×32 inputs (128 per client), batch 64. **2 local steps instead of W2's 50** (one 50-step
  round takes minutes per mode on 2 threads); the per-step cost is what the modes differ in, and
  ``extra_info`` also holds the projection to 50 steps.
* ``mlp`` — the digits MLP (64 → 128 → 10) × 64 clients, batch 64, 10 local steps.
* ``gru`` — the GRU forecaster (2 features → 32 hidden, windows 12 → 12) × 207 clients, batch
  64, 2 local steps.

and the pFedHN server update for 50 CIFAR-CNN clients: one batched vector–Jacobian product for
all 50 (``HyperNetworkAlgorithm.apply_updates``) vs one backward per client.

Ratios (medians; ``*_min`` from the minima) go to ``extra_info`` and are printed:
``vmap_over_loop`` (< 1: vmap faster), ``auto_over_best`` = auto / min(vmap, loop) (≈ 1 when
the ``auto`` rule picks the faster path), ``per_client_over_batched`` for the server update.
Absolute times on shared 2-core machines move by ±20% or more; compare ratios from one run.

Environment: ``SHN_BENCH_ROUNDS`` (default 10 repetitions), ``SHN_BENCH_DEVICE`` (default cpu).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

from shn.config import LocalConfig, ServerConfig
from shn.federated.algorithm import HyperNetworkAlgorithm, _clip
from shn.federated.local import ClientStore, LocalTrainer
from shn.hypernetwork import HyperNetwork
from shn.target import ParamSpec, module_params
from tasks.base import ClientData, classification_loss
from tasks.models import MLP, PFedHNCNN

pytest.importorskip("pytest_benchmark")

ROUNDS = int(os.environ.get("SHN_BENCH_ROUNDS", "10"))
DEVICE = torch.device(os.environ.get("SHN_BENCH_DEVICE", "cpu"))
MODES = ("vmap", "loop", "auto")
AUTO_TOLERANCE = 1.3  # auto may be this much slower than the faster mode (noise on shared machines)


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


def _sync() -> None:
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


def _round(name: str, mode: str):
    """(a function running one round of local training in ``mode``, the mode ``auto`` resolves to)."""
    w = WORKLOADS[name]
    template, store, params, clients = prepared(name)
    cfg = LocalConfig(steps=w.steps, batch_size=w.batch_size, mode=mode)  # pFedHN's lr/momentum/wd/clip
    trainer = LocalTrainer(template, w.loss, cfg)

    def one_round():
        result = trainer.train(params, store, clients, torch.Generator().manual_seed(0))
        _sync()
        return result

    return one_round, trainer.resolve_mode(DEVICE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_w2_local_training(benchmark, name, mode):
    """One row per (workload, mode) in the benchmark table (for ``--benchmark-compare``)."""
    w = WORKLOADS[name]
    one_round, picks = _round(name, mode)
    benchmark.group = f"W2 local training: {name}"
    benchmark.extra_info.update(workload=name, mode=mode, resolved_mode=picks, clients=w.clients, steps=w.steps,
                                batch_size=w.batch_size, threads=torch.get_num_threads(), device=str(DEVICE))
    result = benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.isfinite(result.loss).all()
    stats = benchmark.stats.stats
    per_step = stats.median / w.steps
    benchmark.extra_info.update(
        median_s=stats.median, min_s=stats.min, median_step_s=per_step,
        client_updates_per_s=w.clients / stats.median,
        projected_50_step_round_s=per_step * 50,
    )


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_w2_mode_ratios(benchmark, capsys, name):
    """The three modes interleaved (order rotated every repetition), so that load drifting on a
    shared machine hits them alike; ratios from the per-repetition pairs and from the minima."""
    w = WORKLOADS[name]
    rounds = {m: _round(name, m) for m in MODES}
    picks = rounds["auto"][1]
    times: dict[str, list[float]] = {m: [] for m in MODES}
    order = list(MODES)

    def all_modes():
        for m in order:
            t0 = time.perf_counter()
            rounds[m][0]()
            times[m].append(time.perf_counter() - t0)
        order.append(order.pop(0))

    benchmark.group = "W2 local training: the three modes interleaved"
    benchmark.pedantic(all_modes, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    t = {m: v[1:] for m, v in times.items()}  # drop the warm-up repetition
    best = [min(a, b) for a, b in zip(t["vmap"], t["loop"])]
    ratios = {
        "vmap_over_loop": statistics.median(a / b for a, b in zip(t["vmap"], t["loop"])),
        "vmap_over_loop_min": min(t["vmap"]) / min(t["loop"]),
        "auto_over_best": statistics.median(a / b for a, b in zip(t["auto"], best)),
        "auto_over_best_min": min(t["auto"]) / min(min(t["vmap"]), min(t["loop"])),
        "faster_mode": "vmap" if min(t["vmap"]) < min(t["loop"]) else "loop",
        "auto_picks": picks,
    }
    benchmark.extra_info.update(workload=name, clients=w.clients, steps=w.steps, batch_size=w.batch_size,
                                threads=torch.get_num_threads(), device=str(DEVICE), **ratios)
    for m in MODES:
        benchmark.extra_info[f"{m}_median_s"] = statistics.median(t[m])
        benchmark.extra_info[f"{m}_min_s"] = min(t[m])
        benchmark.extra_info[f"{m}_client_updates_per_s"] = w.clients / statistics.median(t[m])
    with capsys.disabled():
        print(f"\nW2 {name} ({w.clients} clients, {w.steps} steps, batch {w.batch_size}, {DEVICE}, "
              f"{torch.get_num_threads()} threads): " + "  ".join(
                  f"{m}{'[' + picks + ']' if m == 'auto' else ''} {statistics.median(t[m]):.3f}s (min {min(t[m]):.3f}s)"
                  for m in MODES)
              + f"  | vmap/loop = {ratios['vmap_over_loop']:.2f} (min {ratios['vmap_over_loop_min']:.2f})"
              f"  auto/best = {ratios['auto_over_best']:.2f} (min {ratios['auto_over_best_min']:.2f})")
    assert ratios["auto_picks"] == ratios["faster_mode"] or ratios["auto_over_best_min"] <= AUTO_TOLERANCE, (
        f"{name}: auto ({picks}) is {ratios['auto_over_best_min']:.2f}x the faster mode "
        f"({ratios['faster_mode']}); revisit LocalTrainer.resolve_mode")


# -- the server update ----------------------------------------------------------------------------

SERVER_CLIENTS = 50


def _server():
    torch.manual_seed(0)
    spec = ParamSpec.from_module(PFedHNCNN(3, 10))
    hn = HyperNetwork(spec, SERVER_CLIENTS).to(DEVICE)  # pFedHN: embed dim 1 + N/4, hidden 100, 3 blocks
    alg = HyperNetworkAlgorithm(hn, ServerConfig())
    clients = list(range(SERVER_CLIENTS))
    g = torch.Generator().manual_seed(2)
    deltas = {n: 1e-3 * torch.randn(SERVER_CLIENTS, *s, generator=g).to(DEVICE) for n, s in zip(spec.names, spec.shapes)}
    return alg, clients, deltas


def per_client_grads(alg: HyperNetworkAlgorithm, clients, deltas) -> list[torch.Tensor]:
    """The same gradient as the batched update, from one backward pass per client."""
    params = [p for p in alg.hn.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    for i, c in enumerate(clients):
        theta = alg.generate([c])
        names = list(theta)
        grads = torch.autograd.grad([theta[n] for n in names], params,
                                    [deltas[n][i:i + 1] / len(clients) for n in names], allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a += g
    return acc


def per_client_update(alg: HyperNetworkAlgorithm, clients, deltas) -> None:
    params = [p for p in alg.hn.parameters() if p.requires_grad]
    for p, g in zip(params, per_client_grads(alg, clients, deltas)):
        p.grad = g
    _clip(params, alg.config.grad_clip)
    alg.optimizer.step()
    alg.optimizer.zero_grad(set_to_none=True)


def batched_grads(alg: HyperNetworkAlgorithm, clients, deltas) -> list[torch.Tensor]:
    params = [p for p in alg.hn.parameters() if p.requires_grad]
    theta = alg.generate(clients)
    names = list(theta)
    grads = torch.autograd.grad([theta[n] for n in names], params, [deltas[n] / len(clients) for n in names],
                                allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


SERVER_RESULTS: dict[str, dict[str, float]] = {}


@pytest.mark.parametrize("how", ["batched", "per_client"])
def test_w2_server_update(benchmark, capsys, how):
    alg, clients, deltas = _server()
    if how == "per_client":  # same gradient, C backward passes instead of one
        for a, b in zip(per_client_grads(alg, clients, deltas), batched_grads(alg, clients, deltas)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)

    def update():
        if how == "batched":
            alg.apply_updates(clients, deltas, torch.full((len(clients),), 100))
        else:
            per_client_update(alg, clients, deltas)
        _sync()

    benchmark.group = "W2 server update: pFedHN CIFAR CNN, 50 clients"
    benchmark.extra_info.update(how=how, clients=len(clients), hn_params=sum(p.numel() for p in alg.hn.parameters()),
                                threads=torch.get_num_threads(), device=str(DEVICE))
    benchmark.pedantic(update, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    stats = benchmark.stats.stats
    SERVER_RESULTS[how] = {"min": stats.min, "median": stats.median}
    benchmark.extra_info.update(median_s=stats.median, min_s=stats.min)
    if len(SERVER_RESULTS) == 2:
        ratio = SERVER_RESULTS["per_client"]["median"] / SERVER_RESULTS["batched"]["median"]
        ratio_min = SERVER_RESULTS["per_client"]["min"] / SERVER_RESULTS["batched"]["min"]
        benchmark.extra_info.update(per_client_over_batched=ratio, per_client_over_batched_min=ratio_min)
        with capsys.disabled():
            print(f"\nW2 server update (50 clients, {DEVICE}): batched {SERVER_RESULTS['batched']['median']:.3f}s  "
                  f"per-client {SERVER_RESULTS['per_client']['median']:.3f}s (medians)  "
                  f"per-client/batched = {ratio:.2f} (min {ratio_min:.2f})")
