"""``shn config``: every config key with its type, default and meaning, generated from the dataclasses.

One source of truth: a key's meaning is its entry in the ``Attributes:`` section of the docstring
of the frozen dataclass that declares it (:mod:`shn.config`'s tables, each registered task's and
method's options dataclass; a subclass inherits its bases' entries). An entry is ``name: text``
(or ``a, b: text`` for several fields), continued on more deeply indented lines. Types come from
the annotations, defaults from the field defaults, so the reference cannot drift from the code;
``tests/test_config_reference.py`` checks that every field has an entry.

``shn config --defaults`` lists every table (all registered tasks and methods, plugins included);
``shn config CONFIG`` lists the keys of that config's task and method with the values it resolves
to, marking those that differ from the default. ``--markdown`` writes a markdown page instead
(``docs/config.md`` is that page for the built-ins).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import MISSING, dataclass, fields, is_dataclass
from typing import Any, Literal, Mapping

from shn.config import RunConfig, TaskConfig

__all__ = ["Key", "Section", "field_help", "format_markdown", "format_text", "reference", "type_name"]

_ENTRY = re.compile(r"^(?P<names>[A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s*(?P<text>.*)$")


def field_help(cls: type) -> dict[str, str]:
    """``{field name: meaning}`` from the ``Attributes:`` sections of ``cls`` and its bases
    (subclasses override), each meaning joined into one line."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or "__doc__" not in vars(klass) or not klass.__doc__:
            continue
        out.update(_attributes(inspect.cleandoc(klass.__doc__)))
    return out


def _attributes(doc: str) -> dict[str, str]:
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return {}
    base = len(lines[start]) - len(lines[start].lstrip())
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    entry_indent: int | None = None
    for line in lines[start + 1:]:
        if not line.strip():
            current = None
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= base:
            break  # the section ended
        entry_indent = indent if entry_indent is None else entry_indent
        m = _ENTRY.match(line.strip()) if indent == entry_indent else None
        if m:
            current = []
            for name in re.split(r"\s*,\s*", m.group("names")):
                entries[name] = current
            current.append(m.group("text").strip())
        elif current is not None:
            current.append(line.strip())
    return {name: " ".join(t for t in text if t) for name, text in entries.items()}


def type_name(hint: Any) -> str:
    """A TOML-minded name for an annotation: ``int``, ``float or none``, ``"sgd" | "adam"``,
    ``list of str``, ``[float, float]``, ``table``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any"
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or none" if type(None) in args else "")
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return "[" + ", ".join(type_name(a) for a in args) + "]"
        return f"list of {type_name(args[0]) if args else 'any'}"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "table"
    if isinstance(hint, type):
        return {"str": "string", "bool": "boolean", "int": "integer", "float": "number"}.get(hint.__name__, hint.__name__)
    return str(hint)


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()  # no value: listing defaults, or a field without a default


@dataclass(frozen=True)
class Key:
    key: str  # dotted, as in TOML and --set
    type: str
    default: Any
    help: str
    value: Any = UNSET  # the config's resolved value (UNSET: listing defaults)


@dataclass(frozen=True)
class Section:
    title: str  # "[local]", "top level", "[task] name = \"digits\"", "[methods.fedavg]"
    about: str
    keys: list[Key]


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return UNSET


def _keys(cls: type, prefix: str, values: Any = None, skip: tuple[str, ...] = ()) -> list[Key]:
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    out = []
    for f in fields(cls):
        if not f.init or f.name in skip:
            continue
        value = getattr(values, f.name) if values is not None else UNSET
        out.append(Key(prefix + f.name, type_name(hints[f.name]), _default(f), helps.get(f.name, ""), value))
    return out


def _summary(cls: type) -> str:
    doc = inspect.cleandoc(cls.__doc__ or "")
    first = doc.split("\n\n", 1)[0].split("Attributes:", 1)[0]
    return " ".join(first.split())


def reference(config: RunConfig | None = None, *, builtin_only: bool = False) -> list[Section]:
    """The sections of the reference: every table with defaults (``config=None``), or the tables
    of ``config`` (its task and its method) with its values. ``builtin_only`` leaves out tasks
    and methods registered outside shn's packages (plugins): ``docs/config.md``."""
    from shn.registry import METHODS, TASKS

    def builtin(entry: Any) -> bool:
        module = getattr(entry.factory, "__module__", "") or ""
        return not builtin_only or module.split(".")[0] in ("shn", "baselines", "tasks")

    run_help = field_help(RunConfig)
    hints = typing.get_type_hints(RunConfig)
    nested = [f for f in fields(RunConfig) if is_dataclass(hints[f.name]) and f.name != "task"]
    top = _keys(RunConfig, "", config, skip=("task", "methods", "sweep", *(f.name for f in nested)))
    sections = [Section("top level", "keys outside any table", top)]
    for f in nested:
        cls = hints[f.name]
        sections.append(Section(f"[{f.name}]", _summary(cls) or run_help.get(f.name, ""),
                                _keys(cls, f"{f.name}.", getattr(config, f.name) if config else None)))
    tasks = [config.task.name] if config is not None else [n for n in TASKS.names() if builtin(TASKS.get(n))]
    for name in tasks:
        entry = TASKS.get(name)
        options = entry.options
        values = config.task.options if config is not None else None
        name_key = Key("task.name", "string", "digits", field_help(TaskConfig).get("name", ""),
                       name if config is not None else UNSET)
        keys = [name_key] + (_keys(options, "task.", values) if options is not None else [])
        sections.append(Section(f'[task] name = "{name}"', _summary(options) if options else entry.doc, keys))
    methods = [config.method] if config is not None else [n for n in METHODS.names() if builtin(METHODS.get(n))]
    for name in methods:
        entry = METHODS.get(name)
        if entry.options is None:
            sections.append(Section(f"[methods.{name}]", f"{entry.doc or name} (no options)", []))
            continue
        values = config.method_options if config is not None else None
        sections.append(Section(f"[methods.{name}]", entry.doc, _keys(entry.options, f"methods.{name}.", values)))
    sections.append(Section("[sweep]", run_help.get("sweep", ""), [Key(
        "sweep.<path>", "table", UNSET,
        'a distribution for the config key <path>: { type = "float" | "int", low, high, log, step } or '
        '{ type = "categorical", choices = [...] } (shn sweep; see shn/sweep.py)')]))
    return sections


def show(value: Any) -> str:
    """A value as it is written in TOML (``none`` for an unset optional)."""
    if value is UNSET:
        return "—"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + "}"
    if is_dataclass(value):
        return "(table)"
    return repr(value)


def format_text(sections: list[Section], width: int = 100) -> str:
    import textwrap

    lines = ["shn configuration: every key of a TOML config (or --set KEY=VALUE) with its type, default and meaning.",
             "Keys inside a table are written there ([local] steps = 20) or dotted (--set local.steps=20).", ""]
    for sec in sections:
        lines.append(f"{sec.title}  {sec.about}".rstrip())
        for k in sec.keys:
            if k.value is UNSET:
                head = f"  {k.key}: {k.type} = {show(k.default)}"
            else:
                changed = "" if _same(k.value, k.default) else f"   (default {show(k.default)})"
                head = f"  {k.key}: {k.type} = {show(k.value)}{changed}"
            lines.append(head)
            lines += textwrap.wrap(k.help, width, initial_indent="      ", subsequent_indent="      ")
        lines.append("")
    return "\n".join(lines)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return list(a) == list(b)
    return a == b


def format_markdown(sections: list[Section]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# Configuration reference", "",
             "Every key of a `shn` TOML config, generated from the config dataclasses by "
             "`shn config --defaults --markdown --builtin-only` (do not edit by hand; `shn config CONFIG` shows the values a "
             "config resolves to). A key inside a table is written there (`[local]` `steps = 20`) or dotted on "
             "the command line (`--set local.steps=20`). `none` means unset (leave the key out).", ""]
    for sec in sections:
        lines += [f"## `{sec.title}`", ""]
        if sec.about:
            lines += [sec.about, ""]
        if sec.keys:
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            lines += [f"| `{k.key}` | {cell(k.type)} | `{cell(show(k.default))}` | {cell(k.help)} |" for k in sec.keys]
            lines.append("")
    return "\n".join(lines)
