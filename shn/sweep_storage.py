"""Where ``shn sweep`` keeps its study, and the local file locks its processes coordinate with.

* :func:`open_storage` — an optuna storage from a URL or a journal path, read once up front so
  that a corrupt file, a missing database driver or an unknown scheme is one ``ConfigError`` line.
* :func:`file_lock` — the claim lock: a new trial is started only under it (exact trial budget).
* :class:`CommandLock` — held shared by every process of a ``shn sweep`` command; a command that
  can take it exclusively is alone on the study, so RUNNING trials are interrupted ones.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator

from shn.config import ConfigError


def open_storage(url: str) -> Any:
    """``sqlite:///file.db`` (or another SQLAlchemy URL) → RDBStorage; anything else is a journal
    file path (an optional ``journal:`` prefix is dropped). The storage is read once here: what
    cannot be opened is a one-line ``ConfigError`` naming the URL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        if "://" in url:
            kwargs: dict[str, Any] = {}
            if url.startswith("sqlite:///"):
                Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
                kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
            storage = optuna.storages.RDBStorage(url, **kwargs)
        else:
            path = Path(url.removeprefix("journal:")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            storage = JournalStorage(JournalFileBackend(str(path)))
        optuna.get_all_study_names(storage)
    except ImportError:
        scheme = url.split("://")[0]
        raise ConfigError(f"--storage {url!r}: the database driver for {scheme!r} is not installed "
                          "(e.g. pip install psycopg2-binary for postgresql, pymysql for mysql+pymysql)") from None
    except Exception as e:  # noqa: BLE001 - sqlalchemy / json / optuna errors on a bad URL or a corrupt file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if type(e).__name__ == "NoSuchModuleError":
            raise ConfigError(f"--storage {url!r}: unknown database scheme {url.split('://')[0]!r}; use "
                              "sqlite:///path.db, another SQLAlchemy URL, or a journal file path") from None
        raise ConfigError(f"--storage {url!r}: cannot open the study storage, corrupt or not an optuna "
                          f"storage? ({type(e).__name__}: {first})") from None
    return storage


def lock_path(url: str, out: Path) -> Path:
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):] + ".shn-claim.lock")
    if "://" in url:
        return out / ".shn-claim.lock"
    return Path(url.removeprefix("journal:") + ".shn-claim.lock")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by the worker processes on this machine (POSIX flock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows): no cross-process claim lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def command_lock_path(lock: Path, study_name: str) -> Path:
    return lock.with_name(f"{lock.name}.{hashlib.sha256(study_name.encode()).hexdigest()[:12]}.command")


class CommandLock:
    """Held (shared) by every process of a ``shn sweep`` command while it works on a study, so
    that another command can tell whether RUNNING trials belong to a live worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def acquire_alone(self) -> bool:
        """Take the lock exclusively if no other process holds it; True if this command is alone."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows): no lock, behave as alone
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def share(self) -> None:
        """Hold the lock shared (the state while trials run); blocks only during another
        command's short exclusive check."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        fcntl.flock(self._file, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None
