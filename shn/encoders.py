"""Graph encoders for the hypernetwork: sheaf diffusion (SHN), GCN (GHN / Panacea), and a
learned-graph wrapper. Each is registered by name in ``shn.registry.ENCODERS`` with the factory
signature ``(in_dim: int, config: EncoderConfig) -> Encoder``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from shn.config import EncoderConfig
from shn.graph import ClientGraph, LearnedGraph
from shn.hypernetwork import Encoder, IdentityEncoder
from shn.registry import ENCODERS
from shn.sheaf import SheafDiffusion


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
            dropout=config.dropout,
        )
        self.out_dim = self.diffusion.out_dim

    def forward(self, embeddings: Tensor, graph: Any = None) -> Tensor:
        edge_index, edge_weight = _edges(graph)
        return self.diffusion(embeddings, edge_index, edge_weight)

    def layer_outputs(self, embeddings: Tensor, graph: Any = None) -> list[Tensor]:
        edge_index, edge_weight = _edges(graph)
        return self.diffusion.layer_outputs(embeddings, edge_index, edge_weight)


class GCNEncoder(Encoder):
    """``L`` layers of ``X ← ELU(Â X W)`` with ``Â = D̃^{-1/2}(A+I)D̃^{-1/2}`` (PyG ``GCNConv``).
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
    return GCNEncoder(in_dim, config)
