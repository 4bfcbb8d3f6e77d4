"""Config loading (shn.config) and the CLI's user-error contract: one line on stderr, exit 2."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import baselines  # noqa: F401 - registers the methods
from shn import cli
from shn.config import (
    ConfigError,
    LocalConfig,
    RunConfig,
    ServerConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dumps_toml,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "configs" / "quickstart.toml"


def quick(*overrides: str) -> RunConfig:
    return load_config(QUICKSTART, list(overrides))


# -- loading ------------------------------------------------------------------------------------

def test_quickstart_loads_into_frozen_dataclasses():
    cfg = quick()
    assert isinstance(cfg, RunConfig)
    assert (cfg.method, cfg.seed, cfg.rounds, cfg.clients_per_round, cfg.eval_every) == ("pfedhn", 0, 150, 5, 25)
    assert cfg.task.name == "digits"
    opts = cfg.task.options
    assert (opts.num_clients, opts.partition, opts.classes_per_client) == (10, "pathological", 2)
    assert cfg.local == LocalConfig(steps=20, batch_size=32)  # the rest are pFedHN defaults
    assert cfg.server == ServerConfig()
    assert (cfg.server.lr, cfg.server.momentum, cfg.server.weight_decay, cfg.server.grad_clip) == (1e-2, 0.9, 1e-3, 50.0)
    assert (cfg.local.lr, cfg.local.momentum, cfg.local.weight_decay, cfg.local.grad_clip) == (5e-3, 0.9, 5e-5, 50.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.local.steps = 3  # type: ignore[misc]


def test_set_overrides_numbers_strings_bools_and_nested_tables():
    cfg = quick(
        "rounds=7",
        "server.lr=0.05",
        "server.embed_lr=1",  # an integer literal for a float field
        "local.weight_decay=1e-4",
        "method=fedavg",  # a bare word is a string
        'local.mode="loop"',  # so is a quoted TOML string
        "server.nesterov=true",
        "hypernetwork.spectral_norm=false",
        "hypernetwork.embed_dim=9",
        "server.betas=[0.8, 0.95]",
        "task.partition=dirichlet",
        "task.alpha=0.1",
        "task.num_clients=6",
        "methods.fedavg.momentum=0.9",
        "methods.pfedhn.personal_head=true",
    )
    assert cfg.rounds == 7 and isinstance(cfg.rounds, int)
    assert cfg.server.lr == 0.05
    assert cfg.server.embed_lr == 1.0 and isinstance(cfg.server.embed_lr, float)
    assert cfg.local.weight_decay == 1e-4
    assert cfg.method == "fedavg" and cfg.local.mode == "loop"
    assert cfg.server.nesterov is True and cfg.hypernetwork.spectral_norm is False
    assert cfg.hypernetwork.embed_dim == 9
    assert cfg.server.betas == (0.8, 0.95)
    assert (cfg.task.options.partition, cfg.task.options.alpha, cfg.task.options.num_clients) == ("dirichlet", 0.1, 6)
    assert cfg.methods["fedavg"].momentum == 0.9
    assert cfg.methods["pfedhn"].personal_head is True
    assert cfg.method_options.momentum == 0.9  # the active method's options
    # later overrides win; the file itself is untouched
    assert quick("rounds=3", "rounds=4").rounds == 4
    assert quick().rounds == 150


def test_apply_overrides_does_not_mutate_its_input():
    data = {"local": {"steps": 3}}
    out = apply_overrides(data, ["local.steps=5", "server.lr=0.1"])
    assert data == {"local": {"steps": 3}}
    assert out == {"local": {"steps": 5}, "server": {"lr": 0.1}}


BAD = [
    # (overrides, words the single error line must contain)
    (["foo=1"], ["foo", "unknown key", "rounds"]),
    (["local.stepz=3"], ["local.stepz", "unknown key", "steps"]),
    (["task.colour=red"], ["task", "colour"]),
    (["local.mode=fast"], ["local.mode", "'fast'", "'auto'", "'vmap'", "'loop'"]),
    (["local.precision=fp16"], ["local.precision", "'fp16'", "'fp32'", "'bf16'"]),
    (["server.optimizer=rmsprop"], ["server.optimizer", "'sgd'", "'adam'"]),
    (["method=nope"], ["method", "nope", "pfedhn", "fedavg", "local"]),
    (["task.name=imagenet"], ["task.name", "imagenet", "digits", "cifar10"]),
    (["task.partition=striped"], ["partition", "striped", "pathological", "dirichlet"]),
    (["rounds=abc"], ["rounds", "integer", "'abc'"]),
    (["rounds=2.5"], ["rounds", "integer"]),
    (["rounds=0"], ["rounds", "> 0"]),
    (["local.lr=-1"], ["local.lr", "≥ 0"]),
    (["local.lr=fast"], ["local.lr", "number"]),
    (["local.lr=nan"], ["local.lr", "finite"]),
    (["server.nesterov=yes"], ["server.nesterov", "true or false"]),
    (["server.nesterov=true", "server.momentum=0"], ["server.nesterov", "momentum"]),
    (["server.betas=[0.9]"], ["server.betas", "2 values"]),
    (["server=3"], ["server", "table"]),
    (["methods.nope.lr=1"], ["methods.nope", "unknown method"]),
    (["methods.fedavg.lrr=1"], ["methods.fedavg.lrr", "unknown key"]),
    (["rounds"], ["rounds", "KEY=VALUE"]),
    # issue 15: a table set to a scalar, values torch would reject, an integer beyond exactness
    (["task=5"], ["task", "expected a table", "5"]),
    (["methods=5"], ["methods", "expected a table", "5"]),
    (["sweep=5"], ["sweep", "expected a table", "5"]),
    (["encoder.dropout=1.5"], ["encoder.dropout", "[0, 1)", "1.5"]),
    (["encoder.dropout=1"], ["encoder.dropout", "[0, 1)"]),
    (["server.betas=[2.0,-1.0]"], ["server.betas", "[0, 1)", "2.0"]),
    (["server.betas=[0.9,1.0]"], ["server.betas", "[0, 1)", "1.0"]),
    (["rounds=1e300"], ["rounds", "integer", "1e+300"]),
    (["seed=1e20"], ["seed", "integer"]),
    (["validation.max_examples=0"], ["validation.max_examples", "> 0"]),
    (["validation.max_examples=1.5"], ["validation.max_examples", "integer"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_raise_config_error_naming_the_key(overrides, words):
    with pytest.raises(ConfigError) as info:
        quick(*overrides)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_non_utf8_config_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('rounds = 3\n# caf\u00e9\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 0xe9 at offset 16\)"):
        load_config(bad)
    code, _, err = run_cli(capsys, "run", str(bad), "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 2
    assert_one_line_error(err, "latin1.toml", "UTF-8")


def test_validation_max_examples_reaches_the_server():
    from shn.federated.server import Server
    from shn.runner import build

    cfg = config_from_dict({"method": "fedavg", "clients_per_round": 2, "task": {"name": "digits", "num_clients": 4, "model": "mlp"},
                            "validation": {"max_examples": 50}})
    assert cfg.validation.max_examples == 50 and RunConfig().validation.max_examples == 10**9
    built = build(cfg)
    assert Server(built.algorithm, cfg.validation).max_examples == 50


def test_round_trip_config_to_dict_dumps_toml_load(tmp_path):
    cfgs = [
        quick(),
        quick("method=fedavg", "methods.fedavg.momentum=0.9", "methods.fedavg.nesterov=true", "server.embed_lr=0.3",
              "server.betas=[0.5, 0.75]", "hypernetwork.embed_dim=4", "local.mode=vmap", "task.partition=dirichlet",
              "task.alpha=0.3", "checkpoint_every=5", "validation.clip_norm=2.5", "local.weight_decay=5e-5"),
        load_config(QUICKSTART, ['task.data_dir=/tmp/a "quoted" \\ path\twith tab', "task.max_train_per_class=7"]),
    ]
    for i, cfg in enumerate(cfgs):
        text = dumps_toml(config_to_dict(cfg))
        path = tmp_path / f"c{i}.toml"
        path.write_text(text)
        back = load_config(path)
        assert back == cfg
        assert config_to_dict(back) == config_to_dict(cfg)
        assert dumps_toml(config_to_dict(back)) == text


def test_round_trip_of_awkward_strings_and_sweep_tables():
    cfg = quick()
    cfg = dataclasses.replace(
        cfg,
        task=dataclasses.replace(cfg.task, options=dataclasses.replace(cfg.task.options, data_dir="a\nb\x01\x7f\"\\é€")),
        sweep={"server.lr": {"low": 1e-4, "high": 0.1, "log": True}, "local.mode": {"choices": ["vmap", "loop"]}},
    )
    back = config_from_dict(tomllib.loads(dumps_toml(config_to_dict(cfg))))
    assert back == cfg


# -- the CLI: one line on stderr, exit code 2 ----------------------------------------------------

def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("shn: error:")
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"


def test_cli_unknown_key_in_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    text = QUICKSTART.read_text()
    assert "steps = 20" in text
    bad.write_text(text.replace("steps = 20", "stepz = 20"))
    code, out, err = run_cli(capsys, "run", str(bad), "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 2
    assert_one_line_error(err, "local.stepz", "unknown key", "steps")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,words", [
    ("local.mode=fast", ["local.mode", "'auto'", "'vmap'", "'loop'"]),
    ("local.precision=half", ["local.precision", "'half'", "'fp32'", "'bf16'"]),
    ("rounds=abc", ["rounds", "integer"]),
    ("method=nope", ["method", "pfedhn"]),
    ("task.classes_per_client=11", ["classes_per_client", "11"]),
    ("device=toaster", ["device", "toaster"]),
])
def test_cli_bad_override(tmp_path, capsys, override, words):
    code, _, err = run_cli(capsys, "run", str(QUICKSTART), "--set", override, "--out", str(tmp_path / "run"),
                           "--no-progress")
    assert code == 2
    assert_one_line_error(err, *words)


def test_cli_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "missing.toml"))
    assert code == 2
    assert_one_line_error(err, "missing.toml", "not found")


def test_cli_missing_config_file_in_a_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "shn.cli", "run", "missing.toml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "missing.toml")
    assert proc.stdout == ""


def test_cli_missing_cifar10_data_names_the_path(tmp_path, capsys):
    empty = tmp_path / "no_data_here"
    empty.mkdir()
    code, _, err = run_cli(capsys, "run", str(QUICKSTART), "--set", "task.name=cifar10", "--set",
                           f"task.data_dir={empty}", "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 2
    assert_one_line_error(err, str(empty), "cifar10")
    code, _, err = run_cli(capsys, "run", str(QUICKSTART), "--set", "task.name=cifar10", "--set",
                           f"task.data_dir={tmp_path / 'does_not_exist'}", "--out", str(tmp_path / "run"),
                           "--no-progress")
    assert code == 2
    assert_one_line_error(err, "does_not_exist")
    code, _, err = run_cli(capsys, "run", str(QUICKSTART), "--set", "task.name=cifar10", "--out",
                           str(tmp_path / "run"), "--no-progress")
    assert code == 2
    assert_one_line_error(err, "data_dir")


def test_cli_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run"])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", [[], {}, 3, ["digits"]])
def test_task_name_that_is_no_string_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"^task\.name: unknown task .*; allowed: .*digits"):
        config_from_dict({"task": {"name": name}})
