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

Client-side methods (:mod:`shn.federated.client_method`) change a training phase through a
:class:`LocalObjective`: an extra loss term (FedProx's proximal pull), the tensors trained (FedRep's
head, then body), the number of steps and the optimiser. Both paths run it, vmap-batched in the
``vmap`` path. Without one (``objective=None``) training is plain SGD on the task loss.

``local.precision = "bf16"`` runs the model's forward and the task loss of every path under
``torch.autocast`` to bfloat16 on the data's device (:func:`autocast_loss`); the weights, their
gradients, the optimiser state and the trained weights stay float32. ``"fp32"`` adds nothing, so
its numbers are those of a trainer without the option. bf16 deltas are within a documented
tolerance of fp32's (``tests/test_local_precision.py``); with ``grouped`` the CIFAR CNN's steps
ran 1.9× faster than the fp32 loop per CPU core (README, performance).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from shn.allocator import apply_default as apply_allocator_default
from shn.config import LocalConfig
from shn.federated.grouped import GroupedNet, grouped_loss, grouped_unsupported
from tasks.base import ClientData, Split, Task

Params = dict[str, Tensor]

# Bytes of the largest activation of one grouped network call, in the dtype it is computed in
# (float32; bfloat16 under local.precision = "bf16"). Clients are run in chunks that keep it under
# this (at least one client per chunk): chunks of 5 CIFAR-CNN clients at batch 64 in float32 (measured
# faster than chunks of 1, 2 or 10 under glibc's default malloc; one call for all 50, 160 MB, was
# slower than the loop) and of 10 in bfloat16 (with freed memory kept, shn/allocator.py, 7 % faster
# than chunks of 5 on 2 threads; float32 gains 1-3 % from chunks of 10 there, and loses 40 % under
# glibc's defaults). Small targets (digits) fit the whole cohort in one call.
GROUPED_ACTIVATION_BYTES = 16 * 2**20


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
    loss: Tensor  # mean training (task) loss over the K steps, [C]


# A functional optimiser step for C clients at once: (params, grads, state, config) -> (params, state),
# every tensor with a leading client dim; the state starts as None (see sgd_step, adam_step).
LocalOptimizer = Callable[[Params, Params, Any, LocalConfig], tuple[Params, Any]]
# An extra local loss term for ONE client: (params {name: [*shape]}, anchor {name: [*shape]}) -> 0-d
# tensor; it must be vmap-safe (plain tensor maths, no Python branching on values).
Penalty = Callable[[Params, Params], Tensor]


@dataclass(frozen=True)
class LocalObjective:
    """How one local-training phase differs from plain SGD on the task loss.

    Attributes:
        penalty: added to the task loss at every step (e.g. FedProx's ``mu/2 ||w - w_global||^2``);
            it sees one client's full weights and its row of ``anchor``.
        anchor: ``{name: [C, *shape]}``, the penalty's reference point per client (e.g. the
            weights the server sent this round).
        trainable: the tensors this phase trains; the others stay fixed (FedRep's head phase,
            then body phase). ``None``: all of them.
        steps: this phase's local steps (``None``: ``local.steps``).
        optimizer: the optimiser step (``None``: :func:`sgd_step`, momentum and weight decay from
            ``[local]``); its state starts fresh in every phase.

    The reported loss is the task loss alone, so that methods with and without a penalty
    report comparable training losses.
    """

    penalty: Penalty | None = None
    anchor: Params | None = None
    trainable: frozenset[str] | None = None
    steps: int | None = None
    optimizer: LocalOptimizer | None = None

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"LocalObjective.steps: must be >= 1, got {self.steps}")
        if self.penalty is not None and self.anchor is None:
            raise ValueError("LocalObjective: a penalty needs an anchor ({name: [C, *shape]}, e.g. the received weights)")


def uses_convolution(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


class LocalTrainer:
    """K local SGD steps (momentum, weight decay, per-client grad-norm clipping), batched.

    Args:
        template: the target architecture (any device; only its structure is used).
        loss: ``loss(output, *targets) -> 0-d tensor``, vmap-safe.
        config: steps, lr, momentum, weight decay, batch size, grad clip, mode.
        templates: per-client architectures for tasks whose clients differ (e.g. input sizes);
            the clients of one architecture are trained together (:meth:`for_group`).
    """

    def __init__(self, template: nn.Module, loss: Callable[..., Tensor], config: LocalConfig, *,
                 templates: Mapping[int, nn.Module] | None = None) -> None:
        apply_allocator_default()  # training's freed memory kept for the next step (shn/allocator.py)
        self.template = template
        self.loss = loss
        self.config = config
        self.templates = dict(templates or {})

        client_loss = self._loss_of(template)
        self._vgrad = vmap(grad_and_value(client_loss))
        self._grad = autograd_grad_and_value(client_loss)
        self._grouped_net: GroupedNet | None = None  # built on first use (one fx trace)
        self._grouped_grad: Callable[..., tuple[Params, Tensor]] | None = None
        self._grouped_numel: dict[tuple[int, ...], int] = {}  # one client's largest activation, by (batch, *sample)
        # per template: the grouped-mode verdict and the traced grouped network (each one fx
        # trace), shared by this trainer's copies (for_group / cohort_trainer make one a round)
        self._traced: dict[tuple, Any] = {}
        self._client_grads = {int(c): autograd_grad_and_value(self._loss_of(t)) for c, t in self.templates.items()}

    def _loss_of(self, template: nn.Module) -> Callable[..., Tensor]:
        """``(params, x, *targets) -> task loss`` for one client, in ``local.precision``."""
        return autocast_loss(lambda p, x, *targets: self.loss(functional_call(template, p, (x,)), *targets),
                             self.config.precision)

    def _objective_loss(self, template: nn.Module, penalty: Penalty | None) -> Callable[..., tuple[Tensor, Tensor]]:
        """``(trainable, frozen, anchor, x, *targets) -> (task loss + penalty, task loss)``."""

        task_loss = self._loss_of(template)  # the penalty stays outside autocast, in float32

        def loss(trainable: Params, frozen: Params, anchor: Params, x: Tensor, *targets: Tensor) -> tuple[Tensor, Tensor]:
            p = {**frozen, **trainable}
            task = task_loss(p, x, *targets)
            return (task + penalty(p, anchor) if penalty is not None else task), task

        return loss

    def template_for(self, client: int) -> nn.Module:
        """The architecture client ``client`` runs (the shared template unless it has its own)."""
        return self.templates.get(int(client), self.template)

    def for_client(self, client: int) -> "LocalTrainer":
        """A copy of this trainer that trains ``client`` alone with its own architecture (the
        loop path; any ``minibatch_uniforms`` override, e.g. :func:`cohort_trainer`'s, is kept)."""
        out = self.for_group(client)
        out.config = replace(self.config, mode="loop")
        return out

    def for_group(self, client: int) -> "LocalTrainer":
        """A copy of this trainer for the clients that share ``client``'s architecture, in this
        trainer's mode (any ``minibatch_uniforms`` override is kept)."""
        template = self.template_for(client)
        out = copy.copy(self)
        out.template, out.templates, out._client_grads = template, {}, {}
        client_loss = self._loss_of(template)
        out._vgrad, out._grad = vmap(grad_and_value(client_loss)), autograd_grad_and_value(client_loss)
        out._grouped_net, out._grouped_grad, out._grouped_numel = None, None, {}  # fetched from _traced
        return out

    def resolve_mode(self, device: torch.device) -> str:
        if self.config.mode != "auto":
            return self.config.mode
        if device.type == "cpu" and uses_convolution(self.template):
            return "grouped" if self.grouped_reason is None else "loop"
        return "vmap"

    @property
    def grouped_reason(self) -> str | None:
        """Why the template cannot run in ``grouped`` mode, or None (one fx trace, on first use)."""
        key = ("reason", id(self.template))
        if key not in self._traced:
            self._traced[key] = grouped_unsupported(self.template)
        return self._traced[key]

    def train(self, params: Mapping[str, Tensor], store: ClientStore, clients: Sequence[int], generator: torch.Generator,
              objective: LocalObjective | None = None) -> LocalResult:
        """Train C clients starting from ``params {name: [C, *shape]}`` on their train splits;
        ``objective`` changes the phase (extra loss term, trained tensors, steps, optimiser)."""
        cfg = self.config
        clients = [int(c) for c in clients]
        C = len(clients)
        device = next(iter(params.values())).device
        mode = self.resolve_mode(device)
        if mode in ("vmap", "grouped") and store.concat is None:
            if cfg.mode == mode:
                raise ValueError(f"local.mode = '{mode}' needs clients whose data shapes agree; use 'loop' or 'auto'")
            mode = "loop"  # auto: clients whose data shapes differ cannot be stacked
        if objective is not None:
            return self._train_objective(params, store, clients, generator, objective, mode)
        local_idx = self.minibatch_indices(generator, store, clients)
        p = {k: v.detach().clone() for k, v in params.items()}
        buf: Params | None = None
        losses = torch.zeros(C, device=device)
        if mode in ("vmap", "grouped"):
            offsets = torch.tensor([store.offsets[c] for c in clients], dtype=torch.long)
            global_idx = (local_idx + offsets[None, :, None]).to(store.device)
        if mode == "grouped":
            return self._train_grouped(p, store, global_idx)
        for step in range(cfg.steps):
            if mode == "vmap":
                batch = tuple(t[global_idx[step]] for t in store.concat)
                grads, loss = self._vgrad(p, *batch)
            else:
                grads, loss = self._loop_grads(p, store, clients, local_idx[step])
            losses += loss.detach()
            p, buf = sgd_step(p, grads, buf, cfg)
        return LocalResult(p, losses / cfg.steps)

    def _train_grouped(self, p: Params, store: ClientStore, global_idx: Tensor) -> LocalResult:
        """:meth:`train` in ``grouped`` mode: the cohort in chunks of clients whose largest activation
        stays under ``GROUPED_ACTIVATION_BYTES``, each chunk trained for all its steps
        before the next. Clients share nothing, and the optimiser acts per element and per client,
        so this is the same arithmetic as stepping every chunk in turn; gathering each chunk's
        minibatch alone keeps the step's allocations small (a whole cohort's CIFAR batch is 39 MB,
        which glibc's default malloc maps afresh at every step)."""
        cfg = self.config
        C = global_idx.shape[1]
        chunk = self._grouped_chunk(p, tuple(store.concat[0].shape[1:]), cfg.batch_size)
        params, losses = [], []
        for i in range(0, C, chunk):
            q = {k: v[i:i + chunk] for k, v in p.items()}
            buf: Params | None = None
            total = torch.zeros(min(chunk, C - i), device=next(iter(q.values())).device)
            for step in range(cfg.steps):
                grads, loss = self._grouped_grads(q, tuple(t[global_idx[step, i:i + chunk]] for t in store.concat))
                total += loss.detach()
                q, buf = sgd_step(q, grads, buf, cfg)
            params.append(q)
            losses.append(total)
        if len(params) == 1:
            return LocalResult(params[0], losses[0] / cfg.steps)
        return LocalResult({k: torch.cat([q[k] for q in params]) for k in p}, torch.cat(losses) / cfg.steps)

    def _train_objective(self, params: Mapping[str, Tensor], store: ClientStore, clients: list[int],
                         generator: torch.Generator, objective: LocalObjective, mode: str) -> LocalResult:
        """:meth:`train` for a phase with a :class:`LocalObjective`: the same minibatch stream and
        paths; the frozen tensors and the anchor travel as further (vmapped) arguments."""
        cfg = self.config
        steps = objective.steps or cfg.steps
        trainable = set(params) if objective.trainable is None else set(objective.trainable)
        unknown = sorted(trainable - set(params))
        if unknown:
            raise ValueError(f"LocalObjective.trainable names {unknown[:5]}, which are not among the weights {sorted(params)[:8]}")
        step_fn = objective.optimizer or sgd_step
        anchor = {k: v.detach() for k, v in (objective.anchor or {}).items()}
        p = {k: v.detach().clone() for k, v in params.items() if k in trainable}
        frozen = {k: v.detach() for k, v in params.items() if k not in trainable}
        loss_fn = self._objective_loss(self.template, objective.penalty)
        local_idx = self.minibatch_indices(generator, store, clients, steps)
        device = next(iter(params.values())).device
        losses = torch.zeros(len(clients), device=device)
        state: Any = None
        if mode == "vmap":
            vgrad = vmap(grad_and_value(loss_fn, has_aux=True))
            offsets = torch.tensor([store.offsets[c] for c in clients], dtype=torch.long)
            global_idx = (local_idx + offsets[None, :, None]).to(store.device)
        else:
            grad = autograd_grad_and_value(loss_fn, has_aux=True)
        for step in range(steps):
            if mode == "vmap":
                batch = tuple(t[global_idx[step]] for t in store.concat)
                grads, (_, task) = vgrad(p, frozen, anchor, *batch)
            else:
                per_grad, per_task = [], []
                for i, c in enumerate(clients):
                    train = store.split(c, "train")
                    rows = local_idx[step, i].to(train[0].device)
                    row = lambda d: {k: v[i] for k, v in d.items()}  # noqa: E731
                    g, (_, t) = grad(row(p), row(frozen), row(anchor), *(x[rows] for x in train))
                    per_grad.append(g)
                    per_task.append(t)
                grads, task = {k: torch.stack([g[k] for g in per_grad]) for k in p}, torch.stack(per_task)
            losses += task.detach()
            p, state = step_fn(p, grads, state, cfg)
        return LocalResult({k: p[k] if k in p else frozen[k].clone() for k in params}, losses / steps)

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

    def minibatch_indices(self, generator: torch.Generator, store: ClientStore, clients: Sequence[int],
                          steps: int | None = None) -> Tensor:
        """Each client's local sample indices ``[steps, C, batch_size]`` (long). One draw for every
        (step, client, sample): both paths see the same minibatches."""
        u = self.minibatch_uniforms(generator, len(clients), steps)
        sizes = store.num_train(clients).to(torch.float64)
        return (u * sizes[None, :, None]).long().clamp_max_((sizes - 1).long()[None, :, None])

    def minibatch_uniforms(self, generator: torch.Generator, num_clients: int, steps: int | None = None) -> Tensor:
        """The uniforms behind every minibatch index, ``[steps, C, batch_size]`` float64, drawn once
        for the round's whole cohort. An engine that trains one client of a larger cohort on its
        own (``shn.flower``) overrides this to take that client's column of the cohort's draw
        (:func:`cohort_trainer`)."""
        cfg = self.config
        return torch.rand(steps or cfg.steps, num_clients, cfg.batch_size, generator=generator, dtype=torch.float64)

    def _grouped_chunk(self, p: Params, sample_shape: tuple[int, ...], batch_size: int) -> int:
        """How many clients one grouped call takes: ``GROUPED_ACTIVATION_BYTES`` over one client's
        largest activation (its elements measured once per shape on the meta device, times the
        bytes of the dtype it is computed in)."""
        self._grouped()
        key = (batch_size, *sample_shape)
        if key not in self._grouped_numel:
            self._grouped_numel[key] = self._grouped_net.activation_numel(p, torch.empty(1, *key, device="meta"))
        itemsize = 2 if self.config.precision == "bf16" else next(iter(p.values())).element_size()
        return max(1, GROUPED_ACTIVATION_BYTES // (self._grouped_numel[key] * itemsize))

    def _grouped(self) -> None:
        if self._grouped_net is None:
            reason = self.grouped_reason
            if reason is not None:
                raise ValueError(f"local.mode = 'grouped' cannot run this target: {reason}; use 'loop' or 'auto'")
            key = ("net", id(self.template), self.config.precision)
            if key not in self._traced:
                net = GroupedNet(self.template)
                self._traced[key] = (net, autograd_grad_and_value(
                    autocast_loss(grouped_loss(net, self.loss), self.config.precision)), {})
            self._grouped_net, self._grouped_grad, self._grouped_numel = self._traced[key]

    def _grouped_grads(self, p: Params, batch: tuple[Tensor, ...]) -> tuple[Params, Tensor]:
        """One chunk of clients' gradients and losses from the grouped network."""
        self._grouped()
        return self._grouped_grad(p, *batch)

    def _loop_grads(self, p: Params, store: ClientStore, clients: list[int], idx: Tensor) -> tuple[Params, Tensor]:
        per_grad, per_loss = [], []
        for i, c in enumerate(clients):
            train = store.split(c, "train")
            rows = idx[i].to(train[0].device)
            g, loss = self._grad({k: v[i] for k, v in p.items()}, *(t[rows] for t in train))
            per_grad.append(g)
            per_loss.append(loss)
        return {k: torch.stack([g[k] for g in per_grad]) for k in p}, torch.stack(per_loss)


def cohort_trainer(trainer: LocalTrainer, slot: int | Sequence[int], cohort: int) -> LocalTrainer:
    """A copy of ``trainer`` that trains one client (``slot``), or a group of them (``slot`` a
    list of slots), with exactly the minibatches they get in a cohort of ``cohort``: their
    columns of the draw made for the whole cohort (every phase draws again, as the cohort does).
    The Flower engine trains each client this way, and the in-process engine each architecture's
    clients when architectures differ."""
    slots = [int(slot)] if isinstance(slot, int) else [int(s) for s in slot]
    if not slots or any(not 0 <= s < cohort for s in slots):
        raise ValueError(f"slots {slots} outside a cohort of {cohort}")
    out = copy.copy(trainer)
    columns = torch.tensor(slots, dtype=torch.long)

    def minibatch_uniforms(generator: torch.Generator, num_clients: int, steps: int | None = None) -> Tensor:
        if num_clients != len(slots):
            raise ValueError(f"a cohort trainer trains exactly its {len(slots)} client(s)")
        draw = trainer.minibatch_uniforms(generator, cohort, steps)
        return draw[:, columns.to(draw.device)]

    out.minibatch_uniforms = minibatch_uniforms  # type: ignore[method-assign]
    return out


def autograd_grad_and_value(loss: Callable[..., Any], has_aux: bool = False) -> Callable[..., tuple[Params, Any]]:
    """``torch.func.grad_and_value(loss, has_aux)`` for ONE client, by plain autograd: bit-identical
    results, and 1.3–1.5× faster on CPU for the small targets here (no functorch wrapping per op),
    which is what the per-client loop pays for at every step. With ``has_aux`` the loss returns
    ``(value, aux)`` and so does the second result. ``loss`` may also return one loss per client
    ``[C]`` of a cohort that shares no weights (the grouped network): the gradient of their sum is
    then each client's own gradient."""

    def grad_and_value_(p: Params, *args: Any) -> tuple[Params, Any]:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
            out = loss(leaves, *args)
            value, aux = out if has_aux else (out, None)
            # a cohort's loss per client [C] (the grouped network): each client's own gradient
            grads = torch.autograd.grad(value, list(leaves.values()), torch.ones_like(value), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
        return (grads, (value.detach(), aux.detach())) if has_aux else (grads, value.detach())

    return grad_and_value_


def autocast_loss(loss: Callable[..., Tensor], precision: str) -> Callable[..., Tensor]:
    """``loss(params, x, *targets)`` in ``precision``: itself for ``"fp32"``; for ``"bf16"`` run
    under ``torch.autocast(x.device.type, torch.bfloat16)`` — convolutions and matmuls in
    bfloat16 (the autocast op lists; the float32 weights are cast per call, so their gradients
    come back float32), losses such as cross-entropy in float32 — and the value returned as
    float32. Works inside ``torch.func.vmap``/``grad_and_value`` too."""
    if precision == "fp32":
        return loss
    if precision != "bf16":
        raise ValueError(f"local.precision: {precision!r} is not allowed; allowed values: 'fp32', 'bf16'")

    def mixed(p: Params, x: Tensor, *targets: Tensor) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            value = loss(p, x, *targets)
        return value.float() if value.dtype == torch.bfloat16 else value

    return mixed


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


def adam_step(p: Params, grads: Params, state: Any, cfg: LocalConfig, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> tuple[Params, Any]:
    """One ``torch.optim.Adam`` step (L2 weight decay as Adam's ``weight_decay``) after
    ``clip_grad_norm_``, per client (leading dim C); lr from ``cfg.lr``. A :data:`LocalOptimizer`."""
    if cfg.grad_clip > 0:
        sq = sum(g.detach().flatten(1).pow(2).sum(1) for g in grads.values())
        coef = (cfg.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        grads = {k: g * coef.view(-1, *[1] * (g.dim() - 1)) for k, g in grads.items()}
    d = {k: g + cfg.weight_decay * p[k] if cfg.weight_decay else g for k, g in grads.items()}
    step, m, v = state if state is not None else (0, {k: torch.zeros_like(x) for k, x in d.items()},
                                                  {k: torch.zeros_like(x) for k, x in d.items()})
    step += 1
    b1, b2 = betas
    m = {k: b1 * m[k] + (1 - b1) * d[k] for k in d}
    v = {k: b2 * v[k] + (1 - b2) * d[k] * d[k] for k in d}
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    new = {k: p[k] - cfg.lr * (m[k] / c1) / ((v[k] / c2).sqrt() + eps) for k in p}
    return new, (step, m, v)
