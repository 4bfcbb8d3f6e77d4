"""Compressed uploads ([compression], shn.federated.compression): top-k keeps exactly k entries and
error feedback loses nothing over rounds; 8-bit quantisation is unbiased and seeded; malformed
payloads are rejected by the server; compressed FedAvg and pFedHN still learn; resume is exact
(the residuals are checkpointed); bad config values are one ConfigError line naming the key."""

from __future__ import annotations

import json

import pytest
import torch

import baselines  # noqa: F401 - registers the methods
from shn.config import ConfigError, ServerConfig, ValidationConfig, config_from_dict, load_config
from shn.config_compression import CompressionConfig
from shn.federated.algorithm import GlobalModelAlgorithm
from shn.federated.compression import ClientUpload, UploadCodec, topk_count
from shn.federated.records import read_jsonl
from shn.federated.server import Server
from shn.federated.traffic import npy_bytes, payload_bytes
from shn.federated.validation import UnreadableUpdate
from shn.runner import run
from shn.seeding import torch_generator
from shn.target import ParamSpec
from tests.conftest import REPO

SPEC = ParamSpec(("fc.weight", "fc.bias"), ((6, 5), (6,)))
QUICKSTART = REPO / "experiments" / "configs" / "quickstart.toml"


def random_deltas(count: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(count, *s, generator=g) for n, s in zip(SPEC.names, SPEC.shapes)}


# -- top-k and error feedback -------------------------------------------------------------------

def test_topk_count_is_the_ceiling_at_least_one_at_most_all():
    assert topk_count(30, 0.1) == 3  # (0.1 * 30 is 3.0000000000000004 in floating point)
    assert topk_count(31, 0.1) == 4 and topk_count(6, 0.01) == 1 and topk_count(6, 1.0) == 6


def test_topk_keeps_exactly_k_largest_and_error_feedback_preserves_the_sum():
    upload = ClientUpload.from_config(CompressionConfig(kind="topk", topk_fraction=0.2), SPEC)
    codec = upload.codec
    assert codec.k == {"fc.weight": 6, "fc.bias": 2}
    clients = [3, 7]
    sent_sum = {n: torch.zeros(2, *s) for n, s in zip(SPEC.names, SPEC.shapes)}
    true_sum = {n: torch.zeros(2, *s) for n, s in zip(SPEC.names, SPEC.shapes)}
    for r in range(1, 9):
        deltas = random_deltas(2, r)
        kept = {c: upload.residuals.get(c) for c in clients}
        payloads = upload.encode(clients, deltas, seed=0, round_=r)
        for i, (c, p) in enumerate(zip(clients, payloads)):
            assert set(p) == {"fc.weight:idx", "fc.weight:val", "fc.bias:idx", "fc.bias:val"}
            decoded = codec.decode(p)
            for n in SPEC.names:
                k = codec.k[n]
                assert p[f"{n}:idx"].dtype == torch.int32 and p[f"{n}:idx"].shape == (k,)
                assert int((decoded[n] != 0).sum()) == k
                # the k entries of largest magnitude of delta + residual, at their positions
                corrected = deltas[n][i] + (kept[c][n] if kept[c] is not None else 0)
                top = corrected.flatten().abs().topk(k).indices.sort().values
                assert torch.equal(p[f"{n}:idx"].long(), top)
                assert torch.equal(decoded[n].flatten()[top], corrected.flatten()[top])
                sent_sum[n][i] += decoded[n]
                true_sum[n][i] += deltas[n][i]
    for i, c in enumerate(clients):
        residual = upload.residuals[c]
        for n in SPEC.names:  # what the server got + what the client still holds = what it computed
            torch.testing.assert_close(sent_sum[n][i] + residual[n], true_sum[n][i], atol=1e-5, rtol=0)
            assert float(residual[n].abs().sum()) > 0  # something is still held back


def test_without_error_feedback_the_dropped_entries_are_lost():
    upload = ClientUpload.from_config(CompressionConfig(kind="topk", topk_fraction=0.2, error_feedback=False), SPEC)
    assert upload.residuals is None
    deltas = random_deltas(1, 0)
    first = upload.encode([0], deltas, seed=0, round_=1)[0]
    assert torch.equal(first["fc.weight:val"], upload.encode([0], deltas, seed=0, round_=2)[0]["fc.weight:val"])


def test_a_non_finite_delta_does_not_poison_the_residual():
    upload = ClientUpload.from_config(CompressionConfig(kind="topk", topk_fraction=0.2), SPEC)
    deltas = random_deltas(1, 0)
    deltas["fc.weight"][0, 0, 0] = float("nan")
    upload.encode([0], deltas, seed=0, round_=1)
    assert all(bool(torch.isfinite(v).all()) for v in upload.residuals[0].values())


# -- 8-bit stochastic quantisation --------------------------------------------------------------

def test_qsgd8_is_unbiased_and_one_byte_per_entry():
    codec = UploadCodec(CompressionConfig(kind="qsgd8"), SPEC)
    x = random_deltas(1, 1)
    draws = 4000
    stacked = {n: v.expand(draws, *v.shape[1:]).clone() for n, v in x.items()}
    gens = [torch_generator(0, "upload-compression", 1, c) for c in range(draws)]
    payloads, decoded = codec.encode(stacked, gens)
    for n in SPEC.names:
        q, scale = payloads[0][f"{n}:q8"], payloads[0][f"{n}:scale"]
        assert q.dtype == torch.int8 and q.shape == x[n].shape[1:] and scale.shape == ()
        assert float(scale) == pytest.approx(float(x[n].abs().max()) / 127)
        assert npy_bytes(q.dtype, q.shape) - npy_bytes(q.dtype, (0,) * q.dim()) == q.numel()  # one byte per entry
        # each draw lies on the grid next to x (never further than one step) ...
        assert float((decoded[n] - x[n]).abs().max()) <= float(scale) * (1 + 1e-5)
        # ... and the mean over draws is x: the rounding error has std ≤ scale/2 per entry
        mean = decoded[n].mean(dim=0)
        assert float((mean - x[n][0]).abs().max()) <= 5 * float(scale) / 2 / draws ** 0.5
        torch.testing.assert_close(codec.decode(payloads[0])[n], decoded[n][0], rtol=0, atol=0)


def test_qsgd8_is_deterministic_per_seed_round_and_client():
    def payload(seed, round_, clients):
        upload = ClientUpload.from_config(CompressionConfig(kind="qsgd8", error_feedback=False), SPEC)
        one = random_deltas(1, 5)  # every client sends the same delta
        deltas = {k: v.expand(len(clients), *v.shape[1:]).clone() for k, v in one.items()}
        return upload.encode(clients, deltas, seed=seed, round_=round_)

    a, again = payload(0, 1, [2, 5]), payload(0, 1, [2, 5])
    assert all(torch.equal(a[i][k], again[i][k]) for i in range(2) for k in a[i])
    # a client's draw does not depend on its cohort (the Flower engine encodes it alone)
    assert torch.equal(payload(0, 1, [5])[0]["fc.weight:q8"], a[1]["fc.weight:q8"])
    assert not torch.equal(a[0]["fc.weight:q8"], a[1]["fc.weight:q8"])  # another client, other noise
    assert not torch.equal(payload(0, 2, [2, 5])[0]["fc.weight:q8"], a[0]["fc.weight:q8"])  # another round
    assert not torch.equal(payload(1, 1, [2, 5])[0]["fc.weight:q8"], a[0]["fc.weight:q8"])  # another seed


def test_an_all_zero_tensor_quantises_to_zero():
    codec = UploadCodec(CompressionConfig(kind="qsgd8"), SPEC)
    zeros = {n: torch.zeros(1, *s) for n, s in zip(SPEC.names, SPEC.shapes)}
    payloads, decoded = codec.encode(zeros, [torch_generator(0, "x")])
    assert float(payloads[0]["fc.bias:scale"]) == 0 and all(float(v.abs().sum()) == 0 for v in decoded.values())


# -- what the server accepts --------------------------------------------------------------------

def _honest(kind: str) -> tuple[UploadCodec, dict[str, torch.Tensor]]:
    codec = UploadCodec(CompressionConfig(kind=kind, topk_fraction=0.5), SPEC)
    return codec, codec.encode(random_deltas(1, 0), [torch_generator(0, "x")])[0][0]


@pytest.mark.parametrize("kind, key, bad, reason", [
    ("topk", "fc.bias:idx", lambda t: t.flip(0), "ascending, distinct"),
    ("topk", "fc.bias:idx", lambda t: t + 100, "in [0, 6)"),
    ("topk", "fc.bias:idx", lambda t: t.long(), "expected a dense torch.int32 tensor"),
    ("topk", "fc.bias:val", lambda t: t[:1], "expected (3,)"),
    ("qsgd8", "fc.bias:q8", lambda t: torch.full_like(t, -128), "codes below -127"),
    ("qsgd8", "fc.bias:scale", lambda t: torch.tensor(float("inf")), "not a finite number"),
    ("qsgd8", "fc.bias:scale", lambda t: t.reshape(1), "a scale of shape (1,)"),
    ("qsgd8", "fc.bias:scale", None, "missing ['fc.bias:scale']"),
])
def test_malformed_payloads_are_rejected_with_the_reason(kind, key, bad, reason):
    codec, payload = _honest(kind)
    assert isinstance(codec.decode(payload), dict)
    forged = dict(payload)
    if bad is None:
        del forged[key]
    else:
        forged[key] = bad(payload[key])
    got = codec.decode(forged)
    assert isinstance(got, UnreadableUpdate) and reason in got.reason, got
    # the server rejects it, with that reason, and applies the honest client's update alone
    alg = GlobalModelAlgorithm({n: torch.zeros(s) for n, s in zip(SPEC.names, SPEC.shapes)},
                               ServerConfig(momentum=0.0, weight_decay=0.0, lr=1.0))
    server = Server(alg, ValidationConfig(), clients=[0, 1])
    metrics = server.receive(1, [0, 1], [codec.decode(payload), got], [10, 10])
    assert metrics["accepted"] == 1.0 and reason in server.rejections.by_round[1][0].reason
    assert codec.decode("not a mapping").reason.startswith(f"malformed {kind} upload")


# -- runs ---------------------------------------------------------------------------------------

LEARN = ["rounds=30", "eval_every=10", "local.steps=20", "task.model=mlp", "server.lr=0.03"]


@pytest.mark.parametrize("method", ["fedavg", "pfedhn"])
@pytest.mark.parametrize("kind", ["topk", "qsgd8"])
def test_compressed_runs_still_learn_and_upload_fewer_bytes(method, kind, tmp_path):
    torch.set_num_threads(1)
    config = load_config(QUICKSTART, [*LEARN, f"method={method}", f"compression.kind={kind}",
                                      "compression.topk_fraction=0.05"])
    result = run(config, run_dir=tmp_path, progress=False)
    m = result.summary["metrics"]
    assert m["test_accuracy"] >= 0.85, m  # two classes per client: chance is 0.5
    records = read_jsonl(tmp_path / "metrics.jsonl")
    for before, after in zip(records, records[1:]):
        assert after["bytes_up"] > before["bytes_up"] and after["bytes_down"] > before["bytes_down"]
    last = records[-1]
    assert last["bytes_total"] == last["bytes_down"] + last["bytes_up"]
    # downloads are dense float32 (4 bytes per entry), uploads ~8 bytes per kept entry or 1 per entry
    assert last["bytes_up"] < (0.15 if kind == "topk" else 0.3) * last["bytes_down"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    comm = summary["communication"]
    assert comm["bytes_total"] == summary["budget"]["bytes_total"] == last["bytes_total"]
    assert comm["compression"] == {"kind": kind, "topk_fraction": 0.05, "error_feedback": True}
    assert sum(c["bytes_up"] for c in comm["per_client"].values()) == comm["bytes_up"]


def test_uncompressed_uploads_are_as_large_as_downloads():
    config = load_config(QUICKSTART, ["rounds=2", "eval_every=1", "local.steps=1", "method=fedavg", "task.model=mlp"])
    last = run(config, progress=False).history[-1]
    assert last["bytes_up"] == last["bytes_down"] > 0  # the delta has the shapes and keys of the weights


def test_resume_with_compression_is_exact(tmp_path):
    """The residuals and byte counts are in the checkpoint: a run stopped after round 2 and
    resumed to round 4 equals one that ran 4 rounds."""
    overrides = ["eval_every=1", "checkpoint_every=2", "local.steps=2", "task.num_clients=4", "clients_per_round=2",
                 "task.model=mlp", "method=fedavg", "compression.kind=topk", "compression.topk_fraction=0.05"]
    full = run(load_config(QUICKSTART, [*overrides, "rounds=4"]), run_dir=tmp_path / "full", progress=False)
    run(load_config(QUICKSTART, [*overrides, "rounds=2"]), run_dir=tmp_path / "part", progress=False)
    resumed = run(load_config(QUICKSTART, [*overrides, "rounds=4"]), run_dir=tmp_path / "part", resume=True,
                  progress=False)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "elapsed_s"} for h in hs]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    assert resumed.summary["communication"] == full.summary["communication"]


# -- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("table, message", [
    ({"kind": "gzip"}, "compression.kind: 'gzip' is not allowed; allowed values: 'none', 'topk', 'qsgd8'"),
    ({"topk_fraction": 0.0}, "compression.topk_fraction: must be in (0, 1], got 0.0"),
    ({"topk_fraction": 1.5}, "compression.topk_fraction: must be in (0, 1], got 1.5"),
    ({"topk_fraction": "10%"}, "compression.topk_fraction: expected a number, got '10%'"),
    ({"error_feedback": "yes"}, "compression.error_feedback: expected true or false, got 'yes'"),
    ({"level": 8}, "compression.level: unknown key; allowed keys here: error_feedback, kind, topk_fraction"),
])
def test_bad_compression_values_are_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"compression": table})
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_payload_sizes_follow_the_wire_format():
    codec, payload = _honest("topk")
    k = codec.k["fc.weight"]
    idx_bytes = npy_bytes(torch.int32, (k,)) - npy_bytes(torch.int32, (0,))
    assert idx_bytes == 4 * k  # int32 indices; values are float32: 8 bytes per kept entry
    assert payload_bytes(payload) == sum(len(name) + npy_bytes(t.dtype, t.shape) for name, t in payload.items())
