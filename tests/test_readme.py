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
