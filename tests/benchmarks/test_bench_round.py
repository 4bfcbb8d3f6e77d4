"""W2 benchmark (``../shared/BENCHMARKS.md``): one federated round.

Skipped by the default test run (``--benchmark-skip``); run with::

    pytest tests/benchmarks/test_bench_round.py --benchmark-only

Local training of one round, every client of the round at once, in the ``LocalTrainer`` modes
``vmap``, ``loop``, ``grouped`` (convolutional targets only) and ``auto``, on the workloads of
``round_report.py`` (pFedHN's CIFAR CNN × 50 clients with 2 local steps, the digits MLP × 64,
the GRU forecaster × 207); ``python tests/benchmarks/round_report.py`` prints the same ratios as
the README's table. Also the pFedHN server update for 50 CIFAR-CNN clients: one batched
vector–Jacobian product for all 50 (``HyperNetworkAlgorithm.apply_updates``) vs one backward per
client. With ``local.precision = "bf16"`` (modes named ``<mode>+bf16``): every mode's round, and
the CIFAR CNN's loop and grouped modes in both precisions interleaved (``python
tests/benchmarks/round_report.py --workloads cifar_cnn --precision fp32 bf16`` prints the same).

Ratios (medians of per-repetition ratios; ``*_min`` from the minima) go to ``extra_info`` and are
printed: ``vmap_over_loop`` and ``grouped_over_loop`` (< 1: faster than the loop),
``auto_over_best`` = auto / the fastest other mode (≈ 1 when the ``auto`` rule picks it),
``per_client_over_batched`` for the server update; ``<mode>+bf16_over_loop`` against the fp32
loop. Absolute times on shared 2-core machines move by ±20% or more; compare ratios from one run.

Environment: ``SHN_BENCH_ROUNDS`` (default 10 repetitions), ``SHN_BENCH_DEVICE`` (default cpu).
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from shn.config import ServerConfig
from shn.federated.algorithm import HyperNetworkAlgorithm, _clip
from shn.hypernetwork import HyperNetwork
from shn.target import ParamSpec
from tasks.models import PFedHNCNN

from .round_report import (DEVICE, WORKLOADS, bf16_instructions, interleaved, make_round, modes_for, ratio,
                           with_precision)
from .round_report import sync as _sync

pytest.importorskip("pytest_benchmark")

ROUNDS = int(os.environ.get("SHN_BENCH_ROUNDS", "10"))
AUTO_TOLERANCE = 1.3  # auto may be this much slower than the faster mode (noise on shared machines)
MODE_CASES = [(name, mode) for name in sorted(WORKLOADS) for mode in modes_for(name)]
MODE_CASES += [(name, mode) for name in sorted(WORKLOADS)
               for mode in with_precision(tuple(m for m in modes_for(name) if m != "auto"), ("bf16",))]
CONV_WORKLOADS = [name for name in sorted(WORKLOADS) if "grouped" in modes_for(name)]


@pytest.mark.parametrize(("name", "mode"), MODE_CASES)
def test_w2_local_training(benchmark, name, mode):
    """One row per (workload, mode) in the benchmark table (for ``--benchmark-compare``)."""
    w = WORKLOADS[name]
    one_round, picks = make_round(name, mode)
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
    """Every mode interleaved (order rotated every repetition), so that load drifting on a
    shared machine hits them alike; ratios from the per-repetition pairs and from the minima."""
    w = WORKLOADS[name]
    modes = modes_for(name)
    picks = make_round(name, "auto")[1]
    result: dict = {}

    def measure():
        result.update(interleaved(name, modes, ROUNDS))

    benchmark.group = "W2 local training: the modes interleaved"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    t = {m: v["wall"] for m, v in result.items()}
    others = [m for m in modes if m != "auto"]
    fastest = min(others, key=lambda m: statistics.median(t[m]))
    best = [min(vals) for vals in zip(*(t[m] for m in others))]
    ratios = {f"{m}_over_loop": ratio(result, m, "loop") for m in others if m != "loop"}
    ratios.update({f"{m}_over_loop_cpu": ratio(result, m, "loop", "cpu") for m in others if m != "loop"})
    ratios.update({f"{m}_over_loop_min": min(t[m]) / min(t["loop"]) for m in others if m != "loop"})
    ratios.update(
        auto_over_best=statistics.median(a / b for a, b in zip(t["auto"], best)),
        auto_over_best_min=min(t["auto"]) / min(min(t[m]) for m in others),
        faster_mode=fastest, auto_picks=picks,
    )
    benchmark.extra_info.update(workload=name, clients=w.clients, steps=w.steps, batch_size=w.batch_size,
                                threads=torch.get_num_threads(), device=str(DEVICE), load_average=os.getloadavg()[0],
                                **ratios)
    for m in modes:
        benchmark.extra_info[f"{m}_median_s"] = statistics.median(t[m])
        benchmark.extra_info[f"{m}_min_s"] = min(t[m])
        benchmark.extra_info[f"{m}_client_updates_per_s"] = w.clients / statistics.median(t[m])
    with capsys.disabled():
        print(f"\nW2 {name} ({w.clients} clients, {w.steps} steps, batch {w.batch_size}, {DEVICE}, "
              f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}): " + "  ".join(
                  f"{m}{'[' + picks + ']' if m == 'auto' else ''} {statistics.median(t[m]):.3f}s (min {min(t[m]):.3f}s)"
                  for m in modes)
              + "  | " + "  ".join(f"{m}/loop = {ratios[m + '_over_loop']:.2f} (cpu {ratios[m + '_over_loop_cpu']:.2f})"
                                   for m in others if m != "loop")
              + f"  auto/best = {ratios['auto_over_best']:.2f} (min {ratios['auto_over_best_min']:.2f})")
    assert picks == fastest or ratios["auto_over_best_min"] <= AUTO_TOLERANCE, (
        f"{name}: auto ({picks}) is {ratios['auto_over_best_min']:.2f}x the faster mode "
        f"({fastest}); revisit LocalTrainer.resolve_mode")
    if "grouped" in modes:  # the grouped network exists to beat the per-client loop on CPU
        assert DEVICE.type != "cpu" or ratios["grouped_over_loop"] < 1, ratios


@pytest.mark.parametrize("name", CONV_WORKLOADS)
def test_w2_bf16_ratios(benchmark, capsys, name):
    """The loop and grouped modes in fp32 and bf16 interleaved: every ratio against the fp32 loop
    (the README's W2 bf16 rows)."""
    w = WORKLOADS[name]
    modes = with_precision(("loop", "grouped"), ("fp32", "bf16"))
    result: dict = {}
    benchmark.group = "W2 local training: fp32 and bf16 interleaved"
    benchmark.pedantic(lambda: result.update(interleaved(name, modes, ROUNDS)), rounds=1, iterations=1)
    ratios = {f"{m}_over_loop": ratio(result, m, "loop") for m in modes if m != "loop"}
    ratios.update({f"{m}_over_loop_cpu": ratio(result, m, "loop", "cpu") for m in modes if m != "loop"})
    cpu_bf16 = bf16_instructions() if DEVICE.type == "cpu" else "n/a"
    benchmark.extra_info.update(workload=name, clients=w.clients, steps=w.steps, batch_size=w.batch_size,
                                threads=torch.get_num_threads(), device=str(DEVICE), cpu_bf16_instructions=cpu_bf16,
                                load_average=os.getloadavg()[0], **ratios,
                                **{f"{m}_median_s": statistics.median(result[m]["wall"]) for m in modes})
    with capsys.disabled():
        print(f"\nW2 {name} fp32/bf16 ({DEVICE}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}, "
              f"CPU bf16: {cpu_bf16}): " + "  ".join(
                  f"{m}/loop = {ratios[m + '_over_loop']:.2f} (cpu {ratios[m + '_over_loop_cpu']:.2f})"
                  for m in modes if m != "loop"))
    if DEVICE.type == "cpu" and cpu_bf16 not in ("none", "unknown (no /proc/cpuinfo)"):
        assert ratios["grouped+bf16_over_loop"] < 1, ratios  # native bf16: grouped bf16 beats the fp32 loop


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


# -- the CIFAR CNN against the loop as it ran before `shn --allocator keep` -------------------------

@pytest.mark.skipif(DEVICE.type != "cpu", reason="the allocator setting is about CPU tensors")
def test_w2_cnn_speedup(benchmark, capsys):
    """The README's speed-up table at a smaller budget (10 local steps, 3 repetitions): every
    variant in a child process of its own, interleaved (``cnn_speedup.py``); ratios against the fp32
    loop under glibc's default malloc."""
    from .cnn_speedup import VARIANTS, measure, ratios

    result: dict = {}
    benchmark.group = "W2 CIFAR CNN speed-up (child processes)"
    benchmark.pedantic(lambda: result.update(measure(torch.get_num_threads(), 3, 1, 10, VARIANTS)), rounds=1,
                       iterations=1)
    wall = {name: statistics.median(r) for name, r in ratios(result).items()}
    benchmark.extra_info.update(threads=torch.get_num_threads(), steps=10, load_average=os.getloadavg()[0],
                                **{f"{name} / reference": v for name, v in wall.items()})
    with capsys.disabled():
        print("\nW2 CIFAR CNN, 10 steps: " + "  ".join(f"{name}: {v:.2f}" for name, v in wall.items()))
    assert wall["grouped fp32, keep"] < 1, wall  # the grouped network with kept memory beats today's loop
