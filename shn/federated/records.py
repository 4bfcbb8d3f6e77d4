"""The run directory: resolved config, metrics log, summary, crash-safe checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

log = logging.getLogger("shn.records")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(run_dir: Path, state: Mapping[str, Any]) -> Path:
    """Write-then-rename; the previous checkpoint is kept as ``checkpoint.prev.pt`` so a crash at
    any moment leaves at least one complete checkpoint."""
    import io

    buf = io.BytesIO()
    torch.save(dict(state), buf)
    path = run_dir / "checkpoint.pt"
    tmp = run_dir / "checkpoint.pt.tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, run_dir / "checkpoint.prev.pt")
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint, or None if the run has none. A corrupt newest
    checkpoint is reported and the previous good one used; if none is readable, raise."""
    candidates = [run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"]
    present = [p for p in candidates if p.exists()]
    if not present:
        return None
    errors = []
    for p in present:
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "round" not in state:
                raise CheckpointError("not a shn checkpoint (no 'round')")
            if errors:
                log.warning("%s; resuming from %s instead", errors[-1], p)
            return state
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            errors.append(f"{p}: corrupt or truncated checkpoint ({type(e).__name__}: {e})")
    raise CheckpointError("; ".join(errors))


def mean_over_clients(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    keys = sorted({k for row in per_client.values() for k in row})
    out = {}
    for k in keys:
        vals = [row[k] for row in per_client.values() if k in row and math.isfinite(row[k])]
        out[k] = statistics.fmean(vals) if vals else float("nan")
    return out


class MetricsLog:
    """``metrics.jsonl``: one JSON line per evaluation, rewritten from the checkpointed history
    on resume so a killed run never leaves duplicate or orphan lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self, records: Iterable[Mapping[str, Any]]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def append(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
