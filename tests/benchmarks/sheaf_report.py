"""Workload W1 (``../shared/BENCHMARKS.md``): one sheaf-diffusion layer, forward + backward.

Shared by ``test_bench_sheaf.py`` (pytest-benchmark) and runnable as a script that prints a markdown
table of median/min milliseconds and peak memory per sheaf type × ``n`` — the numbers the README
quotes::

    python tests/benchmarks/sheaf_report.py                 # n = 1 000, 10 000, 100 000
    python tests/benchmarks/sheaf_report.py --n 1000 10000 --rounds 20

Peak memory is the ``ru_maxrss`` of a *fresh* process per configuration (``--peak-rss`` mode of
this script), reported as the whole process and as the increase caused by the layer (its own
high-water mark above the RSS after setup: python, torch, graph and inputs).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # running as a script from anywhere
    sys.path.insert(0, str(REPO))
if "--peak-rss" in sys.argv and "shn" not in sys.modules:
    # Memory probe: import only the shn.sheaf submodule (it depends on torch alone), not the
    # package __init__ with everything else, so the baseline RSS is python + torch + numpy.
    _pkg = types.ModuleType("shn")
    _pkg.__path__ = [str(REPO / "shn")]
    sys.modules["shn"] = _pkg

from shn.sheaf import SheafConv, SheafGraph, SheafLearner, canonical_sheaf_type  # noqa: E402

D, H, K = 3, 16, 10
SHEAF_KINDS = ("diag", "orth", "general")
SIZES = (1_000, 10_000, 100_000)
DENSE_MAX_N = 2_000

#: Median forward+backward ms of the NSD reference implementation on this machine kind
#: (BENCHMARKS.md W1 anchor, 2 threads); the library's goal is >= 5x faster at n = 10 000.
NSD_ANCHOR_MS = {
    "diag": {1_000: (9.7, 18.0), 10_000: (127.0, 160.0)},
    "orth": {1_000: (40.0, 48.0), 10_000: (518.0, 612.0)},
    "general": {1_000: (24.0, 29.0), 10_000: (392.0, 494.0)},
}


@lru_cache(maxsize=4)
def w1_graph(n: int, k: int = K) -> torch.Tensor:
    """W1 graph: ``n`` uniform points in [0, 1]², kNN (k = 10, self excluded), undirected union,
    both directions, no self loops or duplicates, sorted by (row, col). ``[2, E]`` int64."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    points = rng.random((n, 2))
    _, nbr = cKDTree(points).query(points, k=k + 1)
    rows = np.repeat(np.arange(n), k)
    cols = nbr[:, 1:].reshape(-1)
    src = np.concatenate([rows, cols])
    dst = np.concatenate([cols, rows])
    keep = src != dst
    key = np.unique(src[keep].astype(np.int64) * n + dst[keep])
    return torch.from_numpy(np.stack([key // n, key % n]))


def w1_features(n: int) -> torch.Tensor:
    return torch.randn(n, D * H, generator=torch.Generator().manual_seed(1))


def make_layer(kind: str) -> SheafConv:
    """The W1 layer: maps from endpoint features, normalised Laplacian, left/right weights, ELU, ε."""
    torch.manual_seed(0)
    return SheafConv(D, H, kind, normalised=True, left_weights=True, right_weights=True, use_act=True).train()


class DenseSheafLayer(torch.nn.Module):
    """Dense reference: the same learner and layer parameters, but the normalised sheaf Laplacian
    is assembled as a dense ``(n·d × n·d)`` matrix and applied by a dense matmul."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = canonical_sheaf_type(kind)
        self.learner = SheafLearner(D, H, self.kind)
        self.left = torch.nn.Parameter(torch.eye(D))
        self.right = torch.nn.Parameter(torch.nn.init.orthogonal_(torch.empty(H, H)))
        self.epsilon = torch.nn.Parameter(torch.zeros(D))

    def laplacian(self, x: torch.Tensor, graph: SheafGraph) -> torch.Tensor:
        n, d = graph.num_nodes, D
        maps = self.learner(x, graph)
        src, tgt, weight = maps.directed()
        if self.kind == "diag":
            src, tgt = torch.diag_embed(src), torch.diag_embed(tgt)
        c = torch.ones(src.size(0), dtype=x.dtype) if weight is None else weight.square()
        off = -c.view(-1, 1, 1) * (src.mT @ tgt)  # [E, d, d]
        gram = c.view(-1, 1, 1) * (src.mT @ src)
        row, col = graph.edge_index
        blocks = torch.zeros(n, d, d, dtype=x.dtype).index_add(0, row, gram)  # D_u
        nd, ar, nodes = n * d, torch.arange(d), torch.arange(n)
        # flat positions of every block entry in the dense (n·d × n·d) matrix
        off_pos = (row.view(-1, 1, 1) * d + ar.view(1, -1, 1)) * nd + col.view(-1, 1, 1) * d + ar.view(1, 1, -1)
        diag_pos = (nodes.view(-1, 1, 1) * d + ar.view(1, -1, 1)) * nd + nodes.view(-1, 1, 1) * d + ar.view(1, 1, -1)
        lap = torch.zeros(nd * nd, dtype=x.dtype)
        lap = lap.index_add(0, off_pos.reshape(-1), off.reshape(-1))
        lap = lap.index_add(0, diag_pos.reshape(-1), blocks.reshape(-1)).view(nd, nd)
        shifted = blocks + torch.eye(d, dtype=x.dtype)
        if self.kind != "general":  # diagonal node blocks (diag, orth): elementwise scaling
            s = torch.diagonal(shifted, dim1=-2, dim2=-1).rsqrt().reshape(nd)
            return lap * s.view(-1, 1) * s.view(1, -1)
        evals, evecs = torch.linalg.eigh(shifted)
        norm = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT  # [n, d, d]
        big = torch.einsum("uab,ubw->uaw", norm, lap.view(n, d, nd))  # left block scaling
        big = torch.einsum("xvc,vcd->xvd", big.view(nd, n, d), norm)  # right block scaling
        return big.reshape(nd, nd)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        graph = SheafGraph.from_edge_index(edge_index, n)
        lap = self.laplacian(x, graph)
        stalks = x.view(n, D, H)
        y = torch.einsum("ij,njh->nih", self.left, stalks) @ self.right.t()
        y = torch.nn.functional.elu((lap @ y.reshape(n * D, H)).view(n, D, H))
        out = (1.0 + torch.tanh(self.epsilon)).view(1, D, 1) * stalks - y
        return out.reshape(n, D * H)


def make_step(kind: str, n: int, impl: str = "sparse"):
    """A closure running one forward + backward of ``layer(x).square().mean()``."""
    edge_index, x = w1_graph(n), w1_features(n)
    layer = make_layer(kind) if impl == "sparse" else DenseSheafLayer(kind).train()
    params = [p for p in layer.parameters()]

    def step() -> None:
        for p in params:
            p.grad = None
        layer(x, edge_index).square().mean().backward()

    return step


def time_step(step, rounds: int = 10, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``rounds`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _measure_peak_rss(kind: str, n: int, impl: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    step = make_step(kind, n, impl)
    try:  # reset the RSS high-water mark (Linux >= 4.0) so setup peaks do not count
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        resettable = True
    except OSError:
        resettable = False
    base = _status_kib("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        step()
    peak = _status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": peak / 1024.0, "layer_peak_mb": max(peak - base, 0) / 1024.0}


def peak_rss(kind: str, n: int, impl: str = "sparse", threads: int = 2) -> dict:
    """Peak RSS (MiB) of a fresh process running the W1 layer twice (forward + backward):
    ``{"peak_rss_mb": whole process during the runs, "layer_peak_mb": its increase over the RSS
    after setup (python, torch, graph, inputs)}``. Uses ``VmHWM`` after a reset via
    ``/proc/self/clear_refs`` (falls back to ``ru_maxrss``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peak-rss", kind, str(n), impl, str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f} (min {min(times) * 1e3:.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--kinds", nargs="+", default=list(SHEAF_KINDS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-RSS runs")
    parser.add_argument("--peak-rss", nargs=4, metavar=("KIND", "N", "IMPL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peak_rss:
        kind, n, impl, threads = args.peak_rss
        print(json.dumps(_measure_peak_rss(kind, int(n), impl, int(threads))))
        return

    torch.set_num_threads(args.threads)
    print(f"W1, one sheaf-diffusion layer (d={D}, h={H}, kNN k={K}), forward+backward, "
          f"{args.threads} threads, {args.rounds} rounds; torch {torch.__version__}\n")
    header = "| sheaf type | n | E | median ms (min) | peak RSS MiB (layer +MiB) | dense ref. median ms | dense peak (+MiB) | speed-up vs dense | vs NSD anchor |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for kind in args.kinds:
        for n in args.n:
            times = time_step(make_step(kind, n), rounds=args.rounds)
            med = statistics.median(times) * 1e3
            mem = "—" if args.no_memory else "{peak_rss_mb:.0f} (+{layer_peak_mb:.0f})".format(**peak_rss(kind, n, threads=args.threads))
            dense_ms = dense_mem = ratio = "—"
            if n <= DENSE_MAX_N:
                dtimes = time_step(make_step(kind, n, "dense"), rounds=max(3, args.rounds // 2), warmup=1)
                dense_ms = _fmt_ms(dtimes)
                ratio = f"{statistics.median(dtimes) * 1e3 / med:.0f}×"
                if not args.no_memory:
                    dense_mem = "{peak_rss_mb:.0f} (+{layer_peak_mb:.0f})".format(**peak_rss(kind, n, "dense", args.threads))
            anchor = NSD_ANCHOR_MS.get(kind, {}).get(n)
            vs_nsd = f"{anchor[0] / med:.1f}–{anchor[1] / med:.1f}×" if anchor else "—"
            e = w1_graph(n).size(1)
            print(f"| {kind} | {n:,} | {e:,} | {_fmt_ms(times)} | {mem} | {dense_ms} | {dense_mem} | {ratio} | {vs_nsd} |", flush=True)


if __name__ == "__main__":
    main()
