"""Plugins: your own modules that register methods, tasks or encoders, loaded by every command.

A plugin is a module whose import registers something (``@shn.register_method``,
``@shn.register_task``, ``@shn.register_encoder``). It is loaded

* from the command line: ``shn --plugin mymodule run ...`` (repeatable; a dotted module name on
  the Python path, the working directory included, or the path of a ``.py`` file);
* from installed packages: every entry point of the group ``shn.plugins`` (the value is a module,
  or ``module:function`` — the function is called with no arguments after the import), e.g. in
  the package's ``pyproject.toml``::

      [project.entry-points."shn.plugins"]
      my_methods = "my_package.methods"

Worker processes load the same plugins: ``shn suite --jobs`` and ``shn sweep --workers`` pass
:func:`active` (the plugins loaded here, plus any module outside ``shn`` that registered something,
e.g. imported by a Python script) to their workers, each with the folder that makes it importable.
``shn flower simulate`` passes them to Flower's client processes in the environment variable
``SHN_PLUGINS``; a Flower ClientApp loads the entry points and ``SHN_PLUGINS`` of its own
environment, never modules named by the server.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from shn.config import ConfigError

__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "active", "load_entry_points", "load_plugin", "load_plugins",
           "load_specs", "load_from_env", "specs_json"]

ENTRY_POINT_GROUP = "shn.plugins"
ENV_VAR = "SHN_PLUGINS"
BUILTIN_PACKAGES = ("shn", "baselines", "tasks")

log = logging.getLogger("shn.plugins")

_loaded: dict[str, dict[str, str | None]] = {}  # module name -> its spec (what a worker needs to import it)
_entry_points_done = False


def _spec_of(module: Any, name: str) -> dict[str, str | None]:
    """``{"module": name, "path": folder that makes it importable, "file": .py file or None}``."""
    file = getattr(module, "__file__", None)
    if not file:
        return {"module": name, "path": None, "file": None}
    p = Path(file).resolve()
    depth = name.count(".") + (1 if p.name == "__init__.py" else 0)
    root = p.parents[depth] if depth < len(p.parents) else p.parent
    return {"module": name, "path": str(root), "file": None}


def load_plugin(name: str) -> str:
    """Import one plugin (a module name or a ``.py`` file path); returns its module name. A
    plugin that cannot be imported is a one-line ``ConfigError`` naming it."""
    name = str(name).strip()
    if not name:
        raise ConfigError("--plugin: expected a module name or a .py file, got an empty string")
    if name.endswith(".py") or os.sep in name or (os.altsep and os.altsep in name):
        return _load_file(Path(name))
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # `shn --plugin mymodule` finds ./mymodule.py, as `python -m` would
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(f"--plugin {name}: no module named {e.name!r} on the Python path (the working "
                              "directory included); give its .py file or add its folder to PYTHONPATH") from None
        raise ConfigError(f"--plugin {name}: importing it failed: {type(e).__name__}: {e}") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's own error, named in one line
        raise ConfigError(f"--plugin {name}: importing it failed: {type(e).__name__}: {e}") from None
    _loaded.setdefault(name, _spec_of(module, name))
    return name


def _load_file(path: Path) -> str:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"--plugin {path}: file not found")
    name = path.stem if path.stem.isidentifier() else "shn_plugin_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        _loaded[name] = {"module": name, "path": None, "file": str(path)}  # asked for as a file: workers load it so
        return name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--plugin {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that its objects pickle by reference (worker processes)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        sys.modules.pop(name, None)
        raise ConfigError(f"--plugin {path}: importing it failed: {type(e).__name__}: {e}") from None
    _loaded[name] = {"module": name, "path": None, "file": str(path)}
    return name


def load_entry_points() -> list[str]:
    """Load every ``shn.plugins`` entry point of the installed packages (once per process). A
    broken one is logged as a warning naming it, and the others still load."""
    global _entry_points_done
    if _entry_points_done:
        return []
    _entry_points_done = True
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if ep.attr and callable(obj):
                obj()
        except Exception as e:  # noqa: BLE001 - one broken package must not stop every command
            log.warning("plugin entry point %r (%s) failed to load: %s: %s", ep.name, ep.value, type(e).__name__, e)
            continue
        names.append(ep.value)
    return names


def load_plugins(names: Iterable[str] = (), *, entry_points: bool = True) -> list[str]:
    """The built-in methods and tasks, the installed entry points, then ``names`` in order."""
    import shn  # noqa: F401  (the built-ins first: a plugin may build on them)

    if entry_points:
        load_entry_points()
    return [load_plugin(n) for n in names]


def active() -> list[dict[str, str | None]]:
    """What a worker process must import to see this process's registrations: the plugins
    loaded here, and every other module outside shn's packages that registered a method, task
    or encoder (``__main__`` excepted: a worker cannot import a script)."""
    from shn.registry import ENCODERS, METHODS, TASKS

    specs = dict(_loaded)
    for registry in (METHODS, TASKS, ENCODERS):
        for name in registry.names():
            module_name = getattr(registry.get(name).factory, "__module__", None) or ""
            if not module_name or module_name == "__main__" or module_name in specs:
                continue
            if module_name.split(".")[0] in BUILTIN_PACKAGES:
                continue
            module = sys.modules.get(module_name)
            if module is not None:
                specs[module_name] = _spec_of(module, module_name)
    return list(specs.values())


def load_specs(specs: Sequence[dict[str, Any]]) -> None:
    """In a worker: import what :func:`active` listed in the parent (each folder appended to
    ``sys.path`` where needed), after the built-ins and the entry points."""
    import shn  # noqa: F401

    load_entry_points()
    for spec in specs:
        if spec.get("file"):
            _load_file(Path(spec["file"]))
            continue
        path = spec.get("path")
        if path and path not in sys.path:
            sys.path.append(path)
        load_plugin(str(spec["module"]))


def specs_json(specs: Sequence[dict[str, Any]] | None = None) -> str:
    return json.dumps(list(active() if specs is None else specs))


def load_from_env() -> None:
    """Load the entry points and the plugins listed in ``SHN_PLUGINS`` (JSON, as :func:`specs_json`
    writes it; a Flower client process of ``shn flower simulate``)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text:
        load_entry_points()
        return
    try:
        specs = json.loads(text)
        if not isinstance(specs, list) or not all(isinstance(s, dict) and "module" in s for s in specs):
            raise ValueError("expected a list of {module, path, file} objects")
    except ValueError as e:
        raise ConfigError(f"environment variable {ENV_VAR}: not a plugin list ({e})") from None
    load_specs(specs)
