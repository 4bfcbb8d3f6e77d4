"""A learned client graph: :class:`LearnedGraph`, differentiable symmetric edge weights on fixed candidates."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from shn.graph.container import ClientGraph
from shn.graph.inputs import _as_int

__all__ = ["LearnedGraph"]


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
