"""Communication accounting: the bytes each client receives and sends, counted the same way on
every engine.

**The measure.** A payload is a dict of tensors: exactly what the Flower engine puts into a
message's ArrayRecord (the weights a client receives, ``"arrays"``; what it sends back,
``"delta"``, compressed or not: :mod:`shn.federated.compression`). Its size is Flower's own
``ArrayRecord.count_bytes()``: each tensor as ``numpy.save`` writes it (a .npy header, 128 bytes
for the usual shapes, plus the raw data) plus the length of its key. :func:`payload_bytes`
computes it from dtypes and shapes alone, so the in-process engine counts what Flower would
serialise without serialising anything (``tests/test_compression.py`` checks the two agree).

Counted: the training exchanges (weights down, the upload back). Not counted: the control
fields of a message (round, config text, metrics: constant per message and independent of the
method) and evaluation traffic (the in-process engine evaluates on the server; on Flower it is
a measurement, not training).
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["Traffic", "npy_bytes", "payload_bytes"]


@functools.lru_cache(maxsize=None)
def _dtype_info(dtype: torch.dtype) -> tuple[str, int]:
    """(numpy descr, bytes per element) of a torch dtype."""
    array = torch.empty(0, dtype=dtype).numpy()
    return np.lib.format.dtype_to_descr(array.dtype), array.dtype.itemsize


@functools.lru_cache(maxsize=4096)
def _header_bytes(descr: str, shape: tuple[int, ...]) -> int:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.tell()


def npy_bytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes of a C-contiguous tensor of ``dtype`` and ``shape`` as ``numpy.save`` writes it."""
    descr, itemsize = _dtype_info(dtype)
    shape = tuple(int(s) for s in shape)
    return _header_bytes(descr, shape) + math.prod(shape) * itemsize


def payload_bytes(payload: Mapping[str, Tensor], batch_dims: int = 0) -> int:
    """Flower's ``ArrayRecord(payload).count_bytes()``, from dtypes and shapes. ``batch_dims``:
    leading dimensions to leave out (a cohort's stacked ``{name: [C, *shape]}``: one client's row)."""
    return sum(len(k) + npy_bytes(t.dtype, t.shape[batch_dims:]) for k, t in payload.items())


class Traffic:
    """Cumulative bytes sent to (``down``) and received from (``up``) each client."""

    def __init__(self) -> None:
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}

    def sent(self, client: int, nbytes: int) -> None:
        self.down[int(client)] = self.down.get(int(client), 0) + int(nbytes)

    def received(self, client: int, nbytes: int) -> None:
        self.up[int(client)] = self.up.get(int(client), 0) + int(nbytes)

    def record(self) -> dict[str, int]:
        """The totals so far, as every metrics.jsonl record carries them."""
        down, up = sum(self.down.values()), sum(self.up.values())
        return {"bytes_down": down, "bytes_up": up, "bytes_total": down + up}

    def summary(self, compression: Any = None) -> dict[str, Any]:
        """``summary.json``'s ``communication``: the totals, the compression used, per client."""
        clients = sorted(set(self.down) | set(self.up))
        out: dict[str, Any] = dict(self.record())
        if compression is not None:
            out["compression"] = {k: getattr(compression, k) for k in ("kind", "topk_fraction", "error_feedback")}
        out["per_client"] = {str(c): {"bytes_down": self.down.get(c, 0), "bytes_up": self.up.get(c, 0)} for c in clients}
        return out

    def state_dict(self) -> dict[str, dict[int, int]]:
        return {"down": dict(self.down), "up": dict(self.up)}

    def load_state_dict(self, state: Mapping[str, Mapping[Any, int]]) -> None:
        self.down = {int(c): int(n) for c, n in state.get("down", {}).items()}
        self.up = {int(c): int(n) for c, n in state.get("up", {}).items()}
