"""FedAvg and the FedOpt family: the example-weighted mean delta is the pseudo-gradient of a
server optimiser. The defaults (SGD, lr 1, no momentum) are plain FedAvg; momentum
(optionally Nesterov) gives FedAvgM and ``optimizer = "adam"`` FedAdam — the outer optimiser
of DiLoCo and Photon. Configured under ``[methods.fedavg]``, not ``[server]`` (whose defaults
are the hypernetwork's). ``aggregation = "median" | "trimmed_mean"`` replaces the weighted mean
by a Byzantine-robust coordinate-wise rule (:mod:`shn.federated.robust`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shn.config import ServerConfig
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.federated.robust import make_aggregate
from shn.methods import MethodContext, register_method


@dataclass(frozen=True)
class FedAvgOptions:
    """The server optimiser of FedAvg and its relatives (``[methods.<name>]``).

    Attributes:
        optimizer: server optimiser over the mean delta as pseudo-gradient: "sgd" or "adam".
        lr: server learning rate (1 with SGD and no momentum: plain FedAvg).
        momentum: server SGD momentum (FedAvgM).
        nesterov: Nesterov momentum (needs momentum > 0).
        weight_decay: server L2 weight decay.
        betas: Adam's (beta1, beta2) (FedAdam).
        aggregation: how the accepted deltas are combined: "mean" (example-weighted, FedAvg),
            or the unweighted coordinate-wise "median" / "trimmed_mean" (Byzantine-robust).
        trim_fraction: "trimmed_mean": drop floor(trim_fraction · C) deltas per side, in [0, 0.5).
    """

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction: must be in [0, 0.5), got {self.trim_fraction!r}")

    def server_config(self) -> ServerConfig:
        return ServerConfig(optimizer=self.optimizer, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                            weight_decay=self.weight_decay, grad_clip=0.0, betas=self.betas)


@register_method("fedavg", FedAvgOptions)
def make_fedavg(ctx: MethodContext) -> GlobalModelAlgorithm:
    """FedAvg / FedOpt: one global model."""
    opts = ctx.options
    return GlobalModelAlgorithm(ctx.initial, opts.server_config(), spec=ctx.spec,
                                aggregate=make_aggregate(opts.aggregation, opts.trim_fraction))
