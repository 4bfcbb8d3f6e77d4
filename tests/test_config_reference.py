"""The config reference (shn.config_reference, ``shn config``): every field of every config
dataclass — the run config's tables, every task's and every method's options — has a meaning in
its docstring; the reference lists type, default and meaning of every key; docs/config.md is the
generated page; relative data paths that do not exist say what they were resolved against."""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

import shn  # noqa: F401 - registers the built-in tasks and methods
from shn.cli import main
from shn.config import RunConfig, TaskConfig, load_config
from shn.config_reference import field_help, format_markdown, reference, type_name
from shn.registry import METHODS, TASKS

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "experiments" / "configs" / "quickstart.toml")


def config_dataclasses() -> list[type]:
    hints = typing.get_type_hints(RunConfig)
    classes = [RunConfig, TaskConfig] + [hints[f.name] for f in fields(RunConfig) if is_dataclass(hints[f.name])]
    classes += [TASKS.get(n).options for n in TASKS.names() if TASKS.get(n).options is not None]
    classes += [METHODS.get(n).options for n in METHODS.names() if METHODS.get(n).options is not None]
    return list(dict.fromkeys(classes))


@pytest.mark.parametrize("cls", config_dataclasses(), ids=lambda c: c.__name__)
def test_every_config_field_has_a_help_line(cls):
    helps = field_help(cls)
    missing = [f.name for f in fields(cls) if f.init and not helps.get(f.name, "").strip()]
    assert not missing, f"{cls.__module__}.{cls.__name__}: no Attributes entry for {missing}"
    unknown = sorted(set(helps) - {f.name for f in fields(cls)})
    assert not unknown, f"{cls.__name__}: Attributes entries for no field: {unknown}"


def test_attributes_parser_joins_continuations_and_shares_grouped_entries():
    class Options:
        """Summary.

        Attributes:
            a: first line
                continued here.
            b, c: shared text.
            d: one: with a colon.

        Returns:
            e: not an attribute.
        """

    helps = field_help(Options)
    assert helps == {"a": "first line continued here.", "b": "shared text.", "c": "shared text.",
                     "d": "one: with a colon."}


def test_type_names():
    from typing import Literal

    assert type_name(int | None) == "integer or none"
    assert type_name(Literal["sgd", "adam"]) == '"sgd" | "adam"'
    assert type_name(tuple[str, ...]) == "list of string"
    assert type_name(tuple[float, float]) == "[number, number]"


def test_shn_config_defaults_lists_every_key_with_type_default_and_meaning(capsys):
    assert main(["config", "--defaults"]) == 0
    text = capsys.readouterr().out
    for line in ("  local.steps: integer = 50", '  server.optimizer: "sgd" | "adam" = "sgd"',
                 "  methods.fedprox.mu: number = 0.01", "  task.alpha: number = 0.5",
                 "  task.graph_k: integer = 3", "  graph.stage1_rounds: integer or none = none"):
        assert line in text, line
    assert "local SGD steps per client and round" in text
    sections = reference()
    keys = {k.key for s in sections for k in s.keys}
    assert {f"local.{f.name}" for f in fields(type(RunConfig().local))} <= keys
    assert all(k.help for s in sections for k in s.keys)


def test_shn_config_of_a_config_shows_its_values_and_what_differs(capsys):
    assert main(["config", QUICKSTART, "--set", "method=fedavg"]) == 0
    text = capsys.readouterr().out
    assert "  rounds: integer = 150   (default 100)" in text and "  local.steps: integer = 20   (default 50)" in text
    assert "[methods.fedavg]" in text and "[methods.pfedhn]" not in text and '[task] name = "digits"' in text
    assert "[task] name = \"traffic\"" not in text
    assert main(["config", QUICKSTART, "--defaults"]) == 2
    assert "either --defaults or a CONFIG" in capsys.readouterr().err


def test_docs_config_md_is_the_generated_reference():
    generated = format_markdown(reference(builtin_only=True)) + "\n"
    committed = (REPO / "docs" / "config.md").read_text()
    assert committed == generated, ("docs/config.md is out of date: regenerate it with "
                                    "`shn config --defaults --markdown --builtin-only > docs/config.md`")
    assert "(docs/config.md)" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("task, extra", [
    ("mnist", []), ("cifar10", []), ("traffic", None), ("weather", None),
])
def test_a_relative_data_dir_that_does_not_exist_says_what_it_was_resolved_against(task, extra, tmp_path,
                                                                                  monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'method = "fedavg"\n[task]\nname = "{task}"\ndata_dir = "data/missing"\n')
    assert main(["inspect", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data/missing" in err and f"relative to the working directory {tmp_path}" in err, err
