"""The ``[compression]`` table: how clients compress what they upload (kept out of
:mod:`shn.config` so that module stays one screenful of tables per concern)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from shn.config_files import ConfigError

__all__ = ["CompressionConfig"]


@dataclass(frozen=True)
class CompressionConfig:
    """Compression of the clients' uploads (their deltas), for every method: the server decodes
    each upload before validation and aggregation, so methods run unchanged. Downloads are
    sent dense. Bytes are counted either way (``bytes_down``, ``bytes_up`` in metrics.jsonl).

    Attributes:
        kind: "none" (dense float32 deltas), "topk" (per tensor, the ceil(topk_fraction × size)
            entries of largest magnitude, sent as int32 indices and float32 values) or "qsgd8"
            (per tensor, unbiased stochastic rounding to 255 levels in [-max|x|, max|x|]: one
            int8 per entry and a float32 scale; the rounding noise is drawn from the run seed,
            per round and client).
        topk_fraction: "topk": share of each tensor's entries a client sends, in (0, 1]; at
            least one entry per tensor.
        error_feedback: each client keeps what compression dropped (its residual, never sent)
            and adds it to its next upload, so nothing is lost, only delayed (Stich et al.,
            2018). The residual is client state: in checkpoints, and in a Flower node's
            context.state.
    """

    kind: Literal["none", "topk", "qsgd8"] = "none"
    topk_fraction: float = 0.1
    error_feedback: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.topk_fraction, (int, float)) and math.isfinite(self.topk_fraction)
                and 0.0 < self.topk_fraction <= 1.0):
            raise ConfigError(f"topk_fraction: must be in (0, 1], got {self.topk_fraction!r}")
