"""``run(config)``: what ``shn run`` does, from Python. Builds the task, the method and the
engine from a ``RunConfig``, runs it, and writes the run directory.

``run`` is the dispatch on top: a graph method whose graph is inferred goes through the
three-stage pipeline (:mod:`shn.pipeline`), any other run is built and executed by
:mod:`shn.build`, whose names are re-exported here. Also ``run_file``, ``load_run`` and
``torch_threads``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from shn.build import (
    Built,
    RunResult,
    build,
    client_templates,
    execute,
    make_summary,
    make_task,
    make_template,
    primary_metric,
    resolve_device,
)
from shn.config import RunConfig, load_config
from shn.federated.records import read_jsonl
from shn.federated.simulation import EvalCallback
from shn.pipeline import publish_stage1, run_pipeline
from shn.registry import METHODS
from shn.rundir import RunDirError, claim_early
from tasks.base import Task

__all__ = ["INFERRED_GRAPHS", "Built", "RunResult", "build", "client_templates", "execute", "load_run", "make_summary",
           "make_task", "make_template", "primary_metric", "resolve_device", "run", "run_file", "torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``n`` for the block (None: left alone), then restored."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run(config: RunConfig, *, task: Task | None = None, run_dir: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, on_eval: EvalCallback | None = None,
        **build_kwargs: Any) -> RunResult:
    """Run one federated experiment in-process; write ``run_dir`` when given.

    A ``run_dir`` holding a run is refused (:class:`shn.rundir.RunDirError`) unless ``resume``
    continues it (same training-relevant config; ``rounds`` may grow, which extends the run) or
    ``overwrite`` replaces it; the directory is locked while the run writes it."""
    entry = METHODS.get(config.method)
    if entry.meta.get("needs_graph") and build_kwargs.get("graph") is None and config.graph.kind in INFERRED_GRAPHS:
        return run_pipeline(config, task=task, run_dir=run_dir, resume=resume, overwrite=overwrite,
                            progress=progress, on_eval=on_eval)
    with claim_early(run_dir, config, resume=resume, overwrite=overwrite):  # a refusal before the build
        built = build(config, task=task, **build_kwargs)
        if config.graph.stage1_cache and build_kwargs.get("warm_embeddings") is None:
            publish = publish_stage1(config, built.context.held_out)
            if publish is not None:
                built.context.extras.setdefault("after_training", []).insert(0, publish)
        return execute(built, run_dir=run_dir, resume=resume, overwrite=overwrite, progress=progress,
                       on_eval=on_eval)


INFERRED_GRAPHS = ("knn", "threshold", "learned")


def run_file(path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> RunResult:
    return run(load_config(path, list(overrides)), **kwargs)


def load_run(run_dir: str | Path) -> RunResult:
    """Read a finished (or checkpointed) run directory back: config, summary, history, and the
    trained server state rebuilt from the last checkpoint."""
    from shn.federated.records import check_run_state, load_checkpoint_file, restoring

    run_path = Path(run_dir)
    cfg_path = run_path / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a shn run directory (no config.toml)")
    config = load_config(cfg_path)
    summary = _read_run_file(run_path / "summary.json", lambda p: json.loads(p.read_text(encoding="utf-8")), {})
    history = _read_run_file(run_path / "metrics.jsonl", read_jsonl, [])
    found = load_checkpoint_file(run_path)  # plain data only (weights_only): no code runs
    algorithm = None
    per_client: dict[int, dict[str, float]] = {}
    if found is not None:
        source, state = found
        check_run_state(state, source)
        graph = None
        graph_file = run_path / "graph.json"
        if graph_file.is_file():
            from shn.graph import ClientGraph

            graph = ClientGraph.load(graph_file)
        built = build(config, graph=graph)
        with restoring(source):
            built.algorithm.load_state_dict(state["algorithm"])
        algorithm = built.algorithm
        per_client = {int(k): v for k, v in state["per_client"].items()}
    return RunResult(config, summary, history, per_client, run_path, algorithm)


def _read_run_file(path: Path, read: Any, default: Any) -> Any:
    """A run directory's JSON file (``default`` when absent); a malformed one is one line."""
    if not path.is_file():
        return default
    try:
        return read(path)
    except (OSError, ValueError) as e:  # (not UTF-8, not JSON)
        raise RunDirError(f"{path}: not a readable run file ({type(e).__name__}: {str(e)[:200]})") from None
