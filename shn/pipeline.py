"""The three-stage SHN pipeline (METHOD §3.2–3.4).

1. Federated hypernetwork training: plain pFedHN; its learned client embeddings E* are the only
   thing that leaves the stage (no raw data or client statistics).
2. Client-relation graph construction from E* (kNN on cosine similarity by default), saved with
   its diagnostics (degree, components, homophily w.r.t. the task's client attributes).
3. Federated SHN (or any graph method) training on that graph, embeddings warm-started from E*.

Graph resolution and stage 2 live in :mod:`shn.run_graph`, building and executing a stage in
:mod:`shn.build`; their names are re-exported here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from shn.build import _held_out, build, execute, make_task
from shn.config import ConfigError, RunConfig
from shn.federated.records import atomic_write_text
from shn.hypernetwork import embedding_drift, initial_embeddings
from shn.run_graph import (
    client_info,
    describe_graph,
    given_task_graph,
    infer_graph,
    resolve_graph,
    rewire_graph,
    without_clients,
)
from tasks.base import Task

__all__ = ["check_graph_method", "client_info", "describe_graph", "given_task_graph", "infer_graph", "publish_stage1", "resolve_graph",
           "rewire_graph", "run_pipeline", "stage1_config", "without_clients"]

log = logging.getLogger("shn.pipeline")


def run_pipeline(config: RunConfig, *, task: Task | None = None, run_dir: str | Path | None = None,
                 resume: bool = False, progress: bool = True, on_eval=None, held_out: Sequence[int] = ()):
    """Run stages 1–3 and return stage 3's ``RunResult`` (its summary gains ``graph`` and
    ``stage1_metrics``). Every stage writes its own sub-directory of ``run_dir``."""
    check_graph_method(config)
    task = task if task is not None else make_task(config)
    root = Path(run_dir) if run_dir is not None else None
    sub = (lambda name: root / name) if root is not None else (lambda name: None)  # noqa: E731
    held_out = tuple(held_out) or tuple(_held_out(config, task))
    pool = [c for c in range(task.num_clients) if c not in set(held_out)]

    # Stage 1: plain pFedHN.
    stage1_cfg = stage1_config(config)
    stage1_rounds = stage1_cfg.rounds
    cached = _stage1_cache_dir(config, stage1_cfg, held_out)
    full = config.graph.stage3_init == "full"
    needed = ["embeddings.pt", "summary.json"] + (["hypernetwork.pt"] if full else [])
    hn_state = None
    if cached is not None and all((cached / f).is_file() for f in needed):
        # graph methods sharing a seed and budget share stage 1 (e.g. GHN, Panacea, SHN in a suite)
        embeddings = torch.load(cached / "embeddings.pt", map_location=config.device, weights_only=True)
        stage1_summary = json.loads((cached / "summary.json").read_text())
        if full:
            hn_state = torch.load(cached / "hypernetwork.pt", map_location=config.device, weights_only=True)
        log.info("stage 1 reused from %s", cached)
    else:
        stage1_built = build(stage1_cfg, task=task, held_out=held_out)
        stage1_built.context.extras["after_training"] = []  # stage 1 only supplies embeddings (no novel-client fit)
        stage1 = execute(stage1_built, run_dir=cached or sub("stage1_pfedhn"), resume=resume, progress=progress)
        embeddings = stage1.algorithm.hn.embeddings.weight.detach().clone()
        hn_state = {k: v.detach().clone() for k, v in stage1.algorithm.hn.state_dict().items()}
        stage1_summary = stage1.summary
        if cached is not None:
            torch.save(embeddings.cpu(), cached / "embeddings.pt")
            torch.save({k: v.cpu() for k, v in hn_state.items()}, cached / "hypernetwork.pt")
    stage1_metrics = stage1_summary["metrics"]
    stage1_updates = int(stage1_summary.get("budget", {}).get("client_updates",
                                                               stage1_rounds * stage1_cfg.clients_per_round))
    drift = embedding_drift(initial_embeddings(config.seed, task.num_clients, int(embeddings.shape[1])), embeddings)
    if drift["off_scale_change"] < 1e-3:
        log.warning("stage-1 embeddings moved no more than a rescaling (off-scale change %.2g): the inferred "
                    "graph is a graph of their random initialisation; train stage 1 longer or with a larger "
                    "server.embed_lr", drift["off_scale_change"])

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
    built = build(config, task=task, graph=graph, warm_embeddings=embeddings, held_out=held_out,
                  warm_hypernetwork=hn_state if full else None)
    stage3_dir = sub(f"stage3_{config.method}")
    if stage3_dir is not None:
        stage3_dir.mkdir(parents=True, exist_ok=True)
        graph.save(stage3_dir / "graph.json")
    result = execute(built, run_dir=stage3_dir, resume=resume, progress=progress, on_eval=on_eval)
    result.summary["graph"] = diagnostics
    result.summary["stage1_metrics"] = stage1_metrics
    result.summary["pipeline"] = {"stage1_rounds": stage1_rounds, "graph_kind": config.graph.kind,
                                  "k": config.graph.k, "stage3_init": config.graph.stage3_init}
    result.summary["stage1_embedding_drift"] = drift
    stage3_updates = int(result.summary.get("budget", {}).get("client_updates", 0))
    result.summary["budget"] = {"client_updates": stage1_updates + stage3_updates,
                                "stage1_client_updates": stage1_updates, "stage3_client_updates": stage3_updates}
    if root is not None:
        atomic_write_text(root / "summary.json", json.dumps(result.summary, indent=2, sort_keys=True) + "\n")
        if stage3_dir is not None:
            atomic_write_text(stage3_dir / "summary.json", json.dumps(result.summary, indent=2, sort_keys=True) + "\n")
    return result


def check_graph_method(config: RunConfig) -> None:
    """Stage 3 must be a method that uses the client graph; anything else would silently train
    pFedHN, a graph nobody uses, and then the method itself (e.g. pFedHN twice)."""
    from shn.registry import METHODS

    if not METHODS.get(config.method).meta.get("needs_graph"):
        graph_methods = [m for m in METHODS.names() if METHODS.get(m).meta.get("needs_graph")]
        raise ConfigError(f"method: {config.method!r} uses no client graph, so the three-stage pipeline "
                          f"(pFedHN → graph → graph method) does not apply; use `shn run` for it, or a graph "
                          f"method ({', '.join(graph_methods)}), e.g. --set method=shn")


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
            torch.save({k: v.detach().cpu().clone() for k, v in result.algorithm.hn.state_dict().items()},
                       cached / "hypernetwork.pt")
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
