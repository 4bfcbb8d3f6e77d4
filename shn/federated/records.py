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
    """The newest readable checkpoint, or None if the run has none.

    A corrupt or truncated newest checkpoint is reported (a warning) and the previous good one
    used; the corrupt file is moved aside to ``<name>.corrupt`` so that the next save cannot
    rotate it over the good one. If none is readable, raise :class:`CheckpointError` naming the
    files (one line); nothing is moved or deleted then.
    """
    candidates = [run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"]
    present = [p for p in candidates if p.exists()]
    if not present:
        return None
    errors: list[tuple[Path, str]] = []
    for p in present:
        try:
            state = torch.load(p, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "round" not in state:
                raise CheckpointError("not a shn checkpoint (no 'round')")
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            first = (str(e).strip().splitlines() or [""])[0][:200]
            errors.append((p, f"{p}: corrupt or truncated checkpoint ({type(e).__name__}: {first})"))
            continue
        for bad, why in errors:
            aside = bad.with_name(bad.name + ".corrupt")
            os.replace(bad, aside)
            log.warning("%s; moved it to %s and resuming from %s (round %s)", why, aside.name, p, state["round"])
        return state
    raise CheckpointError(f"cannot resume from {run_dir}: no readable checkpoint: " + "; ".join(why for _, why in errors))


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
