"""FedAvg and the FedOpt family: the example-weighted mean delta is the pseudo-gradient of a
server optimiser. The defaults (SGD, lr 1, no momentum) are plain FedAvg; momentum
(optionally Nesterov) gives FedAvgM and ``optimizer = "adam"`` FedAdam — the outer optimiser
of DiLoCo and Photon. Configured under ``[methods.fedavg]``, not ``[server]`` (whose defaults
are the hypernetwork's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shn.config import ServerConfig
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.methods import MethodContext, register_method


@dataclass(frozen=True)
class FedAvgOptions:
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)

    def server_config(self) -> ServerConfig:
        return ServerConfig(optimizer=self.optimizer, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov,
                            weight_decay=self.weight_decay, grad_clip=0.0, betas=self.betas)


@register_method("fedavg", FedAvgOptions)
def make_fedavg(ctx: MethodContext) -> GlobalModelAlgorithm:
    """FedAvg / FedOpt: one global model."""
    return GlobalModelAlgorithm(ctx.initial, ctx.options.server_config(), spec=ctx.spec)
