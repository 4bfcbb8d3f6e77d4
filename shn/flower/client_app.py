"""The ClientApp of the Flower engine (:mod:`shn.flower.engine` has the protocol and the server).

A node serves one client, its partition id. It rebuilds the task and method from the config text
the server sends (cached per process), trains or evaluates through the same
:class:`~shn.federated.client.ClientRuntime` as the in-process engine, and keeps its personal
tensors and error-feedback residual in ``context.state`` — and, with a state directory, on its
own disk after every round it trains in, so that a resumed run continues exactly
(:mod:`shn.flower.client_state`).
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from collections.abc import Iterator, MutableMapping
from typing import Any, Mapping

from torch import Tensor

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shn.build import Built, build, make_task
from shn.config import RunConfig, config_from_dict, config_to_dict, dumps_toml
from shn.federated.client import ClientRuntime
from shn.federated.local import cohort_trainer
from shn.flower.client_state import RESTORED_PREFIX, ClientSnapshots, state_dir
from shn.plugins import load_from_env
from shn.seeding import torch_generator

PERSONAL_PREFIX = "shn.personal."
RESIDUAL_PREFIX = "shn.residual."  # a client's error-feedback residual ([compression]), never sent


def arrays(tensors: Mapping[str, Tensor]) -> Any:
    """``tensors`` as an ArrayRecord (detached, on the CPU, contiguous)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def config_text(config: RunConfig) -> str:
    """The resolved config as TOML: what the server sends, what clients rebuild from."""
    return dumps_toml(config_to_dict(config))


class StatePersonal(MutableMapping):
    """``PersonalStore`` backing in a node's ``context.state``: client -> ArrayRecord
    ``shn.personal.<client>``, kept by the SuperNode between rounds, never sent. With
    ``prefix = RESIDUAL_PREFIX``: the client's error-feedback residual ([compression])."""

    def __init__(self, state: Any, prefix: str = PERSONAL_PREFIX) -> None:
        self.state = state
        self.prefix = prefix

    def _key(self, client: int) -> str:
        return f"{self.prefix}{int(client)}"

    def __getitem__(self, client: int) -> dict[str, Tensor]:
        key = self._key(client)
        if key not in self.state:
            raise KeyError(client)
        return dict(self.state[key].to_torch_state_dict())

    def __setitem__(self, client: int, params: Mapping[str, Tensor]) -> None:
        self.state[self._key(client)] = arrays(params)

    def __delitem__(self, client: int) -> None:
        del self.state[self._key(client)]

    def __iter__(self) -> Iterator[int]:
        return iter([int(k[len(self.prefix):]) for k in list(self.state.keys()) if k.startswith(self.prefix)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


_TASKS: dict[str, Any] = {}
_BUILT: dict[tuple[str, int, str], Built] = {}


def _client_config(text: str, node_config: Mapping[str, Any]) -> RunConfig:
    config = config_from_dict(tomllib.loads(text))
    data_dir = node_config.get("data-dir")
    if data_dir and hasattr(config.task.options, "data_dir"):  # this machine's copy of the data
        config = dataclasses.replace(config, task=dataclasses.replace(
            config.task, options=dataclasses.replace(config.task.options, data_dir=str(data_dir))))
    return config


def partition_id(context: Any) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("this SuperNode has no integer partition-id: start it with "
                         "--node-config 'partition-id=<client index>'") from None


def client_built(text: str, client: int, node_config: Mapping[str, Any] | None = None) -> Built:
    """Task, method and runtime for one client, cached per process (a simulation worker or a
    test grid serves many clients; a deployed SuperNode starts a process per message)."""
    node_config = dict(node_config or {})
    key = (text, client, str(node_config.get("data-dir", "")))
    if key not in _BUILT:
        load_from_env()  # this process's plugins (its entry points and SHN_PLUGINS), never the server's
        config = _client_config(text, node_config)
        tkey = config_text(config)
        if tkey not in _TASKS:
            _TASKS.clear()  # one task per process at a time
            _TASKS[tkey] = make_task(config)
        _BUILT[key] = build(config, task=_TASKS[tkey], store_clients=[client])
    return _BUILT[key]


def _runtime(built: Built, context: Any, client: int, cfg: Any, slot: int = 0, cohort: int = 1) -> ClientRuntime:
    """The built runtime with this round's cohort trainer and personal tensors in ``context.state``
    (restored from the node's disk on the first message of a resumed run)."""
    _restore(context, client, cfg)
    personal = copy.copy(built.runtime.personal)  # same initial values, another backing
    personal.values = StatePersonal(context.state)
    upload = built.runtime.upload
    return ClientRuntime(built.task, cohort_trainer(built.runtime.trainer, slot, cohort), built.runtime.store, personal,
                         attack=built.runtime.attack,  # [attack]: the same malicious clients as in-process
                         method=built.runtime.method,
                         upload=upload.with_residuals(StatePersonal(context.state, RESIDUAL_PREFIX)) if upload else None)


def _snapshots(context: Any, client: int, cfg: Any) -> ClientSnapshots | None:
    root = state_dir(context)
    if root is None or "run-key" not in cfg:
        return None
    return ClientSnapshots(root, str(cfg["run-key"]), client, (PERSONAL_PREFIX, RESIDUAL_PREFIX))


def _restore(context: Any, client: int, cfg: Any) -> None:
    """Once per run and client: a resumed run (``resumed-from`` R > 0) brings back the client's
    state as it was after round R; a fresh run deletes snapshots of an earlier one."""
    snapshots = _snapshots(context, client, cfg)
    if snapshots is None:
        return
    resumed = int(cfg.get("resumed-from", 0))
    marker = f"{RESTORED_PREFIX}{client}"
    if marker in context.state and int(context.state[marker]["from"]) == resumed:
        return
    if resumed > 0:
        snapshots.restore(resumed, context.state, arrays)
    else:
        snapshots.clear()
    context.state[marker] = ConfigRecord({"from": resumed})


def _received(msg: Any, context: Any) -> tuple[Built, int, Mapping[str, Any], dict[str, Tensor]]:
    client = partition_id(context)
    cfg = msg.content["config"]
    if int(cfg["client"]) != client:
        raise ValueError(f"message for client {cfg['client']} reached the SuperNode of partition {client}")
    built = client_built(str(cfg["shn-config"]), client, context.node_config)
    device = built.runtime.store.device
    weights = {k: v.unsqueeze(0).to(device) for k, v in msg.content["arrays"].to_torch_state_dict().items()}
    return built, client, cfg, weights


def handle_train(msg: Any, context: Any) -> Any:
    built, client, cfg, weights = _received(msg, context)
    if "novel-step" in cfg:  # after training: one step of a held-out client's embedding fit (shn.novel)
        runtime = _runtime(built, context, client, cfg)
        fit = runtime.fit_novel(client, weights, built.config.seed, int(cfg["novel-step"]))
        payload = {k: v[0] for k, v in fit.deltas.items()}  # as in-process: the delta itself
    else:
        round_ = int(cfg["round"])
        runtime = _runtime(built, context, client, cfg, int(cfg["slot"]), int(cfg["cohort"]))
        fit = runtime.fit([client], weights, torch_generator(built.config.seed, "local-training", round_))
        payload = runtime.payloads([client], fit.deltas, built.config.seed, round_)[0]  # [compression]
        snapshots = _snapshots(context, client, cfg)
        if snapshots is not None:
            snapshots.save(round_, context.state)
            snapshots.prune(int(cfg.get("checkpoint-round", 0)))
    metrics = MetricRecord({"num-examples": int(fit.num_examples[0]), "train-loss": float(fit.loss[0]),
                            "partition-id": client})
    return Message(RecordDict({"delta": arrays(payload), "metrics": metrics}), reply_to=msg)


def handle_evaluate(msg: Any, context: Any) -> Any:
    built, client, cfg, weights = _received(msg, context)
    row = _runtime(built, context, client, cfg).evaluate([client], weights)[client]
    return Message(RecordDict({"metrics": MetricRecord({**row, "partition-id": client})}), reply_to=msg)


def handle_query(msg: Any, context: Any) -> Any:
    """Which client is this node? Answered from the node config alone (no data, no torch work):
    ``flower_app``'s ClientApp answers it without importing shn at all, and must reply the same."""
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id(context)})}), reply_to=msg)


def make_client_app() -> Any:
    app = ClientApp()
    app.train()(handle_train)
    app.evaluate()(handle_evaluate)
    app.query()(handle_query)
    return app


