"""FedPer (Arivazhagan et al., 2019): a shared body trained FedAvg-style and a personal head
(``head.*``) that never leaves the client: the server neither sends nor receives it, and each
client's head persists on the client across rounds. The server optimiser options are FedAvg's
(``[methods.fedper]``: plain averaging by default, or momentum / Nesterov / Adam)."""

from __future__ import annotations

from dataclasses import dataclass

from baselines.fedavg import FedAvgOptions
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.methods import MethodContext, register_method


@dataclass(frozen=True)
class FedPerOptions(FedAvgOptions):
    """FedPer: FedAvg's server options, and

    Attributes:
        head_prefix: the personal head: target tensors whose names start with this.
    """

    head_prefix: str = "head."


@register_method("fedper", FedPerOptions)
def make_fedper(ctx: MethodContext) -> GlobalModelAlgorithm:
    """FedPer: global body, personal head."""
    opts = ctx.options
    return GlobalModelAlgorithm(ctx.initial, opts.server_config(), spec=ctx.spec,
                                personal_keys=ctx.keys_with_prefix(opts.head_prefix))
