"""Robust aggregation rules for averaging methods (FedAvg / FedOpt's pseudo-gradient).

Each rule maps the accepted clients' stacked deltas ``[C, *shape]`` and their example counts
``[C]`` to one aggregate ``[*shape]`` (the ``aggregate`` argument of ``GlobalModelAlgorithm``):

* ``mean`` — the example-weighted mean (FedAvg);
* ``median`` — the coordinate-wise median (Yin et al., 2018), unweighted; for an even C the
  mean of the two middle values, so the result does not depend on the clients' order;
* ``trimmed_mean`` — the coordinate-wise β-trimmed mean (Yin et al., 2018): per coordinate, drop
  the ``k = floor(β·C)`` largest and ``k`` smallest values and average the rest, unweighted;
  ``k`` is capped at ``(C − 1) // 2`` so at least one value is left.

The robust rules ignore the example counts on purpose: a malicious client could inflate its
count to dominate any weighted rule.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from shn.federated.algorithm import weighted_mean

Aggregate = Callable[[Tensor, Tensor], Tensor]

AGGREGATIONS = ("mean", "median", "trimmed_mean")


def coordinate_median(stacked: Tensor, weights: Tensor | None = None) -> Tensor:
    """Coordinate-wise median of ``stacked [C, *shape]`` (mean of the two middle values for even C)."""
    _check(stacked)
    c = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    lo, hi = (c - 1) // 2, c // 2
    return ordered[lo] if lo == hi else (ordered[lo] + ordered[hi]) / 2


def trimmed_mean(stacked: Tensor, weights: Tensor | None = None, trim_fraction: float = 0.1) -> Tensor:
    """Coordinate-wise mean of ``stacked [C, *shape]`` after dropping the ``floor(trim_fraction·C)``
    largest and smallest values of each coordinate (at most ``(C − 1) // 2`` each side)."""
    _check(stacked)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    c = stacked.shape[0]
    k = min(math.floor(trim_fraction * c), (c - 1) // 2)
    ordered = stacked.sort(dim=0).values
    return ordered[k:c - k].mean(dim=0)


def make_aggregate(kind: str, trim_fraction: float = 0.1) -> Aggregate:
    """The ``aggregate(stacked, weights)`` function for ``kind`` (one of :data:`AGGREGATIONS`)."""
    if kind == "mean":
        return weighted_mean
    if kind == "median":
        return coordinate_median
    if kind == "trimmed_mean":
        return partial(trimmed_mean, trim_fraction=trim_fraction)
    raise ValueError(f"unknown aggregation {kind!r}; allowed: {', '.join(AGGREGATIONS)}")


def _check(stacked: Tensor) -> None:
    if stacked.dim() < 1 or stacked.shape[0] < 1:
        raise ValueError(f"need at least one client's delta, got shape {tuple(stacked.shape)}")
