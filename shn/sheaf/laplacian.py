"""Step 2 of NSD: the matrix-free (normalised) sheaf Laplacian (:func:`build_laplacian`, :class:`SheafLaplacian`).

Owns the operator ``Δ = (D+I)^{-1/2} L (D+I)^{-1/2}`` kept as per-edge and per-node ``d×d``
blocks, and the edge operators that apply its off-diagonal part: sparse CSR products (with a
symmetric backward and one SDDMM for the block gradients) for large graphs, a plain
gather–multiply–scatter for small ones (``backend``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from shn.sheaf.graph import SheafGraph
from shn.sheaf.linalg import _cm_matmul, _SymInvSqrt
from shn.sheaf.maps import RestrictionMaps, SheafType, _halves

__all__ = ["SheafLaplacian", "build_laplacian"]

Backend = Literal["auto", "sparse", "gather"]


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
# The Laplacian
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
