"""Shared fixtures. Tests that need ../shared/datasets skip where it is absent (a user's
machine) but fail under CI=true, so CI never silently skips them."""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/datasets/<name>``; skip (or fail under CI=true) when absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        reason = f"{path} is absent: this test needs the staged dataset {name!r} (../shared/datasets)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " — CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return path


def tiny_digits_toml(method: str = "local", rounds: int = 3) -> str:
    """A digits config of a few seconds: 4 clients, 2 classes each, every client every round."""
    return f"""
method = "{method}"
seed = 0
rounds = {rounds}
clients_per_round = 4
eval_every = 1

[task]
name = "digits"
num_clients = 4
partition = "pathological"
classes_per_client = 2

[local]
steps = 2
batch_size = 16
"""


def with_changes(data: dict, **changes) -> dict:
    """A deep copy of a config dict with dotted keys set (``**{"local.steps": 3}``)."""
    data = copy.deepcopy(data)
    for key, value in changes.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


def state_hash(obj) -> str:
    """sha256 over every tensor's bytes (and every other leaf's repr) of a nested state dict."""
    h = hashlib.sha256()

    def walk(o, path):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                walk(o[k], f"{path}/{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")
        else:
            h.update(f"{path}={o!r}".encode())

    walk(obj, "")
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _two_threads():
    # CI has 2 cores; keep tests (and benchmarks) honest about that and deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def flower_env(tmp_path_factory, monkeypatch):
    """Flower state in a temp dir; no update check, never a runtime `uv sync` (downloads). Flower
    test modules use it for every test (``pytestmark = pytest.mark.usefixtures("flower_env")``)."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
