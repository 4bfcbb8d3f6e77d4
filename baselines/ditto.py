"""Ditto (Li et al., ICML 2021): a global model trained exactly as FedAvg, and on every client a
personal model ``v`` kept between rounds and trained towards the global model it received,

    min_v  F_i(v) + λ/2 · ||v − w_global||²,

which is what each client is evaluated with. Per round a client runs two batched phases on its
minibatch stream: ``local.steps`` plain steps on the received global model (its delta goes to the
server, so the server side is FedAvg's, number for number) and ``personal_steps`` proximal steps
on its personal model. The personal model never leaves the client (in-process: the personal
store and checkpoints; Flower: the node's ``context.state``).

A client's personal model starts from the global model it receives the first time it is sampled
(Ditto's code starts it from the initial global model, the same thing when every client takes
part in round 1); until then the client is evaluated with the global model. Configured under
``[methods.ditto]``: ``lam`` (λ), ``personal_steps`` and FedAvg's server options."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baselines.fedavg import FedAvgOptions
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.federated.client_method import ClientFit, ClientMethod, ClientRound, proximal_penalty
from shn.federated.local import LocalObjective
from shn.federated.robust import make_aggregate
from shn.methods import MethodContext, register_method
from shn.target import Params

PREFIX = "ditto."  # the personal model's tensors in the client's personal state


@dataclass(frozen=True)
class DittoOptions(FedAvgOptions):
    """Ditto: FedAvg's server options (for the global model), and

    Attributes:
        lam: λ, the pull λ/2 ||v − w_global||² of each personal model towards the global one.
        personal_steps: local steps on the personal model per round; None: local.steps.
    """

    lam: float = 1.0
    personal_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lam < 0:
            raise ValueError(f"lam: must be ≥ 0, got {self.lam!r}")
        if self.personal_steps is not None and self.personal_steps < 1:
            raise ValueError(f"personal_steps: must be ≥ 1, got {self.personal_steps!r}")


class DittoClient(ClientMethod):
    """FedAvg's local update for the global model, then the proximal update of the personal one."""

    def __init__(self, lam: float, personal_steps: int | None = None) -> None:
        self.lam = lam
        self.personal_steps = personal_steps

    def initial_state(self, initial: Params) -> Params:
        return {PREFIX + k: v.detach().clone() for k, v in initial.items()}

    def fit(self, round: ClientRound) -> ClientFit:
        w = round.received
        global_fit = round.train(w)  # the global model's local update: sent back, as FedAvg's
        fresh = round.fresh
        v = {k: torch.where(fresh.view(-1, *[1] * (t.dim() - 1)), t, round.state[PREFIX + k]) for k, t in w.items()}
        personal = round.train(v, LocalObjective(penalty=proximal_penalty(self.lam) if self.lam else None,
                                                 anchor=dict(w), steps=self.personal_steps))
        return ClientFit(global_fit.params, personal.loss, {PREFIX + k: t for k, t in personal.params.items()})

    def eval_weights(self, weights: Params, state: Params | None) -> Params:
        if state is None:  # not trained yet: its personal model would start from this global model
            return weights
        return {k: state[PREFIX + k] for k in weights}


@register_method("ditto", DittoOptions)
def make_ditto(ctx: MethodContext) -> GlobalModelAlgorithm:
    """Ditto: FedAvg's global model and a proximally regularised personal model per client."""
    opts = ctx.options
    ctx.client = DittoClient(opts.lam, opts.personal_steps)
    return GlobalModelAlgorithm(ctx.initial, opts.server_config(), spec=ctx.spec,
                                aggregate=make_aggregate(opts.aggregation, opts.trim_fraction))
