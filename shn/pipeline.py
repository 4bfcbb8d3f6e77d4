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

import contextlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from shn.build import _held_out, build, execute, make_task
from shn.config import CompressionConfig, ConfigError, RunConfig, load_config
from shn.federated.records import atomic_write_text, dumps_json
from shn.federated.simulation import write_summary
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
from shn.rundir import RunDirError, check_run_dir, clear_run, locked
from tasks.base import Task

__all__ = ["check_graph_method", "client_info", "describe_graph", "given_task_graph", "infer_graph", "publish_stage1", "resolve_graph",
           "rewire_graph", "run_pipeline", "stage1_config", "without_clients"]

log = logging.getLogger("shn.pipeline")


def run_pipeline(config: RunConfig, *, task: Task | None = None, run_dir: str | Path | None = None,
                 resume: bool = False, progress: bool = True, on_eval=None, held_out: Sequence[int] = (),
                 overwrite: bool = False):
    """Run stages 1–3 and return stage 3's ``RunResult`` (its summary gains ``graph`` and
    ``stage1_metrics``). Every stage writes its own sub-directory of ``run_dir``, which is locked
    for the whole pipeline and checked first (:mod:`shn.rundir`): a finished pipeline is not run
    again without ``resume`` or ``overwrite``, nor resumed with another config."""
    check_graph_method(config)
    task = task if task is not None else make_task(config)
    root = Path(run_dir) if run_dir is not None else None
    with contextlib.ExitStack() as stack:
        if root is not None:
            stack.enter_context(locked(root))
            _check_pipeline(root, config, task, held_out, resume=resume, overwrite=overwrite)
            if overwrite:
                clear_run(root)
        return _run_stages(config, task, root, resume=resume, overwrite=overwrite, progress=progress,
                           on_eval=on_eval, held_out=held_out)


# stage 1 (plain pFedHN) depends on none of these: a resumed stage 1 may differ there
STAGE1_IGNORES = ("graph", "encoder", "methods")
# stage 3 depends on graph.stage1_rounds only through stage 1's rounds, checked as such
STAGE3_IGNORES = ("graph.stage1_rounds",)


def _check_pipeline(root: Path, config: RunConfig, task: Task, held_out: Sequence[int], *, resume: bool,
                    overwrite: bool) -> None:
    """Every check of a pipeline run directory, before anything is written in it."""
    if (root / "summary.json").is_file() and not (resume or overwrite):
        raise RunDirError(f"{root}: holds a finished pipeline run (summary.json); use --resume to continue or extend "
                          "it (more rounds), --force to replace it, or another run directory (--out)")
    stage1_cfg = stage1_config(config)
    if not config.graph.stage1_cache:  # a cached stage 1 is content-addressed: always the same run
        check_run_dir(root / "stage1_pfedhn", stage1_cfg, resume=resume, overwrite=overwrite, ignore=STAGE1_IGNORES)
    stage3 = root / f"stage3_{config.method}"
    check_run_dir(stage3, config, resume=resume, overwrite=overwrite, ignore=STAGE3_IGNORES)
    if resume and (stage3 / "checkpoint.pt").is_file() and (stage3 / "config.toml").is_file():
        before = stage1_config(load_config(stage3 / "config.toml")).rounds
        if before != stage1_cfg.rounds:
            raise RunDirError(f"{root}: stage 3 was trained on the graph of a {before}-round stage 1, and this config's "
                              f"stage 1 has {stage1_cfg.rounds} rounds; to extend stage 3 only, set "
                              f"graph.stage1_rounds = {before}")


def _run_stages(config: RunConfig, task: Task, root: Path | None, *, resume: bool, overwrite: bool, progress: bool,
                on_eval, held_out: Sequence[int]):
    sub = (lambda name: root / name) if root is not None else (lambda name: None)  # noqa: E731
    held_out = tuple(held_out) or tuple(_held_out(config, task))
    pool = [c for c in range(task.num_clients) if c not in set(held_out)]

    # Stage 1: plain pFedHN.
    stage1_cfg = stage1_config(config)
    stage1_rounds = stage1_cfg.rounds
    cached = _stage1_cache_dir(config, stage1_cfg, held_out)
    full = config.graph.stage3_init == "full"
    with locked(cached, wait=True) if cached is not None else contextlib.nullcontext():
        # (waits while another process computes the same stage 1)
        if cached is not None and all((cached / f).is_file() for f in _cache_files(full)):
            # graph methods sharing a seed and budget share stage 1 (e.g. GHN, Panacea, SHN in a suite)
            embeddings, stage1_summary, hn_state = _read_stage1_cache(cached, config.device, full)
            log.info("stage 1 reused from %s", cached)
        else:
            stage1_built = build(stage1_cfg, task=task, held_out=held_out)
            stage1_built.context.extras["after_training"] = []  # stage 1 only supplies embeddings (no novel-client fit)
            if cached is not None:  # the cache holds this very run (its key is the config): continue what is there
                found = any((cached / f).is_file() for f in ("checkpoint.pt", "checkpoint.prev.pt"))
                stage1 = execute(stage1_built, run_dir=cached, resume=found, overwrite=not found, progress=progress)
            else:
                stage1 = execute(stage1_built, run_dir=sub("stage1_pfedhn"), resume=resume, overwrite=overwrite,
                                 progress=progress, ignore=STAGE1_IGNORES)
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
    if drift["off_scale_change"] < EMBEDDING_DRIFT_WARNING:
        log.warning("stage-1 embeddings moved by %.2g %% of their norm beyond a rescaling (what weight decay alone "
                    "does): the inferred graph mostly reflects their random initialisation; train stage 1 longer "
                    "or with a larger server.embed_lr", 100 * drift["off_scale_change"])

    # Stage 2: the client-relation graph from the learned embeddings.
    graph = infer_graph(config, task, embeddings, pool)
    diagnostics = describe_graph(graph, task)
    if root is not None:
        (root / "stage2_graph").mkdir(parents=True, exist_ok=True)
        graph.save(root / "stage2_graph" / "graph.json")
        torch.save(embeddings.cpu(), root / "stage2_graph" / "embeddings.pt")
        atomic_write_text(root / "stage2_graph" / "graph_summary.json", dumps_json(diagnostics, indent=2) + "\n")
        atomic_write_text(root / "stage2_graph" / "clients.json", dumps_json(client_info(task)) + "\n")

    # Stage 3: the graph method, embeddings warm-started from stage 1.
    built = build(config, task=task, graph=graph, warm_embeddings=embeddings, held_out=held_out,
                  warm_hypernetwork=hn_state if full else None)
    if getattr(built.algorithm, "privacy", None) is not None:  # [privacy]: ε composes over both stages
        built.algorithm.privacy.prior_steps = stage1_rounds
    stage3_dir = sub(f"stage3_{config.method}")
    if stage3_dir is not None:
        stage3_dir.mkdir(parents=True, exist_ok=True)
        graph.save(stage3_dir / "graph.json")
    result = execute(built, run_dir=stage3_dir, resume=resume, overwrite=overwrite, progress=progress,
                     on_eval=on_eval, ignore=STAGE3_IGNORES)
    result.summary["graph"] = diagnostics
    result.summary["stage1_metrics"] = stage1_metrics
    result.summary["pipeline"] = {"stage1_rounds": stage1_rounds, "graph_kind": config.graph.kind,
                                  "k": config.graph.k, "stage3_init": config.graph.stage3_init}
    result.summary["stage1_embedding_drift"] = drift
    stage3_updates = int(result.summary.get("budget", {}).get("client_updates", 0))
    stage1_bytes = stage1_summary.get("budget", {}).get("bytes_total")
    if stage1_bytes is None:
        log.warning("the stage-1 cache entry predates byte counting: budget.bytes_total is unknown (null); "
                    "delete the entry to count it")
    stage3_bytes = int(result.summary.get("budget", {}).get("bytes_total", 0))
    result.summary["budget"] = {"client_updates": stage1_updates + stage3_updates,
                                "stage1_client_updates": stage1_updates, "stage3_client_updates": stage3_updates,
                                "bytes_total": None if stage1_bytes is None else int(stage1_bytes) + stage3_bytes,
                                "stage1_bytes_total": stage1_bytes, "stage3_bytes_total": stage3_bytes}
    if root is not None:
        write_summary(root, result.summary)
        if stage3_dir is not None:
            write_summary(stage3_dir, result.summary)
    return result


# below this relative off-scale change the stage-1 embeddings have barely learnt (see embedding_drift)
EMBEDDING_DRIFT_WARNING = 1e-2


def _cache_files(full: bool) -> list[str]:
    return ["embeddings.pt", "summary.json"] + (["hypernetwork.pt"] if full else [])


def _read_stage1_cache(cached: Path, device: str, full: bool):
    """(embeddings, summary, hypernetwork state or None) from a stage-1 cache entry; plain data
    only (``weights_only``), a broken entry is one CheckpointError line naming the file."""
    from shn.federated.records import CheckpointError

    def load(name: str):
        try:
            return torch.load(cached / name, map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable or unsafe: the same one line
            raise CheckpointError(f"{cached / name}: unreadable stage-1 cache entry ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0][:200]}); delete {cached} to recompute it") from None

    embeddings = load("embeddings.pt")
    try:
        summary = json.loads((cached / "summary.json").read_text(encoding="utf-8"))
        summary["metrics"]  # noqa: B018 - the one key read from it
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cached / 'summary.json'}: unreadable stage-1 cache entry ({e}); delete {cached} "
                              "to recompute it") from None
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise CheckpointError(f"{cached / 'embeddings.pt'}: not a stage-1 embedding matrix; delete {cached} to "
                              "recompute it")
    return embeddings, summary, load("hypernetwork.pt") if full else None


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
        with locked(cached, wait=True):  # (a pipeline elsewhere may be writing the same entry)
            if (cached / "embeddings.pt").is_file():
                return {}
            write_summary(cached, result.summary)
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
    if stage1_cfg.compression == CompressionConfig():  # keys (and caches) from before [compression] stay valid
        key.pop("compression", None)
    digest = hashlib.sha256((dumps_toml(key) + repr(sorted(held_out))).encode()).hexdigest()[:16]
    path = Path(config.graph.stage1_cache) / digest
    path.mkdir(parents=True, exist_ok=True)
    return path
