"""Graph encoders for the hypernetwork: sheaf diffusion (SHN), GCN diffusion (GHN / Panacea),
the older plain GCN stack, and a learned-graph wrapper. Each is registered by name in
``shn.registry.ENCODERS`` with the factory signature ``(in_dim: int, config: EncoderConfig) -> Encoder``.

GHN is "SHN minus the sheaf": :class:`GCNDiffusionEncoder` runs SHN's input projection, residual
update and weights with the sheaf Laplacian replaced by the GCN Laplacian ``I − Â``,
``Â = D̃^{-1/2}(A + I)D̃^{-1/2}``. Since ``D̃ = D + I``, ``I − Â = D̃^{-1/2}(D − A)D̃^{-1/2}`` is exactly
NSD's augmented-degree normalised Laplacian of the *trivial* sheaf (every map ``F = I``), so GHN
is also the identity-sheaf ablation of SHN (``kind = "sheaf_trivial"`` names it so).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shn.config import EncoderConfig
from shn.graph import ClientGraph, LearnedGraph
from shn.hypernetwork import Encoder, IdentityEncoder
from shn.registry import ENCODERS
from shn.sheaf import SheafDiffusion, SheafDiffusionLayer


def _edges(graph: ClientGraph) -> tuple[Tensor, Tensor | None]:
    if graph is None:
        raise ValueError("this encoder needs a client graph, got None")
    return graph.edge_index, graph.edge_weight


@ENCODERS.register("identity")
def make_identity_encoder(in_dim: int, config: EncoderConfig) -> Encoder:
    return IdentityEncoder(in_dim)


class SheafEncoder(Encoder):
    """Neural sheaf diffusion over the client graph (METHOD §2 step 2–4): ``[N, e] → [N, d·h]``."""

    needs_graph = True

    def __init__(self, in_dim: int, config: EncoderConfig) -> None:
        super().__init__()
        self.diffusion = SheafDiffusion(
            in_dim, config.stalk_dim, config.hidden_channels, config.layers, config.sheaf_type,
            normalised=config.normalised, nonlinear=config.nonlinear, edge_weights=config.edge_weights,
            dropout=config.dropout, sheaf_act=config.sheaf_act,
        )
        self.out_dim = self.diffusion.out_dim

    def forward(self, embeddings: Tensor, graph: Any = None) -> Tensor:
        edge_index, edge_weight = _edges(graph)
        return self.diffusion(embeddings, edge_index, edge_weight)

    def layer_outputs(self, embeddings: Tensor, graph: Any = None) -> list[Tensor]:
        edge_index, edge_weight = _edges(graph)
        return self.diffusion.layer_outputs(embeddings, edge_index, edge_weight)


class GraphLaplacian:
    """``Δ = I − D̃^{-1/2}(A_sym + I)D̃^{-1/2}`` applied to stalk-major features ``[d, N, h]`` (the
    same on every stalk dimension: ``Δ ⊗ I_d``), matrix-free; differentiable in the edge weights.
    ``A_sym = ½(A + Aᵀ)`` as the sheaf Laplacian symmetrises weights."""

    def __init__(self, edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int) -> None:
        src, dst = edge_index[0], edge_index[1]
        keep = src != dst  # self loops are added by the normalisation itself
        self.src, self.dst = src[keep], dst[keep]
        self.w = None if edge_weight is None else edge_weight[keep]
        self.num_nodes = num_nodes

    def apply_stalk_major(self, y: Tensor) -> Tensor:
        w = y.new_ones(self.src.shape) if self.w is None else self.w.to(y.dtype)
        deg = w.new_zeros(self.num_nodes).index_add(0, self.src, w).index_add(0, self.dst, w) * 0.5
        inv = (deg + 1.0).rsqrt().view(1, -1, 1)
        z = y * inv
        w = (0.5 * w).view(1, -1, 1)
        agg = z.index_select(1, self.dst).mul(w)
        out = torch.zeros_like(z).index_add(1, self.src, agg)  # A y
        out = out.index_add(1, self.dst, z.index_select(1, self.src).mul(w))  # + Aᵀ y
        return y - inv * (out + z)


class GCNDiffusionEncoder(Encoder):
    """SHN's diffusion (``shn.sheaf.SheafDiffusion``: projection + ELU, ``L`` steps of
    ``X ← (1 + tanh ε) X − ELU(Δ (I ⊗ W_left) X W_rightᵀ)``) with the GCN Laplacian as ``Δ``
    (see the module docstring): the faithful GHN, identical to SHN except for the operator."""

    needs_graph = True

    def __init__(self, in_dim: int, config: EncoderConfig) -> None:
        super().__init__()
        d, h = config.stalk_dim, config.hidden_channels
        self.stalk_dim, self.dropout = d, config.dropout
        self.out_dim = d * h
        self.lin_in = nn.Linear(in_dim, self.out_dim)
        self.layers = nn.ModuleList(SheafDiffusionLayer(d, h, dropout=config.dropout) for _ in range(config.layers))

    def forward(self, embeddings: Tensor, graph: Any = None) -> Tensor:
        return self.layer_outputs(embeddings, graph)[-1]

    def layer_outputs(self, embeddings: Tensor, graph: Any = None) -> list[Tensor]:
        edge_index, edge_weight = _edges(graph)
        n = embeddings.shape[0]
        x = F.elu(self.lin_in(embeddings))
        x = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        outs = [x]
        lap = GraphLaplacian(edge_index, edge_weight, n)
        state = x.view(n, self.stalk_dim, -1).transpose(0, 1).contiguous()  # [d, N, h], as SheafDiffusion
        for layer in self.layers:
            state = layer(state, lap)
            outs.append(state.transpose(0, 1).reshape(n, self.out_dim))
        return outs


class GCNEncoder(Encoder):
    """The plain GCN stack (``kind = "gcn_stack"``; GHN before the faithful rewrite).
    ``L`` layers of ``X ← ELU(Â X W)`` with ``Â = D̃^{-1/2}(A+I)D̃^{-1/2}`` (PyG ``GCNConv``).
    With ``layers = 0`` it is the identity, so GHN-0 is exactly pFedHN."""

    needs_graph = True

    def __init__(self, in_dim: int, config: EncoderConfig) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        width = config.gcn_hidden or config.stalk_dim * config.hidden_channels
        dims = [in_dim] + [width] * config.layers
        self.convs = nn.ModuleList(GCNConv(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.dropout = config.dropout
        self.out_dim = dims[-1]

    def forward(self, embeddings: Tensor, graph: Any = None) -> Tensor:
        return self.layer_outputs(embeddings, graph)[-1]

    def layer_outputs(self, embeddings: Tensor, graph: Any = None) -> list[Tensor]:
        outs = [embeddings]
        if not self.convs:
            return outs
        edge_index, edge_weight = _edges(graph)
        x = embeddings
        for conv in self.convs:
            x = nn.functional.dropout(x, self.dropout, self.training)
            x = nn.functional.elu(conv(x, edge_index, edge_weight))
            outs.append(x)
        return outs


class LearnedGraphEncoder(Encoder):
    """Wraps a graph encoder: edge weights on a fixed candidate set are computed from the client
    embeddings by a ``LearnedGraph`` and trained by the same server update."""

    needs_graph = True

    def __init__(self, inner: Encoder, learned: LearnedGraph) -> None:
        super().__init__()
        self.inner = inner
        self.learned = learned
        self.out_dim = inner.out_dim

    def current_graph(self, embeddings: Tensor) -> ClientGraph:
        return self.learned(embeddings)

    def forward(self, embeddings: Tensor, graph: Any = None) -> Tensor:
        return self.inner(embeddings, self.learned(embeddings))

    def layer_outputs(self, embeddings: Tensor, graph: Any = None) -> list[Tensor]:
        return self.inner.layer_outputs(embeddings, self.learned(embeddings))


@ENCODERS.register("sheaf")
def make_sheaf_encoder(in_dim: int, config: EncoderConfig) -> Encoder:
    return SheafEncoder(in_dim, config)


@ENCODERS.register("gcn")
def make_gcn_encoder(in_dim: int, config: EncoderConfig) -> Encoder:
    return GCNDiffusionEncoder(in_dim, config)


@ENCODERS.register("sheaf_trivial")
def make_trivial_sheaf_encoder(in_dim: int, config: EncoderConfig) -> Encoder:
    """SHN with every restriction map the identity: the same operator as GHN's (module docstring)."""
    return GCNDiffusionEncoder(in_dim, config)


@ENCODERS.register("gcn_stack")
def make_gcn_stack_encoder(in_dim: int, config: EncoderConfig) -> Encoder:
    return GCNEncoder(in_dim, config)
