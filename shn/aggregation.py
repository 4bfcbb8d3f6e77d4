"""WorldLM-style attentive key-layer aggregation (METHOD §8), as a differentiable stage after
the hypernetwork heads.

For each named key layer and each requested client i with graph neighbours N(i):

    α_ij = softmax_{j∈N(i)}( ⟨q(z_i), k(z_j)⟩ / (τ·√a) )      attention from client representations
    θ_i ← (1 − m)·θ_i + m·Σ_j α_ij θ_j                          residual mix, m ∈ [0, 1]

``m = 0`` gives back the plain heads; ``τ → ∞`` makes α uniform (the neighbour mean). The stage
is differentiable, so the pFedHN server update trains q, k (and a learnable m) too.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch_geometric.utils import softmax as edge_softmax

from shn.target import Params


class AttentiveKeyLayerMixer(nn.Module):
    """Mix the key layers of each client with its neighbours'.

    Args:
        rep_dim: width of the client representations z.
        key_layers: names of the target tensors to mix (e.g. ``("head.weight", "head.bias")``).
        attention_dim: width a of the query/key projections.
        temperature: τ; larger → flatter attention.
        mix: initial m; ``learn_mix`` makes it a trained parameter (through a logit).
    """

    def __init__(self, rep_dim: int, key_layers: Sequence[str], attention_dim: int = 16,
                 temperature: float = 1.0, mix: float = 0.5, learn_mix: bool = False) -> None:
        super().__init__()
        if not key_layers:
            raise ValueError("attentive aggregation needs at least one key layer name")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        self.key_layers = tuple(key_layers)
        self.temperature = float(temperature)
        self.query = nn.Linear(rep_dim, attention_dim, bias=False)
        self.key = nn.Linear(rep_dim, attention_dim, bias=False)
        self.learn_mix = learn_mix
        if learn_mix:
            m = min(max(mix, 1e-4), 1 - 1e-4)
            self.mix_logit = nn.Parameter(torch.tensor(math.log(m / (1 - m))))
        else:
            self.register_buffer("mix_value", torch.tensor(float(mix)))

    @property
    def mix(self) -> Tensor:
        return torch.sigmoid(self.mix_logit) if self.learn_mix else self.mix_value

    def attention(self, z: Tensor, edge_index: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention over the neighbours of ``targets``: returns (edge target, neighbour, α) for
        every edge (i → j) with i in ``targets``; α sums to 1 over each target's edges."""
        row, col = edge_index
        keep = torch.isin(row, targets)
        row, col = row[keep], col[keep]
        scale = self.temperature * math.sqrt(self.query.out_features)
        scores = (self.query(z[row]) * self.key(z[col])).sum(-1) / scale
        return row, col, edge_softmax(scores, row, num_nodes=z.shape[0])

    def forward(self, clients: Tensor, z: Tensor, generate: Callable[[Tensor], Params], graph) -> Params:
        """``clients [C]``, ``z [N, f]`` all representations, ``generate(z_rows) -> {name: [R, *shape]}``."""
        row, col, alpha = self.attention(z, graph.edge_index, clients)
        # generate once for the clients and all their neighbours
        nodes = torch.unique(torch.cat([clients, col]))
        weights = generate(z[nodes])
        pos = torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
        pos[nodes] = torch.arange(len(nodes), device=z.device)
        out = {n: w[pos[clients]] for n, w in weights.items()}
        m = self.mix
        for name in self.key_layers:
            w = weights[name]
            neigh = torch.zeros((z.shape[0],) + w.shape[1:], dtype=w.dtype, device=w.device)
            a = alpha.view(-1, *[1] * (w.dim() - 1)).to(w.dtype)
            neigh = neigh.index_add(0, row, a * w[pos[col]])
            has_neighbours = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
            has_neighbours[row] = True
            own = out[name]
            mixed = (1 - m) * own + m * neigh[clients]
            # a client without neighbours keeps its own layer
            keep_own = ~has_neighbours[clients]
            out[name] = torch.where(keep_own.view(-1, *[1] * (own.dim() - 1)), own, mixed)
        return out


# -- the standalone (non-hypernetwork) form: FedAtt / WorldLM attention over client layers ------

def layer_attention(query: Tensor, keys: Tensor, temperature: float, similarity: str = "l2",
                    mask: Tensor | None = None) -> Tensor:
    """Attention of each query client over the candidate clients, from their flattened layers.

    ``α_ij = softmax_j(s_ij / τ)`` with ``s_ij = −‖q_i − k_j‖₂`` (``"l2"``) or ``cos(q_i, k_j)``
    (``"cosine"``), over the ``j`` allowed by ``mask``.

    Args:
        query: ``[C, D]`` the requesting clients' layers (flattened).
        keys: ``[N, D]`` every candidate client's layer.
        temperature: τ > 0; τ → ∞ makes α uniform over the allowed clients.
        mask: optional ``[C, N]`` bool, True where client j may contribute to client i (each row
            needs at least one True).
    Returns:
        ``[C, N]`` weights, each row summing to 1 (0 where masked out).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if similarity == "l2":
        scores = -torch.cdist(query.double(), keys.double())
    elif similarity == "cosine":
        scores = nn.functional.normalize(query.double(), dim=-1) @ nn.functional.normalize(keys.double(), dim=-1).T
    else:
        raise ValueError(f"similarity must be 'l2' or 'cosine', got {similarity!r}")
    scores = scores / temperature
    if mask is not None:
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every query client needs at least one allowed client in mask")
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=1).to(query.dtype)


def attentive_step(own: Tensor, others: Tensor, alpha: Tensor, step: float) -> Tensor:
    """``K_i ← K_i − ε Σ_j α_ij (K_i − K_j)`` (METHOD §8): ``own [C, *shape]``, ``others
    [N, *shape]``, ``alpha [C, N]`` rows summing to 1. ``ε = 0`` keeps ``own``; ``ε = 1`` gives the
    attention-weighted mean ``Σ_j α_ij K_j``."""
    mixed = torch.tensordot(alpha.to(others.dtype), others, dims=1)
    return own - step * (own - mixed)
