"""``shn inspect``: the task of a config described without training."""

from __future__ import annotations

import json

from shn.cli import main as cli_main
from shn.config import config_from_dict
from shn.inspect import describe_task, format_description, inspect_config
from tests.test_tabular import write_table
from tests.test_timeseries import write_wide


def test_inspect_tabular_with_a_given_graph(tmp_path, capsys):
    write_table(tmp_path / "data.csv", small=3)
    (tmp_path / "edges.csv").write_text("alpha,beta\nbeta,gamma\n")
    (tmp_path / "c.toml").write_text(f"""
method = "shn"
[task]
name = "tabular"
files = "{tmp_path / 'data.csv'}"
client_column = "site"
target_column = "price"
exclude_columns = ["label"]
graph_file = "{tmp_path / 'edges.csv'}"
[graph]
kind = "given"
""")
    assert cli_main(["inspect", str(tmp_path / "c.toml")]) == 0
    out = capsys.readouterr().out
    assert "task 'tabular': 4 clients (1 dropped: 'tiny'), regression" in out
    assert "graph (given, from the task's relation graph): 2 edges, degree min 0 / mean 1.00 / max 2, 1 isolated" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("alpha", "beta", "delta"))]
    assert rows[0][:6] == ["alpha", "17", "2", "5", "7", "1"] and rows[2][-1] == "0"
    assert cli_main(["inspect", str(tmp_path / "c.toml"), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["graph"]["degree"] == [1, 2, 1, 0] and desc["clients"][1]["input_shape"] == [7]
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_inspect_timeseries_reports_the_time_axis(tmp_path):
    write_wide(tmp_path / "flow.csv", days=3)
    config = config_from_dict({"task": {"name": "timeseries", "files": str(tmp_path / "flow.csv"), "variable": "flow",
                                        "input_len": 6, "output_len": 3}})
    desc = inspect_config(config)
    assert desc["num_steps"] == 432 and desc["step_seconds"] == 600 and desc["season_steps"] == 144
    assert desc["split_steps"] == {"train": [0, 302], "val": [302, 345], "test": [345, 432]}
    assert desc["clients"][0]["train"] == 302 - 9 + 1 and desc["graph"] == {"kind": "knn", "source": None}
    text = format_description(desc)
    assert "time axis: 432 steps of 10min from 2024-03-04T00:00:00 (train 302, val 43, test 87)" in text
    assert "inferred from stage-1 embeddings" in text


def test_inspect_reports_a_missing_given_graph_and_fails_on_data_errors(tmp_path, capsys):
    write_wide(tmp_path / "flow.csv", days=3)
    config = config_from_dict({"task": {"name": "timeseries", "files": str(tmp_path / "flow.csv")},
                               "graph": {"kind": "given"}})
    text = format_description(describe_task(__import__("shn.runner", fromlist=["make_task"]).make_task(config), config))
    assert "graph: graph.kind = 'given' but task 'timeseries' has no relation graph" in text
    (tmp_path / "bad.toml").write_text(f'[task]\nname = "timeseries"\nfiles = "{tmp_path / "nope.csv"}"\n')
    assert cli_main(["inspect", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.csv: file not found (task option files)" in err[0]
