"""Graph builders: given (task data), kNN and threshold (client embeddings), complete; ``build_graph``.

Pure, deterministic functions (ties broken by the lower node index, no global random state) that
compute similarities in float64 with an elementwise distance kernel and never materialise the
``[N, N]`` score matrix (rows are processed in chunks); see :mod:`shn.graph` for why.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from shn.graph.container import ClientGraph
from shn.graph.inputs import _INT_DTYPES, _as_int, _as_num_nodes, _as_tensor, _as_weight, _coalesce, _parse_edges

__all__ = ["GRAPH_KINDS", "METRICS", "build_graph", "complete_graph", "given_graph", "knn_graph", "nearest_clients",
           "threshold_graph"]

GRAPH_KINDS = ("knn", "threshold", "given", "complete")
METRICS = ("cosine", "euclidean")

# Elements of one [chunk, N] float64 distance block; bounds builder memory to ~32 MiB.
_CHUNK_ELEMENTS = 1 << 22


def given_graph(
    source: Any,
    num_nodes: int | None = None,
    *,
    symmetrize: bool = True,
    weighted: bool = False,
    edge_weight: Any = None,
    threshold: float = 0.0,
    layout: str = "auto",
) -> ClientGraph:
    """A graph supplied with the task (e.g. a road-sensor network), cleaned up.

    Unlike :meth:`ClientGraph.from_edge_list` this is lenient with real data: self loops /
    the diagonal are dropped and duplicate edges merged (largest weight kept).

    Args:
        source: one of
            * a dense ``[N, N]`` adjacency (torch/numpy; e.g. Gaussian-kernel distances) —
              edges where ``A > threshold``;
            * an edge list ``[E, 2]`` or ``[2, E]`` of node ids (see ``layout``);
            * a :class:`ClientGraph`.
            With ``layout="auto"`` a square matrix is an adjacency, except an *integer* ``[2, 2]``
            array, which is read as two edge pairs; use ``layout`` ∈ {"adjacency", "pairs",
            "index"} to be explicit.
        num_nodes: ``N``; checked against an adjacency, inferred from an edge list if omitted.
        symmetrize: return the undirected closure (``A = max(A, Aᵀ)``).
        weighted: keep weights (adjacency entries, ``edge_weight``, or the graph's own weights).
        edge_weight: ``[E]`` weights for an edge list (required there when ``weighted``).
    """
    if layout not in ("auto", "adjacency", "pairs", "index"):
        raise ValueError(f"layout must be one of 'auto', 'adjacency', 'pairs', 'index', got {layout!r}")
    if isinstance(source, ClientGraph):
        graph = source
        if not weighted and graph.is_weighted:
            graph = ClientGraph._unchecked(graph.edge_index, graph.num_nodes, None)
    else:
        raw = _as_tensor(source, "given graph")
        is_adjacency = layout == "adjacency" or (
            layout == "auto"
            and raw.dim() == 2
            and raw.shape[0] == raw.shape[1]
            and (raw.shape[0] != 2 or raw.is_floating_point() or raw.dtype == torch.bool)
        )
        if is_adjacency:
            graph = ClientGraph.from_adjacency(raw, threshold=threshold, symmetrize=symmetrize, weighted=weighted)
        else:
            if raw.numel() and raw.dtype not in _INT_DTYPES:
                raise ValueError(f"an edge list must hold integer node ids, got {raw.dtype}")
            edge_index = _parse_edges(raw, "auto" if layout == "auto" else layout)
            if weighted and edge_weight is None:
                raise ValueError("weighted=True with an edge list needs edge_weight")
            w = _as_weight(edge_weight, edge_index.device) if (weighted and edge_weight is not None) else None
            if w is not None and w.shape != (edge_index.shape[1],):
                raise ValueError(f"edge_weight must have shape [{edge_index.shape[1]}], got {list(w.shape)}")
            n = num_nodes
            if n is None:
                if edge_index.shape[1] == 0:
                    raise ValueError("num_nodes is required for an edge list without edges")
                n = int(edge_index.max()) + 1
            n = _as_num_nodes(n)
            if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
                raise ValueError(f"edge list has node ids outside [0, {n})")
            keep = edge_index[0] != edge_index[1]
            ei, w = _coalesce(edge_index[0][keep], edge_index[1][keep], None if w is None else w[keep], n)
            graph = ClientGraph(ei, n, w)
    if num_nodes is not None and _as_num_nodes(num_nodes) != graph.num_nodes:
        raise ValueError(f"num_nodes={num_nodes} does not match the given graph's {graph.num_nodes} nodes")
    return graph.symmetrized() if symmetrize else graph


def knn_graph(
    embeddings: Any,
    k: int = 5,
    metric: str = "cosine",
    *,
    weighted: bool = False,
    chunk_size: int | None = None,
) -> ClientGraph:
    """Symmetrised k-nearest-neighbour graph of client embeddings (METHOD.md §3.3).

    Each node keeps its ``k`` most similar other nodes (cosine similarity of the rows, or
    smallest Euclidean distance); the result is the undirected closure ``A = max(A, Aᵀ)``, so every
    node has degree ≥ k and no node is isolated. Ties are broken by the lower node index, so the
    graph is deterministic (duplicated embeddings give exactly equal scores, see :mod:`shn.graph`).
    The ``[N, N]`` score matrix is never materialised; rows are processed in chunks.

    Args:
        embeddings: ``[N, e]`` client embeddings (finite; for cosine, no all-zero rows).
        k: neighbours per node, ``1 ≤ k ≤ N-1``. With a single client (``N = 1``) the result is
            the empty graph for any ``k ≥ 1`` (there is nobody to connect to).
        metric: ``"cosine"`` or ``"euclidean"``.
        weighted: attach weights: cosine similarity clamped at 0, or ``1 / (1 + distance)``.
        chunk_size: rows per block (default: about 4M scores per block).
    """
    x = _embeddings(embeddings, metric)
    n = x.shape[0]
    k = _as_int(k, "k")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if n == 1:
        return _empty_graph(1, x.device, _weight_dtype(embeddings) if weighted else None)
    if k > n - 1:
        raise ValueError(f"k={k} is too large for {n} clients: each node has only {n - 1} others (need k ≤ {n - 1})")
    blocks = []
    for start, d in _distance_blocks(x, chunk_size):
        mask = _k_smallest(d, k)
        blocks.append((start, mask.nonzero(as_tuple=True)))  # indices only: O(|E|) memory, not O(N²)
    return _symmetric_graph(blocks, x, n, metric, _weight_dtype(embeddings), weighted)


def threshold_graph(
    embeddings: Any,
    tau: float,
    metric: str = "cosine",
    *,
    weighted: bool = False,
    chunk_size: int | None = None,
) -> ClientGraph:
    """Undirected graph joining clients whose similarity exceeds ``tau``.

    Edge ``{u, v}`` iff ``cos(e_u, e_v) > tau`` (cosine) or ``‖e_u − e_v‖ < tau`` (euclidean).
    Isolated-node repair rule: every node left without an edge is joined to its single nearest
    neighbour (lowest index among ties), so no client is isolated (unless ``N = 1``). The repair
    can give a few nodes degree 1 below the threshold; it is what keeps diffusion well defined.

    Args:
        embeddings: ``[N, e]`` client embeddings.
        tau: similarity threshold (cosine, in [-1, 1] to be meaningful) or distance threshold.
        metric: ``"cosine"`` or ``"euclidean"``.
        weighted: attach weights as in :func:`knn_graph`.
    """
    x = _embeddings(embeddings, metric)
    n = x.shape[0]
    tau = float(tau)
    if not math.isfinite(tau):
        raise ValueError(f"tau must be finite, got {tau}")
    if n == 1:
        return _empty_graph(1, x.device, _weight_dtype(embeddings) if weighted else None)
    blocks = []
    for start, d in _distance_blocks(x, chunk_size):
        # cosine of unit vectors from their distance: cos = 1 − d²/2 (d is exactly symmetric)
        mask = (1.0 - 0.5 * d * d > tau) if metric == "cosine" else (d < tau)
        isolated = ~mask.any(dim=1)
        if bool(isolated.any()):
            mask |= _k_smallest(d, 1) & isolated[:, None]
        blocks.append((start, mask.nonzero(as_tuple=True)))  # indices only: O(|E|) memory, not O(N²)
    return _symmetric_graph(blocks, x, n, metric, _weight_dtype(embeddings), weighted)


def complete_graph(num_nodes: int, device: torch.device | str = "cpu") -> ClientGraph:
    """All ``N(N−1)`` directed edges between distinct clients (FedSheafHN's choice)."""
    n = _as_num_nodes(num_nodes)
    mask = ~torch.eye(n, dtype=torch.bool, device=device)
    row, col = mask.nonzero(as_tuple=True)
    return ClientGraph._unchecked(torch.stack([row, col]), n, None)


def nearest_clients(embeddings: Any, query: Any, k: int, metric: str = "cosine") -> Tensor:
    """Ids of the ``k`` existing clients nearest to ``query`` (ties: lower index), used to attach
    a novel client with :meth:`ClientGraph.add_node`.

    Args:
        embeddings: ``[N, e]`` existing client embeddings.
        query: ``[e]`` or ``[Q, e]`` new-client embeddings.
    Returns:
        ``[k]`` (or ``[Q, k]``) int64 node ids, nearest first.
    """
    x = _embeddings(embeddings, metric)
    q = _as_tensor(query, "query")
    single = q.dim() == 1
    q = _embeddings(q.reshape(1, -1) if single else q, metric, what="query")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"query has dimension {q.shape[1]} but embeddings have {x.shape[1]}")
    k = _as_int(k, "k")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0]}], got {k}")
    d = torch.cdist(q.to(x.device), x, compute_mode="donot_use_mm_for_euclid_dist")
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return order[0] if single else order


def build_graph(
    kind: str,
    *,
    embeddings: Any = None,
    given: Any = None,
    num_nodes: int | None = None,
    k: int = 5,
    tau: float = 0.5,
    metric: str = "cosine",
    weighted: bool = False,
) -> ClientGraph:
    """Dispatch on ``kind`` ∈ {"knn", "threshold", "given", "complete"} (the config's
    ``graph_builder``). ``knn``/``threshold`` need ``embeddings`` ``[N, e]``; ``given`` needs
    ``given`` (see :func:`given_graph`); ``complete`` needs ``num_nodes`` or ``embeddings``."""
    if kind not in GRAPH_KINDS:
        raise ValueError(f"unknown graph kind {kind!r}; allowed: {', '.join(GRAPH_KINDS)}")
    if kind in ("knn", "threshold"):
        if embeddings is None:
            raise ValueError(f"graph kind {kind!r} needs embeddings")
        graph = knn_graph(embeddings, k, metric, weighted=weighted) if kind == "knn" else threshold_graph(
            embeddings, tau, metric, weighted=weighted
        )
    elif kind == "given":
        if given is None:
            raise ValueError("graph kind 'given' needs given= (an adjacency, an edge list or a ClientGraph)")
        graph = given_graph(given, num_nodes, weighted=weighted)
    else:
        if num_nodes is None:
            if embeddings is None:
                raise ValueError("graph kind 'complete' needs num_nodes or embeddings")
            num_nodes = int(_as_tensor(embeddings, "embeddings").shape[0])
        graph = complete_graph(num_nodes)
    if num_nodes is not None and graph.num_nodes != _as_num_nodes(num_nodes):
        raise ValueError(f"built graph has {graph.num_nodes} nodes but num_nodes={num_nodes}")
    return graph


def _empty_graph(num_nodes: int, device: torch.device, weight_dtype: torch.dtype | None) -> ClientGraph:
    w = None if weight_dtype is None else torch.zeros(0, dtype=weight_dtype, device=device)
    return ClientGraph._unchecked(torch.zeros(2, 0, dtype=torch.long, device=device), num_nodes, w)


def _weight_dtype(embeddings: Any) -> torch.dtype:
    t = embeddings if isinstance(embeddings, Tensor) else None
    return t.dtype if t is not None and t.is_floating_point() else torch.get_default_dtype()


def _embeddings(embeddings: Any, metric: str, what: str = "embeddings") -> Tensor:
    """Validated float64 ``[N, e]`` copy; rows unit-normalised for cosine."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    x = _as_tensor(embeddings, what).detach()
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{what} must have shape [N, e] with N, e ≥ 1, got {list(x.shape)}")
    if not (x.is_floating_point() or x.dtype in _INT_DTYPES):
        raise ValueError(f"{what} must be numeric, got {x.dtype}")
    x = x.to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contain NaN or infinite values")
    if metric == "cosine":
        norm = x.norm(dim=1, keepdim=True)
        zero = norm.squeeze(1) == 0
        if bool(zero.any()):
            raise ValueError(f"{what} row {int(zero.nonzero()[0, 0])} is all zeros: cosine similarity is undefined")
        x = x / norm
    return x


def _distance_blocks(x: Tensor, chunk_size: int | None) -> Iterable[tuple[int, Tensor]]:
    """Yield ``(start, D)`` with ``D [c, N]`` float64 distances of rows ``start..start+c`` to all
    rows, self-distances set to +inf. The elementwise kernel gives exactly equal distances for
    duplicated rows and exactly symmetric blocks (a matmul-based kernel does neither)."""
    n = x.shape[0]
    chunk = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // n)
    if _as_int(chunk, "chunk_size") < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    for start in range(0, n, chunk):
        block = x[start : start + chunk]
        d = torch.cdist(block, x, compute_mode="donot_use_mm_for_euclid_dist")
        local = torch.arange(block.shape[0], device=x.device)
        d[local, start + local] = math.inf
        yield start, d


def _k_smallest(d: Tensor, k: int) -> Tensor:
    """``[R, N]`` bool mask with exactly ``k`` True per row at the smallest entries of ``d``;
    among equal values the lower column index wins (``torch.topk`` gives no such guarantee)."""
    kth = torch.kthvalue(d, k, dim=1, keepdim=True).values
    below = d < kth
    at = d == kth
    need = k - below.sum(dim=1, keepdim=True)
    return below | (at & (torch.cumsum(at, dim=1) <= need))


def _symmetric_graph(blocks: list[tuple[int, tuple[Tensor, Tensor]]], x: Tensor, n: int, metric: str,
                     dtype: torch.dtype, weighted: bool) -> ClientGraph:
    """The symmetrised graph of per-block edges ``(first row of the block, (rows, cols) in it)``."""
    rows, cols = [], []
    for start, (r, c) in blocks:
        rows.append(r + start)
        cols.append(c)
    edge_index, _ = _coalesce(torch.cat(rows + cols), torch.cat(cols + rows), None, n)
    weight = _similarity_weights(x, edge_index, metric, dtype) if weighted else None
    return ClientGraph._unchecked(edge_index, n, weight)


def _similarity_weights(x: Tensor, edge_index: Tensor, metric: str, dtype: torch.dtype) -> Tensor:
    """``[E]`` weights from unit-normalised (cosine) or raw (euclidean) float64 rows; symmetric
    exactly because the per-pair formulas are."""
    xu, xv = x[edge_index[0]], x[edge_index[1]]
    if metric == "cosine":
        w = (xu * xv).sum(dim=1).clamp(0.0, 1.0)
    else:
        w = 1.0 / (1.0 + (xu - xv).norm(dim=1))
    return w.to(dtype)
