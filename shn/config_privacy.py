"""The ``[privacy]`` table: client-level differential privacy (kept out of :mod:`shn.config`
so that module stays one table per concern; the mechanism is :mod:`shn.federated.privacy`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from shn.config_files import ConfigError

__all__ = ["PrivacyConfig"]


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg, McMahan et al. 2018): each client's
    contribution to a server step is clipped to L2 norm ``clip_norm`` = C, and Gaussian noise of
    std ``noise_multiplier`` × C is added to the sum (:mod:`shn.federated.privacy`). The ε spent
    at ``delta`` is reported in every evaluation record (``epsilon``) and in the summary.

    Attributes:
        clip_norm: C, the bound on one client's contribution (FedAvg family: its delta; hypernetwork
            methods: its vector-Jacobian product on the hypernetwork); 0: privacy off.
        noise_multiplier: σ: noise std σ·C on the summed contributions; 0: clipping only (ε = ∞).
        delta: the δ at which ε is reported, in (0, 1) (choose it below 1 / number of clients).
        accountant: opacus's "rdp" (Rényi DP) or "prv" (privacy random variables) accountant,
            with sampling rate clients_per_round / training clients and one step per round.
    """

    clip_norm: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{name}: must be ≥ 0, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{name}: must be finite, got {value!r}")
        if self.noise_multiplier > 0 and self.clip_norm <= 0:
            raise ConfigError("noise_multiplier: noise needs privacy.clip_norm > 0 (the noise std is σ × clip_norm)")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta: must be in (0, 1), got {self.delta!r}")

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0
