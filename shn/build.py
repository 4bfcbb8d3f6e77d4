"""Build one run from a ``RunConfig`` — task, client graph, method, client runtime — and execute it
on the in-process engine (``build`` → ``Built`` → ``execute`` → ``RunResult``).

The three-stage pipeline (:mod:`shn.pipeline`) and ``run`` (:mod:`shn.runner`) are made of these
calls; this module imports neither of them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from shn.config import ConfigError, RunConfig, config_to_dict, dumps_toml
from shn.federated.algorithm import Algorithm, HyperNetworkAlgorithm
from shn.federated.client import ClientRuntime, PersonalStore
from shn.federated.client_method import ClientMethod
from shn.federated.compression import ClientUpload
from shn.federated.local import ClientStore, LocalTrainer
from shn.federated.attacks import ClientAttack
from shn.federated.privacy import enable_privacy
from shn.federated.records import atomic_write_text, mean_over_clients
from shn.federated.simulation import EvalCallback, RoundFaults, Simulation, nonfinite_clients, write_summary
from shn.methods import MethodContext
from shn.registry import METHODS, TASKS
from shn.run_graph import describe_graph, resolve_graph
from shn.rundir import claim
from shn.seeding import seeded_init
from shn.target import ParamSpec, block_index, fits, module_params, nests_in
from tasks.base import Task
from tasks.datasets import DataError

log = logging.getLogger("shn.build")

__all__ = ["Built", "RunResult", "after_training", "build", "client_templates", "execute", "make_summary", "make_task",
           "make_template", "primary_metric", "resolve_device"]


@dataclass
class RunResult:
    """What a run returns: the summary (as in ``summary.json``), one record per evaluation,
    each client's final metrics, and the trained server state."""

    config: RunConfig
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    per_client: dict[int, dict[str, float]]
    run_dir: Path | None = None
    algorithm: Algorithm | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary["metrics"]


@dataclass
class Built:
    """Everything a run is made of (engines compose these)."""

    config: RunConfig
    task: Task
    context: MethodContext
    algorithm: Algorithm
    runtime: ClientRuntime


def make_task(config: RunConfig) -> Task:
    entry = TASKS.get(config.task.name)
    options = config.task.options
    if options is None and entry.options is not None:
        options = entry.options()  # RunConfig built in Python with TaskConfig("name") only
    try:
        return entry.factory(options, seed=config.seed)
    except (ConfigError, DataError):
        raise
    except ValueError as e:  # a task option the data cannot satisfy (classes_per_client, num_clients, ...)
        raise ConfigError(f"task: {e}") from e


def make_template(task: Task, seed: int, device: torch.device, client: int | None = None) -> torch.nn.Module:
    with seeded_init(seed, "target-init"):
        try:
            model = task.make_model(client)
        except ValueError as e:  # e.g. task.model = "pfedhn_cnn" for 8x8 images
            raise ConfigError(f"task: {e}") from e
        return model.to(device)


def resolve_device(name: str) -> torch.device:
    """``config.device`` as a torch device; a ConfigError if it is not one or is not available here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} but CUDA is not available on this machine; use device = \"cpu\"")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r} but MPS is not available on this machine; use device = \"cpu\"")
    return device


def client_templates(task: Task, seed: int, device: torch.device) -> dict[int, torch.nn.Module] | None:
    """Every client's own architecture (``task.make_model(client)``) when they differ, e.g. in
    input size; ``None`` when all clients share one (the usual case)."""
    models = {c: make_template(task, seed, torch.device("cpu"), c) for c in range(task.num_clients)}
    specs = {ParamSpec.from_module(m) for m in models.values()}
    if len(specs) == 1:
        return None
    return {c: m.to(device) for c, m in models.items()}


def widest_template(templates: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """The client architecture every other one nests in (each tensor a leading block of its
    own: the widest of width-scaled models), else client 0's: what the server's tensors follow."""
    specs = {c: ParamSpec.from_module(m) for c, m in templates.items()}
    for c, spec in specs.items():
        if all(nests_in(other, spec) for other in specs.values()):
            return templates[c]
    return templates[min(templates)]


def _personal_per_client(algorithm: Algorithm, templates: dict[int, torch.nn.Module], method: str,
                         nested: bool = False, widest: torch.nn.Module | None = None) -> dict[int, Any]:
    """Each client's initial personal tensors. The tensors the server shares must agree in
    shape, or — for a hypernetwork method on a task whose architectures nest (width
    multipliers) — be leading blocks of the server's, which each client receives and trains."""
    shared = algorithm.server_spec
    slices = nested and isinstance(algorithm, HyperNetworkAlgorithm)
    for c, m in templates.items():
        spec = ParamSpec.from_module(m)
        shapes = dict(zip(spec.names, spec.shapes))
        bad = [n for n, s in zip(shared.names, shared.shapes) if shapes.get(n) != s]
        if bad and slices and widest is not None:
            index, full = block_index(m, widest), dict(zip(shared.names, shared.shapes))
            if all(n in index and fits(index[n], full[n]) for n in bad):
                continue
        if bad and nested:
            raise ConfigError(
                f"method {method!r} shares {bad[:3]}, whose shapes differ between the clients' widths "
                f"(task.widths): only a hypernetwork method (pfedhn, ghn, shn, panacea) generates each width's "
                "tensors, or use method \"local\""
            )
        if bad:
            raise ConfigError(
                f"method {method!r} shares {bad} but client {c}'s model has other shapes there ({[shapes.get(n) for n in bad]}): "
                "the clients' architectures differ; keep those tensors personal (method \"decoupled\", or "
                "hypernetwork.personal_input = true for the hypernetwork methods)"
            )
    return {c: {k: v for k, v in module_params(m).items() if k in algorithm.personal_keys} for c, m in templates.items()}


def build(config: RunConfig, *, task: Task | None = None, graph: Any = None,
          warm_embeddings: torch.Tensor | None = None, held_out: Sequence[int] = (),
          store_clients: Sequence[int] | None = None, warm_hypernetwork: dict[str, torch.Tensor] | None = None) -> Built:
    """Build task, method and client runtime for ``config`` (no training yet)."""
    device = resolve_device(config.device)
    task = task if task is not None else make_task(config)
    _check_task(task, config)
    if not held_out:  # novel clients ([novel] fraction), the same set the pipeline holds out
        held_out = _held_out(config, task)
    templates = client_templates(task, config.seed, device)
    template = make_template(task, config.seed, device) if templates is None else widest_template(templates)
    ctx = MethodContext(config, task, template, device, graph=graph, warm_embeddings=warm_embeddings,
                        held_out=tuple(held_out), client_templates=templates, warm_hypernetwork=warm_hypernetwork)
    entry = METHODS.get(config.method)
    if entry.meta.get("needs_graph") and ctx.graph is None:
        ctx.graph = resolve_graph(config, task, held_out)
        described = describe_graph(ctx.graph, task)  # as the pipeline records an inferred graph
        ctx.after_training(lambda out: {"graph": described})
    algorithm = entry.factory(ctx)
    enable_privacy(algorithm, config)  # [privacy]: the Gaussian mechanism in the server step
    nested = bool(getattr(task, "nested_architectures", False))
    per_client = (_personal_per_client(algorithm, templates, config.method, nested, template)
                  if templates is not None else None)
    trainer = LocalTrainer(template, task.loss, config.local, templates=templates)
    attack = ClientAttack.from_config(config.attack, config.seed, task.num_clients)
    store = _client_store(task, store_clients, device, attack, config.seed)
    client = _client_method(ctx, config.method)
    personal = PersonalStore(algorithm.initial_personal(), per_client=per_client, state=client.initial_state(ctx.initial))
    runtime = ClientRuntime(task, trainer, store, personal, method=client,
                            upload=ClientUpload.from_config(config.compression, algorithm.server_spec))
    runtime.attack = attack
    _faults_and_attack_reports(ctx, attack)
    return Built(config, task, ctx, algorithm, runtime)


def _client_method(ctx: MethodContext, method: str) -> ClientMethod:
    """The method's client side (``ctx.client``, set by its factory), checked: a ClientMethod
    whose personal state does not shadow a target tensor."""
    client = ctx.client if ctx.client is not None else ClientMethod()
    if not isinstance(client, ClientMethod):
        raise TypeError(f"method {method!r} set ctx.client to {type(client).__name__}, expected a "
                        "shn.federated.client_method.ClientMethod")
    clash = sorted(set(client.initial_state(ctx.initial)) & set(ctx.spec.names))
    if clash:
        raise ValueError(f"method {method!r}: its client state names {clash[:3]} are target tensor names; prefix them")
    return client


def _client_store(task: Task, clients: Sequence[int] | None, device: torch.device, attack: ClientAttack | None,
                  seed: int) -> ClientStore:
    """The run's ClientStore; ``[attack] kind = "label_flip"`` permutes the malicious clients'
    train labels here (the task itself is untouched)."""
    if attack is None or attack.kind != "label_flip":
        return ClientStore.from_task(task, clients, device)
    clients = range(task.num_clients) if clients is None else clients
    data = {int(c): task.client_data(int(c)) for c in clients}
    return ClientStore(attack.poison(data, seed, getattr(task, "num_classes", None)), device)


def _faults_and_attack_reports(ctx: MethodContext, attack: ClientAttack | None) -> None:
    """``[faults] dropout`` → the engine's RoundFaults; with an ``[attack]``, the summary lists
    the malicious clients and the honest clients' mean test metrics."""
    if ctx.config.faults.dropout > 0:
        ctx.extras.setdefault("faults", RoundFaults(dropout=ctx.config.faults.dropout))
    if attack is None:
        return
    malicious = sorted(attack.malicious)

    def report(result: RunResult) -> dict[str, Any]:
        honest = {c: row for c, row in result.per_client.items() if int(c) not in attack.malicious}
        means = mean_over_clients({c: {k: v for k, v in row.items() if k.startswith("test_")} for c, row in honest.items()})
        return {"attack": attack.kind, "malicious_clients": malicious, **{f"honest_{k}": v for k, v in means.items()}}

    ctx.extras.setdefault("after_training", []).append(report)


def _check_task(task: Task, config: RunConfig) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"{type(task).__name__} does not implement the tasks.base.Task protocol")
    if task.num_clients < 1:
        raise ValueError(f"task {task.name!r} has no clients")
    if config.clients_per_round > task.num_clients:
        raise ConfigError(
            f"clients_per_round: {config.clients_per_round} is more than the task's {task.num_clients} clients"
        )


def primary_metric(task: Task) -> tuple[str, str]:
    """(metric name, "max" | "min") used for model selection on the validation split."""
    return getattr(task, "primary_metric", ("accuracy", "max"))


def execute(built: Built, *, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            on_eval: EvalCallback | None = None, pool: Sequence[int] | None = None, overwrite: bool = False,
            ignore: tuple[str, ...] = ()) -> RunResult:
    """Run ``built`` on the in-process engine. With ``run_dir``: the directory is locked for the
    run and checked before anything is written (:func:`shn.rundir.claim`: a finished or
    unfinished run there is refused unless ``resume`` continues it — with the same
    training-relevant config, keys under ``ignore`` aside — or ``overwrite`` replaces it)."""
    run_path = Path(run_dir) if run_dir is not None else None
    if run_path is None:
        return _execute(built, None, resume, progress, on_eval, pool)
    with claim(run_path, built.config, resume=resume, overwrite=overwrite, ignore=ignore):
        atomic_write_text(run_path / "config.toml", dumps_toml(config_to_dict(built.config)))
        return _execute(built, run_path, resume, progress, on_eval, pool)


def _execute(built: Built, run_path: Path | None, resume: bool, progress: bool, on_eval: EvalCallback | None,
             pool: Sequence[int] | None) -> RunResult:
    config = built.config
    held = set(built.context.held_out)
    pool = [c for c in range(built.task.num_clients) if c not in held] if pool is None else list(pool)
    sim = Simulation(config, built.algorithm, built.runtime, pool=pool, run_dir=run_path, progress=progress,
                     on_eval=on_eval, faults=built.context.extras.get("faults"))
    t0 = time.perf_counter()
    result = sim.run(resume=resume)
    summary = make_summary(config, built.task, result.history, result.per_client, result.rejected_updates,
                           result.failed_clients, result.wall_time_s)
    summary.update(result.extra)  # the engine's own reports ([privacy]: ε spent)
    summary["communication"] = sim.traffic.summary(config.compression)
    out = RunResult(config, summary, result.history, result.per_client, run_path, built.algorithm,
                    {"simulation": sim, "built": built, "runtime": built.runtime, "elapsed": time.perf_counter() - t0})
    after_training(built, out)
    if run_path is not None:
        write_summary(run_path, summary)
    return out


def after_training(built: Built, out: RunResult, tolerate: tuple[type[Exception], ...] = ()) -> list[str]:
    """Run the method's after-training steps (novel clients, encoder energy, ...) into
    ``out.summary``, in order. A step raising one of ``tolerate`` fails alone: logged, its message
    returned; any other error propagates. Both engines call this."""
    failed: list[str] = []
    for hook in built.context.extras.get("after_training", []):
        try:
            out.summary.update(hook(out))
        except tolerate as e:
            log.warning("an after-training step failed: %s", e)
            failed.append(str(e))
    return failed


def make_summary(config: RunConfig, task: Task, history: list[dict[str, Any]], per_client: dict[int, dict[str, float]],
                 rejected: int, failed: int, wall_time: float) -> dict[str, Any]:
    last = history[-1] if history else {}
    name, mode = primary_metric(task)
    key = f"val_{name}"
    scored = [h for h in history if key in h and math.isfinite(h[key])]
    best = (max if mode == "max" else min)(scored, key=lambda h: h[key]) if scored else last
    strip = lambda rec: {k: v for k, v in rec.items() if k not in ("round", "elapsed_s", "client_updates")}  # noqa: E731
    # forecasting tasks: naive forecasts on the same test targets, so no report hides a model worse than them
    extra = {"baselines": task.naive_baselines()} if callable(getattr(task, "naive_baselines", None)) else {}
    return {
        "method": config.method,
        "task": task.name,
        "seed": config.seed,
        "rounds": config.rounds,
        "num_clients": task.num_clients,
        "primary_metric": f"test_{name}",
        "metrics": strip(last),
        "best_val": {"round": best.get("round"), "metrics": strip(best)},
        "per_client": {str(c): {k: v for k, v in row.items() if k.startswith("test_")} for c, row in sorted(per_client.items())},
        "budget": {"client_updates": int(last.get("client_updates", 0)), "bytes_total": int(last.get("bytes_total", 0))},
        "rejected_updates": rejected,
        "failed_clients": failed,
        "nonfinite_clients": nonfinite_clients(per_client, name),  # left out of the means
        "wall_time_s": round(wall_time, 3),
        **extra,
    }


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
