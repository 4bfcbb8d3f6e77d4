"""Plugins (shn.plugins): a module that registers a method, loaded with ``shn --plugin`` or an
installed ``shn.plugins`` entry point, is usable by run, suite (also in --jobs worker processes),
sweep (also in --workers processes) and the Flower client processes (SHN_PLUGINS)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shn import plugins
from shn.cli import main
from shn.registry import METHODS
from tests.conftest import tiny_digits_toml

PLUGIN = '''
"""A plugin registering FedAvg under another name."""
import shn
from shn.config import ServerConfig
from shn.federated.algorithm import GlobalModelAlgorithm


@shn.register_method("{name}")
def make(ctx):
    """Plain FedAvg, from a plugin."""
    config = ServerConfig(lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=0.0)
    return GlobalModelAlgorithm(ctx.initial, config, spec=ctx.spec)
'''


@pytest.fixture
def plugin(tmp_path, request):
    """A fresh plugin module ``<module>`` in its own folder registering method ``<method>``;
    unregistered and unimported afterwards."""
    stem = request.node.name.split("[")[0].removeprefix("test_")[:24]
    module, method = f"shnplug_{stem}", f"plug_{stem}"
    folder = tmp_path / "plugin_dir"
    folder.mkdir()
    (folder / f"{module}.py").write_text(PLUGIN.format(name=method))
    yield module, method, folder
    METHODS._entries.pop(method, None)
    sys.modules.pop(module, None)
    plugins._loaded.pop(module, None)
    while str(folder) in sys.path:
        sys.path.remove(str(folder))


def test_plugin_method_runs_from_shn_run(plugin, tmp_path, monkeypatch, capsys):
    module, method, folder = plugin
    (tmp_path / "tiny.toml").write_text(tiny_digits_toml("local", rounds=2))
    assert method not in METHODS
    monkeypatch.chdir(folder)  # `shn --plugin NAME` finds ./NAME.py, as `python -m` would
    code = main(["--plugin", module, "run", str(tmp_path / "tiny.toml"), "--set", f"method={method}",
                 "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == method and summary["metrics"]["test_accuracy"] > 0
    # without the plugin the method is unknown: one line, exit 2
    METHODS._entries.pop(method)
    sys.modules.pop(module)
    code = main(["run", str(tmp_path / "tiny.toml"), "--set", f"method={method}", "--out", str(tmp_path / "r2")])
    assert code == 2 and "unknown method" in capsys.readouterr().err


def test_a_plugin_given_as_a_file_path(plugin, tmp_path, capsys):
    module, method, folder = plugin
    (tmp_path / "tiny.toml").write_text(tiny_digits_toml("local", rounds=1))
    code = main(["--plugin", str(folder / f"{module}.py"), "run", str(tmp_path / "tiny.toml"), "--set",
                 f"method={method}", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    (spec,) = [s for s in plugins.active() if s["module"] == module]
    assert spec["file"] == str((folder / f"{module}.py").resolve())


@pytest.mark.parametrize("name, message", [
    ("no_such_shn_plugin", "--plugin no_such_shn_plugin: no module named 'no_such_shn_plugin'"),
    ("/nowhere/plugin.py", "--plugin /nowhere/plugin.py: file not found"),
])
def test_a_plugin_that_cannot_be_imported_is_one_line(name, message, tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(tiny_digits_toml("local", rounds=1))
    assert main(["--plugin", name, "inspect", str(tmp_path / "tiny.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"shn: error: {message}") and "\n" not in err


def test_suite_jobs_workers_load_the_plugin(plugin, tmp_path, capsys):
    """Spawned suite workers start with nothing imported: the parent passes its plugins."""
    module, method, folder = plugin
    sys.path.append(str(folder))
    (tmp_path / "tiny.toml").write_text(tiny_digits_toml("local", rounds=1))
    suite = tmp_path / "suite.toml"
    suite.write_text(f'out = "{tmp_path / "out"}"\n[[runs]]\nname = "p"\nconfig = "{tmp_path / "tiny.toml"}"\n'
                     f'seeds = [0, 1]\nmethods = ["{method}"]\n')
    code = main(["--plugin", module, "suite", str(suite), "--jobs", "2", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["done"] == 2
    for seed in (0, 1):
        assert json.loads((tmp_path / "out" / "p" / method / f"seed{seed}" / "summary.json").read_text())["method"] == method


def test_sweep_worker_processes_load_the_plugin(plugin, tmp_path, capsys):
    module, method, folder = plugin
    sys.path.append(str(folder))
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_digits_toml(method, rounds=1) + '\n[sweep]\n"local.lr" = { type = "float", low = 1e-3, high = 1e-1, log = true }\n')
    code = main(["--plugin", module, "sweep", str(cfg), "--trials", "2", "--workers", "2", "--out",
                 str(tmp_path / "sw"), "--pruner", "none", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["complete"] == 2 and result["fail"] == 0
    # other test modules that registered methods earlier in the session may be listed too
    specs = json.loads((tmp_path / "sw" / ".sweep-spec.json").read_text())["plugins"]
    assert {"module": module, "path": str(folder.resolve()), "file": None} in specs


def test_a_module_imported_by_a_script_is_passed_to_workers_too(plugin):
    module, method, folder = plugin
    sys.path.append(str(folder))
    __import__(module)  # registered by a plain import, not by --plugin
    assert {"module": module, "path": str(folder.resolve()), "file": None} in plugins.active()
    assert all(s["module"].split(".")[0] not in plugins.BUILTIN_PACKAGES for s in plugins.active())


def test_flower_client_processes_load_plugins_from_the_environment(plugin, monkeypatch):
    module, method, folder = plugin
    monkeypatch.setenv(plugins.ENV_VAR, json.dumps([{"module": module, "path": str(folder), "file": None}]))
    plugins.load_from_env()
    assert method in METHODS and str(folder) in sys.path
    monkeypatch.setenv(plugins.ENV_VAR, "not json")
    with pytest.raises(plugins.ConfigError, match="SHN_PLUGINS: not a plugin list"):
        plugins.load_from_env()


def test_entry_points_of_installed_packages_are_loaded(plugin, monkeypatch, caplog):
    module, method, folder = plugin
    dist = folder / "shnplug_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shnplug-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[shn.plugins]\ndemo = {module}\nbroken = shnplug_missing_module\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(plugins, "_entry_points_done", False)
    loaded = plugins.load_entry_points()
    assert loaded == [module] and method in METHODS
    assert "broken" in caplog.text and "shnplug_missing_module" in caplog.text  # named, the others still load
    assert plugins.load_entry_points() == []  # once per process


def test_readme_and_cli_help_document_the_flag():
    from shn.cli import build_parser

    assert "--plugin" in build_parser().format_help()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "shn --plugin" in readme and "shn.plugins" in readme
