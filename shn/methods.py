"""What a method factory receives, and the shared building blocks methods compose.

A method is registered with ``@register_method(name, OptionsDataclass)`` on a factory
``factory(ctx: MethodContext) -> Algorithm``. Everything a method may need (task, target
template and spec, seeded initial weights, client graph, device, config) comes from ``ctx``.
The factory returns the server side; a method whose clients do more than plain local training
also sets ``ctx.client`` to its :class:`~shn.federated.client_method.ClientMethod`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from shn.config import ConfigError, RunConfig
from shn.diagnostics import record_encoder_energy
from shn.encoders import LearnedGraphEncoder
from shn.federated.algorithm import HyperNetworkAlgorithm, Regularizer
from shn.graph import LearnedGraph
from shn.hypernetwork import Encoder, HyperNetwork, default_embed_dim
from shn.novel import evaluate_novel_clients
from shn.registry import ENCODERS, METHODS
from shn.seeding import seeded_init
from shn.target import Params, ParamSpec, module_params
from tasks.base import Task


@dataclass
class MethodContext:
    config: RunConfig
    task: Task
    template: nn.Module  # the target architecture (initialised, on ``device``)
    device: torch.device
    # the client graph (a shn.graph.ClientGraph) for graph methods; resolved by the runner
    graph: Any = None
    # stage-1 embeddings to warm-start from (three-stage pipeline), [N, e]
    warm_embeddings: torch.Tensor | None = None
    # the whole stage-1 hypernetwork's state (graph.stage3_init = "full"): embeddings, trunk, heads
    warm_hypernetwork: dict[str, torch.Tensor] | None = None
    # clients excluded from training (novel-client evaluation)
    held_out: tuple[int, ...] = ()
    # per-client architectures when the task's clients differ (e.g. input sizes); None otherwise
    client_templates: dict[int, nn.Module] | None = None
    # the method's client side (shn.federated.client_method); None: plain local training
    client: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> ParamSpec:
        return ParamSpec.from_module(self.template)

    @property
    def initial(self) -> Params:
        return module_params(self.template)

    @property
    def options(self) -> Any:
        return self.config.method_options

    @property
    def seed(self) -> int:
        return self.config.seed

    def keys_with_prefix(self, prefix: str) -> tuple[str, ...]:
        """The target tensors whose names start with ``prefix`` (e.g. ``"head."``); an error
        naming the model's tensors when there are none."""
        keys = tuple(n for n in self.spec.names if n.startswith(prefix))
        if not keys:
            raise ValueError(f"the target has no tensors starting with {prefix!r}: {self.spec.names}")
        return keys

    def after_training(self, hook: Callable[[Any], dict[str, Any]]) -> None:
        """Run ``hook(run_result) -> dict`` once training ends; its dict joins ``summary.json``."""
        self.extras.setdefault("after_training", []).append(hook)


def register_method(name: str, options: type | None = None, *, needs_graph: bool = False,
                    replace: bool = False) -> Callable:
    """Register ``factory(ctx: MethodContext) -> Algorithm`` under ``name``; ``options`` is the
    frozen dataclass of its ``[methods.<name>]`` table; ``needs_graph`` makes the runner resolve a
    client graph (given, or inferred by the three-stage pipeline) into ``ctx.graph``."""
    return METHODS.register(name, options, replace=replace, needs_graph=needs_graph)


def available_methods() -> list[str]:
    """Names of the registered methods (built-in and user-registered), sorted."""
    return METHODS.names()


def register_encoder(name: str, *, replace: bool = False) -> Callable:
    """Register ``factory(in_dim: int, config: EncoderConfig) -> Encoder`` under ``name``; use it
    in a config with ``[encoder] kind = "<name>"``."""
    return ENCODERS.register(name, None, replace=replace)


def build_hypernetwork(ctx: MethodContext, encoder: str) -> HyperNetwork:
    """The shared hypernetwork of every HN method; methods differ only in ``encoder`` (unless
    ``encoder.kind`` in the config names another registered encoder).

    Paired initialisation: the encoder draws from its own stream of the run seed and the
    embeddings, trunk layers and heads each from theirs, so pFedHN, GHN, Panacea and SHN of one
    seed start from the same embeddings, heads and trunk (all but its first layer, whose width
    is the encoder's, unless ``hypernetwork.graph_branch = "residual"``). The three-stage
    pipeline warm-starts the embeddings from stage 1, or with ``graph.stage3_init = "full"`` the
    whole stage-1 hypernetwork (the graph branch then starts at zero: SHN starts at pFedHN's
    solution)."""
    cfg = ctx.config
    name = cfg.encoder.kind or encoder
    n = ctx.task.num_clients
    embed_dim = cfg.hypernetwork.embed_dim
    if ctx.warm_embeddings is not None:
        embed_dim = int(ctx.warm_embeddings.shape[1])
    e = embed_dim or default_embed_dim(n)
    with seeded_init(cfg.seed, "hn-encoder"):
        enc = ENCODERS.get(name).factory(e, cfg.encoder)
        if not isinstance(enc, Encoder):
            raise TypeError(f"encoder {name!r} returned {type(enc).__name__}, expected a shn.hypernetwork.Encoder")
        if cfg.graph.kind == "learned" and enc.needs_graph:
            # edge weights over the candidate graph, computed from the embeddings, trained too
            enc = LearnedGraphEncoder(enc, LearnedGraph(ctx.graph, e))
    hn = HyperNetwork(ctx.spec, n, e, enc, cfg.hypernetwork.hidden, cfg.hypernetwork.n_hidden,
                      cfg.hypernetwork.spectral_norm, graph_branch=cfg.hypernetwork.graph_branch,
                      init_seed=cfg.seed)
    if ctx.warm_hypernetwork is not None:
        load_shared_parameters(hn, ctx.warm_hypernetwork)
    elif ctx.warm_embeddings is not None:
        with torch.no_grad():
            hn.embeddings.weight.copy_(ctx.warm_embeddings)
    return hn.to(ctx.device)


def load_shared_parameters(hn: HyperNetwork, state: dict[str, torch.Tensor]) -> None:
    """Copy a trained pFedHN's embeddings, trunk and heads into ``hn`` (every one must match in
    shape: use ``hypernetwork.graph_branch = "residual"`` so the trunk reads the embedding width)."""
    own = hn.state_dict()
    # heads of tensors this run keeps personal are not generated (HyperNetwork.restrict)
    shared = [k for k in state if k.startswith(("embeddings.", "trunk.")) or (k.startswith("heads.") and k in own)]
    bad = [k for k in shared if k not in own or own[k].shape != state[k].shape]
    if bad:
        raise ConfigError(
            f"graph.stage3_init: cannot continue from the stage-1 hypernetwork: {bad[:3]} differ in shape; set "
            f'hypernetwork.graph_branch = "residual" (or graph.stage3_init = "embeddings")'
        )
    with torch.no_grad():
        for k in shared:
            own[k].copy_(state[k].to(own[k].device))


def hypernetwork_algorithm(ctx: MethodContext, hn: HyperNetwork, *, graph: Any = None,
                           personal_keys: Sequence[str] = (), regularizer: Regularizer | None = None
                           ) -> HyperNetworkAlgorithm:
    """The pFedHN server around ``hn`` with what every hypernetwork method reports after
    training: novel-client generalisation (``[novel]``) and, for graph encoders, the Dirichlet
    energy of each encoder layer's output. ``hypernetwork.personal_input`` adds the target's
    first layer to ``personal_keys``."""
    if ctx.config.hypernetwork.personal_input:  # DEPT-style: the input layer stays on the client
        first = ctx.spec.names[0].rsplit(".", 1)[0] + "."
        personal_keys = tuple(dict.fromkeys([*personal_keys, *ctx.keys_with_prefix(first)]))
    algorithm = HyperNetworkAlgorithm(hn, ctx.config.server, graph=graph, initial=ctx.initial,
                                      personal_keys=personal_keys, regularizer=regularizer, seed=ctx.seed)
    record_encoder_energy(ctx, algorithm)
    evaluate_novel_clients(ctx, algorithm)
    return algorithm
