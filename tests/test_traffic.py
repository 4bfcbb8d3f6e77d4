"""Communication accounting (shn.federated.traffic): the in-process engine's byte counts equal
the serialised size of what the Flower engine sends and receives (``ArrayRecord.count_bytes``),
per tensor, per payload, and over whole runs with and without [compression]."""

from __future__ import annotations

import pytest
import torch

import baselines  # noqa: F401 - registers the methods
from shn.config import config_from_dict
from shn.config_compression import CompressionConfig
from shn.federated.compression import UploadCodec
from shn.federated.traffic import Traffic, payload_bytes
from shn.runner import run
from shn.seeding import torch_generator
from shn.target import ParamSpec
from tests.conftest import with_changes

flwr_app = pytest.importorskip("flwr.app")
from shn.flower.engine import RESIDUAL_PREFIX, EngineSettings, InProcessGrid, make_client_app, run_federation  # noqa: E402

SMALL = {"seed": 0, "rounds": 3, "clients_per_round": 3, "eval_every": 1,
         "task": {"name": "digits", "num_clients": 4}, "local": {"steps": 2, "batch_size": 16}}


pytestmark = pytest.mark.usefixtures("flower_env")


@pytest.mark.parametrize("payload", [
    {"conv1.weight": torch.zeros(16, 3, 5, 5), "conv1.bias": torch.zeros(16)},
    {"fc.weight": torch.zeros(10, 1000, dtype=torch.float64), "scalar": torch.tensor(2.0)},
    {"w:q8": torch.zeros(7, 3, dtype=torch.int8), "w:scale": torch.tensor(0.5), "i:idx": torch.arange(9, dtype=torch.int32)},
    {"empty": torch.zeros(0), "big": torch.zeros(123456)},
    {},
])
def test_payload_bytes_equal_flowers_serialised_size(payload):
    assert payload_bytes(payload) == flwr_app.ArrayRecord(payload).count_bytes()
    # a cohort's stacked tensors: one client's row
    stacked = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in payload.items()}
    assert payload_bytes(stacked, batch_dims=1) == payload_bytes(payload)


@pytest.mark.parametrize("kind", ["none", "topk", "qsgd8"])
def test_compressed_payloads_count_as_flower_serialises_them(kind):
    spec = ParamSpec(("a.weight", "a.bias"), ((20, 30), (20,)))
    codec = UploadCodec(CompressionConfig(kind=kind, topk_fraction=0.1), spec)
    deltas = {n: torch.randn(2, *s) for n, s in zip(spec.names, spec.shapes)}
    payloads, _ = codec.encode(deltas, [torch_generator(0, "t", c) for c in range(2)])
    for p in payloads:
        assert payload_bytes(p) == flwr_app.ArrayRecord(p).count_bytes()
    dense = payload_bytes({n: d[0] for n, d in deltas.items()})
    # top-k: 8 bytes per kept entry (60 + 2) instead of 4 per entry; 8-bit: 1 byte per entry plus
    # a scale; every array adds its .npy header (128 bytes) and its key
    data = {"none": 4 * 620, "topk": 8 * 62, "qsgd8": 620 + 2 * 4}[kind]
    arrays = {"none": 2, "topk": 4, "qsgd8": 4}[kind]
    assert payload_bytes(payloads[0]) == data + 128 * arrays + sum(len(k) for k in payloads[0])
    assert (payload_bytes(payloads[0]) < dense) == (kind != "none")


def test_traffic_totals_and_state():
    t = Traffic()
    t.sent(1, 100)
    t.sent(2, 100)
    t.received(1, 30)
    t.sent(1, 100)
    assert t.record() == {"bytes_down": 300, "bytes_up": 30, "bytes_total": 330}
    again = Traffic()
    again.load_state_dict(t.state_dict())
    assert again.summary() == t.summary() == {
        "bytes_down": 300, "bytes_up": 30, "bytes_total": 330,
        "per_client": {"1": {"bytes_down": 200, "bytes_up": 30}, "2": {"bytes_down": 100, "bytes_up": 0}}}


@pytest.mark.parametrize("method, kind", [("fedavg", "none"), ("fedavg", "topk"), ("pfedhn", "qsgd8")])
def test_in_process_counts_equal_what_flower_sends_and_receives(method, kind, tmp_path):
    """Same config on both engines: the same bytes in every record (and the same model), and the
    Flower totals are the sums of the real messages' ``count_bytes()``."""
    config = config_from_dict(with_changes(SMALL, method=method, **{"compression.kind": kind,
                                                                      "compression.topk_fraction": 0.05}))
    ref = run(config, progress=False)
    real = make_client_app()
    replies = []

    def recording(msg, context):
        reply = real(msg, context)
        if msg.metadata.message_type == "train":
            replies.append(reply)
        return reply

    grid = InProcessGrid(recording, 4)
    got = run_federation(grid, config, EngineSettings(run_dir=tmp_path / "run"))
    for r, g in zip(ref.history, got.history):
        for key in ("bytes_down", "bytes_up", "bytes_total"):
            assert r[key] == g[key], (r["round"], key)
        assert g["val_accuracy"] == pytest.approx(r["val_accuracy"], abs=1e-7)
    last = got.history[-1]
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert last["bytes_down"] == sum(m.content["arrays"].count_bytes() for m in trains)
    assert last["bytes_up"] == sum(m.content["delta"].count_bytes() for m in replies)
    assert got.summary["communication"] == ref.summary["communication"]
    # each client's error-feedback residual lives in its node's state (never sent), as in-process
    sim_residuals = ref.extra["simulation"].runtime.upload
    for node, context in grid.contexts.items():
        client = context.node_config["partition-id"]
        key = f"{RESIDUAL_PREFIX}{client}"
        if sim_residuals is None or client not in sim_residuals.residuals:
            assert key not in context.state
            continue
        mine = context.state[key].to_torch_state_dict()
        theirs = sim_residuals.residuals[client]
        assert max(float((mine[k] - theirs[k]).abs().max()) for k in theirs) <= 1e-6
