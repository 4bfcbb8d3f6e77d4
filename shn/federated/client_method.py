"""The client side of a federated method: what each client does with the weights it receives.

``Algorithm`` (:mod:`shn.federated.algorithm`) is the server side. A method whose clients do more
than plain local SGD sets ``ctx.client = MyClientMethod(...)`` in its factory; both engines (the
in-process :class:`~shn.federated.simulation.Simulation` and the Flower ClientApp) run it through
:class:`~shn.federated.client.ClientRuntime`, for a whole cohort of clients at once. The protocol:

* **local objective and optimiser** — :meth:`ClientMethod.fit` trains through
  ``round.train(start, LocalObjective(...))``: an extra loss term with its anchor (FedProx's
  proximal pull), the tensors trained (FedRep: head, then body), steps and optimiser
  (:func:`~shn.federated.local.sgd_step`, :func:`~shn.federated.local.adam_step`). Every call is
  one batched phase (vmap where the trainer uses it) and continues the round's minibatch stream.
* **personal state kept between rounds** — :meth:`ClientMethod.initial_state` names tensors that
  stay on the client and are never sent (Ditto's personal model). The in-process engine keeps
  them with the personal model tensors (and in checkpoints), the Flower engine in the node's
  ``context.state``. ``round.state`` holds them stacked ``[C, *shape]``; ``round.fresh`` marks
  clients that have none stored yet (first participation: ``initial_state``'s values).
* **what is sent back** — the server receives ``received − model`` over the tensors it sent
  (``round.sent``), for the ``model`` the method returns in :class:`ClientFit`; the personal
  model tensors of that ``model`` (FedPer / FedRep heads) are kept on the client.
* **what is evaluated** — :meth:`ClientMethod.eval_weights` (Ditto: the personal model).

The base class is plain local training: one phase of ``local.steps`` SGD steps on the task loss,
what every method without its own client side uses (numbers identical to before the protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from shn.federated.local import LocalObjective, LocalResult, Penalty
from shn.target import Params

__all__ = ["ClientFit", "ClientMethod", "ClientRound", "proximal_penalty"]


@dataclass
class ClientRound:
    """One round of local work for C clients, as :meth:`ClientMethod.fit` receives it."""

    clients: list[int]
    received: Params  # {name: [C, *shape]}: the server's tensors plus each client's personal model tensors
    sent: tuple[str, ...]  # the tensors the server sent, and receives a delta for
    state: Params  # {name: [C, *shape]}: the method's personal state ({} when it keeps none)
    fresh: Tensor  # [C] bool: clients without a stored state (their state is initial_state's)
    trainer: Callable[[Params, LocalObjective | None], LocalResult] = field(repr=False)

    def train(self, start: Params, objective: LocalObjective | None = None) -> LocalResult:
        """One local-training phase from ``start {name: [C, *shape]}`` (see :class:`LocalObjective`)."""
        return self.trainer(start, objective)


@dataclass
class ClientFit:
    """What :meth:`ClientMethod.fit` returns, every tensor ``[C, ...]``."""

    model: Params  # the trained model; the server receives received - model over round.sent
    loss: Tensor  # [C] the training loss to report (mean task loss of the phase that matters)
    state: Params = field(default_factory=dict)  # the new personal state (keys of initial_state)


class ClientMethod:
    """Plain local training; subclass and override what a method changes (see the module doc)."""

    def initial_state(self, initial: Params) -> Params:
        """The personal state a client starts with, ``{name: [*shape]}``, from the target's
        initial weights ``initial``. Names must differ from the target's tensor names."""
        return {}

    def fit(self, round: ClientRound) -> ClientFit:
        result = round.train(round.received)
        return ClientFit(result.params, result.loss)

    def eval_weights(self, weights: Params, state: Params | None) -> Params:
        """The weights a client is evaluated with: ``weights`` (un-batched, the server's plus its
        personal model tensors) by default; ``state`` is its stored personal state, or None when
        it has not trained yet."""
        return weights


def proximal_penalty(mu: float) -> Penalty:
    """``mu/2 · Σ_k ||w_k − anchor_k||²`` over the anchor's tensors (FedProx, Ditto); its gradient
    is ``mu · (w − anchor)``."""

    def penalty(params: Params, anchor: Params) -> Tensor:
        total = torch.zeros((), device=next(iter(params.values())).device)
        for k, a in anchor.items():
            total = total + (params[k] - a).pow(2).sum()
        return 0.5 * mu * total

    return penalty
