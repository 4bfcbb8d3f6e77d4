"""The three-stage SHN pipeline (METHOD §3.2–3.4) and client-graph resolution.

1. Federated hypernetwork training: plain pFedHN; its learned client embeddings E* are the only
   thing that leaves the stage (no raw data or client statistics).
2. Client-relation graph construction from E* (kNN on cosine similarity by default), saved with
   its diagnostics (degree, components, homophily w.r.t. the task's client attributes).
3. Federated SHN (or any graph method) training on that graph, embeddings warm-started from E*.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shn.config import ConfigError, RunConfig
from shn.federated.records import atomic_write_text
from shn.graph import ClientGraph, build_graph, complete_graph, given_graph, graph_summary, knn_graph
from tasks.base import Task, client_attribute

log = logging.getLogger("shn.pipeline")


def given_task_graph(config: RunConfig, task: Task) -> ClientGraph:
    """The a-priori graph: ``graph.path`` (a saved ClientGraph .json, or a dense adjacency .csv /
    .npy) or the task's own relation graph (e.g. road-sensor distances)."""
    n = task.num_clients
    if config.graph.path:
        path = Path(config.graph.path)
        if not path.is_file():
            raise ConfigError(f"graph.path: {path} not found")
        if path.suffix == ".json":
            try:
                graph = ClientGraph.load(path)
            except ValueError as e:  # names the file and what is wrong in it
                raise ConfigError(f"graph.path: {e}") from None
        else:
            try:
                adj = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",")
                graph = given_graph(adj, n)
            except (ValueError, OSError, EOFError) as e:
                raise ConfigError(f"graph.path: {path}: expected a dense numeric N x N adjacency matrix ({e})") from None
    else:
        adjacency = getattr(task, "relation_adjacency", None)
        if adjacency is None or adjacency() is None:  # no method, or a task without a graph of its own
            raise ConfigError(
                f"graph.kind = 'given' but task {task.name!r} has no relation graph; set graph.path or use "
                "graph.kind = 'knn' (inferred by the three-stage pipeline)"
            )
        graph = given_graph(adjacency(), n)
    if graph.num_nodes != n:
        raise ConfigError(f"graph has {graph.num_nodes} nodes but the task has {n} clients")
    return graph


def without_clients(graph: ClientGraph, clients: Sequence[int]) -> ClientGraph:
    """Drop every edge touching ``clients`` (held-out novel clients), keeping node ids."""
    if not clients:
        return graph
    out = torch.tensor(list(clients), device=graph.edge_index.device)
    keep = ~(torch.isin(graph.edge_index[0], out) | torch.isin(graph.edge_index[1], out))
    weight = graph.edge_weight[keep] if graph.edge_weight is not None else None
    return ClientGraph(graph.edge_index[:, keep], graph.num_nodes, weight)


def resolve_graph(config: RunConfig, task: Task, held_out: Sequence[int] = ()) -> ClientGraph:
    """The graph for a run that does not infer one (``given`` or ``complete``)."""
    kind = config.graph.kind
    if kind == "given":
        graph = given_task_graph(config, task)
    elif kind == "complete":
        graph = complete_graph(task.num_clients)
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
    if g.kind in ("given", "complete"):
        return resolve_graph(config, task, [c for c in range(task.num_clients) if c not in set(pool)])
    if g.kind == "learned":
        sub = complete_graph(len(pool)) if g.candidate_k == 0 else knn_graph(emb, min(g.candidate_k, len(pool) - 1), g.metric)
    else:
        sub = build_graph(g.kind, embeddings=emb, k=min(g.k, len(pool) - 1), tau=g.tau, metric=g.metric)
    sub = rewire_graph(config, task, sub, pool)
    index = torch.tensor(pool)
    return ClientGraph(index[sub.edge_index], task.num_clients, sub.edge_weight).to(config.device)


def describe_graph(graph: ClientGraph, task: Task) -> dict[str, Any]:
    """Diagnostics saved next to a graph: degrees, components, homophily w.r.t. the task's client
    label sets and groups where the task exposes them."""
    info: dict[str, Any] = {"num_nodes": graph.num_nodes, "num_edges": graph.num_edges}
    sets = client_attribute(task, "label_sets")
    groups = client_attribute(task, "groups")
    info.update(graph_summary(graph.to("cpu"), sets=sets))
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


def run_pipeline(config: RunConfig, *, task: Task | None = None, run_dir: str | Path | None = None,
                 resume: bool = False, progress: bool = True, on_eval=None, held_out: Sequence[int] = ()):
    """Run stages 1–3 and return stage 3's ``RunResult`` (its summary gains ``graph`` and
    ``stage1_metrics``). Every stage writes its own sub-directory of ``run_dir``."""
    from shn.runner import build, execute, make_task

    task = task if task is not None else make_task(config)
    root = Path(run_dir) if run_dir is not None else None
    sub = (lambda name: root / name) if root is not None else (lambda name: None)  # noqa: E731
    held_out = tuple(held_out) or tuple(_held_out(config, task))
    pool = [c for c in range(task.num_clients) if c not in set(held_out)]

    # Stage 1: plain pFedHN.
    stage1_cfg = stage1_config(config)
    stage1_rounds = stage1_cfg.rounds
    cached = _stage1_cache_dir(config, stage1_cfg, held_out)
    if cached is not None and (cached / "embeddings.pt").is_file() and (cached / "summary.json").is_file():
        # graph methods sharing a seed and budget share stage 1 (e.g. GHN, Panacea, SHN in a suite)
        embeddings = torch.load(cached / "embeddings.pt", map_location=config.device)
        stage1_metrics = json.loads((cached / "summary.json").read_text())["metrics"]
        log.info("stage 1 reused from %s", cached)
    else:
        stage1_built = build(stage1_cfg, task=task, held_out=held_out)
        stage1_built.context.extras["after_training"] = []  # stage 1 only supplies embeddings (no novel-client fit)
        stage1 = execute(stage1_built, run_dir=cached or sub("stage1_pfedhn"), resume=resume, progress=progress)
        embeddings = stage1.algorithm.hn.embeddings.weight.detach().clone()
        stage1_metrics = stage1.summary["metrics"]
        if cached is not None:
            torch.save(embeddings.cpu(), cached / "embeddings.pt")

    # Stage 2: the client-relation graph from the learned embeddings.
    graph = infer_graph(config, task, embeddings, pool)
    diagnostics = describe_graph(graph, task)
    if root is not None:
        (root / "stage2_graph").mkdir(parents=True, exist_ok=True)
        graph.save(root / "stage2_graph" / "graph.json")
        torch.save(embeddings.cpu(), root / "stage2_graph" / "embeddings.pt")
        atomic_write_text(root / "stage2_graph" / "graph_summary.json", json.dumps(diagnostics, indent=2) + "\n")
        atomic_write_text(root / "stage2_graph" / "clients.json", json.dumps(client_info(task)) + "\n")

    # Stage 3: the graph method, embeddings warm-started from stage 1.
    built = build(config, task=task, graph=graph, warm_embeddings=embeddings, held_out=held_out)
    stage3_dir = sub(f"stage3_{config.method}")
    if stage3_dir is not None:
        stage3_dir.mkdir(parents=True, exist_ok=True)
        graph.save(stage3_dir / "graph.json")
    result = execute(built, run_dir=stage3_dir, resume=resume, progress=progress, on_eval=on_eval)
    result.summary["graph"] = diagnostics
    result.summary["stage1_metrics"] = stage1_metrics
    result.summary["pipeline"] = {"stage1_rounds": stage1_rounds, "graph_kind": config.graph.kind,
                                  "k": config.graph.k}
    if root is not None:
        atomic_write_text(root / "summary.json", json.dumps(result.summary, indent=2, sort_keys=True) + "\n")
        if stage3_dir is not None:
            atomic_write_text(stage3_dir / "summary.json", json.dumps(result.summary, indent=2, sort_keys=True) + "\n")
    return result


def stage1_config(config: RunConfig) -> RunConfig:
    """The plain pFedHN run that stage 1 of ``config``'s pipeline trains."""
    return replace(config, method="pfedhn", rounds=config.graph.stage1_rounds or config.rounds,
                   encoder=replace(config.encoder, kind=None))


def publish_stage1(config: RunConfig, held_out: Sequence[int]):
    """For a plain pFedHN run with ``graph.stage1_cache`` that IS the stage 1 of the same config's
    pipeline (same seed and rounds): an after-training hook that stores its embeddings and metrics
    in the cache, so that GHN/Panacea/SHN of a suite skip re-training it. ``None`` otherwise."""
    if config.method != "pfedhn" or config.graph.stage1_rounds not in (0, None, config.rounds):
        return None
    cached = _stage1_cache_dir(config, stage1_config(config), held_out)
    if cached is None:
        return None

    def publish(result: Any) -> dict[str, Any]:
        # runs before the other hooks (novel-client fitting), like stage 1 itself
        if not (cached / "embeddings.pt").is_file():
            atomic_write_text(cached / "summary.json", json.dumps(result.summary, indent=2, sort_keys=True) + "\n")
            torch.save(result.algorithm.hn.embeddings.weight.detach().cpu().clone(), cached / "embeddings.pt")
        return {}

    return publish


def _stage1_cache_dir(config: RunConfig, stage1_cfg: RunConfig, held_out: Sequence[int]) -> Path | None:
    """``graph.stage1_cache/<hash of everything stage 1 depends on>`` or None (no caching)."""
    if not config.graph.stage1_cache:
        return None
    import hashlib

    from shn.config import config_to_dict, dumps_toml

    key = config_to_dict(stage1_cfg)
    for irrelevant in ("graph", "encoder", "methods", "sweep"):
        key.pop(irrelevant, None)
    digest = hashlib.sha256((dumps_toml(key) + repr(sorted(held_out))).encode()).hexdigest()[:16]
    path = Path(config.graph.stage1_cache) / digest
    path.mkdir(parents=True, exist_ok=True)
    return path


def _held_out(config: RunConfig, task: Task) -> list[int]:
    """Novel clients held out of training (``novel.fraction``), chosen from the run seed."""
    fraction = getattr(getattr(config, "novel", None), "fraction", 0.0)
    if not fraction:
        return []
    from shn.seeding import torch_generator

    n = task.num_clients
    count = max(1, int(round(fraction * n)))
    perm = torch.randperm(n, generator=torch_generator(config.seed, "held-out"))
    return sorted(perm[:count].tolist())
