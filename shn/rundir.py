"""Claiming a run directory: one writer at a time, no silent loss of a finished run, and a resume
that continues the *same* run.

* **Lock.** A process writing a run directory holds an exclusive ``flock`` on ``<dir>/.lock``
  (the holder's pid is written in it); a second process is refused with one line naming that pid.
  The lock is released when the process ends, however it ends; the file itself stays.
* **Finished or unfinished runs are not replaced** without being asked: a directory with a
  ``summary.json`` (finished) or a checkpoint (unfinished) is refused unless the run resumes it or
  overwrites it (``--force``: its checkpoints, metrics and summary are removed first).
* **Resume checks the config** against the run's ``config.toml`` before anything is written:
  every training-relevant key must be equal (:data:`MAY_DIFFER` lists the keys that may change),
  and ``rounds`` may only stay or grow (growing extends the run).

:class:`RunDirError` is a user error: one line, exit code 2.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from shn.config import ConfigError, RunConfig, config_to_dict, load_config

__all__ = ["LOCK", "MAY_DIFFER", "RunDirError", "check_run_dir", "claim", "claim_early", "clear_run", "locked",
           "resume_conflicts"]

LOCK = ".lock"
# Config keys a resumed run may change: where it runs and what it evaluates or saves when; none of
# them changes what is trained. (``novel.*`` but ``fraction`` acts after training; inactive
# methods' tables and the sweep space are unused by a run.)
MAY_DIFFER = ("device", "eval_every", "checkpoint_every", "graph.stage1_cache", "novel.steps", "novel.lr",
              "novel.reattach_every")
# What a run writes that a later run with other settings must not inherit.
RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "checkpoint.pt.tmp", "checkpoint.pt.corrupt",
             "checkpoint.prev.pt.corrupt", "metrics.jsonl", "summary.json")

try:  # POSIX; elsewhere runs are not locked (documented)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked (in use, finished, another config); one line."""


# Locks this process holds: path -> (fd, depth). A process re-entering its own lock (a pipeline
# stage inside the pipeline's run) must not block on itself: flock locks conflict per open file.
_HELD: dict[str, list[int]] = {}


def _directory(run_dir: Path) -> Path:
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a directory; the run directory (--out) must be a "
                          "directory, new or holding a run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, read-only file system
        raise RunDirError(f"{run_dir}: cannot create the run directory ({e.strerror or e})") from None
    return run_dir


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text().split()[0])
        return f"pid {pid}"
    return "pid unknown"


@contextlib.contextmanager
def locked(run_dir: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold the run directory's exclusive lock for the block (created if needed). Held by
    another process: :class:`RunDirError` naming its pid, or with ``wait`` block until it is
    released. Re-entrant within one process."""
    path = _directory(Path(run_dir))
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    if fcntl is None:  # pragma: no cover
        yield path
        return
    lock_file = path / LOCK
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"{lock_file}: cannot create the run directory's lock file ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunDirError(f"{path}: in use by another shn process ({_holder(lock_file)}, see {LOCK}); wait "
                              "for it to finish or use another run directory (--out)") from None
        with contextlib.suppress(OSError):  # the pid is for the message above; a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = [fd, 1]
        try:
            yield path
        finally:
            del _HELD[key]
    finally:
        os.close(fd)  # releases the lock


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_config(config: RunConfig, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config's training-relevant keys (dotted): what a resumed run must keep."""
    options = config.method_options  # the active method's, defaults filled in: given or not, the same
    data = config_to_dict(replace(config, sweep={}, methods={} if options is None else {config.method: options}))
    flat = _flat(data)
    skip = MAY_DIFFER + ("rounds",) + ignore
    return {k: v for k, v in flat.items() if not any(k == s or k.startswith(s + ".") for s in skip)}


def resume_conflicts(stored: RunConfig, new: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """The training-relevant keys (dotted) whose values differ between a run's stored config and
    the config it is resumed with; ``rounds`` and :data:`MAY_DIFFER` are not compared, nor keys
    under a prefix in ``ignore``."""
    a, b = training_config(stored, ignore), training_config(new, ignore)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value)


def check_run_dir(run_dir: str | Path, config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                  ignore: tuple[str, ...] = ()) -> None:
    """May ``config`` be run into ``run_dir`` as asked? Reads only; :class:`RunDirError` (one
    line) when the directory holds a run that this would replace or mix with another config."""
    path = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("resume and overwrite (--resume, --force) exclude each other")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path}: exists and is not a directory; the run directory (--out) must be a "
                          "directory, new or holding a run")
    if overwrite or not path.is_dir():
        return
    finished = (path / "summary.json").is_file()
    checkpoint = any((path / f).is_file() for f in ("checkpoint.pt", "checkpoint.prev.pt"))
    if not resume:
        if finished:
            raise RunDirError(f"{path}: holds a finished run (summary.json); use --resume to continue or extend it "
                              "(more rounds), --force to replace it, or another run directory (--out)")
        if checkpoint:
            raise RunDirError(f"{path}: holds an unfinished run (checkpoint.pt); use --resume to continue it, "
                              "--force to start over, or another run directory (--out)")
        return
    if not checkpoint:
        if finished:
            raise RunDirError(f"{path}: holds a finished run without a checkpoint to continue from; use --force "
                              "to replace it, or another run directory (--out)")
        return  # nothing to continue: a fresh start
    stored_file = path / "config.toml"
    if not stored_file.is_file():
        raise RunDirError(f"{path}: has a checkpoint but no config.toml to check the config against; "
                          "use --force to start over")
    try:
        stored = load_config(stored_file)
    except ConfigError as e:
        raise RunDirError(f"cannot resume: the run's own config is unreadable: {e}") from None
    conflicts = resume_conflicts(stored, config, ignore)
    if conflicts:
        a, b = _flat(config_to_dict(stored)), _flat(config_to_dict(config))
        shown = "; ".join(f"{k}: {_shown(a.get(k))} -> {_shown(b.get(k))}" for k in conflicts[:4])
        more = f" (and {len(conflicts) - 4} more)" if len(conflicts) > 4 else ""
        raise RunDirError(f"{path}: cannot resume with another config: {', '.join(conflicts)} differ from the run's "
                          f"config.toml ({shown}{more}); resume with the run's values, or use --force to start over")
    if config.rounds < stored.rounds:
        raise RunDirError(f"rounds: {config.rounds} is fewer than the {stored.rounds} rounds of the run in {path}; "
                          "a resumed run keeps or extends its rounds (use another run directory for a shorter run)")


def clear_run(run_dir: str | Path) -> None:
    """Remove what a previous run wrote (checkpoints, metrics, summary) before a run overwrites
    the directory, so nothing of it can be resumed or reported with the new config."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (Path(run_dir) / name).unlink()


@contextlib.contextmanager
def claim(run_dir: str | Path, config: RunConfig, *, resume: bool = False, overwrite: bool = False,
          ignore: tuple[str, ...] = ()) -> Iterator[Path]:
    """Lock ``run_dir``, check it (:func:`check_run_dir`) and, when overwriting, clear it; the
    run writes the directory inside the block. Nothing but the directory and its lock file is
    created before the checks pass."""
    with locked(run_dir) as path:  # first: a run in progress is reported as such, not as "unfinished"
        check_run_dir(path, config, resume=resume, overwrite=overwrite, ignore=ignore)
        if overwrite:
            clear_run(path)
        yield path


@contextlib.contextmanager
def claim_early(run_dir: str | Path | None, config: RunConfig, *, resume: bool = False,
                overwrite: bool = False) -> Iterator[None]:
    """For a block that builds a run before :func:`claim` (a task may take minutes to load): an
    existing ``run_dir`` is locked and checked now, so that a refusal comes first; a new one is
    not created yet (a build that fails leaves nothing behind)."""
    if run_dir is None or not Path(run_dir).exists():
        yield
        return
    with locked(run_dir) as path:
        check_run_dir(path, config, resume=resume, overwrite=overwrite)
        yield
