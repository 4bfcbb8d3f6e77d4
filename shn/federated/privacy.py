"""Client-level differential privacy: the Gaussian mechanism of DP-FedAvg (McMahan et al.,
ICLR 2018) on both server shapes, and its privacy accounting.

Each round, every accepted client's *contribution* to the server step is clipped to L2 norm C,
the clipped contributions are summed, and Gaussian noise N(0, (σC)² I) is added to the sum:

* global-model methods (FedAvg, FedProx, FedPer, FedRep, Ditto, Decoupled): the contribution is
  the client's delta over the shared tensors; the pseudo-gradient is
  ``(Σ_i clip_C(Δ_i) + z) / m`` for the round's m accepted clients — unweighted, since a
  client-reported example count would let one client's weight, and so its influence, grow
  without bound (Flower's server-side fixed clipping divides by the clients' count the same way);
* hypernetwork methods (pFedHN, GHN, Panacea, SHN): the contribution is the client's
  vector–Jacobian product ``g_i = (∂θ_i/∂φ)ᵀ Δ_i`` on the hypernetwork's parameters φ (client
  embeddings included), so the server gradient is ``Σ_i clip_C(g_i) + z`` (``/ m`` with
  ``server.delta_reduction = "mean"``). Clipping Δ_i itself would not bound g_i: the Jacobian of
  the generated weights has no norm bound, so the sum's sensitivity would be unknown. This costs
  one backward pass per client instead of one per round.

Either sum changes by at most C when one client's data changes, so each round is a Gaussian
mechanism with noise multiplier σ on a subsample of the clients. Every later computation (server
optimiser, weights sent to clients, evaluation) is post-processing. Regularisers of the server
objective that read no client update (Panacea's graph reconstruction) are added without noise.

Accounting: opacus's RDP or PRV accountant for the Poisson-subsampled Gaussian mechanism with
sampling rate q = clients_per_round / training clients and one step per round. The engines sample
a fixed number of clients per round without replacement; the Poisson analysis is the standard
approximation of that (as in DP-FedAvg and Opacus itself), not an exact bound for it. Rounds in
which no update was accepted are still counted (ε is an upper bound). What is protected: the
server's model and everything computed from it, against anyone but the server (central DP: the
server sees the raw updates).

The noise is drawn on the CPU from ``torch_generator(seed, "dp-noise", step)`` (step = the
algorithm's server-step count, kept in its checkpoint), so the same config and seed give the
same numbers on every engine and device, and a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from shn.config import ConfigError, PrivacyConfig, RunConfig
from shn.federated.algorithm import GlobalModelAlgorithm, HyperNetworkAlgorithm, weighted_mean
from shn.seeding import torch_generator

__all__ = ["GaussianMechanism", "PrivacyAccountant", "clip_factors", "enable_privacy", "epsilon"]


def clip_factors(norms: Tensor, clip_norm: float) -> Tensor:
    """``min(1, C / ‖x_i‖)`` per client (1 for a zero contribution): the scale that clips each."""
    return torch.where(norms > clip_norm, clip_norm / norms.clamp_min(1e-300), torch.ones_like(norms))


@dataclass
class GaussianMechanism:
    """Clip each client's contribution to ``clip_norm`` (C), sum, add N(0, (σC)²) per coordinate.

    Args:
        clip_norm: C > 0.
        noise_multiplier: σ ≥ 0 (0: clipping only).
        seed: the run seed; the noise of server step s comes from ``(seed, "dp-noise", s)``.
    """

    clip_norm: float
    noise_multiplier: float
    seed: int = 0
    # rounds an earlier stage of the same run spent with this mechanism (the three-stage pipeline's
    # stage 1): counted by the accountant, and skipped by the noise streams (never reused)
    prior_steps: int = 0

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def noise(self, like: Sequence[Tensor], step: int) -> list[Tensor]:
        """One noise tensor shaped, typed and placed as each of ``like``, in order; zeros when σ = 0."""
        if self.noise_multiplier <= 0:
            return [torch.zeros_like(t) for t in like]
        g = torch_generator(self.seed, "dp-noise", self.prior_steps + step)  # a later stage: fresh streams
        return [(torch.randn(t.shape, generator=g, dtype=torch.float32) * self.noise_std).to(t)
                for t in like]

    def mean_update(self, stacked: Sequence[Tensor], step: int) -> tuple[list[Tensor], int]:
        """DP-FedAvg's aggregate of ``stacked`` deltas (each ``[m, *shape]``, one entry per shared
        tensor; a client's norm is over all of them): ``(Σ_i clip_C(Δ_i) + z) / m``, and how many
        of the m clients were clipped."""
        m = stacked[0].shape[0]
        norms = torch.sqrt(sum(s.detach().double().reshape(m, -1).pow(2).sum(1).cpu() for s in stacked))
        factors = clip_factors(norms, self.clip_norm)
        summed = [torch.tensordot(factors.to(s.device, s.dtype), s, dims=1) for s in stacked]
        return [(s + z) / m for s, z in zip(summed, self.noise(summed, step))], int((norms > self.clip_norm).sum())

    def hypernetwork_gradient(self, outputs: Sequence[Tensor], params: Sequence[Tensor], deltas: Sequence[Tensor],
                              step: int) -> tuple[list[Tensor | None], int]:
        """``Σ_i clip_C((∂θ_i/∂φ)ᵀ Δ_i) + z`` over ``params`` (φ), and how many clients were clipped.

        Args:
            outputs: the generated weights, each ``[m, *shape]`` (row i: client i's θ_i), in the
                autograd graph of ``params``.
            params: the hypernetwork's parameters.
            deltas: ``Δ`` shaped as ``outputs``.
            step: the server step (the noise's stream).

        A parameter no output depends on gets None (as ``allow_unused``), without noise: no
        client can reach it. One backward per client; the graph is kept between them.
        """
        m = outputs[0].shape[0]
        total: list[Tensor | None] = [None] * len(params)
        clipped = 0
        for i in range(m):
            rows = [_only_row(d, i) for d in deltas]
            grads = torch.autograd.grad(list(outputs), list(params), rows, retain_graph=True, allow_unused=True)
            norm = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None))
            factor = 1.0 if norm <= self.clip_norm else self.clip_norm / norm
            clipped += factor < 1.0
            for k, g in enumerate(grads):
                if g is not None:
                    total[k] = g * factor if total[k] is None else total[k] + g * factor
        reached = [k for k, t in enumerate(total) if t is not None]
        noise = self.noise([total[k] for k in reached], step)  # type: ignore[misc]
        for k, z in zip(reached, noise):
            total[k] = total[k] + z  # type: ignore[operator]
        return total, clipped


def _only_row(x: Tensor, i: int) -> Tensor:
    """``x`` with every row but row ``i`` zeroed (the grad_outputs of client i alone)."""
    out = torch.zeros_like(x)
    out[i] = x[i]
    return out


# ----------------------------------------------------------------------------------------------
# accounting

def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε of ``steps`` compositions of the Poisson-subsampled Gaussian mechanism (rate
    ``sample_rate``, noise multiplier σ) at ``delta``, by opacus's ``accountant`` ("rdp" or
    "prv"): 0 for no step, ∞ for σ = 0."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant  # heavy import: only when privacy is on

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


class PrivacyAccountant:
    """ε after each round of a run: the run's σ, δ and accountant, sampling rate
    ``clients_per_round / pool_size`` (capped at 1), plus ``prior_steps`` earlier rounds."""

    def __init__(self, config: PrivacyConfig, clients_per_round: int, pool_size: int, prior_steps: int = 0) -> None:
        self.config = config
        self.sample_rate = min(1.0, clients_per_round / max(1, pool_size))
        self.prior_steps = int(prior_steps)
        self._cache: dict[int, float] = {}

    def epsilon(self, rounds: int) -> float:
        steps = self.prior_steps + int(rounds)
        if steps not in self._cache:
            c = self.config
            self._cache[steps] = epsilon(c.noise_multiplier, self.sample_rate, steps, c.delta, c.accountant)
        return self._cache[steps]

    def report(self, rounds: int) -> dict[str, Any]:
        """The summary's ``privacy`` block after ``rounds`` rounds."""
        c = self.config
        return {"epsilon": self.epsilon(rounds), "delta": c.delta, "noise_multiplier": c.noise_multiplier,
                "clip_norm": c.clip_norm, "accountant": c.accountant, "sample_rate": self.sample_rate,
                "steps": self.prior_steps + int(rounds)}


# ----------------------------------------------------------------------------------------------
# wiring

def enable_privacy(algorithm: Any, config: RunConfig) -> None:
    """Give ``algorithm`` the run's Gaussian mechanism (``[privacy]``, when ``clip_norm > 0``).

    Raises ``ConfigError`` for a method without a private server step: one that shares nothing
    (Local), keeps per-client state set from each client's own delta (attentive key layers),
    or aggregates by a rule other than the mean (a median's sensitivity is not bounded by C).
    """
    p = config.privacy
    if not p.enabled:
        return
    method = config.method
    if isinstance(algorithm, HyperNetworkAlgorithm):
        pass
    elif isinstance(algorithm, GlobalModelAlgorithm):
        if not algorithm.server_spec.names:
            raise ConfigError(f"privacy.clip_norm: method {method!r} shares nothing with the server; "
                              "there is nothing to make private (set privacy.clip_norm = 0)")
        if algorithm.aggregate is not weighted_mean:
            key = f"methods.{method}.aggregation" if hasattr(config.method_options, "aggregation") else "method"
            raise ConfigError(f"{key}: differential privacy needs the mean aggregate (the Gaussian mechanism bounds "
                              "a sum of clipped deltas), not a robust rule")
    else:
        raise ConfigError(f"privacy.clip_norm: method {method!r} ({type(algorithm).__name__}) has no differentially "
                          "private server step; use a hypernetwork or FedAvg-family method, or privacy.clip_norm = 0")
    algorithm.privacy = GaussianMechanism(p.clip_norm, p.noise_multiplier, config.seed)
