"""pFedHN (Shamsian et al., ICML 2021): the hypernetwork with the identity encoder.

pFedHN-PC is ``personal_head = true``: the classifier head stays on the client and the
hypernetwork generates only the feature extractor."""

from __future__ import annotations

from dataclasses import dataclass

from shn.federated.algorithm import HyperNetworkAlgorithm
from shn.methods import MethodContext, build_hypernetwork, hypernetwork_algorithm, register_method


@dataclass(frozen=True)
class PFedHNOptions:
    """pFedHN's options.

    Attributes:
        personal_head: pFedHN-PC: the classifier head stays on the client, the hypernetwork
            generates the rest.
        head_prefix: the head: target tensors whose names start with this.
    """

    personal_head: bool = False
    head_prefix: str = "head."


@register_method("pfedhn", PFedHNOptions)
def make_pfedhn(ctx: MethodContext) -> HyperNetworkAlgorithm:
    """pFedHN: client embedding → MLP → target weights."""
    opts = ctx.options
    personal = ctx.keys_with_prefix(opts.head_prefix) if opts.personal_head else ()
    return hypernetwork_algorithm(ctx, build_hypernetwork(ctx, "identity"), personal_keys=personal)
