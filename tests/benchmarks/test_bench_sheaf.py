"""W1 benchmark (``../shared/BENCHMARKS.md``): forward + backward of one sheaf-diffusion layer.

Skipped by the default test run (``--benchmark-skip``); run with::

    pytest tests/benchmarks --benchmark-only
    pytest tests/benchmarks --benchmark-only --benchmark-compare   # against your previous run

Each configuration records in ``extra_info``: the edge count, the peak RSS of a fresh process
running it (whole process and the layer's own increase), and — for ``n <= 2000`` — the dense
``(n·d × n·d)`` reference measured in the same run with the speed and memory ratios.
``tests/benchmarks/sheaf_report.py`` prints the same measurements as a markdown table.
"""

from __future__ import annotations

import statistics

import pytest

from .sheaf_report import DENSE_MAX_N, NSD_ANCHOR_MS, SHEAF_KINDS, SIZES, make_step, peak_rss, time_step, w1_graph

pytest.importorskip("pytest_benchmark")
pytest.importorskip("scipy")

ROUNDS = 10


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", SHEAF_KINDS)
def test_w1_sheaf_layer(benchmark, kind, n):
    step = make_step(kind, n)
    benchmark.group = f"W1 n={n}"
    benchmark.extra_info.update(sheaf_type=kind, n=n, num_edges=int(w1_graph(n).size(1)), threads=2)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    median_ms = benchmark.stats.stats.median * 1e3
    memory = peak_rss(kind, n)
    benchmark.extra_info.update(memory)
    anchor = NSD_ANCHOR_MS.get(kind, {}).get(n)
    if anchor is not None:
        benchmark.extra_info["speedup_vs_nsd_anchor"] = [anchor[0] / median_ms, anchor[1] / median_ms]
    if n <= DENSE_MAX_N:
        dense_ms = statistics.median(time_step(make_step(kind, n, "dense"), rounds=5, warmup=1)) * 1e3
        dense_memory = peak_rss(kind, n, "dense")
        benchmark.extra_info.update(
            dense_median_ms=dense_ms,
            speedup_vs_dense=dense_ms / median_ms,
            dense_peak_rss_mb=dense_memory["peak_rss_mb"],
            dense_layer_peak_mb=dense_memory["layer_peak_mb"],
            layer_memory_ratio_vs_dense=memory["layer_peak_mb"] / max(dense_memory["layer_peak_mb"], 1e-9),
        )
    if n == 100_000:
        assert memory["peak_rss_mb"] < 2048, f"n=100k peak RSS {memory['peak_rss_mb']:.0f} MiB >= 2 GiB"


@pytest.mark.parametrize("kind", SHEAF_KINDS)
def test_w1_dense_reference(benchmark, kind):
    """The dense (n·d × n·d) reference at n = 1000, in the benchmark table for comparison."""
    n = 1_000
    benchmark.group = f"W1 n={n}"
    benchmark.extra_info.update(sheaf_type=kind, n=n, implementation="dense", threads=2)
    benchmark.pedantic(make_step(kind, n, "dense"), rounds=ROUNDS, warmup_rounds=1, iterations=1)
