"""Writing a run config back as TOML (the run directory's resolved ``config.toml``): the plain
dict of a ``RunConfig`` and a minimal TOML writer. Imported by :mod:`shn.config`, which re-exports
both names."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, Mapping

__all__ = ["config_to_dict", "dumps_toml"]


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A ``RunConfig`` as the dict its TOML file holds (tables for the dataclasses, the task
    options inside ``[task]``, unset optionals left out)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "task":
            table = {"name": value.name}
            if value.options is not None:
                table.update(_plain(value.options))
            out["task"] = table
        elif f.name == "methods":
            if value:
                out["methods"] = {k: _plain(v) for k, v in value.items()}
        elif f.name == "sweep":
            if value:
                out["sweep"] = dict(value)
        else:
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if getattr(value, f.name) is not None}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def dumps_toml(data: Mapping[str, Any]) -> str:
    """A minimal TOML writer for config dicts (scalars, lists, nested tables)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return _toml_string(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{ " + ", ".join(f"{_key(k)} = {scalar(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} to TOML")

    def table(prefix: str, d: Mapping[str, Any]) -> None:
        simple = {k: v for k, v in d.items() if not isinstance(v, Mapping)}
        nested = {k: v for k, v in d.items() if isinstance(v, Mapping)}
        if prefix and (simple or not nested):
            lines.append(f"\n[{prefix}]")
        for k, v in simple.items():
            lines.append(f"{_key(k)} = {scalar(v)}")
        for k, v in nested.items():
            table(f"{prefix}.{_key(k)}" if prefix else _key(k), v)

    table("", data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _key(k: str) -> str:
    bare = k.replace("_", "").replace("-", "")
    return k if bare.isascii() and bare.isalnum() else _toml_string(k)


def _toml_string(v: str) -> str:
    """A TOML basic string: quote, backslash and control characters (but tab) escaped."""
    out = []
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
