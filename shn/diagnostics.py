"""Diagnostics of a trained hypernetwork, recorded in ``summary.json`` after training.

Over-smoothing (the depth study of GHN vs SHN): the Dirichlet energy of the encoder output
after every layer, on the training clients' graph. GCN features collapse towards the graph's
smooth subspace as layers are added (energy → 0); sheaf diffusion is expected not to.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from shn.graph import ClientGraph, dirichlet_energy, rayleigh_quotient
from shn.hypernetwork import HyperNetwork


@torch.no_grad()
def encoder_energy(hn: HyperNetwork, graph: ClientGraph, nodes: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Per layer (input embeddings first) of ``hn.encoder``: the normalised Dirichlet energy and
    the Rayleigh quotient (energy / ‖X‖², scale free) of the output ``[N, f]``, over ``graph``
    restricted to ``nodes`` (the training clients; default all)."""
    embeddings = hn.embeddings.weight
    current = getattr(hn.encoder, "current_graph", None)  # a learned graph's edge weights
    graph = current(embeddings) if current is not None else graph
    was_training = hn.training
    hn.eval()
    try:
        outputs = hn.encoder.layer_outputs(embeddings, graph)
    finally:
        hn.train(was_training)
    if nodes is not None:
        index = torch.as_tensor(list(nodes), dtype=torch.long, device=embeddings.device)
        graph = graph.subgraph(index)
        outputs = [x[index] for x in outputs]
    x64 = [x.detach().to(torch.float64) for x in outputs]
    g64 = ClientGraph(graph.edge_index, graph.num_nodes,
                      None if graph.edge_weight is None else graph.edge_weight.detach().to(torch.float64))
    return {
        "encoder_dirichlet_energy": [float(dirichlet_energy(x, g64)) for x in x64],
        "encoder_rayleigh_quotient": [float(rayleigh_quotient(x, g64)) for x in x64],
    }


def record_encoder_energy(ctx: Any, algorithm: Any) -> None:
    """Add ``encoder_dirichlet_energy`` / ``encoder_rayleigh_quotient`` (lists over layers) to the
    summary of a hypernetwork method with a graph encoder."""
    if algorithm.graph is None or not algorithm.hn.encoder.needs_graph:
        return
    held = set(ctx.held_out)
    pool = [c for c in range(ctx.task.num_clients) if c not in held]
    ctx.after_training(lambda out: encoder_energy(out.algorithm.hn, out.algorithm.graph, pool))
