"""SHN — Sheaf HyperNetworks (Nguyen et al., 2024): client embeddings diffused over the client
graph by neural sheaf diffusion, then the shared MLP heads. Optionally WorldLM-style attentive
key-layer aggregation after the heads (``key_layers``).

With ``[graph] kind = "given"`` the task's graph is used directly; with an inferred graph
(``knn``/``threshold``/``learned``) ``shn run`` runs the three-stage pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from shn.aggregation import AttentiveKeyLayerMixer
from shn.federated.algorithm import HyperNetworkAlgorithm
from shn.methods import MethodContext, build_hypernetwork, hypernetwork_algorithm, register_method
from shn.seeding import seeded_init


@dataclass(frozen=True)
class SHNOptions:
    """SHN's optional attentive key-layer stage after the heads.

    Attributes:
        key_layers: target tensors mixed with the graph neighbours', e.g. ["head.weight",
            "head.bias"]; empty: no aggregation stage.
        attention_dim: width of the attention's query / key projections.
        temperature: attention temperature τ (larger: flatter).
        mix: initial share m of the neighbours' mix in a client's key layers, in [0, 1].
        learn_mix: train m (through a logit) with the hypernetwork.
    """

    key_layers: tuple[str, ...] = ()
    attention_dim: int = 16
    temperature: float = 1.0
    mix: float = 0.5
    learn_mix: bool = False


def with_attentive_aggregation(ctx: MethodContext, hn, opts: SHNOptions):
    """Attach the attentive key-layer stage after the heads when key layers are named."""
    if opts.key_layers:
        ctx.spec.subset(opts.key_layers)  # unknown names → clear error
        with seeded_init(ctx.seed, "attentive-aggregation"):
            hn.aggregator = AttentiveKeyLayerMixer(hn.rep_dim, opts.key_layers, opts.attention_dim,
                                                   opts.temperature, opts.mix, opts.learn_mix).to(ctx.device)
    return hn


@register_method("shn", SHNOptions, needs_graph=True)
def make_shn(ctx: MethodContext) -> HyperNetworkAlgorithm:
    """SHN: embeddings → sheaf diffusion over the client graph → heads."""
    hn = with_attentive_aggregation(ctx, build_hypernetwork(ctx, "sheaf"), ctx.options)
    return hypernetwork_algorithm(ctx, hn, graph=ctx.graph)
