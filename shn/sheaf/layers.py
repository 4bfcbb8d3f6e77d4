"""Step 3 of NSD and the encoder: :class:`SheafDiffusionLayer`, :class:`SheafConv`, :class:`SheafDiffusion`.

A diffusion step takes stalk-major features and a :class:`~shn.sheaf.laplacian.SheafLaplacian`
and returns ``(1 + tanh ε) ⊙ X − ELU(Δ (I ⊗ W_left) X W_rightᵀ)``; :class:`SheafConv` is one
nonlinear NSD layer (maps → Laplacian → step) and :class:`SheafDiffusion` the SHN encoder
(input projection, ``L`` layers, readout). Nothing graph-sized is stored on a module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shn.sheaf.graph import SheafGraph, _as_graph
from shn.sheaf.laplacian import Backend, SheafLaplacian, build_laplacian
from shn.sheaf.linalg import _tanh
from shn.sheaf.maps import SheafLearner, canonical_sheaf_type

__all__ = ["SheafConv", "SheafDiffusion", "SheafDiffusionLayer"]


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
