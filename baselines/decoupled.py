"""Decoupled input layers (DEPT-style): each client keeps a personal input layer (by default
the target's first layer: ``input_proj.*`` of the MLPs and forecasters, ``conv1.*`` of the CNNs;
DEPT's own vocabulary embedding) and the body is shared FedAvg-style.

Because the input layer never leaves the client, clients may have different input sizes (e.g.
weather stations lacking a variable): the runner then gives each client its own architecture
(``task.make_model(client)``) and trains clients one by one, each with its own input layer; the
shared tensors must agree in shape across clients (a clear error says which do not). Server
optimiser options as FedAvg's (``[methods.decoupled]``)."""

from __future__ import annotations

from dataclasses import dataclass

from baselines.fedavg import FedAvgOptions
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.methods import MethodContext, register_method


@dataclass(frozen=True)
class DecoupledOptions(FedAvgOptions):
    """Decoupled input layers: FedAvg's server options, and

    Attributes:
        input_prefix: the personal input layer: target tensors whose names start with this;
            None: the target's first layer (input_proj.* / conv1.*).
    """

    input_prefix: str | None = None


@register_method("decoupled", DecoupledOptions)
def make_decoupled(ctx: MethodContext) -> GlobalModelAlgorithm:
    """Personal input layer per client, shared body."""
    opts = ctx.options
    prefix = opts.input_prefix or ctx.spec.names[0].rsplit(".", 1)[0] + "."
    return GlobalModelAlgorithm(ctx.initial, opts.server_config(), spec=ctx.spec,
                                personal_keys=ctx.keys_with_prefix(prefix))
