"""The client relation graph: its container, builders, a learned variant and diagnostics.

In personalised FL each client is a node. The server-side hypernetwork diffuses client
embeddings over this graph (METHOD.md §2), and Stage 2 of SHN builds it from the Stage-1 client
embeddings when no a-priori graph exists (METHOD.md §3.3).

Conventions used throughout:

* A :class:`ClientGraph` stores *directed* edges ``edge_index [2, E]``; an undirected graph stores
  both orientations (the layout neural sheaf diffusion and PyG expect). Edges are kept in
  canonical order, sorted by ``(row, col)``, with no self loops and no duplicates.
* Builders are pure, deterministic torch functions: the same input gives the same graph, ties are
  broken by the lower node index, and nothing draws from a global random state.
* Similarities are computed in float64 with an elementwise (not matrix-product) distance kernel so
  that duplicated embeddings produce *exactly* equal scores — with a BLAS matmul two identical
  rows can differ in the last bit, which would make tie-breaking depend on their position.
* Diagnostics return plain, JSON-serialisable Python values (``None`` where a value is undefined,
  e.g. homophily of a graph without edges), except the Dirichlet energies, which return a 0-dim
  tensor so they can be tracked per layer or used in a loss; call ``float()`` for plots.

Decisions (METHOD.md §9, open question 1): kNN on cosine similarity, symmetrised with
``A = max(A, Aᵀ)``, unweighted, ``k = 5`` by default.
"""

from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "ClientGraph",
    "given_graph",
    "knn_graph",
    "threshold_graph",
    "complete_graph",
    "nearest_clients",
    "LearnedGraph",
    "build_graph",
    "GRAPH_KINDS",
    "METRICS",
    "degree_stats",
    "connected_components",
    "edge_homophily",
    "dirichlet_energy",
    "rayleigh_quotient",
    "rewire_to_homophily",
    "graph_summary",
]

GRAPH_KINDS = ("knn", "threshold", "given", "complete")
METRICS = ("cosine", "euclidean")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FILE_FORMAT = "shn.ClientGraph"
_FILE_VERSION = 1
# Elements of one [chunk, N] float64 distance block; bounds builder memory to ~32 MiB.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# ClientGraph
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class ClientGraph:
    """A graph over ``num_nodes`` clients, stored as a canonical directed edge list.

    Args:
        edge_index: ``[2, E]`` integer tensor; column ``e`` is the directed edge
            ``edge_index[0, e] → edge_index[1, e]``. Undirected graphs store both orientations.
            Any integer dtype is accepted and stored as ``int64``.
        num_nodes: number of clients ``N ≥ 1``; node ids are ``0 .. N-1``.
        edge_weight: optional ``[E]`` floating tensor of finite, non-negative weights, aligned
            with ``edge_index``. It may require grad (see :class:`LearnedGraph`).

    On construction the edges are validated (shape, dtype, range, no self loops, no duplicates;
    a :class:`ValueError` says what is wrong and names an offending edge) and sorted by
    ``(row, col)``; ``edge_weight`` is permuted alongside. Symmetry is *not* required by the
    container — call :meth:`validate_symmetric` where an undirected graph is needed.
    """

    edge_index: Tensor
    num_nodes: int
    edge_weight: Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        num_nodes = _as_num_nodes(self.num_nodes)
        edge_index = self.edge_index
        if not isinstance(edge_index, Tensor):
            raise ValueError(f"edge_index must be a torch.Tensor of shape [2, E], got {type(edge_index).__name__}")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must have shape [2, E], got {list(edge_index.shape)}")
        if edge_index.dtype not in _INT_DTYPES:
            raise ValueError(f"edge_index must have an integer dtype, got {edge_index.dtype}")
        edge_index = edge_index.to(torch.long)
        row, col = edge_index[0], edge_index[1]
        if edge_index.numel():
            bad = (row < 0) | (row >= num_nodes) | (col < 0) | (col >= num_nodes)
            if bool(bad.any()):
                e = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"edge ({int(row[e])}, {int(col[e])}) at position {e} is out of range: "
                    f"node ids must lie in [0, {num_nodes})"
                )
            loops = row == col
            if bool(loops.any()):
                e = int(loops.nonzero()[0, 0])
                raise ValueError(
                    f"self loop ({int(row[e])}, {int(col[e])}) at position {e}: client graphs have no self loops"
                )

        weight = self.edge_weight
        if weight is not None:
            if not isinstance(weight, Tensor):
                raise ValueError(
                    f"edge_weight must be a torch.Tensor of shape [E] or None, got {type(weight).__name__}"
                )
            if weight.shape != (edge_index.shape[1],):
                raise ValueError(f"edge_weight must have shape [E] = [{edge_index.shape[1]}], got {list(weight.shape)}")
            if not weight.is_floating_point():
                raise ValueError(f"edge_weight must have a floating dtype, got {weight.dtype}")
            if weight.device != edge_index.device:
                raise ValueError(f"edge_weight is on {weight.device} but edge_index is on {edge_index.device}")
            if weight.numel():
                w = weight.detach()
                bad = ~torch.isfinite(w) | (w < 0)
                if bool(bad.any()):
                    e = int(bad.nonzero()[0, 0])
                    raise ValueError(
                        f"edge_weight must be finite and non-negative; edge ({int(row[e])}, {int(col[e])}) "
                        f"has weight {float(w[e])}"
                    )

        # Canonical order: sort by (row, col) via the scalar key row * N + col (N < 3e9 fits int64).
        key = row * num_nodes + col
        if key.numel() > 1:
            key, order = torch.sort(key, stable=True)
            dup = key[1:] == key[:-1]
            if bool(dup.any()):
                e = int(dup.nonzero()[0, 0])
                u, v = divmod(int(key[e]), num_nodes)
                raise ValueError(f"duplicate edge ({u}, {v}): each directed edge may appear only once")
            if not bool((order[1:] > order[:-1]).all()):
                edge_index = edge_index[:, order]
                weight = weight[order] if weight is not None else None
        object.__setattr__(self, "edge_index", edge_index.contiguous())
        object.__setattr__(self, "num_nodes", num_nodes)
        object.__setattr__(self, "edge_weight", weight)

    @classmethod
    def _unchecked(cls, edge_index: Tensor, num_nodes: int, edge_weight: Tensor | None = None) -> ClientGraph:
        """Build without validation; only for inputs already known to be canonical and valid
        (hot paths such as :meth:`LearnedGraph.forward`, which would otherwise sync every call)."""
        graph = object.__new__(cls)
        object.__setattr__(graph, "edge_index", edge_index)
        object.__setattr__(graph, "num_nodes", num_nodes)
        object.__setattr__(graph, "edge_weight", edge_weight)
        return graph

    # ---- constructors ----------------------------------------------------------------------

    @classmethod
    def from_edge_list(
        cls,
        edges: Any,
        num_nodes: int | None = None,
        edge_weight: Any = None,
        *,
        layout: str = "auto",
        symmetrize: bool = False,
    ) -> ClientGraph:
        """Build from an edge list (strict: self loops and duplicates raise).

        Args:
            edges: ``[E, 2]`` pairs or ``[2, E]`` edge index (tensor, numpy array or nested
                sequence of ints). ``layout="auto"`` reads a ``[2, E]`` array with ``E ≠ 2`` as
                an edge index and anything ``[E, 2]`` — including the ambiguous ``[2, 2]`` — as
                pairs; pass ``layout="pairs"`` or ``"index"`` to be explicit.
            num_nodes: ``N``; defaults to ``max id + 1`` (required when there are no edges).
            edge_weight: optional ``[E]`` weights aligned with ``edges``.
            symmetrize: add every missing reverse edge; where both orientations are given with
                different weights the larger is kept (``A = max(A, Aᵀ)``).
        """
        edge_index = _parse_edges(edges, layout)
        if num_nodes is None:
            if edge_index.shape[1] == 0:
                raise ValueError("num_nodes is required for an edge list without edges")
            num_nodes = int(edge_index.max()) + 1
        weight = None if edge_weight is None else _as_weight(edge_weight, edge_index.device)
        graph = cls(edge_index, num_nodes, weight)
        return graph.symmetrized() if symmetrize else graph

    @classmethod
    def from_adjacency(
        cls, matrix: Any, threshold: float = 0.0, symmetrize: bool = True, weighted: bool = False
    ) -> ClientGraph:
        """Build from a dense ``[N, N]`` adjacency (torch or numpy; bool, int or float).

        An edge ``u → v`` exists where ``A[u, v] > threshold`` off the diagonal (the diagonal is
        dropped). With ``symmetrize`` the matrix is first replaced by ``max(A, Aᵀ)``. With
        ``weighted`` the entries become edge weights (they must then be non-negative), e.g. a
        road-sensor Gaussian-kernel matrix.
        """
        a = _as_tensor(matrix, "adjacency")
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"adjacency must be a square [N, N] matrix, got shape {list(a.shape)}")
        if a.shape[0] == 0:
            raise ValueError("adjacency must have at least one node")
        if a.dtype == torch.bool:
            a = a.to(torch.get_default_dtype())
        elif not a.is_floating_point():
            if a.dtype not in _INT_DTYPES:
                raise ValueError(f"adjacency must be bool, integer or floating, got {a.dtype}")
            a = a.to(torch.get_default_dtype())
        if not bool(torch.isfinite(a).all()):
            raise ValueError("adjacency contains NaN or infinite entries")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be finite, got {threshold}")
        if symmetrize:
            a = torch.maximum(a, a.T)
        n = a.shape[0]
        mask = a > threshold
        mask.fill_diagonal_(False)
        row, col = mask.nonzero(as_tuple=True)  # row-major: already canonical
        weight = a[row, col] if weighted else None
        return cls(torch.stack([row, col]), n, weight)

    # ---- basic properties ------------------------------------------------------------------

    @property
    def num_edges(self) -> int:
        """Number of directed edges ``E`` (twice the number of undirected edges)."""
        return int(self.edge_index.shape[1])

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    @property
    def is_weighted(self) -> bool:
        return self.edge_weight is not None

    def __repr__(self) -> str:
        return f"ClientGraph(num_nodes={self.num_nodes}, num_edges={self.num_edges}, weighted={self.is_weighted})"

    def to(self, device: torch.device | str) -> ClientGraph:
        """A copy on ``device`` (weights keep their autograd history)."""
        w = self.edge_weight.to(device) if self.edge_weight is not None else None
        return ClientGraph._unchecked(self.edge_index.to(device), self.num_nodes, w)

    def weights(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[E]`` edge weights, ones for an unweighted graph."""
        if self.edge_weight is not None:
            return self.edge_weight if dtype is None else self.edge_weight.to(dtype)
        return torch.ones(self.num_edges, dtype=dtype or torch.get_default_dtype(), device=self.device)

    def degree(self, weighted: bool = False) -> Tensor:
        """``[N]`` out-degree: edge counts (int64), or with ``weighted`` summed edge weights.
        For a symmetric graph this is the ordinary degree."""
        row = self.edge_index[0]
        if not weighted:
            return torch.bincount(row, minlength=self.num_nodes)
        w = self.weights()
        return torch.zeros(self.num_nodes, dtype=w.dtype, device=self.device).index_add(0, row, w)

    def to_dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[N, N]`` adjacency with ``A[u, v]`` = weight of ``u → v`` (1 if unweighted).
        O(N²) memory: for tests and diagnostics only."""
        w = self.weights(dtype)
        a = torch.zeros(self.num_nodes, self.num_nodes, dtype=w.dtype, device=self.device)
        return a.index_put((self.edge_index[0], self.edge_index[1]), w)

    def neighbors(self, node: int) -> Tensor:
        """``[deg]`` sorted out-neighbours of ``node``."""
        i = _as_node(node, self.num_nodes)
        row = self.edge_index[0]
        lo = int(torch.searchsorted(row, i))
        hi = int(torch.searchsorted(row, i, right=True))
        return self.edge_index[1, lo:hi]

    # ---- symmetry --------------------------------------------------------------------------

    def _reverse_positions(self) -> tuple[Tensor, Tensor]:
        """For each edge, the position of its reverse and whether that reverse exists."""
        n = self.num_nodes
        row, col = self.edge_index
        key = row * n + col  # sorted, because the edges are canonical
        rkey = col * n + row
        pos = torch.searchsorted(key, rkey).clamp_max(max(self.num_edges - 1, 0))
        found = key[pos] == rkey if self.num_edges else torch.zeros(0, dtype=torch.bool, device=self.device)
        return pos, found

    def _first_asymmetry(self) -> str | None:
        if self.num_edges == 0:
            return None
        pos, found = self._reverse_positions()
        row, col = self.edge_index
        if not bool(found.all()):
            e = int((~found).nonzero()[0, 0])
            u, v = int(row[e]), int(col[e])
            return f"edge ({u}, {v}) has no reverse edge ({v}, {u})"
        if self.edge_weight is not None:
            w = self.edge_weight.detach()
            diff = w != w[pos]
            if bool(diff.any()):
                e = int(diff.nonzero()[0, 0])
                u, v = int(row[e]), int(col[e])
                return f"edge ({u}, {v}) has weight {float(w[e])} but ({v}, {u}) has weight {float(w[pos[e]])}"
        return None

    def is_symmetric(self) -> bool:
        """True iff every edge's reverse is present with exactly the same weight."""
        return self._first_asymmetry() is None

    def validate_symmetric(self) -> ClientGraph:
        """Raise :class:`ValueError` naming an offending edge unless the graph is symmetric;
        returns ``self`` so it can be chained."""
        problem = self._first_asymmetry()
        if problem is not None:
            raise ValueError(f"graph must be undirected (both orientations of every edge): {problem}")
        return self

    def symmetrized(self) -> ClientGraph:
        """The undirected closure: every missing reverse edge added; where both orientations
        exist with different weights the larger is kept (``A = max(A, Aᵀ)``)."""
        row, col = self.edge_index
        w = self.edge_weight
        edge_index, weight = _coalesce(
            torch.cat([row, col]), torch.cat([col, row]), None if w is None else torch.cat([w, w]), self.num_nodes
        )
        return ClientGraph._unchecked(edge_index, self.num_nodes, weight)

    # ---- editing ---------------------------------------------------------------------------

    def subgraph(self, nodes: Any) -> ClientGraph:
        """The subgraph induced by ``nodes``, relabelled in the order given.

        Args:
            nodes: ``[M]`` distinct node ids (node ``nodes[j]`` becomes node ``j``) or a ``[N]``
                boolean mask (kept nodes keep their relative order).
        """
        idx = _as_tensor(nodes, "nodes").to(self.device)
        if idx.dtype == torch.bool:
            if idx.shape != (self.num_nodes,):
                raise ValueError(f"a boolean node mask must have shape [{self.num_nodes}], got {list(idx.shape)}")
            idx = idx.nonzero(as_tuple=True)[0]
        if idx.dim() != 1 or idx.dtype not in _INT_DTYPES:
            raise ValueError("nodes must be a 1-D sequence of integer node ids or a boolean mask")
        idx = idx.long()
        if idx.numel() == 0:
            raise ValueError("a subgraph needs at least one node")
        if bool(((idx < 0) | (idx >= self.num_nodes)).any()):
            raise ValueError(f"subgraph node ids out of range: they must lie in [0, {self.num_nodes})")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError("nodes must not contain duplicates")
        mapping = torch.full((self.num_nodes,), -1, dtype=torch.long, device=self.device)
        mapping[idx] = torch.arange(idx.numel(), device=self.device)
        row, col = mapping[self.edge_index[0]], mapping[self.edge_index[1]]
        keep = (row >= 0) & (col >= 0)
        w = self.edge_weight[keep] if self.edge_weight is not None else None
        return ClientGraph(torch.stack([row[keep], col[keep]]), int(idx.numel()), w)

    def add_node(self, neighbors: Any, edge_weight: Any = None) -> ClientGraph:
        """A copy with one new node ``N`` joined to ``neighbors`` in both orientations, e.g. a
        novel client attached to its kNN (see :func:`nearest_clients`).

        Args:
            neighbors: ``[K]`` distinct existing node ids (may be empty: an isolated new node).
            edge_weight: ``[K]`` weights of the new undirected edges; required iff the graph is
                weighted.
        """
        nb = _as_tensor(neighbors, "neighbors").to(self.device).reshape(-1)
        if nb.numel() and nb.dtype not in _INT_DTYPES:
            raise ValueError(f"neighbors must be integer node ids, got {nb.dtype}")
        nb = nb.long()
        if bool(((nb < 0) | (nb >= self.num_nodes)).any()):
            raise ValueError(f"neighbors must be existing node ids in [0, {self.num_nodes})")
        if (edge_weight is None) == self.is_weighted and nb.numel():
            raise ValueError(
                "edge_weight for the new edges is required for a weighted graph"
                if self.is_weighted
                else "edge_weight given for an unweighted graph"
            )
        new = torch.full_like(nb, self.num_nodes)
        edge_index = torch.cat([self.edge_index, torch.stack([new, nb]), torch.stack([nb, new])], dim=1)
        weight = self.edge_weight
        if weight is not None:
            w = _as_weight(edge_weight, self.device) if nb.numel() else weight.new_zeros(0)
            if w.shape != nb.shape:
                raise ValueError(f"edge_weight must have one weight per neighbour ({nb.numel()}), got {list(w.shape)}")
            weight = torch.cat([weight, w.to(weight.dtype), w.to(weight.dtype)])
        return ClientGraph(edge_index, self.num_nodes + 1, weight)

    def pruned(self, min_weight: float) -> ClientGraph:
        """Keep only edges with ``weight ≥ min_weight`` (weighted graphs; e.g. for reporting a
        :class:`LearnedGraph`). Symmetric weights give a symmetric result."""
        if self.edge_weight is None:
            raise ValueError("pruned() needs a weighted graph")
        keep = self.edge_weight.detach() >= min_weight
        return ClientGraph._unchecked(self.edge_index[:, keep], self.num_nodes, self.edge_weight[keep])

    # ---- files -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write a small JSON file (atomically: write, then rename). Weights are stored as
        Python floats, which round-trip float32 and float64 exactly."""
        path = Path(path)
        w = self.edge_weight
        payload = {
            "format": _FILE_FORMAT,
            "version": _FILE_VERSION,
            "num_nodes": self.num_nodes,
            "edge_index": self.edge_index.cpu().tolist(),
            "edge_weight": None if w is None else w.detach().cpu().double().tolist(),
            "weight_dtype": None if w is None else str(w.dtype).removeprefix("torch."),
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ClientGraph:
        """Read a file written by :meth:`save`; a malformed file raises :class:`ValueError`
        naming it."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
            if not isinstance(payload, dict) or payload.get("format") != _FILE_FORMAT:
                raise ValueError(f"not a {_FILE_FORMAT} file (missing or wrong 'format')")
            if payload.get("version") != _FILE_VERSION:
                raise ValueError(f"unsupported version {payload.get('version')!r} (expected {_FILE_VERSION})")
            edges = payload["edge_index"]
            if not (isinstance(edges, list) and len(edges) == 2 and all(isinstance(r, list) for r in edges)):
                raise ValueError("'edge_index' must be two lists of node ids")
            if not all(type(v) is int for r in edges for v in r):
                raise ValueError("'edge_index' entries must be integers")
            edge_index = torch.tensor(edges, dtype=torch.long, device=device).reshape(2, -1)
            weight = None
            if payload.get("edge_weight") is not None:
                dtype = getattr(torch, str(payload.get("weight_dtype")), None)
                if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                    raise ValueError(f"bad 'weight_dtype' {payload.get('weight_dtype')!r}")
                raw = payload["edge_weight"]
                numbers = isinstance(raw, list) and all(type(v) in (int, float) for v in raw)
                if not numbers:
                    raise ValueError("'edge_weight' must be a list of numbers")
                weight = torch.tensor(raw, dtype=torch.float64, device=device).to(dtype)
            num_nodes = payload["num_nodes"]
            return cls(edge_index, num_nodes, weight)
        except (ValueError, KeyError, TypeError, OverflowError) as err:
            reason = f"missing key {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"{path}: malformed client graph file: {reason}") from err


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


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
    graph is deterministic (duplicated embeddings give exactly equal scores, see module notes).
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


class LearnedGraph(nn.Module):
    """Learned edge weights on a fixed candidate edge set.

    ``w_uv = sigmoid(a(z_u, z_v) / temperature)`` with a symmetric scorer
    ``a(z_u, z_v) = MLP([z_u ⊙ z_v, |z_u − z_v|])``: both inputs are invariant under swapping
    ``u`` and ``v``, and the score is computed once per undirected pair and copied to both
    orientations, so ``w_uv == w_vu`` exactly. Weights lie in (0, 1) and are differentiable with
    respect to the scorer's parameters and ``z``.

    Args:
        candidates: symmetric :class:`ClientGraph` of allowed edges (e.g. kNN with a larger k,
            or complete); its own weights, if any, are ignored.
        in_features: ``f``, the width of the client representations ``z``.
        hidden: hidden width of the scorer MLP.
        temperature: divides the score before the sigmoid (lower = sharper weights).
        generator: if given, initialises the scorer from it (otherwise PyTorch's default init).
    """

    def __init__(
        self,
        candidates: ClientGraph,
        in_features: int,
        hidden: int = 32,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        candidates.validate_symmetric()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.num_nodes = candidates.num_nodes
        self.in_features = _as_int(in_features, "in_features")
        self.temperature = float(temperature)
        n = candidates.num_nodes
        row, col = candidates.edge_index
        pair_key = torch.minimum(row, col) * n + torch.maximum(row, col)
        pairs, edge_to_pair = torch.unique(pair_key, sorted=True, return_inverse=True)
        self.register_buffer("edge_index", candidates.edge_index.clone())
        self.register_buffer("pair_u", pairs // n)
        self.register_buffer("pair_v", pairs % n)
        self.register_buffer("edge_to_pair", edge_to_pair)
        self.scorer = nn.Sequential(nn.Linear(2 * self.in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        if generator is not None:
            for layer in self.scorer:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                    bound = 1.0 / math.sqrt(layer.in_features)
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, z: Tensor) -> ClientGraph:
        """Args: ``z`` ``[N, f]`` client representations. Returns the candidate graph with
        ``[E]`` differentiable weights in (0, 1)."""
        if z.dim() != 2 or z.shape != (self.num_nodes, self.in_features):
            raise ValueError(f"z must have shape [{self.num_nodes}, {self.in_features}], got {list(z.shape)}")
        zu, zv = z[self.pair_u], z[self.pair_v]
        score = self.scorer(torch.cat([zu * zv, (zu - zv).abs()], dim=-1)).squeeze(-1)
        w_pair = torch.sigmoid(score / self.temperature)
        return ClientGraph._unchecked(self.edge_index, self.num_nodes, w_pair[self.edge_to_pair])

    @staticmethod
    def l1(graph: ClientGraph) -> Tensor:
        """Sparsity regulariser: mean edge weight of a graph returned by :meth:`forward`
        (weights are positive, so this is the L1 norm divided by ``E``)."""
        if graph.edge_weight is None:
            raise ValueError("l1() needs a weighted graph (the output of LearnedGraph.forward)")
        if graph.num_edges == 0:
            return graph.edge_weight.sum()
        return graph.edge_weight.mean()


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


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def degree_stats(graph: ClientGraph) -> dict[str, Any]:
    """Out-degree statistics (the degree, for a symmetric graph): ``min``, ``max``, ``mean``,
    ``median`` (average of the two middle values for even N) and ``isolated`` (degree-0 count;
    in- and out-edges both counted, so a directed sink is not isolated)."""
    deg = graph.degree().double()
    touched = torch.zeros(graph.num_nodes, dtype=torch.bool, device=graph.device)
    touched[graph.edge_index.reshape(-1)] = True
    return {
        "min": int(deg.min()),
        "max": int(deg.max()),
        "mean": float(deg.mean()),
        "median": float(torch.quantile(deg, 0.5)),
        "isolated": int((~touched).sum()),
    }


def connected_components(graph: ClientGraph) -> dict[str, Any]:
    """Connected components, ignoring edge direction.

    Returns ``{"num_components", "labels", "sizes"}``: ``labels[i]`` is the component of node
    ``i``, numbered 0.. in order of each component's smallest node; ``sizes[c]`` its size.
    Min-label propagation with pointer jumping, pure torch, O(E) per sweep.
    """
    n = graph.num_nodes
    row, col = graph.edge_index
    src, dst = torch.cat([row, col]), torch.cat([col, row])
    labels = torch.arange(n, device=graph.device)
    while True:
        # each node takes the smallest label among itself and its neighbours, then jumps
        new = labels.scatter_reduce(0, dst, labels[src], reduce="amin", include_self=True)
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    roots, comp = torch.unique(labels, sorted=True, return_inverse=True)
    sizes = torch.bincount(comp, minlength=roots.numel())
    return {"num_components": int(roots.numel()), "labels": comp.tolist(), "sizes": sizes.tolist()}


def edge_homophily(graph: ClientGraph, labels: Any = None, sets: Any = None) -> dict[str, Any]:
    """Edge homophily: the fraction of edges joining "similar" clients. Pass exactly one of

    * ``labels``: ``[N]`` integer label per client — an edge is homophilous iff its endpoints
      share the label;
    * ``sets``: per-client sets (a sequence of N non-empty iterables of hashables, e.g. each
      client's classes, or an ``[N, C]`` multi-hot tensor) — homophilous iff the sets overlap.
      Also reports ``mean_jaccard``, the mean ``|S_u ∩ S_v| / |S_u ∪ S_v|`` over edges.

    Edges are counted as stored (both orientations of an undirected edge), which for a symmetric
    graph equals the per-undirected-edge fraction. Weights are ignored. Values are ``None`` for
    a graph without edges.

    Returns: ``{"homophily": float | None, "num_edges": int}`` plus ``"mean_jaccard"`` for sets.
    """
    homophilous, jaccard = _edge_similarity(graph, labels, sets)
    e = graph.num_edges
    out: dict[str, Any] = {"homophily": float(homophilous.double().mean()) if e else None, "num_edges": e}
    if jaccard is not None:
        out["mean_jaccard"] = float(jaccard.mean()) if e else None
    return out


def dirichlet_energy(x: Tensor, graph: ClientGraph, normalized: bool = True) -> Tensor:
    """Dirichlet energy of node features over the graph (0-dim tensor, differentiable).

    normalised (default)::  ½ Σ_{(u,v)∈E} w_uv ‖x_u/√(1+d_u) − x_v/√(1+d_v)‖²
                            = trace(Xᵀ (I − D̃^{-1/2} Ã D̃^{-1/2}) X),  Ã = A + I, D̃ = D + I
    unnormalised::          ½ Σ_{(u,v)∈E} w_uv ‖x_u − x_v‖² = trace(Xᵀ (D − A) X)

    with ``d_u = Σ_v w_uv`` (weighted out-degree) and the sum over stored directed edges, so each
    undirected edge counts once after the ½. The augmented degree ``1 + d_u`` matches GCN's
    normalisation; in the normalised form constant features on a regular graph have zero energy.

    Args:
        x: ``[N]`` or ``[N, *]`` node features (trailing dims are flattened), on the graph's device.
        graph: symmetric graph (the identity above assumes it).
    """
    feats = _node_features(x, graph)
    row, col = graph.edge_index
    w = graph.weights(feats.dtype)
    if normalized:
        deg = torch.zeros(graph.num_nodes, dtype=feats.dtype, device=feats.device).index_add(0, row, w)
        feats = feats * (1.0 + deg).rsqrt().unsqueeze(-1)
    diff = feats[row] - feats[col]
    return 0.5 * (w * diff.pow(2).sum(dim=-1)).sum()


def rayleigh_quotient(x: Tensor, graph: ClientGraph, normalized: bool = True) -> Tensor:
    """Scale-free Dirichlet energy ``dirichlet_energy(x) / ‖x‖²_F`` for over-smoothing plots
    (METHOD.md §6): 0 for features constant on components (of a regular graph, normalised form);
    0 for ``x = 0``. With ``normalized`` it lies in [0, 2) for an undirected graph."""
    feats = _node_features(x, graph)
    energy = dirichlet_energy(feats, graph, normalized)
    sq = feats.pow(2).sum()
    return torch.where(sq > 0, energy / sq.clamp_min(torch.finfo(feats.dtype).tiny), torch.zeros_like(energy))


def rewire_to_homophily(
    graph: ClientGraph,
    target_h: float,
    *,
    labels: Any = None,
    sets: Any = None,
    generator: torch.Generator,
) -> ClientGraph:
    """Rewire an undirected graph so its edge homophily moves toward ``target_h`` (METHOD.md §6).

    With ``m`` undirected edges of which ``h`` are homophilous (see :func:`edge_homophily`, pass
    ``labels`` or ``sets``), the goal is ``t = round(target_h · m)``. Each swap removes one edge of
    the over-represented kind and adds one absent edge of the other kind, so the edge count is
    kept and homophily moves by exactly one edge toward ``t`` — never past it. Removed edges are
    drawn at random among those whose endpoints keep degree ≥ 1 (no new isolated nodes), added
    edges uniformly among the absent pairs of the needed kind; an excess edge hanging off a
    degree-1 node is instead moved (that node keeps it, the other end moves). Passes repeat
    until ``t`` is met or no swap is possible (e.g. no heterophilous pair exists), so the target
    may be missed when out of reach. The result is symmetric, unweighted and without self loops
    or duplicates; deterministic given ``generator``. Uses an ``[N, N]`` boolean relation: fine
    for a few thousand clients.
    """
    graph.validate_symmetric()
    if graph.is_weighted:
        raise ValueError("rewire_to_homophily works on unweighted graphs (new edges would have no weight)")
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator (every random choice is drawn from it)")
    target_h = float(target_h)
    if not 0.0 <= target_h <= 1.0:
        raise ValueError(f"target_h must be in [0, 1], got {target_h}")
    relation = _homophily_relation(graph.num_nodes, labels, sets, graph.device)  # [N, N] bool
    # Several passes: additions of one pass raise degrees, freeing removals in the next.
    while True:
        rewired, progressed = _rewire_pass(graph, relation, target_h, generator)
        if not progressed:
            return rewired
        graph = rewired


def graph_summary(graph: ClientGraph, sets: Any = None, labels: Any = None) -> dict[str, Any]:
    """JSON-serialisable summary to save next to a built graph: sizes, symmetry, degree stats,
    components (count and sizes) and, if ``labels``/``sets`` are given, edge homophily."""
    symmetric = graph.is_symmetric()
    components = connected_components(graph)
    out: dict[str, Any] = {
        "num_nodes": graph.num_nodes,
        "num_edges": graph.num_edges,
        "num_undirected_edges": graph.num_edges // 2 if symmetric else None,
        "symmetric": symmetric,
        "weighted": graph.is_weighted,
        "degree": degree_stats(graph),
        "components": {"num_components": components["num_components"], "sizes": components["sizes"]},
    }
    if graph.is_weighted and graph.num_edges:
        w = graph.edge_weight.detach().double()
        out["weight"] = {"min": float(w.min()), "max": float(w.max()), "mean": float(w.mean())}
    if labels is not None:
        out["label_homophily"] = edge_homophily(graph, labels=labels)
    if sets is not None:
        out["set_homophily"] = edge_homophily(graph, sets=sets)
    return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} could not be read as a tensor: {err}") from err


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _as_num_nodes(value: Any) -> int:
    n = _as_int(value, "num_nodes")
    if n < 1:
        raise ValueError(f"num_nodes must be at least 1, got {n}")
    return n


def _as_node(value: Any, num_nodes: int) -> int:
    i = _as_int(value.item() if isinstance(value, Tensor) and value.numel() == 1 else value, "node")
    if not 0 <= i < num_nodes:
        raise ValueError(f"node {i} out of range [0, {num_nodes})")
    return i


def _as_weight(value: Any, device: torch.device) -> Tensor:
    w = _as_tensor(value, "edge_weight")
    if not w.is_floating_point():
        w = w.to(torch.get_default_dtype())
    return w.to(device)


def _parse_edges(edges: Any, layout: str) -> Tensor:
    """Edge list → ``[2, E]`` int64 (range and loops are checked by :class:`ClientGraph`)."""
    if layout not in ("auto", "pairs", "index"):
        raise ValueError(f"layout must be 'auto', 'pairs' or 'index', got {layout!r}")
    t = _as_tensor(edges, "edges")
    if t.numel() == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=t.device)
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"edges must hold integer node ids, got {t.dtype}")
    if t.dim() != 2 or 2 not in t.shape:
        raise ValueError(f"edges must have shape [E, 2] or [2, E], got {list(t.shape)}")
    if layout == "pairs" or (layout == "auto" and t.shape[1] == 2):
        if t.shape[1] != 2:
            raise ValueError(f"layout='pairs' needs shape [E, 2], got {list(t.shape)}")
        t = t.T
    elif t.shape[0] != 2:
        raise ValueError(f"layout='index' needs shape [2, E], got {list(t.shape)}")
    return t.long().contiguous()


def _coalesce(
    row: Tensor, col: Tensor, weight: Tensor | None, num_nodes: int
) -> tuple[Tensor, Tensor | None]:
    """Sorted unique edges; duplicates merged keeping the largest weight. Inputs are in range
    and loop-free; output is canonical, so callers may use ``ClientGraph._unchecked``."""
    key = row * num_nodes + col
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
    edge_index = torch.stack([uniq // num_nodes, uniq % num_nodes])
    if weight is None:
        return edge_index, None
    merged = weight.new_zeros(uniq.numel()).scatter_reduce(0, inv, weight, reduce="amax", include_self=False)
    return edge_index, merged


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


def _node_features(x: Tensor, graph: ClientGraph) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] != graph.num_nodes:
        raise ValueError(f"x must have shape [N, ...] with N = {graph.num_nodes}, got {list(x.shape)}")
    if x.device != graph.device:
        raise ValueError(f"x is on {x.device} but the graph is on {graph.device}")
    feats = x.reshape(graph.num_nodes, -1)
    return feats if feats.is_floating_point() else feats.to(torch.get_default_dtype())


def _multi_hot(sets: Any, num_nodes: int, device: torch.device) -> Tensor:
    """``[N, C]`` bool membership matrix from a multi-hot tensor or a sequence of N iterables."""
    if isinstance(sets, Tensor) or (hasattr(sets, "shape") and hasattr(sets, "dtype")):
        m = _as_tensor(sets, "sets")
        if m.dim() != 2 or m.shape[0] != num_nodes:
            raise ValueError(f"a multi-hot sets tensor must have shape [{num_nodes}, C], got {list(m.shape)}")
        m = m.to(device) != 0
    else:
        members: list[list[Any]] = [list(s) for s in sets]
        if len(members) != num_nodes:
            raise ValueError(f"sets must have one entry per client ({num_nodes}), got {len(members)}")
        vocab = {item: j for j, item in enumerate(sorted({i for s in members for i in s}, key=repr))}
        m = torch.zeros(num_nodes, len(vocab), dtype=torch.bool, device=device)
        for i, s in enumerate(members):  # one pass over clients, not edges
            m[i, [vocab[item] for item in s]] = True
    empty = ~m.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"client {int(empty.nonzero()[0, 0])} has an empty set: overlap is undefined")
    return m


def _labels(labels: Any, num_nodes: int, device: torch.device) -> Tensor:
    lab = _as_tensor(labels, "labels")
    if lab.shape != (num_nodes,):
        raise ValueError(f"labels must have shape [{num_nodes}], got {list(lab.shape)}")
    if lab.dtype not in _INT_DTYPES and lab.dtype != torch.bool:
        raise ValueError(f"labels must be integers, got {lab.dtype}")
    return lab.to(device)


def _check_one_attribute(labels: Any, sets: Any) -> None:
    if (labels is None) == (sets is None):
        raise ValueError("pass exactly one of labels= (one label per client) or sets= (one set per client)")


def _edge_similarity(graph: ClientGraph, labels: Any, sets: Any) -> tuple[Tensor, Tensor | None]:
    """``[E]`` homophilous flags and, for sets, ``[E]`` Jaccard indices."""
    _check_one_attribute(labels, sets)
    row, col = graph.edge_index
    if labels is not None:
        lab = _labels(labels, graph.num_nodes, graph.device)
        return lab[row] == lab[col], None
    m = _multi_hot(sets, graph.num_nodes, graph.device)
    inter = (m[row] & m[col]).sum(dim=1)
    union = (m[row] | m[col]).sum(dim=1)
    return inter > 0, inter.double() / union.double()


def _homophily_relation(num_nodes: int, labels: Any, sets: Any, device: torch.device) -> Tensor:
    """``[N, N]`` bool: which client pairs would form a homophilous edge."""
    _check_one_attribute(labels, sets)
    if labels is not None:
        lab = _labels(labels, num_nodes, device)
        return lab[:, None] == lab[None, :]
    m = _multi_hot(sets, num_nodes, device).float()
    return (m @ m.T) > 0


def _rewire_pass(
    graph: ClientGraph, relation: Tensor, target_h: float, generator: torch.Generator
) -> tuple[ClientGraph, bool]:
    """One batch of swaps toward ``target_h``; returns the graph and whether anything changed."""
    n = graph.num_nodes
    row, col = graph.edge_index
    upper = row < col
    u, v = row[upper], col[upper]
    m = int(u.numel())
    hom = relation[u, v]
    t = round(target_h * m)
    current = int(hom.sum())
    if m == 0 or current == t:
        return graph, False
    need_hom = current < t

    # additions: absent pairs of the needed kind, in random order
    absent = graph.to_dense(torch.float32) == 0
    cand = torch.triu((relation == need_hom) & absent, diagonal=1).nonzero()
    cand = cand[torch.randperm(cand.shape[0], generator=generator).to(cand.device)]
    budget = min(abs(t - current), int(cand.shape[0]))

    # removals: edges of the excess kind, random priority, keeping every endpoint's degree ≥ 1
    excess = (hom != need_hom).nonzero(as_tuple=True)[0]
    excess = excess[torch.randperm(excess.numel(), generator=generator).to(excess.device)]
    degree = graph.degree()
    removed = _removals_keeping_degree(u[excess], v[excess], degree, budget)
    if removed.numel() == 0:
        return _move_pendant_edge(graph, u[excess], v[excess], relation, need_hom, absent, degree, generator)
    keep = torch.ones(m, dtype=torch.bool, device=graph.device)
    keep[excess[removed]] = False
    added = cand[: removed.numel()]
    pairs = torch.cat([torch.stack([u[keep], v[keep]], dim=1), added], dim=0)
    return ClientGraph.from_edge_list(pairs, n, layout="pairs", symmetrize=True), True


def _move_pendant_edge(
    graph: ClientGraph,
    u: Tensor,
    v: Tensor,
    relation: Tensor,
    need_hom: bool,
    absent: Tensor,
    degree: Tensor,
    generator: torch.Generator,
) -> tuple[ClientGraph, bool]:
    """Fallback when every excess edge ``{a, b}`` (in priority order ``u, v``) has a degree-1
    endpoint: keep that endpoint ``a`` and move the edge's other end from ``b`` (degree ≥ 2) to a
    random ``w`` with ``{a, w}`` of the needed kind. One swap; the outer loop repeats."""
    for a, b in zip(u.tolist(), v.tolist()):  # stops at the first movable edge
        if degree[a] >= 2:
            a, b = b, a
        if degree[a] != 1 or degree[b] < 2:
            continue
        options = ((relation[a] == need_hom) & absent[a]).nonzero(as_tuple=True)[0]
        options = options[options != a]
        if options.numel() == 0:
            continue
        w = int(options[torch.randint(options.numel(), (1,), generator=generator)])
        row, col = graph.edge_index
        drop = ((row == a) & (col == b)) | ((row == b) & (col == a))
        edge_index = torch.cat(
            [graph.edge_index[:, ~drop], torch.tensor([[a, w], [w, a]], device=graph.device)], dim=1
        )
        return ClientGraph(edge_index, graph.num_nodes), True
    return graph, False


def _removals_keeping_degree(u: Tensor, v: Tensor, degree: Tensor, budget: int) -> Tensor:
    """Positions (into the priority-ordered candidates ``u, v``) of up to ``budget`` edges whose
    joint removal leaves every node with degree ≥ 1, preferring earlier candidates.

    Vectorised in rounds: a candidate is taken if, at both endpoints, fewer than ``deg − 1``
    higher-priority candidates share that endpoint — a conservative rule that can never strip a
    node. The top remaining feasible candidate always passes, so each round makes progress.
    """
    c = int(u.numel())
    deg = degree.clone()
    remaining = torch.arange(c, device=u.device)
    chosen: list[Tensor] = []
    while budget > 0 and remaining.numel():
        ru, rv = u[remaining], v[remaining]
        feasible = (deg[ru] >= 2) & (deg[rv] >= 2)
        remaining, ru, rv = remaining[feasible], ru[feasible], rv[feasible]
        r = int(remaining.numel())
        if r == 0:
            break
        # rank of each candidate among the candidates sharing the same endpoint, by priority
        node = torch.cat([ru, rv])
        prio = torch.arange(r, device=u.device).repeat(2)
        order = torch.argsort(node * r + prio)
        counts = torch.bincount(node, minlength=deg.numel())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(2 * r, device=u.device) - starts[node[order]]
        ok = (rank[:r] < deg[ru] - 1) & (rank[r:] < deg[rv] - 1)
        take = ok.nonzero(as_tuple=True)[0][:budget]
        chosen.append(remaining[take])
        budget -= int(take.numel())
        ends = torch.cat([ru[take], rv[take]])
        deg.index_add_(0, ends, torch.full_like(ends, -1).to(deg.dtype))
        left = torch.ones(r, dtype=torch.bool, device=u.device)
        left[take] = False
        remaining = remaining[left]
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=u.device)
