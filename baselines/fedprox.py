"""FedProx (Li et al., MLSys 2020): FedAvg whose clients minimise the task loss plus a proximal
term that keeps them near the global model they received,

    min_w  F_i(w) + mu/2 · ||w − w_global||²,

so clients with many local steps or very different data drift less. ``mu = 0`` is exactly FedAvg
(same seed → same numbers). The proximal term is part of the batched local objective (vmapped with
the task loss). Configured under ``[methods.fedprox]``: ``mu`` and FedAvg's server options."""

from __future__ import annotations

from dataclasses import dataclass

from baselines.fedavg import FedAvgOptions
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.federated.client_method import ClientFit, ClientMethod, ClientRound, proximal_penalty
from shn.federated.local import LocalObjective
from shn.federated.robust import make_aggregate
from shn.methods import MethodContext, register_method


@dataclass(frozen=True)
class FedProxOptions(FedAvgOptions):
    """FedProx: FedAvg's server options, and

    Attributes:
        mu: weight of the proximal term mu/2 ||w − w_global||² in the clients' loss (0: FedAvg).
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mu < 0:
            raise ValueError(f"mu: must be ≥ 0, got {self.mu!r}")


class FedProxClient(ClientMethod):
    """Local SGD on ``F_i(w) + mu/2 ||w − w_received||²`` over the tensors the server sent."""

    def __init__(self, mu: float) -> None:
        self.mu = mu

    def fit(self, round: ClientRound) -> ClientFit:
        if self.mu == 0:
            return super().fit(round)
        anchor = {k: round.received[k] for k in round.sent}
        result = round.train(round.received, LocalObjective(penalty=proximal_penalty(self.mu), anchor=anchor))
        return ClientFit(result.params, result.loss)


@register_method("fedprox", FedProxOptions)
def make_fedprox(ctx: MethodContext) -> GlobalModelAlgorithm:
    """FedProx: FedAvg with a proximal term in the clients' objective."""
    opts = ctx.options
    ctx.client = FedProxClient(opts.mu)
    return GlobalModelAlgorithm(ctx.initial, opts.server_config(), spec=ctx.spec,
                                aggregate=make_aggregate(opts.aggregation, opts.trim_fraction))
