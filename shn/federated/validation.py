"""Checks on every client update before it can touch the server state."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from shn.target import ParamSpec

log = logging.getLogger("shn.validation")


@dataclass(frozen=True)
class Rejection:
    client: int
    reason: str


@dataclass
class RejectionLog:
    """Rejections of the current run, by round (for metrics) and in total."""

    by_round: dict[int, list[Rejection]] = field(default_factory=dict)

    def add(self, round_: int, rejection: Rejection) -> None:
        self.by_round.setdefault(round_, []).append(rejection)
        log.warning("round %d: rejected update of client %d: %s", round_, rejection.client, rejection.reason)

    def count(self, round_: int | None = None) -> int:
        if round_ is not None:
            return len(self.by_round.get(round_, []))
        return sum(len(v) for v in self.by_round.values())

    def state_dict(self) -> dict:
        return {r: [(x.client, x.reason) for x in v] for r, v in self.by_round.items()}

    def load_state_dict(self, state: Mapping) -> None:
        self.by_round = {int(r): [Rejection(c, why) for c, why in v] for r, v in state.items()}


def validate_update(
    spec: ParamSpec,
    delta: Mapping[str, Tensor],
    num_examples: object,
    max_norm: float,
    dtype: torch.dtype = torch.float32,
) -> str | None:
    """The reason a single client's update must be rejected, or None if it is acceptable.

    ``spec`` lists exactly the tensors the server sent; the delta must match it key for key,
    shape for shape and dtype for dtype, be finite, have L2 norm ≤ ``max_norm``, and come with
    a positive integer example count.
    """
    if not isinstance(delta, Mapping):
        return f"update is a {type(delta).__name__}, expected a mapping of tensors"
    missing = [n for n in spec.names if n not in delta]
    extra = [n for n in delta if n not in spec.names]
    if missing:
        return f"missing tensors {missing[:5]}"
    if extra:
        return f"unexpected tensors {extra[:5]}"
    sq = 0.0
    for name, shape in zip(spec.names, spec.shapes):
        t = delta[name]
        if not isinstance(t, Tensor):
            return f"{name}: not a tensor ({type(t).__name__})"
        if t.layout != torch.strided:
            return f"{name}: a {t.layout} tensor, expected a dense one"
        if tuple(t.shape) != tuple(shape):
            return f"{name}: shape {tuple(t.shape)}, expected {tuple(shape)}"
        if t.dtype != dtype:
            return f"{name}: dtype {t.dtype}, expected {dtype}"
        if not bool(torch.isfinite(t).all()):
            return f"{name}: non-finite values"
        sq += float(t.double().pow(2).sum())
    norm = math.sqrt(sq)
    if norm > max_norm:
        return f"norm {norm:.4g} above the bound {max_norm:.4g}"
    if isinstance(num_examples, np.integer):
        num_examples = int(num_examples)
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
        if not (isinstance(num_examples, Tensor) and num_examples.numel() == 1
                and not num_examples.dtype.is_floating_point and not num_examples.is_complex()
                and num_examples.dtype != torch.bool and int(num_examples) > 0):
            return f"example count {num_examples!r} is not a positive integer"
    return None


def safe_validate_update(spec: ParamSpec, delta: object, num_examples: object, max_norm: float,
                         dtype: torch.dtype = torch.float32) -> str | None:
    """:func:`validate_update` for anything a client may send: an object that breaks the checks
    themselves (a mapping whose lookups raise, an exotic tensor) is rejected with that reason."""
    try:
        return validate_update(spec, delta, num_examples, max_norm, dtype)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - a malformed update must never take the server down
        return f"malformed update ({type(e).__name__}: {str(e)[:200]})"
