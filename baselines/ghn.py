"""GHN — a graph hypernetwork for PFL: pFedHN's hypernetwork with a GCN encoder (PyG
``GCNConv``, ``encoder.layers`` layers, symmetric normalisation with self loops) over the same
client graph SHN uses (given, or built from stage-1 embeddings by the three-stage pipeline).

The GCN is the only difference from SHN (METHOD §5), which makes GHN the over-smoothing
reference of the depth study. With ``encoder.layers = 0`` the encoder is the identity and GHN is
exactly pFedHN (same seed → same weights, same training)."""

from __future__ import annotations

from shn.federated.algorithm import HyperNetworkAlgorithm
from shn.methods import MethodContext, build_hypernetwork, hypernetwork_algorithm, register_method


@register_method("ghn", needs_graph=True)
def make_ghn(ctx: MethodContext) -> HyperNetworkAlgorithm:
    """GHN: embeddings → GCN over the client graph → heads."""
    return hypernetwork_algorithm(ctx, build_hypernetwork(ctx, "gcn"), graph=ctx.graph)
