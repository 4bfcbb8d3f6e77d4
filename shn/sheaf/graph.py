"""The graph structure every sheaf operation runs on: :class:`SheafGraph`.

A symmetric directed edge list, validated, de-looped and sorted once per call, paired with its
undirected edges (``up``/``down``), plus the CSR index arrays of the sparse edge operators, cached
on the object so that all layers of one forward pass share them. Conventions: see :mod:`shn.sheaf`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SheafGraph"]


@dataclass(eq=False)
class SheafGraph:
    """A symmetric directed edge list, sorted by ``(row, col)``, with its undirected pairing.

    Built per forward call by :meth:`from_edge_index` (a few ``O(E)`` passes and one ``argsort``
    over the ``E/2`` undirected edges). Sparse-operator index arrays are derived on first use and
    cached *on this object*, so all layers of one forward pass share them.

    Attributes:
        edge_index: ``[2, E]`` int64, sorted by ``(row, col)``, no self loops.
        num_nodes: ``N``.
        order: ``[E]`` int64 or ``None``: ``edge_index = input_edge_index[:, order]`` (``None`` when
            the input was already sorted and loop-free). :meth:`edge_values` applies it.
        ptr: ``[N + 1]`` CSR row pointer of ``edge_index``.
        up: ``[H]`` positions (into ``edge_index``) of the ``H = E/2`` edges with ``row < col``;
            these define the undirected edges ``{u, v}``, ``u < v``, in sorted order.
        down: ``[H]`` position of the reverse ``(v, u)`` of each undirected edge.
        uv: ``[2H]`` ``cat(u, v)`` (the endpoints of the undirected edges); ``vu`` is ``cat(v, u)``.
            Per-edge data of both endpoints is stored as ``cat(side_u, side_v)``: column ``k`` for
            ``u`` of undirected edge ``k``, column ``H + k`` for its ``v`` (see :meth:`pos`).
    """

    edge_index: Tensor
    num_nodes: int
    order: Tensor | None
    ptr: Tensor
    up: Tensor
    down: Tensor
    uv: Tensor
    vu: Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int) -> "SheafGraph":
        """Validate, de-loop and sort ``edge_index`` (``[2, E]``, both orientations of every edge).

        Raises ``ValueError`` for a wrong shape or dtype, node ids outside ``[0, num_nodes)``, or an
        edge ``(u, v)`` whose reverse ``(v, u)`` is missing (a one-directional edge list).
        """
        if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.size(0) != 2:
            shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
            raise ValueError(f"edge_index must be a [2, E] integer tensor, got shape {shape}")
        if edge_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"edge_index must be an integer tensor, got dtype {edge_index.dtype}")
        num_nodes = int(num_nodes)
        if num_nodes < 0:
            raise ValueError(f"num_nodes must be non-negative, got {num_nodes}")
        edge_index = edge_index.long()
        dev = edge_index.device
        order = None
        if edge_index.size(1):
            lo, hi = (int(t) for t in torch.aminmax(edge_index))
            if lo < 0 or hi >= num_nodes:
                raise ValueError(
                    f"edge_index has node ids in [{lo}, {hi}] but x has {num_nodes} rows; "
                    f"ids must lie in [0, {num_nodes})"
                )
            loops = edge_index[0] == edge_index[1]
            if bool(loops.any()):
                order = torch.nonzero(~loops).view(-1)
                edge_index = edge_index[:, order]
        row, col = edge_index
        key = row * num_nodes + col
        if key.numel() > 1 and not bool((key[1:] >= key[:-1]).all()):
            perm = torch.argsort(key, stable=True)
            edge_index = edge_index[:, perm]
            row, col = edge_index
            order = perm if order is None else order[perm]
        ptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=dev)
        if row.numel():
            torch.cumsum(torch.bincount(row, minlength=num_nodes), 0, out=ptr[1:])

        # Pair every (u, v), u < v, with its reverse. The reverses are exactly the row > col edges,
        # which sorted by (row, col) are in (v, u) order; the u < v edges are in (u, v) order, so a
        # *stable* sort by v alone puts them in (v, u) order and aligns the two lists.
        is_up = row < col
        up = torch.nonzero(is_up).view(-1)
        down_sorted = torch.nonzero(~is_up).view(-1)
        n_half = up.numel()
        if down_sorted.numel() != n_half:
            raise ValueError(
                f"edge_index must contain both orientations of every edge, but it has {n_half} edges with "
                f"row<col and {down_sorted.numel()} with row>col (add the reverse edges, e.g. "
                "torch_geometric.utils.to_undirected)"
            )
        # (index_select / index_copy_: much cheaper than advanced indexing and index_put_)
        u, v = row.index_select(0, up), col.index_select(0, up)  # endpoints of the undirected edges
        by_vu = torch.argsort(v.int() if num_nodes < 2**31 else v, stable=True)  # int32 sorts faster
        down = torch.empty_like(up).index_copy_(0, by_vu, down_sorted)
        if not (torch.equal(row.index_select(0, down), v) and torch.equal(col.index_select(0, down), u)):
            raise ValueError("edge_index is not symmetric: some edge (u, v) has no reverse edge (v, u)")
        return cls(edge_index, num_nodes, order, ptr, up, down, torch.cat([u, v]), torch.cat([v, u]))

    @property
    def num_edges(self) -> int:
        """``E``, the number of directed edges (twice the undirected ones)."""
        return self.edge_index.size(1)

    @property
    def num_undirected(self) -> int:
        return self.up.numel()

    @property
    def row(self) -> Tensor:
        return self.edge_index[0]

    @property
    def col(self) -> Tensor:
        return self.edge_index[1]

    def edge_values(self, values: Tensor) -> Tensor:
        """Reorder a per-edge tensor (``[E_in, ...]``, the caller's ``edge_index`` order) to this graph's."""
        return values if self.order is None else values[self.order]

    def columns(self) -> Tensor:
        """``[E]`` directed edge holding each column of ``cat(side_u, side_v)``: ``cat(up, down)``."""
        if "columns" not in self._cache:
            self._cache["columns"] = torch.cat([self.up, self.down])
        return self._cache["columns"]

    def pos(self) -> Tensor:
        """``[E]`` column of ``cat(side_u, side_v)`` holding each directed edge's *source* data:
        ``pos[up[k]] = k``, ``pos[down[k]] = H + k`` (inverse of :meth:`columns`). Cached."""
        if "pos" not in self._cache:
            cols = self.columns()
            self._cache["pos"] = torch.empty_like(cols).index_copy_(0, cols, torch.arange(cols.numel(), device=cols.device))
        return self._cache["pos"]

    def half_index(self) -> Tensor:
        """``[E]`` undirected edge of each directed edge (``pos mod H``). Cached."""
        if "half" not in self._cache:
            k = torch.arange(self.num_undirected, device=self.up.device)
            self._cache["half"] = torch.empty_like(self.row).index_copy_(0, self.up, k).index_copy_(0, self.down, k)
        return self._cache["half"]

    def reverse_edges(self) -> Tensor:
        """``[E]`` permutation ``rev`` with ``edge_index[:, rev] = edge_index.flip(0)``."""
        rev = torch.empty_like(self.row)
        rev[self.up] = self.down
        rev[self.down] = self.up
        return rev

    def _csr(self, stalk_dim: int, full_blocks: bool) -> tuple[Tensor, Tensor]:
        """CSR ``(crow [d·N+1], cols [d·E])`` of a stalk-major edge operator (cached per ``d`` and kind).

        Rows are ``(i, u) → i·N + u`` and, within a row, the edges of ``u`` in sorted order, so a
        ``[d, E]`` value tensor is already in CSR order. Diagonal blocks (``full_blocks=False``)
        couple stalk ``i`` of ``u`` to stalk ``i`` of ``v`` (a ``d·N × d·N`` operator); otherwise the
        columns point at node ``v`` (a ``d·N × N`` operator, applied once per source stalk ``j``).
        """
        key = (stalk_dim, full_blocks)
        if key not in self._cache:
            d, n, e = stalk_dim, self.num_nodes, self.num_edges
            dev = self.edge_index.device
            # int32 indices where they fit: half the index traffic in the sparse kernels.
            idx = torch.int32 if max(d * e, d * n) < 2**31 - 1 else torch.int64
            crow_key = ("crow", stalk_dim)
            if crow_key not in self._cache:
                crow = (self.ptr[:-1].unsqueeze(0) + e * torch.arange(d, device=dev).unsqueeze(1)).reshape(-1)
                self._cache[crow_key] = torch.cat([crow, crow.new_tensor([d * e])]).to(idx)
            col = self.col.to(idx)
            if full_blocks:
                cols = col.repeat(d)
            else:
                cols = (col.unsqueeze(0) + n * torch.arange(d, device=dev, dtype=idx).unsqueeze(1)).reshape(-1)
            self._cache[key] = (self._cache[crow_key], cols)
        return self._cache[key]


def _as_graph(edge_index: Tensor | SheafGraph, x: Tensor) -> SheafGraph:
    """The :class:`SheafGraph` for node features ``x`` (``[N, ...]``), building it if needed."""
    if isinstance(edge_index, SheafGraph):
        if edge_index.num_nodes != x.size(0):
            raise ValueError(f"graph has {edge_index.num_nodes} nodes but x has {x.size(0)} rows")
        if edge_index.edge_index.device != x.device:
            raise ValueError(f"graph is on {edge_index.edge_index.device} but x is on {x.device}")
        return edge_index
    if isinstance(edge_index, Tensor) and edge_index.device != x.device:
        edge_index = edge_index.to(x.device)
    return SheafGraph.from_edge_index(edge_index, x.size(0))
