"""Config inheritance (``base = "other.toml"``): merging, chains, errors, every loader, and the
Beijing sweep configs, which must resolve exactly as they did when they repeated their base."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import baselines  # noqa: F401 - registers the methods
from shn.config import ConfigError, config_from_dict, config_to_dict, load_config, read_config
from tests.conftest import REPO, tiny_digits_toml

CONFIGS = REPO / "experiments" / "configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def base_file(tmp_path) -> Path:
    return write(tmp_path / "base.toml", tiny_digits_toml("fedavg", rounds=7) + "lr = 0.1\n")


def test_child_overrides_base_key_by_key(tmp_path, base_file):
    child = write(tmp_path / "child.toml", 'base = "base.toml"\nmethod = "local"\n\n[local]\nsteps = 5\n')
    data = read_config(child)
    assert "base" not in data
    assert data["method"] == "local" and data["rounds"] == 7  # own value; inherited value
    assert data["local"] == {"steps": 5, "batch_size": 16, "lr": 0.1}  # one key of a table replaced
    assert data["task"] == tomllib.loads(base_file.read_text())["task"]
    cfg = load_config(child, ["rounds=9"])  # --set applies after the merge
    assert (cfg.method, cfg.rounds, cfg.local.steps, cfg.local.lr) == ("local", 9, 5, 0.1)


def test_nested_tables_merge_recursively_and_other_values_replace(tmp_path):
    write(tmp_path / "base.toml", '[a]\nx = 1\nlist = [1, 2, 3]\n[a.b]\ny = 2\nz = 3\n[c]\nw = 4\n')
    child = write(tmp_path / "child.toml", 'base = "base.toml"\n[a]\nlist = [9]\n[a.b]\nz = 30\n')
    assert read_config(child) == {"a": {"x": 1, "list": [9], "b": {"y": 2, "z": 30}}, "c": {"w": 4}}
    scalar_over_table = write(tmp_path / "scalar.toml", 'base = "base.toml"\nc = 5\n')
    assert read_config(scalar_over_table)["c"] == 5


def test_chain_of_two_bases_each_relative_to_its_own_file(tmp_path):
    write(tmp_path / "root.toml", tiny_digits_toml("fedavg", rounds=1) + "lr = 0.2\n")
    write(tmp_path / "mid" / "mid.toml", 'base = "../root.toml"\nseed = 4\n\n[local]\nsteps = 3\n')
    leaf = write(tmp_path / "leaf" / "leaf.toml", 'base = "../mid/mid.toml"\nrounds = 5\n\n[local]\nlr = 0.3\n')
    cfg = load_config(leaf)
    assert (cfg.method, cfg.seed, cfg.rounds, cfg.eval_every) == ("fedavg", 4, 5, 1)
    assert (cfg.local.steps, cfg.local.lr, cfg.local.batch_size) == (3, 0.3, 16)
    assert cfg.task.name == "digits" and cfg.task.options.num_clients == 4


def test_base_cycle_is_one_line_naming_the_files(tmp_path):
    a = write(tmp_path / "a.toml", 'base = "b.toml"\nrounds = 2\n')
    write(tmp_path / "b.toml", 'base = "a.toml"\nseed = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(a)
    msg = str(err.value)
    assert "\n" not in msg and "cycle" in msg and "a.toml" in msg and "b.toml" in msg
    own = write(tmp_path / "self.toml", 'base = "self.toml"\n')
    with pytest.raises(ConfigError, match=r"cycle: .*self\.toml -> .*self\.toml"):
        read_config(own)


def test_missing_base_is_one_line_naming_both_files(tmp_path):
    child = write(tmp_path / "child.toml", 'base = "nowhere/gone.toml"\nrounds = 2\n')
    with pytest.raises(ConfigError) as err:
        load_config(child)
    msg = str(err.value)
    assert "\n" not in msg and str(child) in msg and "gone.toml" in msg and "not found" in msg


def test_cli_reports_base_errors_in_one_line_with_exit_2(tmp_path, capsys):
    from shn import cli

    missing = write(tmp_path / "missing.toml", 'base = "gone.toml"\n')
    write(tmp_path / "a.toml", 'base = "b.toml"\n')
    write(tmp_path / "b.toml", 'base = "a.toml"\n')
    for path, words in [(missing, ["missing.toml", "gone.toml", "not found"]), (tmp_path / "a.toml", ["cycle", "b.toml"])]:
        code = cli.main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("shn: error:"), err
        assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["3", '""', "[\"a.toml\"]"])
def test_base_must_name_a_file(tmp_path, value):
    child = write(tmp_path / "child.toml", f"base = {value}\n")
    with pytest.raises(ConfigError, match=r"child\.toml: base: expected the path"):
        read_config(child)


def test_every_config_loader_resolves_bases(tmp_path, base_file):
    from shn.suite import Job
    from shn.sweep import load_base

    child = write(tmp_path / "child.toml", 'base = "base.toml"\nrounds = 3\n')
    want = config_to_dict(load_config(child))
    assert want["rounds"] == 3 and want["method"] == "fedavg" and want["local"]["lr"] == 0.1
    assert config_to_dict(config_from_dict(load_base(child))) == want  # shn sweep
    job = Job("e", "v", "fedavg", 0, (), str(child), (), tmp_path / "run")  # shn suite
    assert config_to_dict(job.config()) == want
    pytest.importorskip("flwr.app")
    from shn.flower.engine import resolve_run_config

    assert config_to_dict(resolve_run_config({"config": str(child)})[0]) == want  # the Flower engine


# The two Beijing sweep configs as they were before they inherited from weather_beijing.toml
# (their recorded sweeps, experiments/results/sweeps/beijing_*, ran with exactly these).
SWEEP_HN_BEFORE = """
method = "pfedhn"
seed = 0
rounds = 60
clients_per_round = 6
eval_every = 20
checkpoint_every = 20

[task]
name = "weather"
data_dir = "../shared/datasets/beijing_multisite_air_quality"
target_vars = ["TEMP"]
input_len = 24
output_len = 12
stride = 6
max_windows = 512
model = "gru"
hidden = 32
graph_k = 3

[local]
steps = 20
lr = 5e-3
batch_size = 32

[graph]
kind = "given"

[sweep]
"server.optimizer" = { type = "categorical", choices = ["sgd", "adam"] }
"server.lr" = { type = "float", low = 1e-4, high = 0.3, log = true }
"local.lr" = { type = "float", low = 1e-3, high = 5e-2, log = true }
"""
SWEEP_BASELINES_BEFORE = SWEEP_HN_BEFORE.replace('method = "pfedhn"', 'method = "fedavg"').split("[sweep]")[0] + """[sweep]
"local.lr" = { type = "float", low = 1e-3, high = 5e-2, log = true }
"""


@pytest.mark.parametrize("name, before", [("sweep_beijing_hn.toml", SWEEP_HN_BEFORE),
                                          ("sweep_beijing_baselines.toml", SWEEP_BASELINES_BEFORE)])
def test_beijing_sweep_configs_inherit_and_resolve_as_before(name, before):
    from shn.sweep import load_base

    path = CONFIGS / name
    assert tomllib.loads(path.read_text())["base"] == "weather_beijing.toml"
    old = tomllib.loads(before)
    assert read_config(path) == old
    assert list(read_config(path)["sweep"]) == list(old["sweep"])  # the order trials suggest in
    assert load_base(path) == old
    assert config_to_dict(load_config(path)) == config_to_dict(config_from_dict(old))
