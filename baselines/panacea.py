"""Panacea (graph-relational FL, ICLR 2024 submission 3052): GHN plus a graph-reconstruction
regulariser on the encoder output ``Z [N, f]`` added to the server objective (METHOD §5):

    L_graph = BCE(σ(z_u·z_v), 1) over the graph's edges + BCE(σ(z_u·z_v), 0) over sampled non-edges
    server loss = pFedHN's VJP objective + λ · L_graph,     λ = ``graph_loss_weight``

Non-edges are drawn among the training clients from the generator the server passes to its
regulariser (seeded per server step). ``λ = 0`` is exactly GHN. Configured under
``[methods.panacea]``; the GCN depth and width under ``[encoder]`` as for GHN."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from shn.federated.algorithm import HyperNetworkAlgorithm, Regularizer
from shn.graph import ClientGraph
from shn.methods import MethodContext, build_hypernetwork, hypernetwork_algorithm, register_method


@dataclass(frozen=True)
class PanaceaOptions:
    """Panacea's graph-reconstruction regulariser.

    Attributes:
        graph_loss_weight: λ, the weight of the reconstruction loss (0: GHN).
        negative_ratio: sampled non-edges per edge.
    """

    graph_loss_weight: float = 0.1
    negative_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.graph_loss_weight < 0 or self.negative_ratio < 0:
            raise ValueError("graph_loss_weight and negative_ratio must be ≥ 0")


def sample_non_edges(graph: ClientGraph, nodes: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Up to ``count`` ordered pairs ``[2, M]`` of distinct ``nodes`` that are not edges of
    ``graph``, drawn uniformly (with replacement) by rejection from ``generator``."""
    draws = torch.randint(len(nodes), (2, 4 * count), generator=generator)
    pairs = nodes.cpu()[draws]
    n = graph.num_nodes
    edges = (graph.edge_index[0] * n + graph.edge_index[1]).cpu()
    ok = (pairs[0] != pairs[1]) & ~torch.isin(pairs[0] * n + pairs[1], edges)
    return pairs[:, ok][:, :count].to(graph.edge_index.device)


def graph_reconstruction_loss(z: Tensor, graph: ClientGraph, nodes: Tensor, generator: torch.Generator,
                              negative_ratio: float = 1.0) -> Tensor:
    """Inner-product decoder BCE: edges of ``graph`` are positives, sampled non-edges among
    ``nodes`` negatives; ``z [N, f]``."""
    row, col = graph.edge_index
    pos = (z[row] * z[col]).sum(-1)
    loss = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) if pos.numel() else z.sum() * 0
    u, v = sample_non_edges(graph, nodes, math.ceil(negative_ratio * graph.num_edges), generator)
    if u.numel():
        neg = (z[u] * z[v]).sum(-1)
        loss = loss + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
    return loss


def reconstruction_regularizer(weight: float, pool: Sequence[int], negative_ratio: float) -> Regularizer:
    nodes = torch.as_tensor(list(pool), dtype=torch.long)

    def regularizer(hn, graph: ClientGraph, generator: torch.Generator) -> Tensor:
        z = hn.representations(graph)
        return weight * graph_reconstruction_loss(z, graph, nodes, generator, negative_ratio)

    return regularizer


@register_method("panacea", PanaceaOptions, needs_graph=True)
def make_panacea(ctx: MethodContext) -> HyperNetworkAlgorithm:
    """Panacea: GHN + λ · graph reconstruction from the encoder output."""
    opts = ctx.options
    pool = [c for c in range(ctx.task.num_clients) if c not in set(ctx.held_out)]
    reg = reconstruction_regularizer(opts.graph_loss_weight, pool, opts.negative_ratio)
    return hypernetwork_algorithm(ctx, build_hypernetwork(ctx, "gcn"), graph=ctx.graph, regularizer=reg)
