"""The client graph of a run: resolved from the config and task (``given``: the task's relation
graph or ``graph.path``; ``complete``), or inferred from stage-1 client embeddings (stage 2 of the
pipeline); optionally rewired toward a target edge homophily; held-out novel clients cut off; and
the diagnostics and client attributes saved next to it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shn.config import ConfigError, RunConfig
from shn.graph import ClientGraph, build_graph, complete_graph, given_graph, graph_summary, knn_graph
from tasks.base import Task, client_attribute

log = logging.getLogger("shn.run_graph")

__all__ = ["client_info", "describe_graph", "given_task_graph", "infer_graph", "resolve_graph", "rewire_graph",
           "without_clients"]


def given_task_graph(config: RunConfig, task: Task) -> ClientGraph:
    """The a-priori graph: ``graph.path`` (a saved ClientGraph .json, or a dense adjacency .csv /
    .npy) or the task's own relation graph (e.g. road-sensor distances). Undirected: a directed
    .json is symmetrised (with a warning) as an adjacency is; a graph without edges is an error."""
    n = task.num_clients
    if config.graph.path:
        graph = _graph_file(Path(config.graph.path), n)
        source = f"graph.path: {config.graph.path}"
    else:
        adjacency = getattr(task, "relation_adjacency", None)
        if adjacency is None or adjacency() is None:  # no method, or a task without a graph of its own
            raise ConfigError(
                f"graph.kind = 'given' but task {task.name!r} has no relation graph; set graph.path or use "
                "graph.kind = 'knn' (inferred by the three-stage pipeline)"
            )
        graph = given_graph(adjacency(), n)
        source = f"task {task.name!r}'s relation graph"
    if graph.num_nodes != n:
        raise ConfigError(f"graph has {graph.num_nodes} nodes but the task has {n} clients")
    if graph.num_edges == 0:  # every entry <= 0 or on the diagonal: the encoder would see isolated clients
        raise ConfigError(f"{source} has no edges (no positive entry off the diagonal); a graph method needs "
                          "edges: fix the graph, or use graph.kind = \"complete\"")
    return graph


def _graph_file(path: Path, n: int) -> ClientGraph:
    """``graph.path``: a ClientGraph .json, or a dense N x N adjacency .npy / .csv (no header)."""
    if not path.is_file():
        raise ConfigError(f"graph.path: {path} not found")
    if path.stat().st_size == 0:
        raise ConfigError(f"graph.path: {path} is empty; expected a ClientGraph .json or a dense N x N adjacency")
    if path.suffix == ".json":
        try:
            graph = ClientGraph.load(path)
        except ValueError as e:  # names the file and what is wrong in it
            raise ConfigError(f"graph.path: {e}") from None
        if not graph.is_symmetric():
            log.warning("graph.path: %s is not symmetric (an edge without its reverse); using its undirected closure "
                        "(max of both directions), as for an adjacency matrix", path)
            graph = graph.symmetrized()
        return graph
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy's "input contained no data": reported below
            adj = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",", ndmin=2)
        if adj.size == 0:
            raise ValueError("no numbers in it")
        return given_graph(adj, n)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"graph.path: {path}: expected a dense numeric N x N adjacency matrix ({e})") from None


def label_graph(config: RunConfig, task: Task, held_out: Sequence[int] = ()) -> ClientGraph:
    """``graph.kind = "labels"``: the kNN graph of the training clients' label distributions (held-out
    clients get no edges, as for an inferred graph)."""
    dists = client_attribute(task, "label_distributions")
    if dists is None:
        raise ConfigError(f"graph.kind = 'labels' needs a classification task with client label distributions; "
                          f"task {task.name!r} has none")
    dists = torch.as_tensor(dists, dtype=torch.float64)
    held = set(held_out)
    pool = [c for c in range(task.num_clients) if c not in held]
    if len(pool) < 2:
        raise ConfigError(f"graph.kind = 'labels' needs at least 2 training clients, got {len(pool)}")
    sub = knn_graph(dists[pool], min(config.graph.k, len(pool) - 1), config.graph.metric)
    return ClientGraph(torch.tensor(pool)[sub.edge_index], task.num_clients, sub.edge_weight)


def without_clients(graph: ClientGraph, clients: Sequence[int]) -> ClientGraph:
    """Drop every edge touching ``clients`` (held-out novel clients), keeping node ids."""
    if not clients:
        return graph
    out = torch.tensor(list(clients), device=graph.edge_index.device)
    keep = ~(torch.isin(graph.edge_index[0], out) | torch.isin(graph.edge_index[1], out))
    weight = graph.edge_weight[keep] if graph.edge_weight is not None else None
    return ClientGraph(graph.edge_index[:, keep], graph.num_nodes, weight)


def resolve_graph(config: RunConfig, task: Task, held_out: Sequence[int] = ()) -> ClientGraph:
    """The graph for a run that does not infer one (``given``, ``complete`` or ``labels``)."""
    kind = config.graph.kind
    if kind == "given":
        graph = given_task_graph(config, task)
    elif kind == "complete":
        graph = complete_graph(task.num_clients)
    elif kind == "labels":
        graph = label_graph(config, task, held_out)
    else:
        raise ConfigError(f"graph.kind = {kind!r} is inferred from stage-1 embeddings: run `shn pipeline` "
                          "(or `shn run`, which runs the pipeline for inferred graphs)")
    graph = rewire_graph(config, task, graph)
    return without_clients(graph, held_out).to(config.device)


def rewire_graph(config: RunConfig, task: Task, graph: ClientGraph, nodes: Sequence[int] | None = None) -> ClientGraph:
    """``graph.rewire_homophily``: rewire ``graph`` (whose node i is client ``nodes[i]``) toward
    that edge homophily w.r.t. the clients' label sets (else groups), keeping the edge count;
    weights are dropped; the random choices come from the run seed. Unchanged when unset."""
    target = config.graph.rewire_homophily
    if target is None:
        return graph
    from shn.graph import rewire_to_homophily
    from shn.seeding import torch_generator

    nodes = list(range(graph.num_nodes)) if nodes is None else list(nodes)
    sets, groups = client_attribute(task, "label_sets"), client_attribute(task, "groups")
    if sets is not None:
        attribute = {"sets": [sets[c] for c in nodes]}
    elif groups is not None:
        attribute = {"labels": [groups[c] for c in nodes]}
    else:
        raise ConfigError(f"graph.rewire_homophily: task {task.name!r} has no client label sets or groups "
                          "to measure homophily against")
    plain = ClientGraph(graph.edge_index.cpu(), graph.num_nodes).symmetrized()
    return rewire_to_homophily(plain, target, generator=torch_generator(config.seed, "rewire-homophily"), **attribute)


def infer_graph(config: RunConfig, task: Task, embeddings: torch.Tensor, pool: Sequence[int]) -> ClientGraph:
    """Stage 2: the graph over all N clients built from the training clients' embeddings (held-out
    clients get no edges until they are attached)."""
    g = config.graph
    pool = list(pool)
    emb = embeddings.detach().to("cpu", torch.float64)[pool]
    if g.kind in ("given", "complete", "labels"):
        return resolve_graph(config, task, [c for c in range(task.num_clients) if c not in set(pool)])
    if g.kind in ("knn", "learned"):
        key, k = ("graph.k", g.k) if g.kind == "knn" else ("graph.candidate_k", g.candidate_k)
        if k > len(pool) - 1:
            log.warning("%s = %d but there are only %d other training clients: every client is a neighbour of every "
                        "other, the graph is complete", key, k, len(pool) - 1)
    if g.kind == "learned":
        sub = complete_graph(len(pool)) if g.candidate_k == 0 else knn_graph(emb, min(g.candidate_k, len(pool) - 1), g.metric)
    else:
        sub = build_graph(g.kind, embeddings=emb, k=min(g.k, len(pool) - 1), tau=g.tau, metric=g.metric)
    sub = rewire_graph(config, task, sub, pool)
    index = torch.tensor(pool)
    return ClientGraph(index[sub.edge_index], task.num_clients, sub.edge_weight).to(config.device)


def describe_graph(graph: ClientGraph, task: Task) -> dict[str, Any]:
    """Diagnostics saved next to a graph: degrees, components, homophily w.r.t. the task's client
    label sets and groups, and the label-distribution similarity of its edges (against chance and
    an oracle graph), where the task exposes them."""
    info: dict[str, Any] = {"num_nodes": graph.num_nodes, "num_edges": graph.num_edges}
    sets = client_attribute(task, "label_sets")
    groups = client_attribute(task, "groups")
    dists = client_attribute(task, "label_distributions")
    if dists is not None and not bool((torch.as_tensor(dists).sum(dim=1) > 0).all()):
        dists = None  # a client without training labels: no similarity to score
    info.update(graph_summary(graph.to("cpu"), sets=sets, features=dists))
    if groups is not None:
        from shn.graph import edge_homophily

        info["group_homophily"] = edge_homophily(graph.to("cpu"), labels=list(groups))
    return info


def client_info(task: Task) -> dict[str, Any]:
    """Per-client attributes saved next to a graph for reports (class sets, groups)."""
    sets, groups = client_attribute(task, "label_sets"), client_attribute(task, "groups")
    return {"num_clients": task.num_clients,
            "label_sets": None if sets is None else [sorted(int(c) for c in s) for s in sets],
            "groups": None if groups is None else [int(x) for x in groups]}
