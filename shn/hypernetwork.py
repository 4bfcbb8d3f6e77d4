"""The hypernetwork: client embeddings → encoder (identity | GCN | sheaf diffusion) → MLP trunk
→ one linear head per target tensor (pFedHN's CNNHyper pattern, heads derived from the target's
``named_parameters()``, never written by hand).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from shn.target import Params, ParamSpec


def default_embed_dim(num_clients: int) -> int:
    """pFedHN's default embedding size, ``1 + N/4``."""
    return 1 + num_clients // 4


class Encoder(nn.Module):
    """Maps all client embeddings ``[N, in_dim]`` to representations ``[N, out_dim]``.

    Subclasses set ``out_dim`` and implement ``forward(embeddings, graph)``; graph encoders read
    ``graph.edge_index`` / ``graph.edge_weight``. ``layer_outputs`` returns the representation
    after every layer (input first), for the Dirichlet-energy / over-smoothing diagnostics.
    """

    out_dim: int
    needs_graph: bool = False

    def forward(self, embeddings: Tensor, graph=None) -> Tensor:  # pragma: no cover - protocol
        raise NotImplementedError

    def layer_outputs(self, embeddings: Tensor, graph=None) -> list[Tensor]:
        return [embeddings, self(embeddings, graph)]


class IdentityEncoder(Encoder):
    """pFedHN: the representation is the embedding itself."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim

    def forward(self, embeddings: Tensor, graph=None) -> Tensor:
        return embeddings

    def layer_outputs(self, embeddings: Tensor, graph=None) -> list[Tensor]:
        return [embeddings]


class HyperNetwork(nn.Module):
    """Generates every client's target-model weights.

    Args:
        spec: the target tensors to generate (names and shapes).
        num_clients: N, the number of embeddings.
        embed_dim: e (default ``1 + N/4``).
        encoder: an ``Encoder`` whose input width is ``embed_dim`` (default identity).
        hidden: trunk width H; ``n_hidden``: number of extra ReLU→Linear(H, H) blocks.
        aggregator: optional stage after the heads that mixes clients' generated layers over the
            graph (``shn.aggregation.AttentiveKeyLayerMixer``).
    """

    def __init__(
        self,
        spec: ParamSpec,
        num_clients: int,
        embed_dim: int | None = None,
        encoder: Encoder | None = None,
        hidden: int = 100,
        n_hidden: int = 3,
        spectral_norm: bool = False,
        aggregator: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"num_clients must be ≥ 1, got {num_clients}")
        self.spec = spec
        self.num_clients = num_clients
        self.embed_dim = embed_dim or default_embed_dim(num_clients)
        self.embeddings = nn.Embedding(num_clients, self.embed_dim)
        self.encoder = encoder if encoder is not None else IdentityEncoder(self.embed_dim)
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = [sn(nn.Linear(self.encoder.out_dim, hidden))]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), sn(nn.Linear(hidden, hidden))]
        self.trunk = nn.Sequential(*layers)
        # ModuleDict keys cannot contain dots.
        self.heads = nn.ModuleDict(
            {_key(n): nn.Linear(hidden, numel) for n, numel in zip(spec.names, spec.numels)}
        )
        self.aggregator = aggregator

    def representations(self, graph=None, embeddings: Tensor | None = None) -> Tensor:
        """Encoder output for all clients, ``[N, encoder.out_dim]``. ``embeddings [N, e]``
        replaces the trained table (a novel client's embedding being fitted)."""
        if self.encoder.needs_graph and graph is None:
            raise ValueError(f"{type(self.encoder).__name__} needs a client graph, got None")
        z = self.encoder(self.embeddings.weight if embeddings is None else embeddings, graph)
        if z.dim() != 2 or z.shape != (self.num_clients, self.encoder.out_dim):
            raise ValueError(
                f"{type(self.encoder).__name__} returned shape {tuple(z.shape)}, the heads expect "
                f"({self.num_clients}, {self.encoder.out_dim}) = (num_clients, encoder.out_dim)"
            )
        return z

    def forward(self, clients: Tensor | Sequence[int], graph=None, embeddings: Tensor | None = None) -> Params:
        """``{name: [C, *shape]}`` for the C requested clients, in one forward pass. Only the
        requested rows go through the trunk and heads (the heads dominate the cost)."""
        clients = torch.as_tensor(clients, dtype=torch.long, device=self.embeddings.weight.device)
        z = self.representations(graph, embeddings)
        if self.aggregator is not None:
            return self.aggregator(clients, z, self.generate, graph)
        return self.generate(z[clients])

    def generate(self, z: Tensor) -> Params:
        """Trunk + heads applied to representations ``z [C, out_dim]``."""
        h = self.trunk(z)
        return {
            n: self.heads[_key(n)](h).reshape(z.shape[0], *shape)
            for n, shape in zip(self.spec.names, self.spec.shapes)
        }

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.embeddings.weight]

    def other_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]


def _key(name: str) -> str:
    return name.replace(".", "__")
