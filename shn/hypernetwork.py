"""The hypernetwork: client embeddings → encoder (identity | GCN | sheaf diffusion) → MLP trunk
→ one linear head per target tensor (pFedHN's CNNHyper pattern, heads derived from the target's
``named_parameters()``, never written by hand).

Paired initialisation: with ``init_seed`` every component draws from its own seeded stream
(embeddings, each trunk layer, each head), so methods that differ only in the encoder start from
the same embeddings, trunk and heads (all but the first trunk layer when the encoder changes the
width; all of them with ``graph_branch = "residual"``).
"""

from __future__ import annotations

from typing import Sequence

import contextlib

import torch
from torch import Tensor, nn

from shn.seeding import seeded_init
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
        graph_branch: ``"replace"`` (the trunk reads the encoder output, as in the SHN paper) or
            ``"residual"`` (the trunk reads ``e + P·encoder(e)`` with ``P`` a linear map back to the
            embedding width initialised at zero: the model starts as pFedHN and can continue from a
            trained pFedHN's parameters).
        init_seed: draw each component from its own stream of this seed (paired comparisons);
            None keeps the caller's RNG.
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
        graph_branch: str = "replace",
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"num_clients must be ≥ 1, got {num_clients}")
        if graph_branch not in ("replace", "residual"):
            raise ValueError(f"graph_branch must be 'replace' or 'residual', got {graph_branch!r}")
        stream = (lambda *k: seeded_init(init_seed, *k)) if init_seed is not None else (lambda *k: contextlib.nullcontext())
        self.spec = spec
        self.num_clients = num_clients
        self.embed_dim = embed_dim or default_embed_dim(num_clients)
        with stream("hn-embeddings"):
            self.embeddings = nn.Embedding(num_clients, self.embed_dim)
        self.encoder = encoder if encoder is not None else IdentityEncoder(self.embed_dim)
        # the residual branch only exists for a real (non-identity) encoder
        self.graph_branch = graph_branch if not isinstance(self.encoder, IdentityEncoder) else "replace"
        self.branch_out: nn.Linear | None = None
        trunk_in = self.encoder.out_dim
        if self.graph_branch == "residual":
            self.branch_out = nn.Linear(self.encoder.out_dim, self.embed_dim)
            nn.init.zeros_(self.branch_out.weight)
            nn.init.zeros_(self.branch_out.bias)
            trunk_in = self.embed_dim
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        widths = [trunk_in] + [hidden] * (n_hidden + 1)
        layers: list[nn.Module] = []
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if k:
                layers.append(nn.ReLU())
            with stream("hn-trunk", k):
                layers.append(sn(nn.Linear(a, b)))
        self.trunk = nn.Sequential(*layers)
        # ModuleDict keys cannot contain dots.
        heads = {}
        for n, numel in zip(spec.names, spec.numels):
            with stream("hn-head", n):
                heads[_key(n)] = nn.Linear(hidden, numel)
        self.heads = nn.ModuleDict(heads)
        self.aggregator = aggregator

    def representations(self, graph=None, embeddings: Tensor | None = None) -> Tensor:
        """Encoder output for all clients, ``[N, encoder.out_dim]``. ``embeddings [N, e]``
        replaces the trained table (a novel client's embedding being fitted)."""
        if self.encoder.needs_graph and graph is None:
            raise ValueError(f"{type(self.encoder).__name__} needs a client graph, got None")
        e = self.embeddings.weight if embeddings is None else embeddings
        z = self.encoder(e, graph)
        if z.dim() != 2 or z.shape != (self.num_clients, self.encoder.out_dim):
            raise ValueError(
                f"{type(self.encoder).__name__} returned shape {tuple(z.shape)}, the heads expect "
                f"({self.num_clients}, {self.encoder.out_dim}) = (num_clients, encoder.out_dim)"
            )
        if self.branch_out is not None:
            z = e + self.branch_out(z)
        return z

    @property
    def rep_dim(self) -> int:
        """Width of :meth:`representations` (what the trunk reads)."""
        return self.embed_dim if self.branch_out is not None else self.encoder.out_dim

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

    def restrict(self, names: Sequence[str]) -> None:
        """Generate only the tensors ``names``: the heads of the others go (tensors a client keeps
        personal are never generated). Each head has its own seeded stream, so the rest is
        unchanged, and so are the generated tensors."""
        keep = set(names)
        self.spec = self.spec.subset(n for n in self.spec.names if n in keep)
        for key in [k for k in self.heads if k not in {_key(n) for n in keep}]:
            del self.heads[key]

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [self.embeddings.weight]

    def other_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("embeddings.")]


def initial_embeddings(seed: int, num_clients: int, embed_dim: int) -> Tensor:
    """The embedding table a hypernetwork built with ``init_seed=seed`` starts from."""
    with seeded_init(seed, "hn-embeddings"):
        return nn.Embedding(num_clients, embed_dim).weight.detach()


def embedding_drift(initial: Tensor, final: Tensor) -> dict[str, float]:
    """How far trained embeddings moved from their initialisation. ``off_scale_change`` ignores
    a global rescaling (what weight decay alone does): ``‖E − αE₀‖ / ‖E₀‖`` with the best ``α``."""
    e0, e = initial.detach().double().cpu(), final.detach().double().cpu()
    norm0 = float(e0.norm()) or 1.0
    alpha = float((e * e0).sum() / (e0 * e0).sum().clamp_min(1e-300))
    return {"relative_change": float((e - e0).norm()) / norm0, "off_scale_change": float((e - alpha * e0).norm()) / norm0,
            "scale": alpha}


def _key(name: str) -> str:
    return name.replace(".", "__")
