"""Reading config files: TOML as UTF-8 with one-line errors, and the ``base = "other.toml"``
inheritance chain resolved into one dict (``shn.config`` re-exports every name)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ConfigError", "read_config", "read_toml"]


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what was expected."""


def read_config(path: str | Path) -> dict[str, Any]:
    """A config file as a dict with its inheritance resolved: ``base = "other.toml"`` (a path
    relative to the file that names it) is read first, recursively; this file's keys override
    it, tables merged key by key (any other value, lists included, replaces); ``base`` itself is
    dropped. A missing base file or a cycle of bases raises ``ConfigError`` naming the files."""
    return _with_bases(Path(path), ())


def _with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    data = read_toml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: expected the path of another TOML config (relative to this file), got {base!r}")
    base_path = path.parent / base
    chain = chain + (path,)
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError("config base cycle: " + " -> ".join(str(p) for p in chain + (base_path,)))
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} not found (looked for {base_path})")
    return _merged(_with_bases(base_path, chain), data)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: where both hold a table, merged recursively; else ``over`` wins."""
    out = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merged(out[key], value) if both_tables else value
    return out


def read_toml(path: str | Path, what: str = "config", error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file raises ``error`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")  # TOML is UTF-8, whatever the locale
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    "TOML files must be saved as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})") from None
