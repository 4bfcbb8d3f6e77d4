"""A Flower client's personal state on its own disk, so that a resumed run continues exactly.

Personal tensors (FedPer heads, Local's model, Ditto's personal model) and error-feedback
residuals live in the node's ``context.state``, which Flower keeps for one run only: a ServerApp
restarted with ``resume`` is a new Flower run whose contexts start empty. With a state directory
(node config ``state-dir``, else run config ``client-state-dir``) the ClientApp writes its
client's state after every round it trains in, ``<dir>/<run key>/client-<c>/round-<r>.pt``, and
on the first message of a resumed run restores the newest snapshot at or before the round the
server resumed from (``resumed-from`` in every message). After a resume the rounds replay
deterministically, so a snapshot newer than that round is rewritten with the same values; older
snapshots than the newest one at or before the server's last checkpoint are deleted.

The run key comes from the server (a hash of the training-relevant config, :func:`run_key`);
the client only accepts 16 hex digits, so it never names a path outside its directory. Files
are read with ``torch.load(weights_only=True)``: plain tensors, no code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from shn.config import RunConfig
from shn.rundir import training_config

__all__ = ["run_key", "state_dir", "ClientSnapshots"]

_KEY = re.compile(r"[0-9a-f]{16}")
_FILE = re.compile(r"round-(\d+)\.pt")
RESTORED_PREFIX = "shn.restored."  # context.state: the round this context was restored from


def run_key(config: RunConfig) -> str:
    """16 hex digits naming a run's client snapshots: equal for a run and its resumption (the
    keys ``shn run --resume`` compares; ``rounds`` may grow), different for another config."""
    text = json.dumps(training_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_dir(context: Any) -> Path | None:
    """The node's ``state-dir`` (node config), else the run's ``client-state-dir``; None: the
    state stays in ``context.state`` only (a resumed run then starts it afresh)."""
    for table, key in ((getattr(context, "node_config", None), "state-dir"),
                       (getattr(context, "run_config", None), "client-state-dir")):
        value = str((table or {}).get(key) or "").strip()
        if value:
            return Path(value).expanduser()
    return None


class ClientSnapshots:
    """One client's snapshots under ``root / key`` (see the module docstring). ``entries`` are
    the ``context.state`` key prefixes that make up the client's state."""

    def __init__(self, root: Path, key: str, client: int, prefixes: tuple[str, ...]) -> None:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(f"run-key: expected 16 hex digits, got {str(key)[:40]!r}")
        self.folder = Path(root) / key / f"client-{int(client)}"
        self.client = int(client)
        self.names = tuple(f"{p}{int(client)}" for p in prefixes)

    def _rounds(self) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        found = {}
        for p in self.folder.iterdir():
            m = _FILE.fullmatch(p.name)
            if m:
                found[int(m.group(1))] = p
        return found

    def save(self, round_: int, state: Any) -> None:
        """Write the client's entries of ``state`` (ArrayRecords) as the snapshot after ``round_``."""
        data = {name: dict(state[name].to_torch_state_dict()) for name in self.names if name in state}
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".round-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / f"round-{int(round_)}.pt")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def restore(self, upto: int, state: Any, arrays: Any) -> int | None:
        """Replace the client's entries of ``state`` with the newest snapshot at or before round
        ``upto``; the snapshot's round, or None (no snapshot: the client had not trained yet)."""
        for name in self.names:
            if name in state:
                del state[name]
        found = self._rounds()
        rounds = [r for r in found if r <= upto]
        if not rounds:
            return None
        best = max(rounds)
        path = found[best]
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file is one clear line
            raise ValueError(f"{path}: not a readable client snapshot ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(data, Mapping) or not all(
                k in self.names and isinstance(v, Mapping) and all(isinstance(t, torch.Tensor) for t in v.values())
                for k, v in data.items()):
            raise ValueError(f"{path}: not a client snapshot of client {self.client} (unexpected entries)")
        for name, tensors in data.items():
            state[name] = arrays(tensors)
        return best

    def prune(self, checkpoint: int) -> None:
        """Delete the snapshots a resumption can no longer need: those older than the newest one
        at or before the server's last checkpoint round."""
        rounds = self._rounds()
        kept = [r for r in rounds if r <= checkpoint]
        if not kept:
            return
        newest = max(kept)
        for r, p in rounds.items():
            if r < newest:
                p.unlink(missing_ok=True)

    def clear(self) -> None:
        """A fresh run: no snapshot of an earlier run under this key may be restored."""
        shutil.rmtree(self.folder, ignore_errors=True)
