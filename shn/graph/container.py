"""The client graph container: :class:`ClientGraph`.

A validated, canonical directed edge list over ``N`` clients with optional non-negative edge
weights: constructors from edge lists and adjacencies, symmetry checks and closure, editing
(subgraph, adding a novel client, pruning) and a small JSON file format.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shn.graph.inputs import (
    _INT_DTYPES,
    _as_node,
    _as_num_nodes,
    _as_tensor,
    _as_weight,
    _coalesce,
    _parse_edges,
)

__all__ = ["ClientGraph"]

_FILE_FORMAT = "shn.ClientGraph"
_FILE_VERSION = 1


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
