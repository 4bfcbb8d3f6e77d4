"""Local training only: every tensor is personal, nothing is shared."""

from __future__ import annotations

from shn.config import ServerConfig
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.methods import MethodContext, register_method


@register_method("local")
def make_local(ctx: MethodContext) -> GlobalModelAlgorithm:
    """Local: each client trains its own model from a common initialisation."""
    return GlobalModelAlgorithm(ctx.initial, ServerConfig(), spec=ctx.spec, personal_keys=ctx.spec.names)
