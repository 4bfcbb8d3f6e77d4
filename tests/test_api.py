"""The public Python API: exports, docstrings, custom tasks / models / encoders, and equality with
the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

import shn
from shn.cli import main as cli_main
from tests.conftest import REPO

QUICK = ["rounds=4", "eval_every=2", "local.steps=2", "task.num_clients=4", "clients_per_round=2"]


def quick_config(*extra: str) -> shn.RunConfig:
    return shn.load_config(REPO / "experiments/configs/quickstart.toml", [*QUICK, *extra])


def test_every_public_name_is_exported_and_documented():
    missing = [n for n in shn.__all__ if not hasattr(shn, n)]
    assert not missing
    undocumented = [n for n in shn.__all__ if not (getattr(shn, n).__doc__ or "").strip()]
    assert not undocumented, undocumented
    assert (REPO / "shn" / "py.typed").is_file()


class TwoBlobs:
    """A user task: per client, two Gaussian blobs whose labels are swapped on odd clients."""

    name = "two-blobs"

    def __init__(self, num_clients: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_clients = num_clients
        self.data = []
        for c in range(num_clients):
            y = torch.randint(0, 2, (90,), generator=g)
            x = torch.randn(90, 3, generator=g) + (2.0 * y - 1.0)[:, None] * (1 if c % 2 else -1)
            self.data.append(shn.ClientData(train=(x[:60], y[:60]), val=(x[60:75], y[60:75]), test=(x[75:], y[75:])))

    def client_data(self, client):
        return self.data[client]

    def make_model(self, client=None):
        return UserModel()

    def loss(self, output, y):
        return nn.functional.cross_entropy(output, y)

    def metrics(self, output, y):
        return {"correct": (output.argmax(-1) == y).sum().float(), "count": torch.tensor(float(y.shape[0]))}

    def finalize(self, sums):
        return {"accuracy": sums["correct"] / sums["count"]}


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("method", ["pfedhn", "shn"])
def test_custom_task_and_model_run_through_run(method):
    config = dataclasses.replace(quick_config(), method=method, graph=shn.GraphConfig(kind="knn", k=1))
    result = shn.run(config, task=TwoBlobs(), progress=False)
    assert result.summary["task"] == "two-blobs"
    assert math.isfinite(result.metrics["test_accuracy"])
    assert set(result.per_client) == {0, 1, 2, 3}


def test_custom_encoder_registered_by_name_runs_through_the_hypernetwork():
    from torch_geometric.nn import GATConv

    class GATEncoder(shn.Encoder):
        """Two-head GAT over the client graph."""

        needs_graph = True

        def __init__(self, in_dim, config):
            super().__init__()
            self.conv = GATConv(in_dim, 8, heads=2)
            self.out_dim = 16

        def forward(self, embeddings, graph=None):
            return torch.relu(self.conv(embeddings, graph.edge_index))

    shn.register_encoder("test-gat", replace=True)(lambda in_dim, cfg: GATEncoder(in_dim, cfg))
    config = quick_config("method=ghn", 'graph.kind="complete"', 'encoder.kind="test-gat"')
    result = shn.run(config, progress=False)
    assert isinstance(result.algorithm.hn.encoder, GATEncoder)
    assert math.isfinite(result.metrics["test_accuracy"])


def test_encoder_with_the_wrong_width_gives_a_clear_error():
    class Liar(shn.Encoder):
        def __init__(self, in_dim, config):
            super().__init__()
            self.out_dim = 7

        def forward(self, embeddings, graph=None):
            return embeddings

    shn.register_encoder("test-liar", replace=True)(lambda in_dim, cfg: Liar(in_dim, cfg))
    with pytest.raises(ValueError, match="Liar returned shape"):
        shn.run(quick_config('encoder.kind="test-liar"'), progress=False)


def test_run_with_a_config_object_equals_shn_run_with_the_toml(tmp_path, capsys):
    config = quick_config()
    from_python = shn.run(config, progress=False).summary
    assert cli_main(["run", str(REPO / "experiments/configs/quickstart.toml"), *sum([["--set", s] for s in QUICK], []),
                     "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    from_cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    drop = lambda s: {k: v for k, v in s.items() if k != "wall_time_s"}  # noqa: E731
    assert drop(json.loads(json.dumps(from_python))) == drop(from_cli)


def test_available_methods_and_tasks_list_the_builtins():
    assert {"pfedhn", "shn", "ghn", "panacea", "fedavg", "local", "fedper", "decoupled", "attentive"} <= set(
        shn.available_methods())
    assert {"digits", "mnist", "cifar10", "cifar100", "traffic", "weather"} <= set(shn.available_tasks())
