"""Step 1 of NSD: restriction maps from node features (:class:`SheafLearner`, :class:`RestrictionMaps`).

Owns the sheaf types (``"diag"``, ``"orth"``, ``"general"`` and their spellings), the map
learner ``F_{u◁uv} = act(W [x_u ‖ x_v])`` with optional learned edge weights, and the orthogonal
maps of the ``"orth"`` type: NSD's Householder parameterisation with a hand-written backward
(:func:`householder_orthogonal`). Maps are stored per undirected edge for both endpoints,
component-major (see :mod:`shn.sheaf`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shn.sheaf.graph import SheafGraph, _as_graph
from shn.sheaf.linalg import _tanh

__all__ = ["SHEAF_TYPES", "RestrictionMaps", "SheafLearner", "canonical_sheaf_type", "householder_orthogonal"]

SheafType = Literal["diag", "orth", "general"]

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


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"tanh": _tanh, "elu": F.elu, "id": lambda t: t}


def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
    """Split the last dim in two equal halves (``split``: its backward is one concatenation, while
    slicing's backward zero-fills a full-size tensor per slice)."""
    h = t.size(-1) // 2
    return t.split(h, dim=-1) if h else (t[..., :0], t[..., :0])


# ---------------------------------------------------------------------------------------------
# Orthogonal maps (Householder)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The learner
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
    (diag), ``d(d−1)/2`` Householder parameters (orth: ``F = Householder(act(W [x_u ‖ x_v]))``, the
    activation applied to the parameters as NSD's learner does) or ``d²`` (general).
    Optional edge weights ``w_uv = σ(a·[x_u ‖ x_v]) σ(a·[x_v ‖ x_u])`` (NSD's ``EdgeWeightLearner``,
    symmetric by construction).

    Since ``W [x_u ‖ x_v] = W_l x_u + W_r x_v``, both halves are applied once per node (``[N, p]``);
    per edge only a gather and an add remain.

    Args:
        stalk_dim: ``d``.
        hidden_channels: ``h``; node features have width ``d·h``.
        sheaf_type: ``"diag" | "orth" | "general"`` (or ``"diagonal"``, ``"orthogonal"``).
        sheaf_act: ``"tanh" | "elu" | "id"`` on the map entries (diag, general) or on the
            Householder parameters (orth); NSD's default ``"tanh"``.
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
            maps = _householder_cm(_ACTIVATIONS[self.sheaf_act](pre), d)
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
