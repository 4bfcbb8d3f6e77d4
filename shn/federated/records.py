"""The run directory: resolved config, metrics log, summary, crash-safe checkpoints.

Checkpoints hold plain data only — tensors, dicts, lists, tuples, numbers, strings — and are read
back with ``torch.load(..., weights_only=True)``: a checkpoint received from someone else cannot
run code when loaded (one that needs more is refused). JSON files are strict JSON: non-finite
numbers are written as ``null``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import statistics
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

log = logging.getLogger("shn.records")

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back, or does not fit the run it is loaded into."""


class WriteError(RuntimeError):
    """A run-directory file that could not be written (disk full, no permission); one line."""


# -- writing ------------------------------------------------------------------------------------

def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _cleaned_up(tmp: Path, target: Path, what: str) -> Iterator[None]:
    """An OSError (ENOSPC, EACCES, ...) while writing ``target`` via ``tmp``: remove ``tmp``
    and raise one :class:`WriteError` line."""
    try:
        yield
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(f"{target}: cannot write {what} ({e.strerror or e}); {tmp.name} removed") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write-then-rename, fsynced: ``path`` is either the old or the new content, never partial."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with _cleaned_up(tmp, path, "the file"):
        _write_synced(tmp, data)
        os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(run_dir: Path, state: Mapping[str, Any]) -> Path:
    """Write-then-rename; the previous checkpoint is kept as ``checkpoint.prev.pt`` so a crash at
    any moment leaves at least one complete checkpoint. ``state`` is converted to plain data
    (:func:`plain`); a full disk raises :class:`WriteError` and leaves no temporary file."""
    buf = io.BytesIO()
    torch.save(plain(dict(state)), buf)
    path = run_dir / CHECKPOINT
    tmp = run_dir / (CHECKPOINT + ".tmp")
    with _cleaned_up(tmp, path, "the checkpoint (the previous one is kept)"):
        _write_synced(tmp, buf.getvalue())
        if path.exists():
            os.replace(path, run_dir / PREVIOUS)
        os.replace(tmp, path)
    return path


def plain(obj: Any, where: str = "state") -> Any:
    """``obj`` as data that ``torch.load(weights_only=True)`` reads: tensors (parameters
    detached), dicts, lists, tuples, numbers, strings, None; numpy values become tensors or
    Python numbers, paths strings. Anything else is a programming error (TypeError naming it)."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach() if type(obj) is not torch.Tensor else obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        out = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for k, v in obj.items():
            out[plain(k, f"{where} key")] = plain(v, f"{where}[{k!r}]")
        meta = getattr(obj, "_metadata", None)  # nn.Module.state_dict()'s version info
        if isinstance(out, OrderedDict) and meta is not None:
            out._metadata = plain(meta, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__name__} cannot go into a checkpoint (plain data only)")


# -- reading ------------------------------------------------------------------------------------

def _why(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
        return "refused: it is not plain data and loading it would run code from the file"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"corrupt or truncated checkpoint ({type(e).__name__}: {first})"


def load_checkpoint_file(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(file, state)`` of the newest readable checkpoint, or None if the run has none.

    Files are read with ``weights_only=True``. A corrupt, truncated or unsafe newest checkpoint
    is reported (a warning) and the previous good one used; the bad file is moved aside to
    ``<name>.corrupt`` so that the next save cannot rotate it over the good one. If none is
    readable, raise :class:`CheckpointError` naming the files (one line); nothing is moved then.
    """
    present = [p for p in (run_dir / CHECKPOINT, run_dir / PREVIOUS) if p.exists()]
    if not present:
        return None
    errors: list[tuple[Path, str]] = []
    for p in present:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "round" not in state:
                raise CheckpointError("not a shn checkpoint (no 'round')")
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            errors.append((p, f"{p}: {_why(e)}"))
            continue
        for bad, why in errors:
            aside = bad.with_name(bad.name + ".corrupt")
            os.replace(bad, aside)
            log.warning("%s; moved it to %s and resuming from %s (round %s)", why, aside.name, p, state["round"])
        return p, state
    raise CheckpointError(f"cannot resume from {run_dir}: no readable checkpoint: " + "; ".join(why for _, why in errors))


def load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The state of :func:`load_checkpoint_file` (None if the run has no checkpoint)."""
    found = load_checkpoint_file(run_dir)
    return None if found is None else found[1]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What a run's checkpoint holds (Simulation._state) and what each entry must be.
_RUN_STATE: dict[str, tuple[str, Any]] = {
    "round": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "elapsed": ("a number", _is_number),
    "algorithm": ("a dict", lambda v: isinstance(v, dict)),
    "personal": ("a dict", lambda v: isinstance(v, dict)),
    "rejections": ("a dict", lambda v: isinstance(v, dict)),
    "history": ("a list of dicts", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v)),
    "per_client": ("a dict of dicts", lambda v: isinstance(v, dict) and all(isinstance(r, dict) for r in v.values())),
    "failed": ("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "train_losses": ("a list of numbers", lambda v: isinstance(v, list) and all(_is_number(x) for x in v)),
}


def check_run_state(state: Mapping[str, Any], source: Path | str) -> None:
    """A checkpoint's structure, before anything is restored from it: one CheckpointError line
    naming the file and the first entry that is missing or of the wrong kind."""
    for key, (expected, ok) in _RUN_STATE.items():
        if key not in state:
            raise CheckpointError(f"{source}: not a checkpoint of a shn run: {key!r} is missing")
        if not ok(state[key]):
            raise CheckpointError(f"{source}: not a checkpoint of a shn run: {key!r} should be {expected}, "
                                  f"got {type(state[key]).__name__}")


@contextlib.contextmanager
def restoring(source: Path | str) -> Iterator[None]:
    """Errors while restoring objects from a checkpoint (a missing key, a shape that differs:
    a checkpoint of another method or model) become one CheckpointError line."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever load_state_dict raises on foreign data
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{source}: does not fit this run ({type(e).__name__}: {first})") from None


# -- metrics and JSON ---------------------------------------------------------------------------

def mean_over_clients(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    keys = sorted({k for row in per_client.values() for k in row})
    out = {}
    for k in keys:
        vals = [row[k] for row in per_client.values() if k in row and math.isfinite(row[k])]
        out[k] = statistics.fmean(vals) if vals else float("nan")
    return out


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.floating):
        return strict(float(obj))
    if isinstance(obj, Mapping):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (RFC 8259): non-finite numbers become ``null``, never bare ``NaN``."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


class MetricsLog:
    """``metrics.jsonl``: one JSON line per evaluation, rewritten from the checkpointed history
    on resume so a killed run never leaves duplicate or orphan lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self, records: Iterable[Mapping[str, Any]]) -> None:
        atomic_write_text(self.path, "".join(dumps_json(r, sort_keys=True) + "\n" for r in records))

    def append(self, record: Mapping[str, Any]) -> None:
        line = dumps_json(record, sort_keys=True) + "\n"
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:
            with contextlib.suppress(OSError):  # no partial line left behind
                os.truncate(self.path, size)
            raise WriteError(f"{self.path}: cannot append the round's metrics ({e.strerror or e})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
