"""Reading user input for client graphs: tensors, integer ids, node counts, weights, edge lists.

Shared by the container and the builders, so every entry point rejects bad input with the same
one-line :class:`ValueError`; also :func:`_coalesce`, the sort-and-merge that makes an edge list
canonical (sorted by ``(row, col)``, duplicates merged keeping the largest weight).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what} could not be read as a tensor: {err}") from err


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _as_num_nodes(value: Any) -> int:
    n = _as_int(value, "num_nodes")
    if n < 1:
        raise ValueError(f"num_nodes must be at least 1, got {n}")
    return n


def _as_node(value: Any, num_nodes: int) -> int:
    i = _as_int(value.item() if isinstance(value, Tensor) and value.numel() == 1 else value, "node")
    if not 0 <= i < num_nodes:
        raise ValueError(f"node {i} out of range [0, {num_nodes})")
    return i


def _as_weight(value: Any, device: torch.device) -> Tensor:
    w = _as_tensor(value, "edge_weight")
    if not w.is_floating_point():
        w = w.to(torch.get_default_dtype())
    return w.to(device)


def _parse_edges(edges: Any, layout: str) -> Tensor:
    """Edge list → ``[2, E]`` int64 (range and loops are checked by :class:`ClientGraph`)."""
    if layout not in ("auto", "pairs", "index"):
        raise ValueError(f"layout must be 'auto', 'pairs' or 'index', got {layout!r}")
    t = _as_tensor(edges, "edges")
    if t.numel() == 0:
        return torch.zeros(2, 0, dtype=torch.long, device=t.device)
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"edges must hold integer node ids, got {t.dtype}")
    if t.dim() != 2 or 2 not in t.shape:
        raise ValueError(f"edges must have shape [E, 2] or [2, E], got {list(t.shape)}")
    if layout == "pairs" or (layout == "auto" and t.shape[1] == 2):
        if t.shape[1] != 2:
            raise ValueError(f"layout='pairs' needs shape [E, 2], got {list(t.shape)}")
        t = t.T
    elif t.shape[0] != 2:
        raise ValueError(f"layout='index' needs shape [2, E], got {list(t.shape)}")
    return t.long().contiguous()


def _coalesce(
    row: Tensor, col: Tensor, weight: Tensor | None, num_nodes: int
) -> tuple[Tensor, Tensor | None]:
    """Sorted unique edges; duplicates merged keeping the largest weight. Inputs are in range
    and loop-free; output is canonical, so callers may use ``ClientGraph._unchecked``."""
    key = row * num_nodes + col
    uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
    edge_index = torch.stack([uniq // num_nodes, uniq % num_nodes])
    if weight is None:
        return edge_index, None
    merged = weight.new_zeros(uniq.numel()).scatter_reduce(0, inv, weight, reduce="amax", include_self=False)
    return edge_index, merged
