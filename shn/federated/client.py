"""The client side of every method, shared by all engines: merge the server's weights with the
client's personal tensors, run the method's client side (:mod:`shn.federated.client_method`:
plain local training unless the method has its own), return the delta; evaluate on val / test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from shn.federated.attacks import ClientAttack
from shn.federated.client_method import ClientFit, ClientMethod, ClientRound
from shn.federated.compression import ClientUpload
from shn.federated.local import ClientStore, LocalObjective, LocalTrainer, cohort_trainer
from shn.seeding import torch_generator
from shn.target import BlockIndex, Params, ParamSpec, block_index, block_shape, put_block, take_block
from tasks.base import Task


class PersonalStore:
    """Per-client personal tensors (FedPer heads, personal input layers, Local's model) and the
    client method's personal state (Ditto's personal model), neither ever sent.

    The in-process engine keeps them in this dict; the Flower engine keeps one per node in its
    ``context.state``. A client seen for the first time starts from the method's initial values,
    or from its own in ``per_client`` (clients whose personal tensors differ in shape), and from
    ``state`` (:meth:`ClientMethod.initial_state`).
    """

    def __init__(self, initial: Params, backing: MutableMapping[int, Params] | None = None, *,
                 per_client: Mapping[int, Params] | None = None, state: Params | None = None) -> None:
        self.initial = initial
        self.values: MutableMapping[int, Params] = {} if backing is None else backing
        self.per_client = dict(per_client or {})
        self.state_initial = dict(state or {})

    def get(self, client: int) -> Params:
        """The client's personal model tensors."""
        stored = self.values.get(client)
        if not stored:
            start = self.per_client.get(client, self.initial)
            return {k: v.clone() for k, v in start.items()}
        if not self.state_initial:
            return stored
        return {k: v for k, v in stored.items() if k not in self.state_initial}

    def has_state(self, client: int) -> bool:
        """Whether the client has stored a personal state (it has trained at least once)."""
        if not self.state_initial:
            return False
        stored = self.values.get(client)
        return bool(stored) and all(k in stored for k in self.state_initial)

    def get_state(self, client: int) -> Params:
        """The client method's personal state (its initial values until the client stores one)."""
        if self.has_state(client):
            stored = self.values[client]
            return {k: stored[k] for k in self.state_initial}
        return {k: v.clone() for k, v in self.state_initial.items()}

    def put(self, client: int, params: Mapping[str, Tensor], state: Mapping[str, Tensor] | None = None) -> None:
        if not self.state_initial:
            if self.initial:
                self.values[client] = {k: params[k].detach().clone() for k in self.initial}
            return
        entry = {k: params[k].detach().clone() for k in self.initial}
        entry.update({k: v.detach().clone() for k, v in (state if state is not None else {}).items()})
        if state is None and self.has_state(client):
            entry.update(self.get_state(client))
        self.values[client] = entry

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
                 attack: "ClientAttack | None" = None, method: ClientMethod | None = None,
                 upload: ClientUpload | None = None) -> None:
        self.task = task
        self.trainer = trainer
        self.store = store
        self.personal = personal
        self.attack = attack  # simulated malicious clients ([attack]); None: every client is honest
        self.method = method or ClientMethod()  # the method's client side (plain local training)
        self.upload = upload  # [compression] of what clients send back; None: deltas as they are
        self._index_cache: dict[int, dict[str, BlockIndex]] = {}
        self._arch_cache: dict[int, tuple] = {}

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
            index = self.index_of(int(c))
            p = {k: _to_block(v[i], index.get(k)) for k, v in server_weights.items()}
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

    def fit_novel(self, client: int, server_weights: Mapping[str, Tensor], seed: int, step: int) -> FitResult:
        """Local training of a held-out client in step ``step`` of its embedding fit
        (:mod:`shn.novel`), with that step's own minibatch stream."""
        return self.fit([int(client)], server_weights, torch_generator(seed, "novel-local", int(client), int(step)))

    def payloads(self, clients: Sequence[int], deltas: Mapping[str, Tensor], seed: int, round_: int) -> list[Params]:
        """What each client sends back for ``deltas {name: [C, *shape]}`` (a :meth:`fit`
        result): its delta, or its compressed form (:mod:`shn.federated.compression`)."""
        if self.trainer.templates:  # architectures differ: each client sends its own block
            return self._block_payloads(clients, deltas, seed, round_)
        if self.upload is None:
            return [{k: v[i] for k, v in deltas.items()} for i in range(len(clients))]
        return self.upload.encode(clients, dict(deltas), seed, round_)

    def _groups(self, clients: Sequence[int]) -> list[list[int]]:
        """The slots of ``clients`` by architecture (first appearance order)."""
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(clients):
            groups.setdefault(self._architecture(int(c)), []).append(i)
        return list(groups.values())

    def _block_payloads(self, clients: Sequence[int], deltas: Mapping[str, Tensor], seed: int,
                        round_: int) -> list[Params]:
        """Each client's upload of the block of ``deltas`` its architecture uses, compressed with
        the codec of that block's shapes (:mod:`shn.federated.blocks` decodes it)."""
        clients = [int(c) for c in clients]
        out: list[Params] = [{} for _ in clients]
        for slots in self._groups(clients):
            members = [clients[i] for i in slots]
            index = self.index_of(members[0])
            block = {k: _to_block(v[torch.tensor(slots, device=v.device)], index.get(k), 1) for k, v in deltas.items()}
            if self.upload is None:
                encoded = [{k: v[j] for k, v in block.items()} for j in range(len(slots))]
            else:
                spec = ParamSpec(tuple(block), tuple(tuple(v.shape[1:]) for v in block.values()))
                encoded = self.upload.for_spec(spec).encode(members, block, seed, round_)
            for j, i in enumerate(slots):
                out[i] = encoded[j]
        return out

    def index_of(self, client: int) -> dict[str, BlockIndex]:
        """Where the client's tensors sit in the server's (the widest architecture's:
        :func:`~shn.target.block_index`); empty when every client has one architecture."""
        if not self.trainer.templates:
            return {}
        if client not in self._index_cache:
            index = block_index(self.trainer.template_for(client), self.trainer.template)
            self._index_cache[client] = index
            self._arch_cache[client] = tuple(  # a hashable key, equal for clients with the same blocks
                (k, tuple(ix if isinstance(ix, int) else tuple(ix.tolist()) for ix in index[k])) for k in sorted(index))
        return self._index_cache[client]

    def _architecture(self, client: int) -> tuple:
        """A hashable key equal for clients whose blocks are the same (computed with the index)."""
        self.index_of(client)
        return self._arch_cache.get(client, ())

    def _fit(self, clients: Sequence[int], server_weights: Mapping[str, Tensor], generator: torch.Generator) -> FitResult:
        if self.trainer.templates:  # architectures differ between clients: one batch per architecture
            if type(self.method) is ClientMethod:
                return self._fit_groups(clients, server_weights, generator)
            return self._fit_method_each(clients, server_weights, generator)
        received = self.full_weights(clients, server_weights)
        round_ = self._round(clients, received, tuple(server_weights),
                             lambda start, objective: self.trainer.train(start, self.store, clients, generator, objective))
        fit = self.method.fit(round_)
        self._keep(clients, fit)
        deltas = {k: received[k] - fit.model[k] for k in server_weights}
        return FitResult(deltas, self.store.num_train(clients), fit.loss)

    def _round(self, clients: Sequence[int], received: Params, sent: tuple[str, ...],
               train: Callable[[Params, LocalObjective | None], Any]) -> ClientRound:
        clients = [int(c) for c in clients]
        state: Params = {}
        if self.personal.state_initial:
            per_client = [self.personal.get_state(c) for c in clients]
            state = {k: torch.stack([s[k] for s in per_client]).to(self.store.device) for k in self.personal.state_initial}
        fresh = torch.tensor([not self.personal.has_state(c) for c in clients], dtype=torch.bool, device=self.store.device)
        return ClientRound(clients, received, sent, state, fresh, train)

    def _keep(self, clients: Sequence[int], fit: ClientFit) -> None:
        """Store each client's personal model tensors and personal state (never sent)."""
        for i, c in enumerate(clients):
            state = {k: v[i] for k, v in fit.state.items()} if self.personal.state_initial else None
            self.personal.put(int(c), {k: v[i] for k, v in fit.model.items()}, state)

    def _fit_method_each(self, clients: Sequence[int], server_weights: Mapping[str, Tensor],
                         generator: torch.Generator) -> FitResult:
        """A client method on clients whose architectures differ: each client alone, with its
        own architecture and its column of the cohort's minibatch draw (exactly as the Flower
        engine trains it), from a copy of the round's generator."""
        clients = [int(c) for c in clients]
        deltas: list[Params] = []
        losses = []
        for i, (c, start) in enumerate(zip(clients, self.client_weights(clients, server_weights))):
            trainer = cohort_trainer(self.trainer.for_client(c), i, len(clients))
            gen = torch.Generator(device=generator.device)
            gen.set_state(generator.get_state())
            received = {k: v.unsqueeze(0) for k, v in start.items()}
            round_ = self._round([c], received, tuple(server_weights),
                                 lambda s, o, t=trainer, g=gen, c=c: t.train(s, self.store, [c], g, o))
            fit = self.method.fit(round_)
            self._keep([c], fit)
            index = self.index_of(c)
            deltas.append({k: _from_block(received[k][0] - fit.model[k][0], index.get(k), v.shape[1:])
                           for k, v in server_weights.items()})
            losses.append(fit.loss[0])
        stacked = {k: torch.stack([d[k] for d in deltas]) for k in server_weights}
        return FitResult(stacked, self.store.num_train(clients), torch.stack(losses))

    def _fit_groups(self, clients: Sequence[int], server_weights: Mapping[str, Tensor],
                    generator: torch.Generator) -> FitResult:
        """Clients whose architectures differ: the clients of one architecture trained as one
        batch (any local mode), each from the leading block of the server's tensors that fits its
        architecture (:func:`~shn.target.take_block`) and with its column of the cohort's
        minibatch draw; each delta is returned zero-padded to the server's shapes, the exact
        gradient input of that slicing. The round's generator advances by one cohort draw."""
        clients = [int(c) for c in clients]
        device = self.store.device
        deltas = {k: torch.zeros_like(v) for k, v in server_weights.items()}
        losses = torch.zeros(len(clients), device=device)
        state = generator.get_state()
        for slots in self._groups(clients):
            members = [clients[i] for i in slots]
            block = self.index_of(members[0])
            index = torch.tensor(slots, dtype=torch.long, device=device)
            received = self.full_weights(members, {k: _to_block(v[index.to(v.device)], block.get(k), 1)
                                                   for k, v in server_weights.items()})
            trainer = cohort_trainer(self.trainer.for_group(members[0]), slots, len(clients))
            gen = torch.Generator(device=generator.device)
            gen.set_state(state)
            result = trainer.train(received, self.store, members, gen)
            for j, c in enumerate(members):
                self.personal.put(c, {k: v[j] for k, v in result.params.items()})
            for k, v in server_weights.items():
                deltas[k][index.to(v.device)] = _from_block(received[k] - result.params[k], block.get(k), v.shape[1:], 1).to(v)
            losses[index] = result.loss.to(device)
        self.trainer.minibatch_uniforms(generator, len(clients))  # as one cohort draw would
        return FitResult(deltas, self.store.num_train(clients), losses)

    @torch.no_grad()
    def evaluate(self, clients: Sequence[int], server_weights: Mapping[str, Tensor],
                 splits: Iterable[str] = ("val", "test"), chunk: int = 4096) -> dict[int, dict[str, float]]:
        """``{client: {"val_accuracy": ..., "test_accuracy": ...}}`` with each client's own weights."""
        out: dict[int, dict[str, float]] = {}
        for c, p in zip(clients, self.client_weights(clients, server_weights)):
            if self.personal.state_initial:
                has = self.personal.has_state(int(c))
                state = {k: v.to(self.store.device) for k, v in self.personal.get_state(int(c)).items()} if has else None
                p = self.method.eval_weights(p, state)
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


def _to_block(t: Tensor, index: BlockIndex | None, batch_dims: int = 0) -> Tensor:
    """A client's block of the server's tensor ``t``; ``t`` itself when it already has the
    block's shape (what the Flower engine sends: only the block)."""
    if index is None or tuple(t.shape[batch_dims:]) == block_shape(index):
        return t
    return take_block(t, index, batch_dims)


def _from_block(t: Tensor, index: BlockIndex | None, full: Sequence[int], batch_dims: int = 0) -> Tensor:
    """A client's block-shaped delta in the shape the server sent (:func:`_to_block`'s adjoint)."""
    if index is None or tuple(full) == block_shape(index):
        return t
    return put_block(t, index, full, batch_dims)
