"""Novel-client generalisation for the hypernetwork methods (pFedHN's protocol; Panacea's claim).

Clients held out of training (``[novel] fraction``: out of the sampling pool and without graph
edges) join after training. Each gets a new embedding ``e`` (initialised at the mean of the
trained embeddings) fitted with the hypernetwork frozen: the client trains locally from
``θ(e)`` and the server applies the same vector–Jacobian product as in training, but ONLY to ``e``.
Graph methods attach the client to its ``graph.k`` nearest training clients (by embedding,
``graph.metric``), re-attached every ``reattach_every`` steps as ``e`` moves. The client is then
evaluated on its own val/test splits; the summary gets ``novel_test_<metric>`` (mean over the
held-out clients) and ``novel_init_test_<metric>`` (before fitting, for reference).

Held-out clients are fitted one at a time, each on the training graph plus its own edges only,
so that they cannot influence each other through the encoder.

Limitation: a learned graph (``graph.kind = "learned"``) computes its edges on a fixed candidate
set, so there a novel client stays isolated in the encoder.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

from shn.config import RunConfig
from shn.federated.algorithm import HyperNetworkAlgorithm, make_optimizer
from shn.federated.client import FitResult
from shn.federated.records import mean_over_clients
from shn.graph import ClientGraph, nearest_clients
from shn.target import Params


class ClientAccess(Protocol):
    """What the protocol asks of an engine's clients: ``ClientRuntime`` in-process, the grid on
    Flower (``shn.flower.engine.GridRuntime``)."""

    def fit_novel(self, client: int, server_weights: Params, seed: int, step: int) -> FitResult: ...

    def evaluate(self, clients: Sequence[int], server_weights: Params) -> dict[int, dict[str, float]]: ...


def evaluate_novel_clients(ctx: Any, algorithm: HyperNetworkAlgorithm) -> None:
    """Register the novel-client evaluation as an after-training hook when clients are held out."""
    if not ctx.held_out:
        return
    held = tuple(int(c) for c in ctx.held_out)
    pool = [c for c in range(ctx.task.num_clients) if c not in set(held)]
    ctx.after_training(lambda out: novel_client_metrics(out.algorithm, out.extra["runtime"], held, pool,
                                                        ctx.config))


def novel_client_metrics(algorithm: HyperNetworkAlgorithm, runtime: ClientAccess, held_out: Sequence[int],
                         pool: Sequence[int], config: RunConfig) -> dict[str, Any]:
    """Fit and evaluate every held-out client; the summary entries (see the module docstring)."""
    before, after = {}, {}
    for c in held_out:
        start = initial_embedding(algorithm, pool)
        before[c] = runtime.evaluate([c], novel_weights(algorithm, c, start, pool, config))
        e = fit_novel_embedding(algorithm, runtime, c, pool, config)
        after[c] = runtime.evaluate([c], novel_weights(algorithm, c, e, pool, config))
    out: dict[str, Any] = {"novel_clients": [int(c) for c in held_out]}
    out.update({f"novel_init_{k}": v for k, v in mean_over_clients({c: r[c] for c, r in before.items()}).items()})
    out.update({f"novel_{k}": v for k, v in mean_over_clients({c: r[c] for c, r in after.items()}).items()})
    out["novel_per_client"] = {str(c): {k: v for k, v in r[c].items() if k.startswith("test_")} for c, r in after.items()}
    return out


def initial_embedding(algorithm: HyperNetworkAlgorithm, pool: Sequence[int]) -> Tensor:
    """The mean of the trained clients' embeddings, ``[e]``."""
    table = algorithm.hn.embeddings.weight.detach()
    return table[torch.as_tensor(list(pool), device=table.device)].mean(0)


def attach(graph: ClientGraph, client: int, pool: Sequence[int], embeddings: Tensor, query: Tensor, k: int,
           metric: str) -> ClientGraph:
    """``graph`` with node ``client`` (which has no edges) joined, both ways, to its ``k`` nearest
    clients of ``pool`` by ``query [e]`` against ``embeddings [N, e]``. New edges of a weighted
    graph get its mean edge weight."""
    index = torch.as_tensor(list(pool), dtype=torch.long, device=embeddings.device)
    near = index[nearest_clients(embeddings[index].detach(), query.detach(), min(k, len(pool)), metric)]
    near = near.to(graph.edge_index.device)
    new = torch.full_like(near, int(client))
    edge_index = torch.cat([graph.edge_index, torch.stack([new, near]), torch.stack([near, new])], dim=1)
    weight = graph.edge_weight
    if weight is not None:
        fill = weight.detach().mean() if weight.numel() else weight.new_tensor(1.0)
        weight = torch.cat([weight.detach(), fill.expand(2 * len(near))])
    return ClientGraph(edge_index, graph.num_nodes, weight)


def _generate(algorithm: HyperNetworkAlgorithm, client: int, e: Tensor, graph: ClientGraph | None) -> Params:
    """``θ(e)`` for ``client`` ``{name: [1, *shape]}`` over the server's tensors, differentiable in ``e``."""
    table = algorithm.hn.embeddings.weight.detach()
    row = torch.arange(table.shape[0], device=table.device) == int(client)
    embeddings = torch.where(row[:, None], e[None, :], table)
    weights = algorithm.hn([int(client)], graph, embeddings=embeddings)
    return {k: weights[k] for k in algorithm.server_spec.names}


def _graph_for(algorithm: HyperNetworkAlgorithm, client: int, e: Tensor, pool: Sequence[int],
               config: RunConfig) -> ClientGraph | None:
    if algorithm.graph is None:
        return None
    table = algorithm.hn.embeddings.weight.detach()
    return attach(algorithm.graph, client, pool, table, e, config.graph.k, config.graph.metric)


@torch.no_grad()
def novel_weights(algorithm: HyperNetworkAlgorithm, client: int, e: Tensor, pool: Sequence[int],
                  config: RunConfig) -> Params:
    """The weights a novel client with embedding ``e`` receives (attached by ``e`` on graphs)."""
    return _generate(algorithm, client, e, _graph_for(algorithm, client, e, pool, config))


def fit_novel_embedding(algorithm: HyperNetworkAlgorithm, runtime: ClientAccess, client: int,
                        pool: Sequence[int], config: RunConfig) -> Tensor:
    """``novel.steps`` server steps on the new embedding alone (the hypernetwork is frozen):
    local training from ``θ(e)``, then ``e ← opt(e, (∂θ/∂e)ᵀ (θ − θ̃))``. Returns ``e [e_dim]``."""
    novel, server = config.novel, config.server
    e = initial_embedding(algorithm, pool).clone().requires_grad_(True)
    lr = novel.lr or server.embed_lr or server.lr
    optimizer = make_optimizer(replace(server, lr=lr, weight_decay=0.0, embed_lr=None), [{"params": [e]}])
    graph = None
    for step in range(novel.steps):
        if step % novel.reattach_every == 0:
            graph = _graph_for(algorithm, client, e, pool, config)
        theta = _generate(algorithm, client, e, graph)
        fit = runtime.fit_novel(client, {k: v.detach() for k, v in theta.items()}, config.seed, step)
        names = list(theta)
        # the pFedHN update, restricted to the new embedding
        (e.grad,) = torch.autograd.grad([theta[n] for n in names], [e], [fit.deltas[n].to(theta[n]) for n in names])
        if server.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([e], server.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return e.detach()
