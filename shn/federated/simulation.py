"""The in-process engine: all clients in one process, each round's clients trained as a batch."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from shn.config import RunConfig
from shn.federated.algorithm import Algorithm, eval_weights
from shn.federated.client import ClientRuntime
from shn.federated.blocks import ClientBlocks
from shn.federated.records import (
    CheckpointError,
    MetricsLog,
    atomic_write_text,
    check_run_state,
    dumps_json,
    load_checkpoint_file,
    mean_over_clients,
    restoring,
    save_checkpoint,
)
from shn.federated.privacy import PrivacyAccountant
from shn.federated.server import ClientSampler, Server, unstack
from shn.federated.traffic import Traffic, payload_bytes
from shn.seeding import derive_seed, torch_generator

log = logging.getLogger("shn.simulation")

EvalCallback = Callable[[int, dict[str, Any]], None]


class DivergedError(RuntimeError):
    """The run's metrics went non-finite (NaN / inf): training diverged; the run stops."""


def non_finite_metrics(record: dict[str, Any], primary: str = "accuracy") -> list[str]:
    """The training loss and the val/test loss and primary metric of an evaluation record that
    are non-finite. A val/test value is a mean over clients, non-finite only when no client has a
    finite one: the model itself diverged (other metrics may be NaN when, e.g., a forecast
    horizon has no observed target)."""
    watched = {"train_loss", "val_loss", "test_loss", f"val_{primary}", f"test_{primary}"}
    return [k for k, v in record.items() if k in watched and isinstance(v, float) and not math.isfinite(v)]


def nonfinite_clients(per_client: Mapping[int, Mapping[str, float]], primary: str = "accuracy") -> list[int]:
    """The clients whose val/test loss or primary metric is non-finite. The means over clients
    leave them out; this is how a run reports them (``nonfinite_clients``) instead."""
    watched = {"val_loss", "test_loss", f"val_{primary}", f"test_{primary}"}
    return sorted(int(c) for c, row in per_client.items()
                  if any(k in watched and isinstance(v, float) and not math.isfinite(v) for k, v in row.items()))


@dataclass
class RoundFaults:
    """Per-round client faults injected by the engine (dropout), drawn from the run seed."""

    dropout: float = 0.0

    def surviving(self, seed: int, round_: int, clients: list[int]) -> list[int]:
        if self.dropout <= 0:
            return clients
        g = torch_generator(seed, "dropout", round_)
        alive = torch.rand(len(clients), generator=g) >= self.dropout
        return [c for c, a in zip(clients, alive.tolist()) if a]


@dataclass
class SimulationResult:
    history: list[dict[str, Any]]  # one record per evaluation (means over clients)
    per_client: dict[int, dict[str, float]]  # last evaluation, per client
    rejected_updates: int
    failed_clients: int
    wall_time_s: float
    rounds_run: int
    extra: dict[str, Any] = field(default_factory=dict)


class Simulation:
    """Runs ``config.rounds`` rounds of ``algorithm`` with ``runtime``'s clients.

    Evaluation every ``eval_every`` rounds (and after the last) on every training client's val
    and test split with its own personalised weights; a checkpoint every ``checkpoint_every``
    rounds and at the end (when a run directory is given); ``resume=True`` continues from the
    last checkpoint and gives exactly the numbers of an uninterrupted run. When an evaluation's
    metrics go non-finite the record is logged and :class:`DivergedError` raised. With
    ``[privacy]`` each record has ``epsilon`` (spent so far) and the result's ``extra`` a
    ``privacy`` block (:mod:`shn.federated.privacy`). Each round's
    uploads go through ``[compression]`` (:mod:`shn.federated.compression`) and are decoded here;
    the bytes each client receives and sends are counted (:mod:`shn.federated.traffic`) and
    every record carries the totals so far.
    """

    def __init__(self, config: RunConfig, algorithm: Algorithm, runtime: ClientRuntime, *,
                 pool: Sequence[int] | None = None, run_dir: Path | None = None, progress: bool = True,
                 on_eval: EvalCallback | None = None, faults: RoundFaults | None = None,
                 eval_chunk: int = 64) -> None:
        self.config = config
        self.algorithm = algorithm
        self.runtime = runtime
        self.pool = list(range(runtime.task.num_clients)) if pool is None else [int(c) for c in pool]
        self.server = Server(algorithm, config.validation, clients=self.pool)  # only training clients send updates
        self.sampler = ClientSampler(config.seed, self.pool, config.clients_per_round)
        mechanism = getattr(algorithm, "privacy", None)  # [privacy]: ε after each round
        self.accountant = (PrivacyAccountant(config.privacy, config.clients_per_round, len(self.pool),
                                             mechanism.prior_steps) if mechanism is not None else None)
        # the server decodes uploads; width-nested clients get and send only their block
        self.blocks = ClientBlocks(algorithm.server_spec, runtime.index_of, config.compression)
        self.traffic = Traffic()  # bytes to and from each client (shn.federated.traffic)
        self.run_dir = run_dir
        self.progress = progress
        self.on_eval = on_eval
        self.faults = faults or RoundFaults()
        self.eval_chunk = eval_chunk
        self.history: list[dict[str, Any]] = []
        self.per_client: dict[int, dict[str, float]] = {}
        self.failed = 0
        self.client_updates = 0
        self._train_losses: list[float] = []
        self._nonfinite: list[int] = []  # last reported, so each change is logged once

    # -- one round -------------------------------------------------------------------------
    def round_clients(self, round_: int) -> list[int]:
        """The round's sampled clients that did not fail (failures are counted)."""
        sampled = self.sampler.clients(round_)
        clients = self.faults.surviving(self.config.seed, round_, sampled)
        self.failed += len(sampled) - len(clients)
        return clients

    def run_round(self, round_: int) -> dict[str, float]:
        cfg = self.config
        clients = self.round_clients(round_)
        if not clients:
            return {"accepted": 0.0, "rejected": 0.0}
        self.client_updates += len(clients)
        weights = self.server.weights_for(clients)
        fit = self.runtime.fit(clients, weights, torch_generator(cfg.seed, "local-training", round_))
        self._train_losses.append(float(fit.loss.mean()))
        payloads = self.runtime.payloads(clients, fit.deltas, cfg.seed, round_)
        for c, payload in zip(clients, payloads):
            self.traffic.sent(c, self.blocks.down_bytes(c, weights))
            self.traffic.received(c, payload_bytes(payload))
        deltas = [self.blocks.receive(c, p) for c, p in zip(clients, payloads)]
        return self.server.receive(round_, clients, deltas, fit.num_examples.tolist())

    def evaluate(self, clients: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
        clients = self.pool if clients is None else list(clients)
        out: dict[int, dict[str, float]] = {}
        for s in range(0, len(clients), self.eval_chunk):
            chunk = clients[s:s + self.eval_chunk]
            out.update(self.runtime.evaluate(chunk, eval_weights(self.algorithm, chunk)))
        return out

    # -- the loop --------------------------------------------------------------------------
    def run(self, resume: bool = False) -> SimulationResult:
        cfg = self.config
        start_round, elapsed = 1, 0.0
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl") if self.run_dir else None
        if resume and self.run_dir is not None:
            found = load_checkpoint_file(self.run_dir)
            if found is not None:
                source, state = found
                check_run_state(state, source)
                if int(state["round"]) > cfg.rounds:  # (shn.rundir refuses this earlier, from config.toml)
                    raise CheckpointError(f"{source}: the checkpoint is at round {state['round']}, past this config's "
                                          f"rounds = {cfg.rounds}; a resumed run keeps or extends its rounds")
                with restoring(source):
                    self._load(state)
                start_round, elapsed = int(state["round"]) + 1, float(state["elapsed"])
                log.info("resuming %s from round %d", self.run_dir, start_round)
        if metrics_log is not None:
            metrics_log.reset(self.history)
        t0 = time.perf_counter() - elapsed
        bar = _progress(cfg.rounds, start_round - 1, self.progress, f"{cfg.method}/{cfg.task.name}")
        for r in range(start_round, cfg.rounds + 1):
            with round_rng(cfg.seed, r, cfg.device):
                self.run_round(r)
                bar.update(1)
                if r % cfg.eval_every == 0 or r == cfg.rounds:
                    record = self._evaluate_round(r, time.perf_counter() - t0)
                    if metrics_log is not None:
                        metrics_log.append(record)
                    bad = non_finite_metrics(record, getattr(self.runtime.task, "primary_metric", ("accuracy",))[0])
                    if bad:
                        bar.close()
                        raise DivergedError(
                            f"round {r}: training diverged: {', '.join(bad[:4])} non-finite (NaN or inf); "
                            "lower the learning rates (server.lr, local.lr)")
                    bar.set_postfix_str(_short(record))
                    if self.on_eval is not None:
                        self.on_eval(r, record)
            if self.run_dir is not None and (
                (cfg.checkpoint_every and r % cfg.checkpoint_every == 0) or r == cfg.rounds
            ):
                save_checkpoint(self.run_dir, self._state(r, time.perf_counter() - t0))
        bar.close()
        extra = {"privacy": self.accountant.report(cfg.rounds)} if self.accountant is not None else {}
        return SimulationResult(self.history, self.per_client, self.server.rejections.count(), self.failed,
                                time.perf_counter() - t0, cfg.rounds, extra)

    def _evaluate_round(self, r: int, elapsed: float) -> dict[str, Any]:
        self.per_client = self.evaluate()
        record: dict[str, Any] = {"round": r, **pooled_and_mean(self.per_client)}
        bad = nonfinite_clients(self.per_client, getattr(self.runtime.task, "primary_metric", ("accuracy",))[0])
        record["nonfinite_clients"] = len(bad)
        if bad and bad != self._nonfinite:
            log.warning("round %d: clients %s have non-finite val/test metrics (NaN or inf); the means over clients "
                        "leave them out (counted in nonfinite_clients)", r, bad)
        self._nonfinite = bad
        if self._train_losses:
            record["train_loss"] = sum(self._train_losses) / len(self._train_losses)
        self._train_losses = []
        previous = self.history[-1] if self.history else {"round": 0, "failed_clients": 0}
        record["rejected_updates"] = self.server.rejections.count()
        record["rejected_this_period"] = sum(self.server.rejections.count(x) for x in range(int(previous["round"]) + 1, r + 1))
        record["failed_clients"] = self.failed
        record["client_updates"] = self.client_updates  # local trainings so far (the budget)
        record["failed_this_period"] = self.failed - int(previous.get("failed_clients", 0))
        if self.accountant is not None:  # ε at privacy.delta after r rounds (∞, written null, without noise)
            record["epsilon"] = self.accountant.epsilon(r)
        record.update(self.traffic.record())  # cumulative bytes_down, bytes_up, bytes_total
        attack = getattr(self.runtime, "attack", None)
        if attack is not None:  # simulated malicious clients: the honest clients' mean test metrics
            honest = {c: row for c, row in self.per_client.items() if int(c) not in attack.malicious}
            record.update({f"honest_{k}": v for k, v in mean_over_clients(honest).items() if k.startswith("test_")})
        record["elapsed_s"] = round(elapsed, 3)
        self.history.append(record)
        return record

    def _state(self, r: int, elapsed: float) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: the algorithm (server parameters
        and optimiser state), the clients' personal tensors, rejections, failures, metrics so far.
        The RNG state is the round index: client sampling, dropout faults, local minibatches,
        attacks and torch's global RNG (:func:`round_rng`) are all derived from (seed, round)."""
        return {
            "round": r, "elapsed": elapsed, "algorithm": self.algorithm.state_dict(),
            "personal": self.runtime.personal.state_dict(), "rejections": self.server.rejections.state_dict(),
            "history": self.history, "per_client": self.per_client, "failed": self.failed,
            "train_losses": self._train_losses, "client_updates": self.client_updates,
            "traffic": self.traffic.state_dict(),
            "residuals": self.runtime.upload.state_dict() if self.runtime.upload is not None else {},
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.runtime.personal.load_state_dict(state["personal"])
        self.server.rejections.load_state_dict(state["rejections"])
        self.history = list(state["history"])
        self.per_client = {int(k): v for k, v in state["per_client"].items()}
        self.failed = int(state["failed"])
        self._train_losses = list(state["train_losses"])
        self.client_updates = int(state.get("client_updates", 0))
        self.traffic.load_state_dict(state.get("traffic", {}))  # (checkpoints from before byte counting: 0)
        if self.runtime.upload is not None:
            self.runtime.upload.load_state_dict(state.get("residuals", {}))


def pooled_and_mean(per_client: dict[int, dict[str, float]]) -> dict[str, float]:
    """Means over clients (each client counts once) and, for accuracies, the pooled value over
    all examples (``pooled_test_accuracy``: what pFedHN's paper reports); ``*_n`` counts dropped."""
    means = {k: v for k, v in mean_over_clients(per_client).items() if not k.endswith("_n")}
    for key in [k for k in means if k.endswith("_accuracy")]:
        split = key.split("_", 1)[0]
        rows = [row for row in per_client.values() if key in row and f"{split}_n" in row and math.isfinite(row[key])]
        total = sum(row[f"{split}_n"] for row in rows)
        if total > 0:
            means[f"pooled_{key}"] = sum(row[key] * row[f"{split}_n"] for row in rows) / total
    return means


@contextlib.contextmanager
def round_rng(seed: int, round_: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Round ``round_`` runs with torch's global RNG (CPU, and the run's CUDA device) seeded from
    (seed, round) and restored afterwards. Every other random choice already comes from a
    generator derived from (seed, stream, round); this covers the draws made from the global RNG
    (dropout in graph encoders), so a run's numbers depend on nothing but the config, and the
    round index is the whole RNG state a checkpoint needs."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, "global-rng", round_))
        yield


def _short(record: dict[str, Any]) -> str:
    keys = [k for k in record if k.startswith("val_") and not k.endswith("loss")][:1]
    keys += [k for k in record if k.startswith("test_") and not k.endswith("loss")][:1]
    return " ".join(f"{k}={record[k]:.4f}" for k in keys)


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix_str(self, s: str) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="round", dynamic_ncols=True)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json``, strict JSON (non-finite numbers as null)."""
    atomic_write_text(run_dir / "summary.json", dumps_json(summary, indent=2, sort_keys=True) + "\n")
