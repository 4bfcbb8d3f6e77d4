"""The Flower engine: any registered ``shn`` method as a Flower ``ServerApp`` + ``ClientApp``.

Nothing about a method is written here. The ServerApp drives the same ``Algorithm`` /
``Server`` / ``ClientSampler`` objects as the in-process engine (it *is* a
:class:`shn.federated.simulation.Simulation` whose round and evaluation go over the grid), and the
ClientApp runs the same :class:`shn.federated.client.ClientRuntime` over a store that holds only
its own partition. With the same config and seed, the numbers equal the in-process engine's.

Protocol (Flower Message API, one SuperNode = one client, identity = ``partition-id``):

* ``query``: the client replies with its ``context.node_config["partition-id"]`` (identity is
  the partition id, never the random node id). It loads nothing: a deployed SuperNode starts a
  fresh process per message, and ``flower_app`` answers this one without importing torch. The
  ServerApp checks the claims (:mod:`shn.flower.identity`): a partition claimed by two nodes is
  used by neither, and with ``partition-map`` a node may only be the client the map binds it to.
* ``train``: per sampled client, its personalised weights (``algorithm.weights_for``; with
  ``task.widths`` only its architecture's block, :mod:`shn.federated.blocks`) as the
  ArrayRecord ``"arrays"`` and a ConfigRecord ``"config"`` (round, client, its slot in the round's
  cohort, cohort size, config text). The client trains with the round's generator
  (``torch_generator(seed, "local-training", round)``, its column of the cohort's draw) and replies
  with the ArrayRecord ``"delta"`` (sent − trained, or its compressed form with ``[compression]``:
  :mod:`shn.federated.compression`) and a MetricRecord ``"metrics"`` (``num-examples``,
  ``train-loss``, ``partition-id``). The server decodes the delta, then replies go through
  ``Server.receive``: validated exactly as in-process. The ArrayRecords' ``count_bytes()`` are
  the run's ``bytes_down`` / ``bytes_up`` (:mod:`shn.federated.traffic`; equal to in-process). A client that errors or does not answer within
  ``round-timeout`` is counted in ``failed_clients``; the round completes with the others.
* ``evaluate``: every ``eval_every`` rounds, every client gets its weights and replies with its
  val/test metrics; the record is the mean over clients, as in-process. Replies are validated
  (:func:`shn.federated.validation.validate_metrics`: the task's metric names only, finite,
  within each metric's range); a rejected one is logged and counted in ``rejected_evaluations``.
* Every ``train`` and ``evaluate`` config also carries ``run-key``, ``resumed-from`` and
  ``checkpoint-round``: what a client with a state directory needs to keep its state on disk
  and restore it when the run is resumed (:mod:`shn.flower.client_state`).
* After training, the method's after-training steps run as in-process, their client work over
  the grid (:class:`GridRuntime`): a held-out client's embedding fit (``[novel]``) is ``train``
  messages with ``novel-step`` (the node trains with that step's stream and replies with its
  delta, validated like a round's update), its evaluation ``evaluate`` messages. A held-out
  client that does not answer fails that step alone (``after_training_failed`` in the summary).

Personal tensors (FedPer heads, personal input layers, Local's whole model) and a client method's
personal state (Ditto's personal model; :mod:`shn.federated.client_method`) live in the node's
``context.state`` (ArrayRecord ``shn.personal.<client>``) and are never sent; so is a client's
error-feedback residual with ``[compression]`` (``shn.residual.<client>``). The ClientApp
(:mod:`shn.flower.client_app`) runs the method's client side through the same ``ClientRuntime``
as in-process.

Run config (``[tool.flwr.app.config]`` of ``flower_app/pyproject.toml``, ``--run-config``):

==================  =======================================================================
``config``          TOML run config (as for ``shn run``); relative paths are looked up in the
                    Flower app directory, then the ServerApp's working directory. "" = defaults.
``overrides``       space-separated ``KEY=VALUE`` items, exactly like ``shn run --set``
                    (``"rounds=2 server.lr=0.01 task.num_clients=4"``).
``num-rounds``      ``rounds`` (0 = the config's).
``run-dir``         run directory (metrics.jsonl, config.toml, summary.json, checkpoint);
                    "" = ``runs/flower/<method>-<task>-seed<seed>`` under the ServerApp's cwd.
``min-nodes``       clients to wait for before round 1 (0 = every client of the task).
``node-timeout``    seconds to wait for them.
``round-timeout``   seconds to wait for the replies of one round (or evaluation chunk).
``partition-map``   TOML file ``"<node id>" = <partition>`` binding clients to node ids (looked
                    up like ``config``); "" = none (contested partitions are dropped).
``overwrite``       replace a run found in ``run-dir`` (else it is refused).
``resume``          continue the run in ``run-dir`` from its checkpoint (as ``shn run --resume``).
``client-state-dir`` read by the ClientApps: where they keep their state for ``resume`` (a
                    node's own ``state-dir`` node config wins); "" = ``context.state`` only.
==================  =======================================================================

Any other key given programmatically (``make_server_app`` defaults, tests) is an override too:
``"server.lr" = 0.01``; dashes become underscores (``"local.batch-size"``). Flower itself only
accepts ``--run-config`` keys that the app's pyproject declares, hence ``overrides``.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from flwr.app import ConfigRecord, RecordDict
from flwr.common.logger import log as flwr_log
from flwr.serverapp import ServerApp

from shn.build import after_training
from shn.config import ConfigError, RunConfig, apply_overrides, config_from_dict, read_config
from shn.federated.algorithm import eval_weights
from shn.federated.client import FitResult
from shn.federated.records import atomic_write_text
from shn.federated.simulation import RoundFaults, Simulation, write_summary
from shn.federated.validation import UnreadableUpdate, expected_metric_keys, safe_validate_update, validate_metrics
from shn.flower.client_app import (  # noqa: F401 - the ClientApp's names, re-exported
    PERSONAL_PREFIX,
    RESIDUAL_PREFIX,
    StatePersonal,
    arrays,
    client_built,
    config_text,
    handle_evaluate,
    handle_query,
    handle_train,
    make_client_app,
    partition_id,
)
from shn.flower.client_state import run_key
from shn.flower.grid import InProcessGrid
from shn.flower.identity import discover_clients, load_partition_map
from shn.flower.identity import message as _message
from shn.plugins import load_from_env
from shn.registry import METHODS
from shn.rundir import claim
from shn.runner import INFERRED_GRAPHS, Built, RunResult, build, make_summary, make_task

log = logging.getLogger("shn.flower")

# The keys of [tool.flwr.app.config] (flwr refuses --run-config keys the app does not declare).
RUN_CONFIG_DEFAULTS: dict[str, Any] = {
    "config": "",
    "overrides": "",
    "num-rounds": 0,
    "run-dir": "",
    "min-nodes": 0,
    "node-timeout": 300.0,
    "round-timeout": 600.0,
    "partition-map": "",
    "overwrite": False,
    "resume": False,
    "client-state-dir": "",
}
ENGINE_KEYS = ("run-dir", "min-nodes", "node-timeout", "round-timeout", "partition-map", "overwrite", "resume")
CLIENT_KEYS = ("client-state-dir",)  # read by the ClientApps (context.run_config), not the server

EVAL_CHUNK = 64  # clients per evaluation exchange (the in-process engine's chunk: same numbers)


# ----------------------------------------------------------------------------------------------
# run config -> RunConfig

@dataclass(frozen=True)
class EngineSettings:
    run_dir: Path | None = None  # None: runs/flower/<method>-<task>-seed<seed>
    min_nodes: int = 0  # 0: every client of the task
    node_timeout: float = 300.0
    round_timeout: float = 600.0
    partition_map: Path | None = None  # None: no binding of partitions to node ids
    overwrite: bool = False  # replace a run found in run_dir (else it is refused: shn.rundir)
    resume: bool = False  # continue the run in run_dir from its checkpoint (as shn run --resume)


def resolve_run_config(run_config: Mapping[str, Any], app_dir: str | Path | None = None) -> tuple[RunConfig, EngineSettings]:
    """Map a Flower run config onto the ``RunConfig`` dataclasses (see the module docstring)."""
    rc = {**RUN_CONFIG_DEFAULTS, **dict(run_config)}
    data: dict[str, Any] = {}
    path = str(rc.pop("config") or "").strip()
    if path:
        data = read_config(_find_config(path, app_dir, "config"))
    overrides = shlex.split(str(rc.pop("overrides") or ""))
    data = apply_overrides(data, overrides)
    rounds = int(rc.pop("num-rounds") or 0)
    if rounds:
        data["rounds"] = rounds
    engine = {k: rc.pop(k) for k in ENGINE_KEYS}
    for key in CLIENT_KEYS:
        rc.pop(key)
    for key, value in rc.items():  # extra dotted keys: typed overrides
        node = data
        parts = [p.replace("-", "_") for p in str(key).split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"run config {key!r}: {p!r} is not a table")
        node[parts[-1]] = value
    config = config_from_dict(data)
    run_dir = str(engine["run-dir"] or "").strip()
    partition_map = str(engine["partition-map"] or "").strip()
    for key in ("overwrite", "resume"):
        if not isinstance(engine[key], bool):
            raise ConfigError(f"run config {key!r}: expected true or false, got {engine[key]!r}")
    if engine["overwrite"] and engine["resume"]:
        raise ConfigError("run config: 'overwrite' and 'resume' exclude each other (replace the run, or continue it)")
    settings = EngineSettings(
        run_dir=Path(run_dir) if run_dir else None,
        min_nodes=int(engine["min-nodes"]),
        node_timeout=float(engine["node-timeout"]),
        round_timeout=float(engine["round-timeout"]),
        partition_map=_find_config(partition_map, app_dir, "partition-map") if partition_map else None,
        overwrite=engine["overwrite"],
        resume=engine["resume"],
    )
    return config, settings


def _find_config(path: str, app_dir: str | Path | None, key: str = "config") -> Path:
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else ([Path(app_dir) / p] if app_dir else []) + [Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"run config {key!r}: {path!r} not found (looked in {', '.join(map(str, candidates))})")


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / "flower" / f"{config.method}-{config.task.name}-seed{config.seed}"


# ----------------------------------------------------------------------------------------------
# the server

class FlowerSimulation(Simulation):
    """The in-process loop (evaluation schedule, metrics log, checkpoints, history records)
    with its two engine steps, a round and an evaluation, done over a Flower ``Grid``."""

    def __init__(self, config: RunConfig, built: Built, grid: Any, nodes: Mapping[int, int], *,
                 pool: Sequence[int], round_timeout: float = 600.0, run_dir: Path | None = None,
                 on_eval: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        super().__init__(config, built.algorithm, built.runtime, pool=pool, run_dir=run_dir, progress=False,
                         on_eval=on_eval, faults=built.context.extras.get("faults") or RoundFaults(),
                         eval_chunk=EVAL_CHUNK)
        self.grid = grid
        self.nodes = dict(nodes)  # client (partition id) -> node id
        self.round_timeout = round_timeout
        self.text = config_text(config)
        self.failed_evaluations = 0
        self.rejected_evaluations = 0  # evaluation replies that failed validate_metrics
        self._expected: frozenset[str] | None = None  # the task's metric names (computed once)
        self.run_key = run_key(config)  # names the clients' state snapshots (shn.flower.client_state)
        self.resumed_from = 0  # the checkpoint round a resumed run continues from (0: a fresh run)
        self._round = 0  # the round being run (its messages name the last checkpoint before it)

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self.resumed_from = int(state["round"])

    def _resumption(self) -> dict[str, Any]:
        """What every message tells the client about its state on disk: the run's key, the round
        a resumed run continues from, and the last checkpoint (snapshots before it may go)."""
        every = self.config.checkpoint_every if self.run_dir is not None else 0
        last = ((self._round - 1) // every) * every if every and self._round > 0 else 0
        return {"run-key": self.run_key, "resumed-from": self.resumed_from,
                "checkpoint-round": max(self.resumed_from, last)}

    def _send(self, kind: str, group: str, clients: Sequence[int], weights: Mapping[str, Tensor],
              extra: Callable[[int], dict[str, Any]]) -> tuple[dict[int, Any], dict[int, int]]:
        """One exchange: ``{client: reply content}`` for the clients that answered without error,
        and ``{client: bytes of the weights sent}`` (Flower's ``count_bytes``: shn.federated.traffic)."""
        msgs = []
        sent: dict[int, int] = {}
        for i, c in enumerate(clients):
            cfg = ConfigRecord({"client": int(c), "shn-config": self.text, **self._resumption(), **extra(i)})
            record = arrays(self.blocks.send(c, {k: v[i] for k, v in weights.items()}))  # its block
            sent[int(c)] = record.count_bytes()
            content = RecordDict({"arrays": record, "config": cfg})
            msgs.append(_message(content, self.nodes[c], kind, group))
        by_node: dict[int, Any] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.round_timeout):
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("%s %s: node %d replied with error %s: %s", kind, group, node, reply.error.code,
                            reply.error.reason)
                continue
            by_node[node] = reply.content
        out = {c: by_node.get(self.nodes[c]) for c in clients}
        missing = [c for c, v in out.items() if v is None]
        if missing:
            log.warning("%s %s: no reply from clients %s", kind, group, missing)
        return {c: v for c, v in out.items() if v is not None}, sent

    def run_round(self, round_: int) -> dict[str, float]:
        self._round = round_
        clients = self.round_clients(round_)
        if not clients:
            return {"accepted": 0.0, "rejected": 0.0}
        self.client_updates += len(clients)  # the budget, counted as in-process (clients asked to train)
        weights = self.server.weights_for(clients)
        cohort = len(clients)
        replies, sent = self._send("train", str(round_), clients, weights,
                                   lambda i: {"round": round_, "slot": i, "cohort": cohort})
        ok, deltas, counts, losses = [], [], [], []
        for c in clients:
            self.traffic.sent(c, sent[c])
            if c not in replies:
                self.failed += 1
                continue
            payload, nbytes, n, loss = _parse_fit(replies[c])
            self.traffic.received(c, nbytes)
            ok.append(c)
            deltas.append(payload if isinstance(payload, UnreadableUpdate) else self.blocks.receive(c, payload))
            counts.append(n)
            if loss is not None:
                losses.append(loss)
        if losses:  # as in-process: the float32 mean over the round's clients
            self._train_losses.append(float(torch.tensor(losses, dtype=torch.float32).mean()))
        if not ok:
            return {"accepted": 0.0, "rejected": 0.0}
        return self.server.receive(round_, ok, deltas, counts)

    def evaluate(self, clients: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
        clients = self.pool if clients is None else list(clients)
        out: dict[int, dict[str, float]] = {}
        for s in range(0, len(clients), self.eval_chunk):
            chunk = clients[s:s + self.eval_chunk]
            out.update(self.evaluate_weights(chunk, eval_weights(self.algorithm, chunk), f"eval-{s}"))
        return out

    def evaluate_weights(self, clients: Sequence[int], weights: Mapping[str, Tensor],
                         group: str = "eval") -> dict[int, dict[str, float]]:
        """Each client's checked val/test metrics with ``weights {name: [C, *shape]}``; a client
        that does not answer, or whose report is rejected, is counted and left out."""
        out: dict[int, dict[str, float]] = {}
        replies, _ = self._send("evaluate", group, clients, weights, lambda i: {})
        for c in clients:
            if c not in replies:
                self.failed_evaluations += 1
                continue
            row, reason = self._checked_metrics(c, replies[c])
            if reason is not None:
                self.rejected_evaluations += 1
                log.warning("rejected the evaluation report of client %d: %s", c, reason)
            else:
                out[c] = row
        return out

    def fit_novel(self, client: int, weights: Mapping[str, Tensor], step: int) -> FitResult:
        """Step ``step`` of a held-out client's embedding fit (:mod:`shn.novel`) on its node; its
        delta is validated as a round's update is. Raises when the client does not answer or its
        reply is rejected (the after-training step then fails alone)."""
        replies, _ = self._send("train", f"novel-{client}-{step}", [client], weights,
                                lambda i: {"round": 0, "slot": 0, "cohort": 1, "novel-step": int(step)})
        if client not in replies:
            raise ClientUnavailable(f"novel client {client} did not answer step {step} of its fit")
        payload, _, n, loss = _parse_fit(replies[client])
        if not isinstance(payload, UnreadableUpdate):
            payload = self.blocks.receive(client, payload, compressed=False)
        spec = self.algorithm.server_spec
        reason = safe_validate_update(spec, payload, n, self.config.validation.max_norm)
        if reason is not None:
            raise ClientUnavailable(f"novel client {client}, step {step}: update rejected ({reason})")
        return FitResult({k: payload[k][None] for k in spec.names}, torch.tensor([int(n)]),
                         torch.tensor([loss if loss is not None else math.nan]))

    def _checked_metrics(self, client: int, content: Any) -> tuple[dict[str, float], str | None]:
        """A reply's metrics as floats, or the reason they are rejected (nothing a client
        reports reaches the record unchecked)."""
        if self._expected is None:
            trainer = self.runtime.trainer
            self._expected = expected_metric_keys(self.runtime.task, trainer.template_for, self.pool,
                                                  self.config.device)
        try:
            row = dict(content["metrics"].items())
        except Exception as e:  # noqa: BLE001 - malformed reply
            return {}, f"unreadable reply ({type(e).__name__}: {str(e)[:200]})"
        reason = validate_metrics(row, self._expected, client)
        if reason is not None:
            return {}, reason
        return {k: float(v) for k, v in row.items() if k != "partition-id"}, None


def _parse_fit(content: Any) -> tuple[Any, int, Any, float | None]:
    """(payload, its bytes, num_examples, loss) from a train reply; anything malformed is passed
    on as is, so that ``Server.receive`` rejects it (nothing reaches the algorithm unchecked)."""
    nbytes = 0
    try:
        record = content["delta"]
        nbytes = int(record.count_bytes())
        payload: Any = dict(record.to_torch_state_dict())
    except Exception as e:  # noqa: BLE001 - malformed reply: let validation name it
        payload = UnreadableUpdate(f"unreadable delta ({type(e).__name__}: {str(e)[:200]})")
    try:
        metrics = content["metrics"]
        n = metrics["num-examples"]
        loss = metrics.get("train-loss")
        loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
    except Exception:  # noqa: BLE001
        n, loss = None, None
    return payload, nbytes, n, loss


def run_federation(grid: Any, config: RunConfig, settings: EngineSettings = EngineSettings()) -> RunResult:
    """The ServerApp's body: discover clients, run ``config.rounds`` rounds, run the method's
    after-training steps (novel clients, encoder energy, ...), write the run directory (locked
    for the run; a run already there is refused unless ``settings.resume`` continues it from its
    checkpoint, as ``shn run --resume``, or ``settings.overwrite`` replaces it)."""
    run_dir = settings.run_dir or default_run_dir(config)
    with claim(run_dir, config, resume=settings.resume, overwrite=settings.overwrite):
        return _run_federation(grid, config, settings, run_dir)


def _run_federation(grid: Any, config: RunConfig, settings: EngineSettings, run_dir: Path) -> RunResult:
    entry = METHODS.get(config.method)
    if entry.meta.get("needs_graph") and config.graph.kind in INFERRED_GRAPHS:
        raise ConfigError(
            f"graph.kind = {config.graph.kind!r}: the Flower engine runs one stage; infer the graph first "
            "(shn pipeline, or a pFedHN stage) and pass it with graph.kind = \"given\" and graph.path, "
            "or use graph.kind = \"complete\""
        )
    t0 = time.perf_counter()
    built = build(config, store_clients=[])  # the server holds no client data
    task = built.task
    held = set(built.context.held_out)
    wanted = [c for c in range(task.num_clients) if c not in held]
    min_nodes = min(settings.min_nodes or task.num_clients, task.num_clients)
    text = config_text(config)
    bound = load_partition_map(settings.partition_map, task.num_clients) if settings.partition_map else None
    # held-out clients are nodes too: they join after training ([novel])
    nodes = discover_clients(grid, text, range(task.num_clients), min_nodes, settings.node_timeout, partition_map=bound)
    pool = sorted(c for c in nodes if c not in held)
    if pool != wanted:
        log.warning("training on partitions %s of the task's %d clients", pool, len(wanted))
    atomic_write_text(run_dir / "config.toml", text)

    def on_eval(r: int, record: dict[str, Any]) -> None:
        shown = {k: round(v, 4) for k, v in record.items() if isinstance(v, float)}
        flwr_log(logging.INFO, "shn: round %d/%d %s", r, config.rounds, shown)

    sim = FlowerSimulation(config, built, grid, nodes, pool=pool, round_timeout=settings.round_timeout,
                           run_dir=run_dir, on_eval=on_eval)
    result = sim.run(resume=settings.resume)
    summary = make_summary(config, task, result.history, result.per_client, result.rejected_updates,
                           result.failed_clients, result.wall_time_s)
    summary.update(result.extra)  # the engine's own reports ([privacy]: ε spent)
    summary["engine"] = "flower"
    summary["communication"] = sim.traffic.summary(config.compression)
    out = RunResult(config, summary, result.history, result.per_client, run_dir, built.algorithm,
                    {"simulation": sim, "built": built, "runtime": GridRuntime(sim), "elapsed": time.perf_counter() - t0})
    failed_steps = after_training(built, out, tolerate=(ClientUnavailable,))  # a client gone fails its step alone
    if failed_steps:
        summary["after_training_failed"] = failed_steps
    summary["failed_evaluations"] = sim.failed_evaluations
    summary["rejected_evaluations"] = sim.rejected_evaluations
    write_summary(run_dir, summary)
    flwr_log(logging.INFO, "shn: finished; summary in %s", run_dir / "summary.json")
    return out


class ClientUnavailable(RuntimeError):
    """A client an after-training step needs did not answer, or its reply was rejected."""


class GridRuntime:
    """The clients as after-training steps use them (:class:`shn.novel.ClientAccess`: what
    ``ClientRuntime`` offers in-process), each call a message exchange over the grid."""

    def __init__(self, sim: FlowerSimulation) -> None:
        self.sim = sim
        self.task = sim.runtime.task

    def fit_novel(self, client: int, server_weights: Mapping[str, Tensor], seed: int, step: int) -> FitResult:
        # the node draws the step's minibatches from the run's seed, which the config it gets carries
        return self.sim.fit_novel(client, server_weights, step)

    def evaluate(self, clients: Sequence[int], server_weights: Mapping[str, Tensor]) -> dict[int, dict[str, float]]:
        out = self.sim.evaluate_weights(list(clients), server_weights, "after-training")
        missing = [c for c in clients if c not in out]
        if missing:
            raise ClientUnavailable(f"clients {missing} did not report their evaluation")
        return out


def make_server_app(app_dir: str | Path | None = None, defaults: Mapping[str, Any] | None = None,
                    on_result: Callable[[RunResult], None] | None = None) -> Any:
    """The ``ServerApp``. ``defaults`` fill run-config keys the context lacks (``run_simulation``
    passes an empty run config); ``app_dir`` is where relative ``config`` paths are looked up."""
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        load_from_env()  # plugin methods / tasks / encoders: entry points and SHN_PLUGINS
        run_config = {**dict(defaults or {}), **dict(context.run_config or {})}
        config, settings = resolve_run_config(run_config, app_dir)
        result = run_federation(grid, config, settings)
        if on_result is not None:
            on_result(result)

    return app


# ----------------------------------------------------------------------------------------------
# the client: shn.flower.client_app

def run_in_process(config: RunConfig, *, run_dir: str | Path | None = None, client_app: Any = None,
                   grid: Any = None, overwrite: bool = False, resume: bool = False,
                   client_state_dir: str | Path | None = None) -> RunResult:
    """The Flower engine without Ray or a SuperLink: every ClientApp call made in this process
    (one Context per client). Same numbers as ``shn.runner.run`` for the same config. With
    ``client_state_dir`` the clients keep their state on disk too, so ``resume`` continues
    exactly (:mod:`shn.flower.client_state`)."""
    task = make_task(config)
    run_config = {"client-state-dir": str(client_state_dir)} if client_state_dir else None
    grid = grid or InProcessGrid(client_app or make_client_app(), task.num_clients, run_config=run_config)
    return run_federation(grid, config, EngineSettings(run_dir=Path(run_dir) if run_dir else None, overwrite=overwrite,
                                                       resume=resume))
