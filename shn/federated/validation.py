"""Checks on everything a client sends before it can touch the server state or the reported
metrics: updates (delta, example count), client ids, and evaluation reports."""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from shn.target import ParamSpec

log = logging.getLogger("shn.validation")

# The largest example count a client may claim. FedAvg weights updates by the claimed counts, so
# this bounds how much one client can weigh against the others (see Server.receive).
MAX_EXAMPLES = 10**9


@dataclass(frozen=True)
class Rejection:
    client: int | str  # the id as sent when it is not a valid client id
    reason: str


@dataclass
class RejectionLog:
    """Rejections of the current run, by round (for metrics) and in total."""

    by_round: dict[int, list[Rejection]] = field(default_factory=dict)

    def add(self, round_: int, rejection: Rejection) -> None:
        self.by_round.setdefault(round_, []).append(rejection)
        log.warning("round %d: rejected update of client %s: %s", round_, rejection.client, rejection.reason)

    def count(self, round_: int | None = None) -> int:
        if round_ is not None:
            return len(self.by_round.get(round_, []))
        return sum(len(v) for v in self.by_round.values())

    def state_dict(self) -> dict:
        return {r: [(x.client, x.reason) for x in v] for r, v in self.by_round.items()}

    def load_state_dict(self, state: Mapping) -> None:
        self.by_round = {int(r): [Rejection(c, why) for c, why in v] for r, v in state.items()}


@dataclass(frozen=True)
class UnreadableUpdate:
    """An upload that could not be read back into a delta (a malformed compressed payload, an
    unreadable Flower record); :func:`validate_update` rejects it with ``reason``."""

    reason: str


def example_count(value: object, max_examples: int = MAX_EXAMPLES) -> int | str:
    """A client's claimed number of training examples as an int, or the reason it is refused:
    it must be an integer (Python, numpy or a one-element integer tensor; not a bool, not a
    float even if whole) in ``1 … max_examples``."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool:
            return f"example count {value!r} is not a positive integer"
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        return f"example count {value!r} is not a positive integer"
    n = int(value)
    if n <= 0:
        return f"example count {n} is not a positive integer"
    if n > max_examples:
        return f"example count {n} is above the bound {max_examples} (validation max_examples)"
    return n


def validate_update(
    spec: ParamSpec,
    delta: Mapping[str, Tensor],
    num_examples: object,
    max_norm: float,
    dtype: torch.dtype = torch.float32,
    max_examples: int = MAX_EXAMPLES,
) -> str | None:
    """The reason a single client's update must be rejected, or None if it is acceptable.

    ``spec`` lists exactly the tensors the server sent; the delta must match it key for key,
    shape for shape and dtype for dtype, be finite, have L2 norm ≤ ``max_norm``, and come with
    an integer example count in ``1 … max_examples`` (:func:`example_count`).
    """
    if isinstance(delta, UnreadableUpdate):
        return delta.reason
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
    n = example_count(num_examples, max_examples)
    return n if isinstance(n, str) else None


def check_client_ids(clients: Sequence[object], allowed: Collection[int] | None) -> dict[int, str]:
    """``{position: reason}`` for the entries of a round's client list that are not valid ids:
    not an integer, not one of ``allowed`` (the training clients; when None, any id ≥ 0), or
    repeated (every copy: which one is genuine is unknown)."""
    bad: dict[int, str] = {}
    ids: list[int | None] = []
    for i, c in enumerate(clients):
        if isinstance(c, Tensor) and c.numel() == 1 and not c.dtype.is_floating_point and c.dtype != torch.bool:
            c = c.item()
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            bad[i] = f"client id {c!r} is not an integer"
            ids.append(None)
            continue
        c = int(c)
        ids.append(c)
        if c < 0 or (allowed is not None and c not in allowed):
            bad[i] = f"client id {c} is not a training client of this run"
    counts = Counter(c for c in ids if c is not None)
    for i, c in enumerate(ids):
        if c is not None and counts[c] > 1 and i not in bad:
            bad[i] = f"client id {c} appears {counts[c]} times in this round"
    return bad


def safe_validate_update(spec: ParamSpec, delta: object, num_examples: object, max_norm: float,
                         dtype: torch.dtype = torch.float32, max_examples: int = MAX_EXAMPLES) -> str | None:
    """:func:`validate_update` for anything a client may send: an object that breaks the checks
    themselves (a mapping whose lookups raise, an exotic tensor) is rejected with that reason."""
    try:
        return validate_update(spec, delta, num_examples, max_norm, dtype, max_examples)  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001 - a malformed update must never take the server down
        return f"malformed update ({type(e).__name__}: {str(e)[:200]})"


# -- evaluation reports (engines where clients evaluate themselves: Flower) ----------------------

# Metrics with a known range, by base name (without the split prefix and a horizon suffix _hN).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "mae": (0.0, math.inf),
    "mse": (0.0, math.inf),
    "rmse": (0.0, math.inf),
    "mape": (0.0, math.inf),
    "wape": (0.0, math.inf),
    "n": (0.0, 1e9),  # examples evaluated (weights the pooled means; bounded like training counts)
}


def metric_range(key: str) -> tuple[float, float] | None:
    base = key.split("_", 1)[1] if key.startswith(("val_", "test_")) else key
    return METRIC_RANGES.get(re.sub(r"_h\d+$", "", base))


@torch.no_grad()
def expected_metric_keys(task: Any, template_for: Callable[[int], nn.Module], clients: Sequence[int],
                         device: torch.device | str = "cpu") -> frozenset[str]:
    """The metric names an honest client reports (``val_accuracy``, ``test_mse_h3``, ...): the
    task's metrics of the server's own template on two samples of each split (taken from the
    first clients whose split is non-empty)."""
    keys: set[str] = set()
    seen: set[str] = set()
    for c in clients:
        data = task.client_data(int(c))
        for split in ("val", "test"):
            tensors = getattr(data, split)
            if split in seen or int(tensors[0].shape[0]) == 0:
                continue
            batch = tuple(t[:2].to(device) for t in tensors)
            output = template_for(int(c))(batch[0])
            sums = {k: float(v) for k, v in task.metrics(output, *batch[1:]).items()}
            keys |= {f"{split}_{k}" for k in task.finalize(sums)} | {f"{split}_n"}
            seen.add(split)
        if len(seen) == 2:
            break
    return frozenset(keys)


def validate_metrics(row: object, expected: Collection[str], client: int) -> str | None:
    """The reason a client's evaluation report must be rejected, or None: a non-empty mapping of
    ``expected`` metric names only (plus its ``partition-id``, which must be ``client``), every
    value a finite number within its metric's range (:data:`METRIC_RANGES`)."""
    if not isinstance(row, Mapping):
        return f"metrics are a {type(row).__name__}, expected a mapping"
    extra = sorted(str(k) for k in row if k not in expected and k != "partition-id")
    if extra:
        return f"unexpected metrics {extra[:5]}"
    if "partition-id" in row:
        pid = row["partition-id"]
        if isinstance(pid, bool) or not isinstance(pid, (int, np.integer)) or int(pid) != client:
            return f"partition-id {pid!r} in the report of client {client}"
    names = [k for k in row if k != "partition-id"]
    if not names:
        return "no metrics"
    for k in names:
        v = row[k]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            return f"{k}: {v!r} is not a number"
        if not math.isfinite(float(v)):
            return f"{k}: non-finite value {float(v)}"
        bounds = metric_range(str(k))
        if bounds is not None and not bounds[0] <= float(v) <= bounds[1]:
            return f"{k}: {float(v):.6g} outside its range [{bounds[0]}, {bounds[1]}]"
    return None
