"""Client-side local training: K SGD steps for many clients at once.

Three execution paths with the same maths and identical minibatch indices:

* ``vmap`` — one ``torch.func.vmap``-ed ``grad_and_value`` call per step for all C clients
  (needs one shared architecture); wins for small MLP/GRU targets.
* ``loop`` — a per-client loop with plain autograd (bit-identical to ``torch.func``'s
  ``grad_and_value``, less overhead); the reference path, and the one for targets nothing else
  runs (clients whose data shapes differ, layers ``grouped`` does not support).
* ``grouped`` — convolutional targets: the cohort as one network of grouped convolutions and
  batched matmuls, channels-last (:mod:`shn.federated.grouped`); on CPU 1.2–1.4× faster than the
  loop on a quiet 2-core machine and more under load (README, performance), equal to it up to
  float rounding (``tests/test_grouped.py``).

``mode = "auto"`` picks by a documented rule (grouped for convolutional targets on CPU when the
target's layers allow it, else loop there; vmap otherwise) rather than by timing, so the same
config always takes the same path and gives bit-identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from shn.config import LocalConfig
from shn.federated.grouped import GroupedNet, grouped_loss, grouped_unsupported
from tasks.base import ClientData, Split, Task

Params = dict[str, Tensor]

# Elements of the largest activation of one grouped network call (float32: 4 bytes each).
# Clients are run in chunks that keep it under this (at least one client per chunk): 16 MB, half
# the development machine's L3 cache, i.e. chunks of 5 CIFAR-CNN clients at batch 64 — measured
# faster than chunks of 1, 2 or 10 on a quiet machine, while one call for all 50 (160 MB) was
# slower than the loop on one thread. Small targets (digits) fit the whole cohort in one call.
GROUPED_ACTIVATION_BUDGET = 4 * 2**20


class ClientStore:
    """Every client's splits held as tensors on one device (read once, never per step).

    When all clients' train tensors agree in trailing shape they are also concatenated, so a
    batch for C clients is one gather from ``offsets[c] + local_index``.
    """

    def __init__(self, data: Mapping[int, ClientData], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.data = {c: d.to(self.device) for c, d in data.items()}
        self.clients = sorted(self.data)
        self.sizes = {c: self.data[c].num_train for c in self.clients}
        empty = [c for c, n in self.sizes.items() if n == 0]
        if empty:
            raise ValueError(f"clients {empty[:10]} have no training samples")
        first = self.data[self.clients[0]].train if self.clients else ()
        same = bool(self.clients) and all(
            len(self.data[c].train) == len(first)
            and all(t.shape[1:] == f.shape[1:] and t.dtype == f.dtype for t, f in zip(self.data[c].train, first))
            for c in self.clients
        )
        self.concat: tuple[Tensor, ...] | None = None
        self.offsets: dict[int, int] = {}
        if same:
            self.concat = tuple(torch.cat([self.data[c].train[i] for c in self.clients]) for i in range(len(first)))
            pos = 0
            for c in self.clients:
                self.offsets[c] = pos
                pos += self.sizes[c]

    @classmethod
    def from_task(cls, task: Task, clients: Sequence[int] | None = None, device: torch.device | str = "cpu") -> "ClientStore":
        clients = range(task.num_clients) if clients is None else clients
        return cls({int(c): task.client_data(int(c)) for c in clients}, device)

    def split(self, client: int, name: str) -> Split:
        return getattr(self.data[client], name)

    def num_train(self, clients: Sequence[int]) -> Tensor:
        return torch.tensor([self.sizes[int(c)] for c in clients], dtype=torch.long)


@dataclass
class LocalResult:
    params: Params  # trained weights {name: [C, *shape]}
    loss: Tensor  # mean training loss over the K steps, [C]


def uses_convolution(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


class LocalTrainer:
    """K local SGD steps (momentum, weight decay, per-client grad-norm clipping), batched.

    Args:
        template: the target architecture (any device; only its structure is used).
        loss: ``loss(output, *targets) -> 0-d tensor``, vmap-safe.
        config: steps, lr, momentum, weight decay, batch size, grad clip, mode.
        templates: per-client architectures for tasks whose clients differ (e.g. input sizes);
            such clients are trained one by one with :meth:`train_each`.
    """

    def __init__(self, template: nn.Module, loss: Callable[..., Tensor], config: LocalConfig, *,
                 templates: Mapping[int, nn.Module] | None = None) -> None:
        self.template = template
        self.loss = loss
        self.config = config
        self.templates = dict(templates or {})

        def client_loss(p: Params, x: Tensor, *targets: Tensor) -> Tensor:
            return self.loss(functional_call(self.template, p, (x,)), *targets)

        self._vgrad = vmap(grad_and_value(client_loss))
        self._grad = autograd_grad_and_value(client_loss)
        self._grouped_net: GroupedNet | None = None  # built on first use (one fx trace)
        self._grouped_grad: Callable[..., tuple[Params, Tensor]] | None = None
        self._grouped_numel: dict[tuple[int, ...], int] = {}  # one client's largest activation, by batch shape
        self._client_grads = {int(c): autograd_grad_and_value(self._loss_of(t)) for c, t in self.templates.items()}

    def _loss_of(self, template: nn.Module) -> Callable[..., Tensor]:
        return lambda p, x, *targets: self.loss(functional_call(template, p, (x,)), *targets)

    def template_for(self, client: int) -> nn.Module:
        """The architecture client ``client`` runs (the shared template unless it has its own)."""
        return self.templates.get(int(client), self.template)

    def resolve_mode(self, device: torch.device) -> str:
        if self.config.mode != "auto":
            return self.config.mode
        if device.type == "cpu" and uses_convolution(self.template):
            return "grouped" if self.grouped_reason is None else "loop"
        return "vmap"

    @cached_property
    def grouped_reason(self) -> str | None:
        """Why the template cannot run in ``grouped`` mode, or None (one fx trace, on first use)."""
        return grouped_unsupported(self.template)

    def train(self, params: Mapping[str, Tensor], store: ClientStore, clients: Sequence[int], generator: torch.Generator) -> LocalResult:
        """Train C clients starting from ``params {name: [C, *shape]}`` on their train splits."""
        cfg = self.config
        clients = [int(c) for c in clients]
        C = len(clients)
        device = next(iter(params.values())).device
        mode = self.resolve_mode(device)
        if mode in ("vmap", "grouped") and store.concat is None:
            if cfg.mode == mode:
                raise ValueError(f"local.mode = '{mode}' needs clients whose data shapes agree; use 'loop' or 'auto'")
            mode = "loop"  # auto: clients whose data shapes differ cannot be stacked
        local_idx = self.minibatch_indices(generator, store, clients)
        p = {k: v.detach().clone() for k, v in params.items()}
        buf: Params | None = None
        losses = torch.zeros(C, device=device)
        if mode in ("vmap", "grouped"):
            offsets = torch.tensor([store.offsets[c] for c in clients], dtype=torch.long)
            global_idx = (local_idx + offsets[None, :, None]).to(store.device)
        for step in range(cfg.steps):
            if mode == "vmap":
                batch = tuple(t[global_idx[step]] for t in store.concat)
                grads, loss = self._vgrad(p, *batch)
            elif mode == "grouped":
                grads, loss = self._grouped_grads(p, tuple(t[global_idx[step]] for t in store.concat))
            else:
                grads, loss = self._loop_grads(p, store, clients, local_idx[step])
            losses += loss.detach()
            p, buf = sgd_step(p, grads, buf, cfg)
        return LocalResult(p, losses / cfg.steps)

    def train_each(self, params: Sequence[Mapping[str, Tensor]], store: ClientStore, clients: Sequence[int],
                   generator: torch.Generator) -> tuple[list[Params], Tensor]:
        """Train C clients one by one, client i from ``params[i] {name: [*shape]}`` with its own
        template (clients whose architectures differ, so nothing can be stacked). Same minibatch
        indices and maths as the loop path of :meth:`train`. Returns the trained dicts and the
        mean training loss ``[C]``."""
        cfg = self.config
        clients = [int(c) for c in clients]
        local_idx = self.minibatch_indices(generator, store, clients)
        trained, losses = [], []
        for i, c in enumerate(clients):
            grad = self._client_grads.get(c, self._grad)
            train = store.split(c, "train")
            p = {k: v.detach().clone().unsqueeze(0) for k, v in params[i].items()}  # a cohort of one
            buf: Params | None = None
            total = torch.zeros((), device=train[0].device)
            for step in range(cfg.steps):
                rows = local_idx[step, i].to(train[0].device)
                g, loss = grad({k: v[0] for k, v in p.items()}, *(t[rows] for t in train))
                p, buf = sgd_step(p, {k: v.unsqueeze(0) for k, v in g.items()}, buf, cfg)
                total = total + loss.detach()
            trained.append({k: v[0] for k, v in p.items()})
            losses.append(total / cfg.steps)
        return trained, torch.stack(losses)

    def minibatch_indices(self, generator: torch.Generator, store: ClientStore, clients: Sequence[int]) -> Tensor:
        """Each client's local sample indices ``[steps, C, batch_size]`` (long). One draw for every
        (step, client, sample): both paths see the same minibatches."""
        u = self.minibatch_uniforms(generator, len(clients))
        sizes = store.num_train(clients).to(torch.float64)
        return (u * sizes[None, :, None]).long().clamp_max_((sizes - 1).long()[None, :, None])

    def minibatch_uniforms(self, generator: torch.Generator, num_clients: int) -> Tensor:
        """The uniforms behind every minibatch index, ``[steps, C, batch_size]`` float64, drawn once
        for the round's whole cohort. An engine that trains one client of a larger cohort on its
        own (``shn.flower``) overrides this to take that client's column of the cohort's draw."""
        cfg = self.config
        return torch.rand(cfg.steps, num_clients, cfg.batch_size, generator=generator, dtype=torch.float64)

    def _grouped_grads(self, p: Params, batch: tuple[Tensor, ...]) -> tuple[Params, Tensor]:
        """Every client's gradient from the grouped network, in chunks of clients whose largest
        activation stays under ``GROUPED_ACTIVATION_BUDGET`` elements."""
        if self._grouped_net is None:
            reason = self.grouped_reason
            if reason is not None:
                raise ValueError(f"local.mode = 'grouped' cannot run this target: {reason}; use 'loop' or 'auto'")
            self._grouped_net = GroupedNet(self.template)
            self._grouped_grad = autograd_grad_and_value(grouped_loss(self._grouped_net, self.loss))
        C = batch[0].shape[0]
        shape = tuple(batch[0].shape[1:])
        if shape not in self._grouped_numel:
            self._grouped_numel[shape] = self._grouped_net.activation_numel(p, batch[0])
        chunk = max(1, GROUPED_ACTIVATION_BUDGET // self._grouped_numel[shape])
        if C <= chunk:
            return self._grouped_grad(p, *batch)
        parts = [self._grouped_grad({k: v[i:i + chunk] for k, v in p.items()}, *(t[i:i + chunk] for t in batch))
                 for i in range(0, C, chunk)]
        return {k: torch.cat([g[k] for g, _ in parts]) for k in p}, torch.cat([v for _, v in parts])

    def _loop_grads(self, p: Params, store: ClientStore, clients: list[int], idx: Tensor) -> tuple[Params, Tensor]:
        per_grad, per_loss = [], []
        for i, c in enumerate(clients):
            train = store.split(c, "train")
            rows = idx[i].to(train[0].device)
            g, loss = self._grad({k: v[i] for k, v in p.items()}, *(t[rows] for t in train))
            per_grad.append(g)
            per_loss.append(loss)
        return {k: torch.stack([g[k] for g in per_grad]) for k in p}, torch.stack(per_loss)


def autograd_grad_and_value(loss: Callable[..., Tensor]) -> Callable[..., tuple[Params, Tensor]]:
    """``torch.func.grad_and_value(loss)`` for ONE client, by plain autograd: bit-identical
    results, and 1.3–1.5× faster on CPU for the small targets here (no functorch wrapping per op),
    which is what the per-client loop pays for at every step.

    ``loss`` may also return one loss per client ``[C]`` of a cohort that shares no weights (the
    grouped network): the gradient of their sum is then each client's own gradient."""

    def grad_and_value_(p: Params, *args: Tensor) -> tuple[Params, Tensor]:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
            value = loss(leaves, *args)
            grads = torch.autograd.grad(value, list(leaves.values()), torch.ones_like(value), allow_unused=True)
        return ({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)},
                value.detach())

    return grad_and_value_


def sgd_step(p: Params, grads: Params, buf: Params | None, cfg: LocalConfig) -> tuple[Params, Params]:
    """One ``torch.optim.SGD`` step after ``clip_grad_norm_``, per client (leading dim C)."""
    if cfg.grad_clip > 0:
        sq = sum(g.detach().flatten(1).pow(2).sum(1) for g in grads.values())
        coef = (cfg.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        grads = {k: g * coef.view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}
    d = {k: g + cfg.weight_decay * p[k] if cfg.weight_decay else g for k, g in grads.items()}
    if cfg.momentum:
        buf = d if buf is None else {k: cfg.momentum * buf[k] + d[k] for k in d}
        d = buf
    return {k: p[k] - cfg.lr * d[k] for k in p}, buf
