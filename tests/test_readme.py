"""The README's Python examples are executed as written, so the README cannot drift."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def python_api_examples() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_two_python_examples():
    assert len(python_api_examples()) == 2


@pytest.mark.parametrize("index", [0, 1])
def test_readme_example_runs_and_prints_finite_metrics(index):
    code = python_api_examples()[index]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    numbers = [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.\d+", proc.stdout)]
    assert numbers, proc.stdout
    assert all(math.isfinite(v) for v in numbers)


def own_data_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Your own data", 1)[1].split("\n## ", 1)[0]


def test_readme_own_data_configs_are_valid_and_cover_every_layout():
    import tomllib

    from shn.config import config_from_dict

    blocks = re.findall(r"```toml\n(.*?)```", own_data_section(), flags=re.S)
    configs = [config_from_dict(tomllib.loads(b)) for b in blocks]
    layouts = [(c.task.name, c.task.options.is_long if c.task.name == "timeseries" else None) for c in configs]
    assert layouts == [("tabular", None), ("timeseries", True), ("timeseries", False)]


def test_readme_graph_file_examples_read_as_documented(tmp_path):
    import io
    import json

    import numpy as np

    from shn.graph import ClientGraph
    from tasks.client_graph import read_client_graph

    text = re.findall(r"```text\n(.*?)```", own_data_section(), flags=re.S)
    task_files = [b.strip() for b in text[0].split("\n\n")]
    names = ["station_1", "station_2", "station_3"]
    for k, block in enumerate(task_files):
        body = "\n".join(line for line in block.splitlines() if not line.startswith("#"))
        (tmp_path / f"g{k}.csv").write_text(body + "\n")
        a = read_client_graph(tmp_path / f"g{k}.csv", names)
        chain = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=bool)
        assert len(task_files) == 3 and np.array_equal(np.maximum(a, a.T) > 0, chain), block
    json_lines = [line for line in text[1].splitlines() if line and not line.startswith("#")]
    (tmp_path / "graph.json").write_text(" ".join(json_lines[:2]))
    graph = ClientGraph.load(tmp_path / "graph.json")
    assert graph.num_nodes == 3 and graph.edge_index.shape == (2, 4)
    assert json.loads(" ".join(json_lines[:2]))["format"] == "shn.ClientGraph"
    dense = np.loadtxt(io.StringIO("\n".join(json_lines[2:])), delimiter=",")  # as shn.pipeline reads graph.path
    assert dense.shape == (3, 3) and np.array_equal(dense, dense.T)
