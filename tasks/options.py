"""Validation helpers for the task option dataclasses (a TOML ``[task]`` table): each raises a
``ValueError`` naming the option and what it accepts, which the config loader turns into a
``ConfigError`` (exit code 2)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["check_int", "check_choice", "check_path", "check_fractions", "check_bool", "as_names", "as_paths",
           "shown_path"]


def shown_path(path: str | Path) -> str:
    """A path for an error message: a relative one also says what it was resolved against (the
    working directory: config paths are not relative to the config file)."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    return f"{p} (relative to the working directory {Path.cwd()})"


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(options, key: str, low: int, allow_none: bool = False) -> None:
    value = getattr(options, key)
    if value is None and allow_none:
        return
    if not _is_int(value) or value < low:
        raise ValueError(f"task option {key}={value!r} must be an integer >= {low}" + (" or omitted" if allow_none else ""))


def check_choice(options, key: str, allowed: Sequence[str]) -> None:
    value = getattr(options, key)
    if value not in allowed:
        raise ValueError(f"task option {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_path(options, key: str) -> None:
    value = getattr(options, key)
    if value is not None and not isinstance(value, (str, Path)):
        raise ValueError(f"task option {key}={value!r} must be a path string or omitted")


def check_bool(options, key: str) -> None:
    value = getattr(options, key)
    if not isinstance(value, bool):
        raise ValueError(f"task option {key}={value!r} must be true or false")


def check_fractions(options) -> None:
    values = []
    for key in ("train_fraction", "val_fraction", "test_fraction"):
        v = getattr(options, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 < v < 1):
            raise ValueError(f"task option {key}={v!r} must be a number in (0, 1)")
        values.append(float(v))
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(
            f"task options train_fraction + val_fraction + test_fraction must sum to 1, got "
            f"{values[0]} + {values[1]} + {values[2]} = {sum(values):.6g}"
        )


def as_names(value, key: str, allow_empty: bool = True) -> tuple[str, ...]:
    """A list of column names (a single string is a list of one), no duplicates."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"task option {key}={value!r} must be a list of column names")
    if not value and not allow_empty:
        raise ValueError(f"task option {key} must name at least one column")
    if len(set(value)) != len(value):
        raise ValueError(f"task option {key}={list(value)!r} has duplicates")
    return tuple(value)


def as_paths(value, key: str) -> tuple[str, ...]:
    """One path or a list of paths (glob patterns allowed) as a tuple of strings."""
    if isinstance(value, (str, Path)):
        value = (str(value),)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, Path)) and str(v) for v in value):
        raise ValueError(f"task option {key}={value!r} must be a file path or a list of file paths")
    return tuple(str(v) for v in value)


def as_widths(value, key: str) -> tuple[float, ...] | None:
    """Width multipliers (``widths``, ``client_widths``): a list of numbers in (0, 64]; None stays."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and 0 < w <= 64 for w in value):
        raise ValueError(f"task option {key}={value!r} must be a list of numbers in (0, 64], e.g. [0.5, 1, 2]")
    return tuple(float(w) for w in value)


def width_for(client: int | None, widths: Sequence[float], client_widths: Sequence[float] | None) -> float:
    """Client ``client``'s width multiplier: its entry of ``client_widths``, else ``widths`` in
    turn (client c gets ``widths[c % len(widths)]``); ``None``: the widest (the server's)."""
    chosen = client_widths if client_widths is not None else (widths or (1.0,))
    if client is None:
        return max(chosen)
    return chosen[int(client)] if client_widths is not None else chosen[int(client) % len(chosen)]

