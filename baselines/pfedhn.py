"""pFedHN (Shamsian et al., ICML 2021): the hypernetwork with the identity encoder.

pFedHN-PC is ``personal_head = true``: the classifier head stays on the client and the
hypernetwork generates only the feature extractor."""

from __future__ import annotations

from dataclasses import dataclass

from shn.federated.algorithm import HyperNetworkAlgorithm
from shn.methods import MethodContext, build_hypernetwork, register_method


@dataclass(frozen=True)
class PFedHNOptions:
    personal_head: bool = False  # pFedHN-PC
    head_prefix: str = "head."


def personal_head_keys(ctx: MethodContext, enabled: bool, prefix: str) -> tuple[str, ...]:
    if not enabled:
        return ()
    keys = tuple(n for n in ctx.spec.names if n.startswith(prefix))
    if not keys:
        raise ValueError(f"personal head requested but the target has no tensors starting with {prefix!r}: {ctx.spec.names}")
    return keys


@register_method("pfedhn", PFedHNOptions)
def make_pfedhn(ctx: MethodContext) -> HyperNetworkAlgorithm:
    """pFedHN: client embedding → MLP → target weights."""
    opts = ctx.options
    return HyperNetworkAlgorithm(
        build_hypernetwork(ctx, "identity"), ctx.config.server, initial=ctx.initial,
        personal_keys=personal_head_keys(ctx, opts.personal_head, opts.head_prefix), seed=ctx.seed,
    )
