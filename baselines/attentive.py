"""Attentive key-layer aggregation as a standalone (non-hypernetwork) method: WorldLM's key
layers with FedAtt-style attention (METHOD §8), the non-HN analogue of pFedLA.

The server keeps every client's own key layers ``K_i`` (its last locally trained values) and one
FedAvg backbone for all other tensors. A client is sent the backbone and, per key tensor,

    α_ij = softmax_j(s(K_i, K_j) / τ),   s = −‖K_i − K_j‖₂ ("l2") or cos(K_i, K_j) ("cosine")
    K_i  − ε Σ_j α_ij (K_i − K_j)

over all training clients j (itself included), or over its graph neighbours and itself with
``neighbours = true`` (``[graph] kind = "given"`` or ``"complete"``). ``ε = 0`` sends the client its
own layer, ``ε = 1`` the attention-weighted mean, and ``τ → ∞`` makes that the plain mean. Each key
tensor (e.g. ``head.weight`` and ``head.bias``) gets its own attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from shn.aggregation import attentive_step, layer_attention
from shn.config import ServerConfig
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.methods import MethodContext, register_method
from shn.target import Params, ParamSpec


@dataclass(frozen=True)
class AttentiveOptions:
    """Attentive key-layer aggregation.

    Attributes:
        key_layers: the per-client key tensors (each with its own attention).
        temperature: τ of the attention softmax (→ ∞: the plain mean), > 0.
        step: ε in [0, 1]: 0 sends a client its own layer, 1 the attention-weighted mean.
        similarity: "l2" (negative distance) or "cosine" between two clients' key layers.
        neighbours: attend over a client's graph neighbours (and itself) only.
    """

    key_layers: tuple[str, ...] = ("head.weight", "head.bias")
    temperature: float = 1.0
    step: float = 1.0
    similarity: Literal["l2", "cosine"] = "l2"
    neighbours: bool = False

    def __post_init__(self) -> None:
        if not self.key_layers:
            raise ValueError("key_layers: name at least one target tensor")
        if self.temperature <= 0 or not 0.0 <= self.step <= 1.0:
            raise ValueError("temperature must be > 0 and step in [0, 1]")


class AttentiveKeyLayerAlgorithm:
    """The server of attentive key-layer aggregation (an ``Algorithm``).

    Args:
        initial: the template's weights ``{name: [*shape]}`` (every client starts from them).
        allowed: ``[N, N]`` bool, ``allowed[i, j]``: client j's key layers may reach client i.
    """

    def __init__(self, initial: Params, spec: ParamSpec, key_layers: Sequence[str], allowed: Tensor, *,
                 temperature: float, step: float, similarity: str) -> None:
        spec.subset(key_layers)  # unknown names → clear error
        self.spec = spec
        self.personal_keys: frozenset[str] = frozenset()
        self.key_layers = tuple(key_layers)
        self.allowed = allowed
        self.temperature, self.step, self.similarity = temperature, step, similarity
        n = allowed.shape[0]
        self.keys = {k: initial[k].detach().unsqueeze(0).repeat(n, *[1] * initial[k].dim()) for k in self.key_layers}
        backbone = {k: v for k, v in initial.items() if k not in self.keys}
        plain_fedavg = ServerConfig(lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=0.0)
        self.backbone = GlobalModelAlgorithm(backbone, plain_fedavg, spec=spec.subset(backbone))

    @property
    def server_spec(self) -> ParamSpec:
        return self.spec

    def initial_personal(self) -> Params:
        return {}

    def attention(self, clients: Sequence[int], name: str) -> Tensor:
        """``[C, N]`` attention of the requested clients over all clients for key tensor ``name``."""
        idx = torch.as_tensor(list(clients), dtype=torch.long, device=self.allowed.device)
        k = self.keys[name].flatten(1)
        return layer_attention(k[idx], k, self.temperature, self.similarity, self.allowed[idx])

    def key_layers_for(self, clients: Sequence[int]) -> Params:
        idx = torch.as_tensor(list(clients), dtype=torch.long, device=self.allowed.device)
        return {n: attentive_step(self.keys[n][idx], self.keys[n], self.attention(clients, n), self.step)
                for n in self.key_layers}

    @torch.no_grad()
    def weights_for(self, clients: Sequence[int]) -> Params:
        out = {**self.backbone.weights_for(clients), **self.key_layers_for(clients)}
        return {n: out[n] for n in self.spec.names}

    @torch.no_grad()
    def apply_updates(self, clients: Sequence[int], deltas: Params, num_examples: Tensor) -> dict[str, float]:
        sent = self.key_layers_for(clients)  # what these clients were sent this round
        idx = torch.as_tensor(list(clients), dtype=torch.long, device=self.allowed.device)
        for n in self.key_layers:
            self.keys[n][idx] = sent[n] - deltas[n].to(sent[n])
        backbone = {n: deltas[n] for n in self.backbone.spec.names}
        return self.backbone.apply_updates(clients, backbone, num_examples) if backbone else {}

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "keys": {k: v.clone() for k, v in self.keys.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.keys = {k: v.clone().to(self.keys[k]) for k, v in state["keys"].items()}


def allowed_sources(num_clients: int, held_out: Sequence[int], graph: Any = None, device: Any = "cpu") -> Tensor:
    """``[N, N]`` bool: every client may draw on itself and on the training clients (its graph
    neighbours among them when ``graph`` is given)."""
    eye = torch.eye(num_clients, dtype=torch.bool, device=device)
    training = torch.ones(num_clients, dtype=torch.bool, device=device)
    training[list(held_out)] = False
    allowed = training[None, :].expand(num_clients, -1).clone()
    if graph is not None:
        allowed &= graph.to_dense().to(device) > 0
    return allowed | eye


@register_method("attentive", AttentiveOptions)
def make_attentive(ctx: MethodContext) -> AttentiveKeyLayerAlgorithm:
    """Attentive key-layer aggregation: per-client key layers mixed by attention, FedAvg backbone."""
    opts = ctx.options
    graph = ctx.graph
    if opts.neighbours and graph is None:
        from shn.pipeline import resolve_graph

        graph = resolve_graph(ctx.config, ctx.task, ctx.held_out)
    allowed = allowed_sources(ctx.task.num_clients, ctx.held_out, graph if opts.neighbours else None, ctx.device)
    return AttentiveKeyLayerAlgorithm(ctx.initial, ctx.spec, opts.key_layers, allowed, temperature=opts.temperature,
                                      step=opts.step, similarity=opts.similarity)
