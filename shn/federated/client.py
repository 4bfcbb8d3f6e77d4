"""The client side of every method, shared by all engines: merge the server's weights with the
client's personal tensors, train locally, return the delta; evaluate on val / test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from shn.federated.attacks import ClientAttack
from shn.federated.local import ClientStore, LocalTrainer
from shn.target import Params
from tasks.base import Task


class PersonalStore:
    """Per-client personal tensors (FedPer heads, personal input layers, Local's model).

    The in-process engine keeps them in this dict; the Flower engine keeps one per node in its
    ``context.state``. A client seen for the first time starts from the method's initial values,
    or from its own in ``per_client`` (clients whose personal tensors differ in shape).
    """

    def __init__(self, initial: Params, backing: MutableMapping[int, Params] | None = None, *,
                 per_client: Mapping[int, Params] | None = None) -> None:
        self.initial = initial
        self.values: MutableMapping[int, Params] = {} if backing is None else backing
        self.per_client = dict(per_client or {})

    def get(self, client: int) -> Params:
        start = self.per_client.get(client, self.initial)
        return self.values.get(client) or {k: v.clone() for k, v in start.items()}

    def put(self, client: int, params: Mapping[str, Tensor]) -> None:
        if self.initial:
            self.values[client] = {k: params[k].detach().clone() for k in self.initial}

    def state_dict(self) -> dict:
        return {int(c): dict(p) for c, p in self.values.items()}

    def load_state_dict(self, state: Mapping) -> None:
        self.values.clear()
        self.values.update({int(c): dict(p) for c, p in state.items()})


@dataclass
class FitResult:
    deltas: Params  # {name: [C, *shape]} over the tensors the server sent
    num_examples: Tensor  # [C] long
    loss: Tensor  # [C] mean local training loss


class ClientRuntime:
    """Runs local training and evaluation for any set of clients held in ``store``."""

    def __init__(self, task: Task, trainer: LocalTrainer, store: ClientStore, personal: PersonalStore, *,
                 attack: "ClientAttack | None" = None) -> None:
        self.task = task
        self.trainer = trainer
        self.store = store
        self.personal = personal
        self.attack = attack  # simulated malicious clients ([attack]); None: every client is honest

    def full_weights(self, clients: Sequence[int], server_weights: Mapping[str, Tensor]) -> Params:
        """Server tensors ``[C, *shape]`` plus each client's personal tensors, stacked."""
        weights = dict(server_weights)
        if self.personal.initial:
            per_client = [self.personal.get(int(c)) for c in clients]
            device = self.store.device
            for k in self.personal.initial:
                weights[k] = torch.stack([p[k] for p in per_client]).to(device)
        return weights

    def client_weights(self, clients: Sequence[int], server_weights: Mapping[str, Tensor]) -> list[Params]:
        """One un-batched dict per client: its row of the server tensors plus its personal ones."""
        out = []
        for i, c in enumerate(clients):
            p = {k: v[i] for k, v in server_weights.items()}
            if self.personal.initial:
                p.update({k: v.to(self.store.device) for k, v in self.personal.get(int(c)).items()})
            out.append(p)
        return out

    def fit(self, clients: Sequence[int], server_weights: Mapping[str, Tensor], generator: torch.Generator) -> FitResult:
        """Train ``clients`` from the server's weights; their deltas (a malicious client's
        replaced by its attack, :mod:`shn.federated.attacks`)."""
        result = self._fit(clients, server_weights, generator)
        if self.attack is not None:
            result.deltas = self.attack.corrupt(clients, result.deltas, generator)
        return result

    def _fit(self, clients: Sequence[int], server_weights: Mapping[str, Tensor], generator: torch.Generator) -> FitResult:
        if self.trainer.templates:  # architectures differ between clients: nothing can be stacked
            return self._fit_each(clients, server_weights, generator)
        start = self.full_weights(clients, server_weights)
        result = self.trainer.train(start, self.store, clients, generator)
        for i, c in enumerate(clients):
            self.personal.put(int(c), {k: v[i] for k, v in result.params.items()})
        deltas = {k: start[k] - result.params[k] for k in server_weights}
        return FitResult(deltas, self.store.num_train(clients), result.loss)

    def _fit_each(self, clients: Sequence[int], server_weights: Mapping[str, Tensor], generator: torch.Generator) -> FitResult:
        start = self.client_weights(clients, server_weights)
        trained, loss = self.trainer.train_each(start, self.store, clients, generator)
        for c, p in zip(clients, trained):
            self.personal.put(int(c), p)
        deltas = {k: torch.stack([s[k] - t[k] for s, t in zip(start, trained)]) for k in server_weights}
        return FitResult(deltas, self.store.num_train(clients), loss)

    @torch.no_grad()
    def evaluate(self, clients: Sequence[int], server_weights: Mapping[str, Tensor],
                 splits: Iterable[str] = ("val", "test"), chunk: int = 4096) -> dict[int, dict[str, float]]:
        """``{client: {"val_accuracy": ..., "test_accuracy": ...}}`` with each client's own weights."""
        out: dict[int, dict[str, float]] = {}
        for c, p in zip(clients, self.client_weights(clients, server_weights)):
            template = self.trainer.template_for(int(c))
            row: dict[str, float] = {}
            for split in splits:
                tensors = self.store.split(int(c), split)
                sums: dict[str, float] = {}
                for s in range(0, int(tensors[0].shape[0]), chunk):
                    batch = tuple(t[s:s + chunk] for t in tensors)
                    output = functional_call(template, p, (batch[0],))
                    for k, v in self.task.metrics(output, *batch[1:]).items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                if sums:
                    row.update({f"{split}_{k}": v for k, v in self.task.finalize(sums).items()})
                    row[f"{split}_n"] = float(tensors[0].shape[0])  # for pooled (example-weighted) means
            out[int(c)] = row
        return out
