"""Neural sheaf diffusion (Bodnar et al., NeurIPS 2022): the hot path of the SHN encoder.

The module keeps NSD's three ideas apart, each taking the graph at call time:

1. :class:`SheafLearner` — features + edges → restriction maps ``F_{u◁uv} = act(W [x_u ‖ x_v])``
   of type ``"diag"``, ``"orth"`` or ``"general"`` (:class:`RestrictionMaps`).
2. :func:`build_laplacian` — maps + edges → :class:`SheafLaplacian`, a *matrix-free* (optionally
   normalised) sheaf Laplacian ``Δ = (D+I)^{-1/2} L (D+I)^{-1/2}`` kept as per-edge and per-node
   ``d×d`` blocks (memory ``O(E·d²)``), never as an ``N·d × N·d`` matrix.
3. :class:`SheafDiffusionLayer` — ``X ← (1 + tanh ε) ⊙ X − ELU(Δ (I ⊗ W_left) X W_rightᵀ)``.

:class:`SheafConv` is one nonlinear NSD layer (1 + 2 + 3) and :class:`SheafDiffusion` the encoder
(input projection, ``L`` layers, readout).

Conventions
-----------
* ``edge_index`` is ``[2, E]`` with **both orientations** of every undirected edge (``E`` counts
  directed edges), as in PyG and NSD. Self loops are dropped (a loop contributes nothing to a
  sheaf Laplacian). :class:`SheafGraph` sorts and validates the edges once per call; callers running
  many passes on one graph may build it once and pass it instead of ``edge_index``.
* A node feature is ``d`` stalk dimensions × ``h`` channels. Public tensors are node-major,
  ``[N, d·h]`` or ``[N·d, h]`` (NSD's layout). Internally the diffusion state is *stalk-major*
  (``[d, N, h]``) and per-edge quantities are *component-major* (``[d, d, E]``: one contiguous
  vector per matrix entry), so every per-edge step is a handful of vectorised elementwise ops —
  batched ``bmm``/``einsum`` on millions of 3×3 blocks is an order of magnitude slower on CPU.

Why it is fast (see ``tests/benchmarks/test_bench_sheaf.py``):

* ``W [x_u ‖ x_v] = W_l x_u + W_r x_v``: both halves are applied once per *node*; per edge only a
  gather and an add remain (no ``[E, 2dh]`` concatenation).
* Maps are computed once per *undirected* edge ``{u<v}`` for both endpoints (NSD computes each
  map twice, once per orientation) and the block ``T_vu = T_uvᵀ`` is reused for the reverse edge.
* The edge part of ``Δ`` is applied by the sparse-dense product built into torch: the per-edge
  block entries are the value array of a CSR matrix whose structure is the graph's own adjacency
  (one fused gather–multiply–scatter; ``torch.sparse.mm`` / ``sampled_addmm``; no torch_sparse).
  The operator is symmetric, so its backward is the same product plus one sampled dense–dense
  product for the block gradients. ``backend="gather"`` is the plain ``index_select``/multiply/
  ``index_add_`` formulation, used for small graphs (as fast, and it does not start a thread team
  per call) and on devices or dtypes without sparse CSR kernels.
* Small per-edge matrix products, the Householder map and the inverse square root have
  hand-written backward passes (autograd through per-entry indexing would allocate a zero tensor
  of the full operand size per slice), and no op goes through MKL VML (``tanh``, ``sqrt``), which
  is slower than the alternatives and starts a thread team even for tiny inputs.
* The general normalisation needs ``(D_u + I)^{-1/2}`` for each node's ``d×d`` block: a batched
  cyclic Jacobi eigensolver for many nodes (elementwise across nodes; LAPACK ``eigh`` for few) and
  an exact, jitter-free backward (Daleckii–Krein), instead of ``N`` LAPACK calls plus autograd
  through ``eigh``.

Cost per layer (``N`` nodes, ``E`` directed edges): ``O(N·d·h·(p + h) + E·d²·h)`` time,
``O(E·d² + N·d·h)`` memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SHEAF_TYPES",
    "SheafGraph",
    "RestrictionMaps",
    "SheafLaplacian",
    "SheafLearner",
    "SheafDiffusionLayer",
    "SheafConv",
    "SheafDiffusion",
    "build_laplacian",
    "canonical_sheaf_type",
    "householder_orthogonal",
    "sym_inv_sqrt",
    "symmetric_eig",
]

SheafType = Literal["diag", "orth", "general"]
Backend = Literal["auto", "sparse", "gather"]

#: Accepted sheaf-type spellings → canonical name.
SHEAF_TYPES: dict[str, SheafType] = {
    "diag": "diag",
    "diagonal": "diag",
    "orth": "orth",
    "orthogonal": "orth",
    "bundle": "orth",
    "general": "general",
}


def canonical_sheaf_type(name: str) -> SheafType:
    """Map ``"diag"/"diagonal"``, ``"orth"/"orthogonal"/"bundle"``, ``"general"`` to a canonical name."""
    try:
        return SHEAF_TYPES[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown sheaf type {name!r}; expected one of {sorted(SHEAF_TYPES)}") from None


class _Tanh(torch.autograd.Function):
    """``tanh`` computed as ``2σ(2x) − 1``. On CPU torch routes ``tanh`` (like ``sqrt``, ``exp``) through
    MKL VML, which is ~2× slower than ``sigmoid`` on large inputs and starts a thread team even for
    tiny ones (a scheduler slice of latency per call on a loaded machine)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = torch.sigmoid(x * 2.0).mul_(2.0).sub_(1.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def _tanh(x: Tensor) -> Tensor:
    return _Tanh.apply(x) if x.device.type == "cpu" else torch.tanh(x)


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"tanh": _tanh, "elu": F.elu, "id": lambda t: t}


# ---------------------------------------------------------------------------------------------
# Graph structure
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Small exact building blocks (component-major: matrices are [d, d, B], entry [r, c] contiguous)
# ---------------------------------------------------------------------------------------------


def _cm_matmul_raw(a: Tensor, b: Tensor, transpose_a: bool) -> Tensor:
    out = None
    for k in range(a.size(0) if transpose_a else a.size(1)):  # the contracted index
        left = (a[k] if transpose_a else a[:, k]).unsqueeze(1)  # [d_i, 1, ...]
        term = b[k].unsqueeze(0)  # [1, d_j, ...]
        out = left * term if out is None else out.addcmul_(left, term)
    return out


class _CmMatmul(torch.autograd.Function):
    """Batched ``a @ b`` / ``aᵀ @ b`` on component-major operands (``[d, d, ...]``, broadcastable
    trailing dims) as ``d`` fused multiply-adds. Hand-written backward: autograd through the
    indexing would allocate a zero tensor of the full operand size per selected slice."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, transpose_a: bool) -> Tensor:  # type: ignore[override]
        ctx.transpose_a = transpose_a
        ctx.save_for_backward(a, b)
        return _cm_matmul_raw(a, b, transpose_a)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = _cm_matmul_raw(b, grad.transpose(0, 1), False)  # [k, i] = Σ_j b[k, j] g[i, j]
            if not ctx.transpose_a:
                ga = ga.transpose(0, 1)
            ga = ga.sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            gb = _cm_matmul_raw(a, grad, not ctx.transpose_a).sum_to_size(b.shape)
        return ga, gb, None


def _cm_matmul(a: Tensor, b: Tensor, transpose_a: bool = False) -> Tensor:
    """Batched ``a @ b`` (or ``aᵀ @ b``) for component-major ``[d, d, ...]`` operands."""
    return _CmMatmul.apply(a, b, transpose_a)


def _householder_tails(params: Tensor, d: int) -> list[tuple[Tensor, Tensor]]:
    """Per reflector ``k``: the free entries of ``v_k`` below its unit diagonal (``[d-1-k, B]``; the
    parameters fill the strict lower triangle column by column) and ``τ_k = 2/‖v_k‖²``."""
    out, start = [], 0
    for k in range(d - 1):
        m = d - 1 - k
        tail = params[start : start + m]
        start += m
        out.append((tail, 2.0 / (1.0 + tail.square().sum(0))))
    return out


def _matvec_cols(a: Tensor, k: int, tail: Tensor) -> Tensor:
    """``a v_k`` for ``a`` ``[d, d, B]`` using only columns ``k..`` (``v_k = (0…0, 1, tail)``) → ``[d, B]``."""
    out = a[:, k].clone()
    for c in range(tail.size(0)):
        out.addcmul_(a[:, k + 1 + c], tail[c])
    return out


def _rank1_cols_(a: Tensor, k: int, left: Tensor, tail: Tensor, alpha: float) -> None:
    """In place: columns ``k..`` of ``a`` += ``alpha · left v_kᵀ`` (``left`` ``[d, B]``)."""
    a[:, k].add_(left, alpha=alpha)
    for c in range(tail.size(0)):
        a[:, k + 1 + c].addcmul_(left, tail[c], value=alpha)


class _Householder(torch.autograd.Function):
    """``Q = H_1 ⋯ H_{d-1} S`` (``S`` flips the last column) from ``[d(d-1)/2, B]`` parameters → ``[d, d, B]``.

    ``v_k`` is zero above entry ``k``, so ``H_k`` only mixes columns ``k..`` of what it multiplies;
    forward and backward update those columns in place. Backward sweeps the reflectors in
    reverse: with ``P_k = P_{k-1} H_k`` and ``G_k = ∂ℓ/∂P_k``, ``∂ℓ/∂H_k = P_{k-1}ᵀ G_k`` and
    ``G_{k-1} = G_k H_k``; reflections are involutions, so ``P_{k-1} = P_k H_k`` is recomputed
    rather than stored. For ``H = I − τ v vᵀ``, ``τ = 2/vᵀv``, ``M = ∂ℓ/∂H``:
    ``∂ℓ/∂v = τ² (vᵀMv) v − τ (M + Mᵀ) v`` (only the free entries of ``v`` are parameters).
    """

    @staticmethod
    def forward(ctx, params: Tensor, d: int) -> Tensor:  # type: ignore[override]
        batch = params.size(-1)
        q = torch.zeros(d, d, batch, dtype=params.dtype, device=params.device)
        for i in range(d):
            q[i, i] = 1.0
        for k, (tail, tau) in enumerate(_householder_tails(params, d)):
            qv = _matvec_cols(q, k, tail)
            _rank1_cols_(q, k, qv.mul_(tau), tail, -1.0)
        q[:, -1].neg_()
        ctx.d = d
        ctx.save_for_backward(params, q)
        return q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        params, q = ctx.saved_tensors
        d = ctx.d
        reflectors = _householder_tails(params, d)
        if not reflectors:
            return torch.zeros_like(params), None
        g = grad.clone()
        g[:, -1].neg_()  # ∂ℓ/∂P_m with Q = P_m S
        p = q.clone()
        p[:, -1].neg_()  # P_m
        grads = []
        for k in reversed(range(d - 1)):
            tail, tau = reflectors[k]
            b = _matvec_cols(p, k, tail).neg_()  # P_{k-1} v = P_k H_k v = −P_k v
            _rank1_cols_(p, k, b * tau, tail, 1.0)  # P_{k-1} = P_k − τ (P_k v) vᵀ = P_k + τ b vᵀ
            a = _matvec_cols(g, k, tail)  # G_k v
            s = (a * b).sum(0)  # vᵀ M v
            rows = []
            for c in range(tail.size(0)):  # free entries r = k+1+c of v
                r = k + 1 + c
                m_v = (p[:, r] * a).sum(0)  # (P_{k-1}ᵀ G_k v)_r = (M v)_r
                mt_v = (g[:, r] * b).sum(0)  # (G_kᵀ P_{k-1} v)_r = (Mᵀ v)_r
                rows.append(tau * (tau * s * tail[c] - m_v - mt_v))
            grads.append(torch.stack(rows) if rows else tail.new_zeros(0, tail.size(-1)))
            if k:
                _rank1_cols_(g, k, a.mul_(tau), tail, -1.0)  # G_{k-1} = G_k H_k
        return torch.cat(grads[::-1], 0), None


def _householder_cm(params: Tensor, d: int) -> Tensor:
    """Component-major Householder map: ``[d(d-1)/2, B]`` → ``[d, d, B]`` (see :func:`householder_orthogonal`)."""
    return _Householder.apply(params, d)


def householder_orthogonal(params: Tensor, d: int) -> Tensor:
    """Orthogonal ``[B, d, d]`` matrices from ``[B, d(d-1)/2]`` parameters (NSD's Householder map).

    The parameters fill the strictly lower triangle of a unit lower-triangular ``V`` column by
    column; column ``v_k`` defines ``H_k = I − τ_k v_k v_kᵀ`` with ``τ_k = 2/‖v_k‖²`` (an exact
    reflection) and ``Q = H_1 ⋯ H_d`` — identical to ``torch.linalg.householder_product(V, τ)`` but
    elementwise across the batch (fast for tiny ``d``, huge ``B``) and differentiable.
    ``det Q = (−1)^d``.
    """
    if params.dim() != 2 or params.size(-1) != d * (d - 1) // 2:
        raise ValueError(f"expected [B, {d * (d - 1) // 2}] Householder parameters, got {tuple(params.shape)}")
    return _householder_cm(params.t(), d).permute(2, 0, 1)


#: Below this many matrices one LAPACK ``eigh`` call per matrix is cheaper than Jacobi sweeps.
_JACOBI_MIN_BATCH = 1536


def _jacobi_eigh(a: Tensor, max_sweeps: int = 30) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of symmetric component-major ``a`` (``[d, d, B]``) by cyclic Jacobi.

    Each rotation is a few elementwise ops across the whole batch, which for small ``d`` and large
    ``B`` beats one LAPACK call per matrix several times over. Jacobi is backward stable, has high
    relative accuracy and converges quadratically; it stops once every off-diagonal entry is below
    ``eps·max|a|``. Returns ``(evals [d, B], evecs [d, d, B])``, ``a = V diag(λ) Vᵀ``.
    """
    d, batch = a.size(0), a.size(-1)
    a = a.detach()
    # Symmetric entries as separate [B] vectors and eigenvector columns as [d, B] tensors: the
    # rotations then just rebind names (no copies, no index writes).
    ent = {(p, q): a[p, q].clone() for p in range(d) for q in range(p, d)}
    cols = [torch.zeros(d, batch, dtype=a.dtype, device=a.device) for _ in range(d)]
    for i in range(d):
        cols[i][i] = 1.0
    if d > 1:
        scale = a.abs().amax(dim=(0, 1)).clamp_min(torch.finfo(a.dtype).tiny)
        tol = torch.finfo(a.dtype).eps
        pairs = [(p, q) for p in range(d - 1) for q in range(p + 1, d)]
        for _ in range(max_sweeps):
            off = torch.stack([ent[pq] for pq in pairs]).abs().amax(0).div_(scale)
            if float(off.max()) <= tol:
                break
            for p, q in pairs:
                apq = ent[(p, q)]
                # tan θ of the rotation zeroing a_pq, the root with |θ| ≤ π/4:
                # t = 1 / (θ + sign(θ)·√(1+θ²)), θ = (a_qq − a_pp) / (2 a_pq); θ = 0 gives t = 1.
                # (clamped so θ² cannot overflow; y·rsqrt(y) = √y avoids VML's sqrt, see _Tanh)
                theta = ((ent[(q, q)] - ent[(p, p)]) / (2.0 * apq)).clamp(-1e18, 1e18)
                y = theta * theta + 1.0
                t = torch.reciprocal(theta + torch.copysign(y * torch.rsqrt(y), theta))
                t = torch.where(apq != 0, t, torch.zeros_like(t))  # also clears 0/0
                c = torch.rsqrt(t * t + 1.0)
                s = t * c
                ent[(p, p)] = ent[(p, p)] - t * apq
                ent[(q, q)] = ent[(q, q)] + t * apq
                ent[(p, q)] = torch.zeros_like(apq)
                for r in range(d):
                    if r in (p, q):
                        continue
                    rp, rq = (min(r, p), max(r, p)), (min(r, q), max(r, q))
                    arp, arq = ent[rp], ent[rq]
                    ent[rp] = c * arp - s * arq
                    ent[rq] = s * arp + c * arq
                vp, vq = cols[p], cols[q]
                cols[p] = c * vp - s * vq
                cols[q] = s * vp + c * vq
    evals = torch.stack([ent[(i, i)] for i in range(d)])
    return evals, torch.stack(cols, 1)


def _eigh_cm(a: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of component-major symmetric ``a`` (``[d, d, B]``): LAPACK for small
    batches, batched Jacobi for large ones (both exact to working precision)."""
    if a.size(-1) < _JACOBI_MIN_BATCH or a.device.type != "cpu":
        evals, evecs = torch.linalg.eigh(a.detach().permute(2, 0, 1))
        return evals.t(), evecs.permute(1, 2, 0)
    return _jacobi_eigh(a)


def symmetric_eig(a: Tensor) -> tuple[Tensor, Tensor]:
    """Batched eigen-decomposition of symmetric ``a`` (``[..., d, d]``) by :func:`_jacobi_eigh`.

    Returns ``(evals [..., d], evecs [..., d, d])`` (columns are eigenvectors; order unspecified).
    No gradient (use :func:`sym_inv_sqrt` for the differentiable matrix function).
    """
    d = a.size(-1)
    batch = a.shape[:-2]
    flat = a.reshape(-1, d, d).permute(1, 2, 0)
    evals, evecs = _jacobi_eigh(flat)
    return evals.t().reshape(*batch, d), evecs.permute(2, 0, 1).reshape(*batch, d, d)


class _SymInvSqrt(torch.autograd.Function):
    """``A^{-1/2}`` for component-major SPD ``A`` (``[d, d, B]``), exact in both directions.

    Backward is the Daleckii–Krein formula ``∇A = U (K ∘ Uᵀ sym(G) U) Uᵀ`` with the divided
    differences of ``λ^{-1/2}`` in cancellation-free form ``K_ij = −1 / (s_i s_j (s_i + s_j))``,
    ``s = √λ`` (it equals the derivative on the diagonal), so repeated eigenvalues — e.g. identity
    maps — need no jitter, unlike differentiating an eigensolver.
    """

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:  # type: ignore[override]
        if a.dtype in (torch.float16, torch.bfloat16):  # no half-precision eigensolvers
            return _SymInvSqrt.forward(ctx, a.float()).to(a.dtype)
        evals, evecs = _eigh_cm(a)
        evals = evals.clamp_min(torch.finfo(a.dtype).tiny)
        r = torch.rsqrt(evals)  # [d, B]
        ctx.save_for_backward(evecs, evals * r)  # √λ
        return _cm_matmul_raw(evecs * r.unsqueeze(0), evecs.transpose(0, 1), False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        evecs, s = ctx.saved_tensors
        g = 0.5 * (grad + grad.transpose(0, 1))
        si, sj = s.unsqueeze(1), s.unsqueeze(0)
        k = -1.0 / (si * sj * (si + sj))  # [d, d, B]
        inner = _cm_matmul_raw(evecs, _cm_matmul_raw(g, evecs, False), True) * k
        return _cm_matmul_raw(_cm_matmul_raw(evecs, inner, False), evecs.transpose(0, 1), False)


def sym_inv_sqrt(a: Tensor) -> Tensor:
    """Inverse square root of symmetric positive-definite ``a`` (``[..., d, d]``), with an exact,
    jitter-free gradient (see :class:`_SymInvSqrt`)."""
    d = a.size(-1)
    flat = a.reshape(-1, d, d).permute(1, 2, 0)
    return _SymInvSqrt.apply(flat).permute(2, 0, 1).reshape(a.shape)


# ---------------------------------------------------------------------------------------------
# Fused edge operator: out = β·z + M z,  (M z)_{i,u} = Σ_{e=(u,v)} Σ_j (T_e)_{ij} z_{j,v}
# ---------------------------------------------------------------------------------------------


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        # torch warns once that sparse CSR is "beta"; the kernels used here are tested against dense.
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values.reshape(-1), size, check_invariants=False)


def _edge_matmul(values: Tensor, z: Tensor, graph: SheafGraph, beta: float) -> Tensor:
    """``β z + M z`` by sparse CSR products. ``values``: ``[d, E]`` (diagonal blocks, entry ``[i, e]``)
    or ``[d, d, E]`` (entry ``[j, i, e] = (T_e)_{ij}``); ``z``: ``[d, N, h]`` → ``[d, N, h]``."""
    d, n, h = z.shape
    crow, cols = graph._csr(d, values.dim() == 3)
    z2 = z.view(d * n, h)
    if values.dim() == 2:
        op = _csr(crow, cols, values, (d * n, d * n))
        out = torch.addmm(z2, op, z2) if beta else torch.sparse.mm(op, z2)
    else:
        out = z2.clone() if beta else None
        for j in range(d):  # stalk j of the neighbours feeds every stalk i of the node
            op = _csr(crow, cols, values[j], (d * n, n))
            out = torch.sparse.mm(op, z[j]) if out is None else out.addmm_(op, z[j])
    return out.view(d, n, h)


def _edge_sddmm(values: Tensor, grad: Tensor, z: Tensor, graph: SheafGraph) -> Tensor:
    """Gradient of ``M z`` w.r.t. the block values: ``⟨grad_{i,u}, z_{j,v}⟩`` for each edge and ``(i, j)``."""
    d, n, h = z.shape
    crow, cols = graph._csr(d, values.dim() == 3)
    g2 = grad.view(d * n, h)
    if values.dim() == 2:
        op = _csr(crow, cols, values, (d * n, d * n))
        return torch.sparse.sampled_addmm(op, g2, z.view(d * n, h).mT, beta=0.0).values().view_as(values)
    outs = []
    for j in range(d):
        op = _csr(crow, cols, values[j], (d * n, n))
        outs.append(torch.sparse.sampled_addmm(op, g2, z[j].mT, beta=0.0).values())
    return torch.stack(outs).view_as(values)


class _EdgeOperator(torch.autograd.Function):
    """``β z + M z`` with ``M`` the (symmetric) off-diagonal part of a sheaf Laplacian with ``+T`` blocks.

    ``M`` is symmetric by construction (:func:`build_laplacian` sets ``T_vu = T_uvᵀ``), so the input
    gradient is the same product applied to the output gradient and the value gradient is one
    sampled dense–dense product (SDDMM) per block column.
    """

    @staticmethod
    def forward(ctx, values: Tensor, z: Tensor, graph: SheafGraph, beta: float) -> Tensor:  # type: ignore[override]
        ctx.graph, ctx.beta = graph, beta
        ctx.save_for_backward(values, z)
        return _edge_matmul(values, z, graph, beta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        values, z = ctx.saved_tensors
        grad = grad.contiguous()
        g_values = _edge_sddmm(values, grad, z, ctx.graph) if ctx.needs_input_grad[0] else None
        g_z = _edge_matmul(values, grad, ctx.graph, ctx.beta) if ctx.needs_input_grad[1] else None
        return g_values, g_z, None, None


class _ScaledOperator(torch.autograd.Function):
    """``y − n ⊙ (I + M)(n ⊙ y)``: a normalised Laplacian whose node normalisation ``n`` is elementwise
    (diag: ``[d, N, 1]``; orth: ``[1, N, 1]``). The operator is symmetric, so ``∂/∂y`` is the same
    map; ``∂/∂T = −SDDMM(n ⊙ g, n ⊙ y)`` and ``∂/∂n = −Σ_h (g ⊙ w + u ⊙ y)`` with
    ``w = (I+M)(n ⊙ y)``, ``u = (I+M)(n ⊙ g)``. Fewer full-size passes than autograd."""

    @staticmethod
    def forward(ctx, values: Tensor, norm: Tensor, y: Tensor, graph: SheafGraph) -> Tensor:  # type: ignore[override]
        z = norm * y
        w = _edge_matmul(values, z, graph, 1.0)
        ctx.graph = graph
        ctx.save_for_backward(values, norm, y, z, w)
        return torch.addcmul(y, norm, w, value=-1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        values, norm, y, z, w = ctx.saved_tensors
        grad = grad.contiguous()
        a = norm * grad
        u = _edge_matmul(values, a, ctx.graph, 1.0)
        g_values = _edge_sddmm(values, a, z, ctx.graph).neg_() if ctx.needs_input_grad[0] else None
        g_norm = None
        if ctx.needs_input_grad[1]:
            g_norm = (grad * w).addcmul_(u, y).sum_to_size(norm.shape).neg_()
        g_y = torch.addcmul(grad, norm, u, value=-1.0) if ctx.needs_input_grad[2] else None
        return g_values, g_norm, g_y, None


def _edge_gather(values: Tensor, z: Tensor, graph: SheafGraph, beta: float) -> Tensor:
    """Reference formulation of :class:`_EdgeOperator`: gather neighbour stalks, multiply, scatter.

    Same arguments; plain autograd. Keeps ``[d, E, h]`` gathered stalks alive for backward
    (memory ``O(E·d·h)``), hence only the fallback.
    """
    row, col = graph.edge_index
    z_col = z.index_select(1, col)  # [d, E, h]
    if values.dim() == 2:
        msg = values.unsqueeze(-1) * z_col
    else:
        msg = None
        for j in range(values.size(0)):
            term = values[j].unsqueeze(-1) * z_col[j].unsqueeze(0)  # [d(i), E, h]
            msg = term if msg is None else msg + term
    out = torch.zeros_like(z).index_add_(1, row, msg)
    return out + z if beta else out


class _PermuteColumns(torch.autograd.Function):
    """``x[:, perm]`` for a permutation ``perm``; the backward gathers with the inverse permutation
    (``index_select``'s own backward is a serial scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
    """Split the last dim in two equal halves (``split``: its backward is one concatenation, while
    slicing's backward zero-fills a full-size tensor per slice)."""
    h = t.size(-1) // 2
    return t.split(h, dim=-1) if h else (t[..., :0], t[..., :0])


#: ``backend="auto"`` uses the sparse kernels from this many ``d·E`` block rows on. Below it the
#: gather formulation is as fast, and it stays single-threaded (under torch's parallel grain size),
#: while a sparse call always forks — costly on a loaded machine (PFL client graphs are small).
_SPARSE_MIN_ROWS = 16384


def _use_sparse(backend: Backend, z: Tensor, num_edges: int) -> bool:
    if backend == "sparse":
        return True
    if backend == "gather":
        return False
    return (
        z.device.type in ("cpu", "cuda")
        and z.dtype in (torch.float32, torch.float64)
        and z.size(0) * num_edges >= _SPARSE_MIN_ROWS
    )


# ---------------------------------------------------------------------------------------------
# 1. Restriction maps
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RestrictionMaps:
    """Restriction maps of both endpoints of every undirected edge ``{u, v}`` (``u < v``) of ``graph``.

    Component-major: ``maps[..., k]`` is ``F_{u◁e}`` of the ``k``-th undirected edge
    (``graph.uv[k]`` is ``u``) and ``maps[..., H + k]`` is ``F_{v◁e}`` (``graph.uv[H + k]`` is ``v``).

    Attributes:
        kind: ``"diag"``: ``maps`` is ``[d, 2H]`` (the diagonals); ``"orth"``/``"general"``:
            ``[d, d, 2H]`` with ``maps[r, c, k] = F[r, c]``.
        maps: see above.
        weight: ``[H]`` learned edge weights or ``None``. Like NSD, a weight scales both maps of
            its edge, so it enters the Laplacian squared.
        graph: the :class:`SheafGraph`.
    """

    kind: SheafType
    maps: Tensor
    weight: Tensor | None
    graph: SheafGraph

    @property
    def stalk_dim(self) -> int:
        return self.maps.size(0)

    def directed(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per directed edge ``e = (u, v)`` of ``graph.edge_index``: ``(F_{u◁e}, F_{v◁e}, w_e)`` as
        ``[E, d]`` / ``[E, d, d]`` tensors (and ``[E]`` weights or ``None``) — for references and tests."""
        g = self.graph
        h = g.num_undirected
        pos = g.pos()
        src = self.maps[..., pos]
        tgt = self.maps[..., (pos + h) % (2 * h)] if h else src
        w = None if self.weight is None else self.weight[g.half_index()]
        dims = (src.dim() - 1,) + tuple(range(src.dim() - 1))
        return src.permute(dims), tgt.permute(dims), w


class SheafLearner(nn.Module):
    """Predicts restriction maps from endpoint features (NSD's ``LocalConcatSheafLearner``).

    ``F_{u◁uv} = act(W [x_u ‖ x_v])``, ``W`` a bias-free linear map to ``p`` outputs: ``p = d``
    (diag), ``d(d−1)/2`` Householder parameters (orth; no activation, as NSD) or ``d²`` (general).
    Optional edge weights ``w_uv = σ(a·[x_u ‖ x_v]) σ(a·[x_v ‖ x_u])`` (NSD's ``EdgeWeightLearner``,
    symmetric by construction).

    Since ``W [x_u ‖ x_v] = W_l x_u + W_r x_v``, both halves are applied once per node (``[N, p]``);
    per edge only a gather and an add remain.

    Args:
        stalk_dim: ``d``.
        hidden_channels: ``h``; node features have width ``d·h``.
        sheaf_type: ``"diag" | "orth" | "general"`` (or ``"diagonal"``, ``"orthogonal"``).
        sheaf_act: ``"tanh" | "elu" | "id"`` on the map entries (diag and general).
        edge_weights: learn edge weights; ``None`` → NSD's default (on for orth, off otherwise).
    """

    def __init__(
        self,
        stalk_dim: int,
        hidden_channels: int,
        sheaf_type: str = "diag",
        sheaf_act: str = "tanh",
        edge_weights: bool | None = None,
    ) -> None:
        super().__init__()
        if stalk_dim < 1 or hidden_channels < 1:
            raise ValueError(f"stalk_dim and hidden_channels must be >= 1, got {stalk_dim}, {hidden_channels}")
        if sheaf_act not in _ACTIVATIONS:
            raise ValueError(f"unknown sheaf_act {sheaf_act!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.stalk_dim = d = stalk_dim
        self.hidden_channels = hidden_channels
        self.sheaf_type: SheafType = canonical_sheaf_type(sheaf_type)
        self.sheaf_act = sheaf_act
        self.edge_weights = (self.sheaf_type == "orth") if edge_weights is None else bool(edge_weights)
        self.num_params = {"diag": d, "orth": d * (d - 1) // 2, "general": d * d}[self.sheaf_type]
        in_dim = d * hidden_channels
        # Same parameterisation and init as NSD's nn.Linear(2·d·h, p, bias=False).
        self.map_linear = nn.Linear(2 * in_dim, self.num_params, bias=False)
        self.weight_linear = nn.Linear(2 * in_dim, 1, bias=False) if self.edge_weights else None

    def forward(self, x: Tensor, edge_index: Tensor | SheafGraph) -> RestrictionMaps:
        """``x``: ``[N, d·h]`` node features; ``edge_index``: ``[2, E]`` or a :class:`SheafGraph`."""
        dh = self.stalk_dim * self.hidden_channels
        if x.dim() != 2 or x.size(1) != dh:
            raise ValueError(f"x must be [N, d*h] = [N, {dh}], got {tuple(x.shape)}")
        graph = _as_graph(edge_index, x)
        d, p, h = self.stalk_dim, self.num_params, graph.num_undirected
        w_left, w_right = [self.map_linear.weight[:, :dh]], [self.map_linear.weight[:, dh:]]
        if self.weight_linear is not None:
            w_left.append(self.weight_linear.weight[:, :dh])
            w_right.append(self.weight_linear.weight[:, dh:])
        k = p + (self.weight_linear is not None)
        # One GEMM gives both per-node halves, transposed ([2k, N]) so per-edge data is component-major.
        proj_l, proj_r = torch.mm(torch.cat(w_left + w_right, 0), x.t()).split(k)
        # Column m < H: W_l x_u + W_r x_v = F_{u◁e}; column H + m: W_l x_v + W_r x_u = F_{v◁e}.
        pre = proj_l.index_select(1, graph.uv) + proj_r.index_select(1, graph.vu)  # [k, 2H]
        weight = None
        if self.weight_linear is not None:
            # split (not slicing): slicing's backward zero-fills a full-size tensor per slice
            pre, gate = pre.split(p)
            gate_u, gate_v = _halves(torch.sigmoid(gate.squeeze(0)))
            weight = gate_u * gate_v
        if self.sheaf_type == "orth":
            maps = _householder_cm(pre, d)
        else:
            maps = _ACTIVATIONS[self.sheaf_act](pre)
            if self.sheaf_type == "general":
                maps = maps.view(d, d, 2 * h)
        return RestrictionMaps(self.sheaf_type, maps, weight, graph)

    def extra_repr(self) -> str:
        return (
            f"stalk_dim={self.stalk_dim}, hidden_channels={self.hidden_channels}, sheaf_type={self.sheaf_type!r}, "
            f"sheaf_act={self.sheaf_act!r}, edge_weights={self.edge_weights}"
        )


# ---------------------------------------------------------------------------------------------
# 2. Laplacian
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SheafLaplacian:
    """Matrix-free sheaf Laplacian ``L`` or its normalisation ``Δ = (D+I)^{-1/2} L (D+I)^{-1/2}``.

    With ``c_e`` the combined edge weight and ``T_e = c_e F_{u◁e}ᵀ F_{v◁e}`` for ``e = (u, v)``:
    ``L_uv = −T_e`` and ``L_uu = D_u = Σ_{e∋u} c_e F_{u◁e}ᵀ F_{u◁e}``.

    Attributes:
        kind: sheaf type (``"diag"`` blocks are diagonal; ``"orth"`` node blocks are scalar).
        graph: the :class:`SheafGraph`.
        edge_values: the ``T_e`` per directed edge in CSR value order: ``[d, E]`` (diag,
            ``[i, e] = (T_e)_ii``) or ``[d, d, E]`` (``[j, i, e] = (T_e)_ij``).
        degree: ``D``: ``[d, N]`` (diag), ``[N]`` (orth, ``D_u = (Σ c_e) I``) or ``[d, d, N]``.
        norm: ``(D + I)^{-1/2}`` with ``degree``'s shape, or ``None`` if not normalised.
        stalk_dim: ``d``.
        backend: ``"auto" | "sparse" | "gather"`` implementation of the edge part.
    """

    kind: SheafType
    graph: SheafGraph
    edge_values: Tensor
    degree: Tensor
    norm: Tensor | None
    stalk_dim: int
    backend: Backend = "auto"

    @property
    def normalised(self) -> bool:
        return self.norm is not None

    def _node_mul(self, blocks: Tensor, y: Tensor) -> Tensor:
        """Per-node blocks times stalk-major ``y`` (``[d, N, h]``)."""
        if self.kind == "diag":
            return blocks.unsqueeze(-1) * y
        if self.kind == "orth":
            return blocks.view(1, -1, 1) * y
        return _cm_matmul(blocks.unsqueeze(-1), y.unsqueeze(1)).squeeze(1)

    def _edge(self, z: Tensor, beta: float) -> Tensor:
        if self.graph.num_edges == 0:
            return z.clone() if beta else torch.zeros_like(z)
        if _use_sparse(self.backend, z, self.graph.num_edges):
            return _EdgeOperator.apply(self.edge_values, z.contiguous(), self.graph, beta)
        return _edge_gather(self.edge_values, z, self.graph, beta)

    def apply_stalk_major(self, y: Tensor) -> Tensor:
        """``Δ y`` for stalk-major ``y`` (``[d, N, h]``); returns ``[d, N, h]``."""
        if self.norm is None:
            return self._node_mul(self.degree, y) - self._edge(y, 0.0)
        # Δ = N (D − M) N with N = (D+I)^{-1/2} and N D N = I − N², so Δy = y − N (z + M z), z = N y.
        if self.kind != "general" and self.graph.num_edges and _use_sparse(self.backend, y, self.graph.num_edges):
            nrm = self.norm.unsqueeze(-1) if self.kind == "diag" else self.norm.view(1, -1, 1)
            return _ScaledOperator.apply(self.edge_values, nrm, y.contiguous(), self.graph)
        z = self._node_mul(self.norm, y)
        w = self._edge(z, 1.0)
        if self.kind == "general":
            return y - self._node_mul(self.norm, w)
        nrm = self.norm.unsqueeze(-1) if self.kind == "diag" else self.norm.view(1, -1, 1)
        return torch.addcmul(y, nrm, w, value=-1.0)

    def apply(self, x: Tensor) -> Tensor:
        """``Δ x`` for node-major ``x`` (``[N·d, h]`` or ``[N, d, h]``); returns ``x``'s shape."""
        d, n = self.stalk_dim, self.graph.num_nodes
        y = x.reshape(n, d, -1).transpose(0, 1).contiguous()
        return self.apply_stalk_major(y).transpose(0, 1).reshape(x.shape)

    def blocks(self) -> tuple[Tensor, Tensor]:
        """Dense ``d×d`` blocks of the operator (for tests and dense references).

        Returns ``(node_blocks [N, d, d], edge_blocks [E, d, d])``: ``Δ_uu`` and ``Δ_uv`` for every
        directed edge ``(u, v)`` of ``graph.edge_index``.
        """
        d = self.stalk_dim
        row, col = self.graph.edge_index
        eye = torch.eye(d, dtype=self.degree.dtype, device=self.degree.device)
        if self.kind == "diag":
            deg, t = torch.diag_embed(self.degree.t()), torch.diag_embed(self.edge_values.t())
            nrm = None if self.norm is None else torch.diag_embed(self.norm.t())
        else:
            t = self.edge_values.permute(2, 1, 0)
            if self.kind == "orth":
                deg = self.degree.view(-1, 1, 1) * eye
                nrm = None if self.norm is None else self.norm.view(-1, 1, 1) * eye
            else:
                deg = self.degree.permute(2, 0, 1)
                nrm = None if self.norm is None else self.norm.permute(2, 0, 1)
        if nrm is None:
            return deg, -t
        return nrm @ deg @ nrm, -(nrm[row] @ t @ nrm[col])


def build_laplacian(
    maps: RestrictionMaps,
    edge_weight: Tensor | None = None,
    *,
    normalised: bool = True,
    backend: Backend = "auto",
) -> SheafLaplacian:
    """Assemble the (normalised) sheaf Laplacian of ``maps`` without forming an ``N·d × N·d`` matrix.

    Args:
        maps: restriction maps (from :class:`SheafLearner`).
        edge_weight: optional ``[E]`` non-negative weights in ``maps.graph.edge_index`` order
            (differentiable, e.g. from a learned client graph). Each edge's contribution is
            multiplied, ``L_uv = −w_uv F_uᵀF_v`` and ``L_uu = Σ w F_uᵀF_u``, on top of learned weights.
            An asymmetric weighting is symmetrised as ``½(w_uv + w_vu)`` so that ``Δ`` stays
            symmetric positive semi-definite.
        normalised: ``Δ = (D+I)^{-1/2} L (D+I)^{-1/2}`` (NSD's augmented-degree normalisation).
        backend: edge-operator implementation (see the module docstring).

    Shapes: ``N`` nodes, ``E`` directed edges, ``H = E/2`` undirected edges, ``d`` stalk dim.
    """
    graph, kind, d = maps.graph, maps.kind, maps.stalk_dim
    n, h = graph.num_nodes, graph.num_undirected
    f = maps.maps
    c = None if maps.weight is None else maps.weight.square()  # [H]
    if edge_weight is not None:
        if edge_weight.dim() != 1 or edge_weight.numel() != graph.num_edges:
            raise ValueError(f"edge_weight must have shape [E] = [{graph.num_edges}], got {tuple(edge_weight.shape)}")
        w = edge_weight.to(f.dtype)
        w = 0.5 * (w[graph.up] + w[graph.down])
        c = w if c is None else c * w
    c2 = None if c is None else torch.cat([c, c])  # per (edge, side)

    fu, fv = _halves(f)
    if kind == "diag":
        prod = fu * fv if c is None else fu * fv * c  # (T_e)_ii, the same for both orientations
        values = prod.index_select(1, graph.half_index())
        sq = f.square() if c2 is None else f.square() * c2
        degree = f.new_zeros(d, n).index_add_(1, graph.uv, sq)
        norm = (degree + 1.0).rsqrt() if normalised else None
    else:
        fvc = fv if c is None else fv * c
        prod = _cm_matmul(fu, fvc, transpose_a=True)  # P[a, b, k] = (c F_uᵀ F_v)_ab, [d, d, H]
        # Values [j, i, e] = (T_e)_ij: for e = (u, v) that is P[i, j] (the transpose of P as laid
        # out), for the reverse edge T_vu = T_uvᵀ gives P[j, i]. `pos` interleaves the two halves.
        both = torch.cat([prod.transpose(0, 1).reshape(d * d, h), prod.reshape(d * d, h)], 1)
        values = _PermuteColumns.apply(both, graph.pos(), graph.columns()).view(d, d, -1)
        if kind == "orth":  # Fᵀ F = I: scalar node blocks D_u = Σ_e c_e (the degree if unweighted)
            if c2 is None:
                degree = (graph.ptr[1:] - graph.ptr[:-1]).to(f.dtype)
            else:
                degree = f.new_zeros(n).index_add_(0, graph.uv, c2)
            norm = (degree + 1.0).rsqrt() if normalised else None
        else:
            gram = _cm_matmul(f, f if c2 is None else f * c2, transpose_a=True)  # [d, d, 2H]
            # 2-D view: index ops along the last dim of a 3-D tensor take a much slower path.
            degree = f.new_zeros(d * d, n).index_add_(1, graph.uv, gram.view(d * d, -1)).view(d, d, n)
            norm = None
            if normalised:
                eye = torch.eye(d, dtype=f.dtype, device=f.device).unsqueeze(-1)
                norm = _SymInvSqrt.apply(degree + eye)
    return SheafLaplacian(kind, graph, values, degree, norm, d, backend)


# ---------------------------------------------------------------------------------------------
# 3. Diffusion
# ---------------------------------------------------------------------------------------------


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p=p, training=True) if training and p > 0 else x


class SheafDiffusionLayer(nn.Module):
    """One discrete NSD step on stalk-major features ``X`` (``[d, N, h]``):

    ``X ← (1 + tanh ε) ⊙ X − ELU(Δ Y)`` with ``Y_u = W_left X_u W_rightᵀ`` (``X_u`` the ``d×h``
    block of node ``u``; ``nn.Linear`` convention on both sides), ``W_left`` ``d×d`` init identity,
    ``W_right`` ``h×h`` init orthogonal, ``ε ∈ R^d`` init 0 (a residual gate per stalk dimension),
    dropout on ``X`` before the weights.
    """

    def __init__(
        self,
        stalk_dim: int,
        hidden_channels: int,
        *,
        left_weights: bool = True,
        right_weights: bool = True,
        use_act: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stalk_dim, self.hidden_channels = stalk_dim, hidden_channels
        self.use_act, self.dropout = use_act, dropout
        self.left = nn.Parameter(torch.eye(stalk_dim)) if left_weights else None
        self.right = nn.Parameter(nn.init.orthogonal_(torch.empty(hidden_channels, hidden_channels))) if right_weights else None
        self.epsilon = nn.Parameter(torch.zeros(stalk_dim))

    def forward(self, x: Tensor, laplacian: SheafLaplacian) -> Tensor:
        """``x``: ``[d, N, h]`` stalk-major; returns ``[d, N, h]``."""
        d, n, h = x.shape
        y = _dropout(x, self.dropout, self.training)
        if self.left is not None:
            y = torch.mm(self.left, y.reshape(d, n * h)).view(d, n, h)  # I_N ⊗ W_left: one GEMM
        if self.right is not None:
            y = torch.mm(y.reshape(d * n, h), self.right.t()).view(d, n, h)
        y = laplacian.apply_stalk_major(y)
        coeff = (1.0 + _tanh(self.epsilon)).view(d, 1, 1)
        if self.use_act:
            return _ResidualElu.apply(x, coeff, y)
        return x * coeff - y

    def extra_repr(self) -> str:
        return (
            f"stalk_dim={self.stalk_dim}, hidden_channels={self.hidden_channels}, left_weights={self.left is not None}, "
            f"right_weights={self.right is not None}, use_act={self.use_act}, dropout={self.dropout}"
        )


class _ResidualElu(torch.autograd.Function):
    """``coeff ⊙ x − ELU(w)`` (``coeff`` ``[d, 1, 1]``, ``x``/``w`` ``[d, N, h]``) with a hand-written
    backward: fewer full-size passes and allocations than autograd's (no ``neg`` nodes, the ELU
    derivative from its saved output instead of another ``exp``, the ``coeff`` gradient as dots)."""

    @staticmethod
    def forward(ctx, x: Tensor, coeff: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        e = F.elu(w)
        ctx.save_for_backward(x, coeff, e)
        return torch.addcmul(e, x, coeff, value=-1.0).neg_()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, coeff, e = ctx.saved_tensors
        gx = grad * coeff if ctx.needs_input_grad[0] else None
        gc = None
        if ctx.needs_input_grad[1]:
            gc = torch.stack([torch.dot(grad[i].reshape(-1), x[i].reshape(-1)) for i in range(x.size(0))])
            gc = gc.view_as(coeff)
        gw = None
        if ctx.needs_input_grad[2]:
            gw = torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, True, e).neg_()
        return gx, gc, gw


def _to_stalk_major(x: Tensor, d: int) -> Tensor:
    """``[N, d·h]`` → ``[d, N, h]``."""
    return x.view(x.size(0), d, -1).transpose(0, 1).contiguous()


def _to_node_major(x: Tensor) -> Tensor:
    """``[d, N, h]`` → ``[N, d·h]``."""
    d, n, h = x.shape
    return x.transpose(0, 1).reshape(n, d * h)


def _check_edge_weight(edge_weight: Tensor | None, edge_index: Tensor | SheafGraph, graph: SheafGraph) -> Tensor | None:
    if edge_weight is None:
        return None
    expected = graph.num_edges if isinstance(edge_index, SheafGraph) else edge_index.size(1)
    if not isinstance(edge_weight, Tensor) or edge_weight.dim() != 1 or edge_weight.numel() != expected:
        shape = tuple(edge_weight.shape) if isinstance(edge_weight, Tensor) else type(edge_weight).__name__
        raise ValueError(f"edge_weight must have shape [E] = [{expected}], got {shape}")
    return edge_weight if isinstance(edge_index, SheafGraph) else graph.edge_values(edge_weight)


class SheafConv(nn.Module):
    """One nonlinear NSD layer: learn maps from ``x``, build ``Δ``, take one diffusion step.

    ``forward(x [N, d·h], edge_index [2, E] | SheafGraph, edge_weight [E] | None) → [N, d·h]``
    (node-major in and out). Options as in :class:`SheafLearner`, :class:`SheafDiffusionLayer`
    and :func:`build_laplacian`.
    """

    def __init__(
        self,
        stalk_dim: int = 3,
        hidden_channels: int = 16,
        sheaf_type: str = "diag",
        *,
        normalised: bool = True,
        edge_weights: bool | None = None,
        sheaf_act: str = "tanh",
        left_weights: bool = True,
        right_weights: bool = True,
        use_act: bool = True,
        dropout: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.stalk_dim, self.hidden_channels = stalk_dim, hidden_channels
        self.normalised, self.backend = normalised, backend
        self.learner = SheafLearner(stalk_dim, hidden_channels, sheaf_type, sheaf_act, edge_weights)
        self.diffusion = SheafDiffusionLayer(
            stalk_dim, hidden_channels, left_weights=left_weights, right_weights=right_weights, use_act=use_act, dropout=dropout
        )

    def laplacian(self, x: Tensor, edge_index: Tensor | SheafGraph, edge_weight: Tensor | None = None) -> SheafLaplacian:
        """The layer's Laplacian for node-major ``x`` (``[N, d·h]``); ``edge_weight`` in ``edge_index``'s order."""
        graph = _as_graph(edge_index, x)
        maps = self.learner(x, graph)
        weight = _check_edge_weight(edge_weight, edge_index, graph)
        return build_laplacian(maps, weight, normalised=self.normalised, backend=self.backend)

    def forward(self, x: Tensor, edge_index: Tensor | SheafGraph, edge_weight: Tensor | None = None) -> Tensor:
        lap = self.laplacian(x, edge_index, edge_weight)
        return _to_node_major(self.diffusion(_to_stalk_major(x, self.stalk_dim), lap))


class SheafDiffusion(nn.Module):
    """The NSD encoder used by SHN: input projection → ``layers`` sheaf-diffusion steps → readout.

    ``x`` ``[N, in_dim]`` → input dropout → ``Linear(in_dim, d·h)`` (+ ELU if ``use_act``) →
    dropout → stalks (``N·d × h``) → ``layers`` × :class:`SheafDiffusionLayer` → ``[N, d·h]``.
    Nonlinear NSD (default) predicts new restriction maps from the current features at every
    layer; ``nonlinear=False`` predicts them once, from the projected input, and reuses ``Δ``.

    The graph is a call argument (any ``N``); nothing graph-sized is stored on the module.

    Args:
        in_dim: input feature width.
        stalk_dim: ``d``.
        hidden_channels: ``h`` (channels per stalk dimension).
        layers: number of diffusion steps ``L`` (0 → just the projection).
        sheaf_type: ``"diag" | "orth" | "general"`` (aliases ``"diagonal"``, ``"orthogonal"``).
        normalised: augmented-degree normalised Laplacian (NSD default).
        nonlinear: recompute the maps at every layer.
        edge_weights: learned edge weights; ``None`` → on for orth, off otherwise (as NSD).
        sheaf_act: activation of the map learner, ``"tanh" | "elu" | "id"``.
        dropout: dropout inside each layer (and on the learner's input after layer 0, as NSD).
        input_dropout: dropout on ``x`` before the projection.
        use_act: ELU after the projection and inside each diffusion step.
        left_weights: the ``d×d`` weights of each step.
        right_weights: the ``h×h`` weights of each step.
        backend: edge-operator implementation (``"auto"``: sparse CSR kernels where available).

    Attributes:
        out_dim: ``d·h``.
    """

    def __init__(
        self,
        in_dim: int,
        stalk_dim: int = 3,
        hidden_channels: int = 16,
        layers: int = 2,
        sheaf_type: str = "diag",
        *,
        normalised: bool = True,
        nonlinear: bool = True,
        edge_weights: bool | None = None,
        sheaf_act: str = "tanh",
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        use_act: bool = True,
        left_weights: bool = True,
        right_weights: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if in_dim < 1 or stalk_dim < 1 or hidden_channels < 1 or layers < 0:
            raise ValueError(
                f"need in_dim, stalk_dim, hidden_channels >= 1 and layers >= 0; got {in_dim}, {stalk_dim}, "
                f"{hidden_channels}, {layers}"
            )
        if backend not in ("auto", "sparse", "gather"):
            raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'sparse' or 'gather'")
        self.in_dim, self.stalk_dim, self.hidden_channels = in_dim, stalk_dim, hidden_channels
        self.num_layers = layers
        self.sheaf_type = canonical_sheaf_type(sheaf_type)
        self.normalised, self.nonlinear = normalised, nonlinear
        self.dropout, self.input_dropout, self.use_act = dropout, input_dropout, use_act
        self.backend: Backend = backend
        self.out_dim = stalk_dim * hidden_channels
        self.lin_in = nn.Linear(in_dim, self.out_dim)
        n_learners = (layers if nonlinear else 1) if layers else 0
        self.learners = nn.ModuleList(
            SheafLearner(stalk_dim, hidden_channels, self.sheaf_type, sheaf_act, edge_weights) for _ in range(n_learners)
        )
        self.layers = nn.ModuleList(
            SheafDiffusionLayer(
                stalk_dim, hidden_channels, left_weights=left_weights, right_weights=right_weights, use_act=use_act, dropout=dropout
            )
            for _ in range(layers)
        )

    def _run(self, x: Tensor, edge_index: Tensor | SheafGraph, edge_weight: Tensor | None, collect: bool) -> list[Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.size(1) != self.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [N, in_dim] = [N, {self.in_dim}], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        graph = _as_graph(edge_index, x)
        weight = _check_edge_weight(edge_weight, edge_index, graph)
        feats = _dropout(x, self.input_dropout, self.training)
        feats = self.lin_in(feats)
        if self.use_act:
            feats = F.elu(feats)
        feats = _dropout(feats, self.dropout, self.training)
        outputs = [feats] if collect else []
        state = _to_stalk_major(feats, self.stalk_dim)  # [d, N, h]
        lap = None
        for k, layer in enumerate(self.layers):
            if k == 0 or self.nonlinear:
                if k > 0:  # NSD also drops the learner's input after the first layer
                    feats = _dropout(_to_node_major(state), self.dropout, self.training)
                maps = self.learners[k if self.nonlinear else 0](feats, graph)
                lap = build_laplacian(maps, weight, normalised=self.normalised, backend=self.backend)
            state = layer(state, lap)
            if collect:
                outputs.append(_to_node_major(state))
        if not collect:
            outputs.append(_to_node_major(state))
        return outputs

    def forward(self, x: Tensor, edge_index: Tensor | SheafGraph, edge_weight: Tensor | None = None) -> Tensor:
        """``x`` ``[N, in_dim]``; ``edge_index`` ``[2, E]`` (both orientations) or a :class:`SheafGraph`;
        ``edge_weight`` ``[E]`` optional, in ``edge_index``'s order (the graph's order for a
        :class:`SheafGraph`). Returns ``[N, d·h]``."""
        return self._run(x, edge_index, edge_weight, collect=False)[-1]

    def layer_outputs(self, x: Tensor, edge_index: Tensor | SheafGraph, edge_weight: Tensor | None = None) -> list[Tensor]:
        """Node features ``[N, d·h]`` after the input projection and after each layer (``layers + 1``
        tensors; e.g. for the per-layer Dirichlet energy in the over-smoothing study)."""
        return self._run(x, edge_index, edge_weight, collect=True)
