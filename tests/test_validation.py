"""Client-update validation (shn.federated.validation, shn.federated.server.Server): every bad
update is rejected with a reason, and a rejected update never touches the server state."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from baselines.fedavg import FedAvgOptions
from shn.config import ServerConfig, ValidationConfig, load_config
from shn.federated.algorithm import GlobalModelAlgorithm, HyperNetworkAlgorithm
from shn.federated.server import Server
from shn.federated.validation import validate_update
from shn.hypernetwork import HyperNetwork
from shn.target import ParamSpec, module_params
from tasks.models import MLP
from tests.conftest import state_hash

MAX_NORM = 1e3


def model() -> MLP:
    torch.manual_seed(0)
    return MLP(6, 3, hidden=(5,))


SPEC = ParamSpec.from_module(model())


def good_delta(seed: int = 0, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(s, generator=g) for n, s in zip(SPEC.names, SPEC.shapes)}


def with_value(name: str, index: tuple, value: float) -> dict[str, torch.Tensor]:
    d = good_delta()
    d[name] = d[name].clone()
    d[name][index] = value
    return d


def _drop(key):
    d = good_delta()
    del d[key]
    return d


BAD_DELTAS = {
    "nan": (lambda: with_value("input_proj.weight", (0, 0), math.nan), "non-finite"),
    "inf": (lambda: with_value("head.bias", (1,), math.inf), "non-finite"),
    "-inf": (lambda: with_value("head.weight", (2, 3), -math.inf), "non-finite"),
    "wrong shape": (lambda: {**good_delta(), "head.bias": torch.zeros(4)}, "shape"),
    "batched shape": (lambda: {**good_delta(), "head.bias": torch.zeros(1, 3)}, "shape"),
    "float64": (lambda: {**good_delta(), "head.weight": good_delta()["head.weight"].double()}, "dtype"),
    "int": (lambda: {**good_delta(), "head.bias": torch.zeros(3, dtype=torch.long)}, "dtype"),
    "missing key": (lambda: _drop("input_proj.bias"), "missing"),
    "extra key": (lambda: {**good_delta(), "backdoor": torch.zeros(3)}, "unexpected"),
    "huge norm": (lambda: {**good_delta(), "input_proj.weight": torch.full((5, 6), 1e3)}, "norm"),
    "not a tensor": (lambda: {**good_delta(), "head.bias": [0.0, 0.0, 0.0]}, "not a tensor"),
    "not a mapping": (lambda: [good_delta()[n] for n in SPEC.names], "mapping"),
}


def test_a_good_update_is_accepted():
    assert validate_update(SPEC, good_delta(), 10, MAX_NORM) is None
    assert validate_update(SPEC, good_delta(), torch.tensor(10), MAX_NORM) is None
    assert validate_update(SPEC, dict(reversed(list(good_delta().items()))), 1, MAX_NORM) is None


@pytest.mark.parametrize("case", sorted(BAD_DELTAS))
def test_bad_delta_is_rejected_with_a_reason(case):
    make, words = BAD_DELTAS[case]
    reason = validate_update(SPEC, make(), 10, MAX_NORM)
    assert reason is not None, f"{case} was accepted"
    assert words in reason


@pytest.mark.parametrize("count", [0, -5, 2.5, 3.0, True, "10", None, torch.tensor(4.0), torch.tensor([1, 2]),
                                   torch.tensor(0), torch.tensor(True), np.int64(0)], ids=repr)
def test_bad_example_count_is_rejected(count):
    reason = validate_update(SPEC, good_delta(), count, MAX_NORM)
    assert reason is not None and "example count" in reason


def test_norm_bound_is_the_configured_one():
    d = good_delta(scale=1.0)
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))
    assert validate_update(SPEC, d, 1, norm * 1.01) is None
    reason = validate_update(SPEC, d, 1, norm * 0.99)
    assert reason is not None and "above the bound" in reason


def test_reason_names_the_offending_tensor():
    reason = validate_update(SPEC, with_value("head.bias", (0,), math.nan), 1, MAX_NORM)
    assert "head.bias" in reason
    reason = validate_update(SPEC, {**good_delta(), "head.weight": torch.zeros(2, 2)}, 1, MAX_NORM)
    assert "head.weight" in reason and "(2, 2)" in reason and "(3, 5)" in reason


# -- the server: rejected updates never touch the state -----------------------------------------



def hn_algorithm() -> HyperNetworkAlgorithm:
    torch.manual_seed(1)
    hn = HyperNetwork(SPEC, num_clients=6, hidden=8, n_hidden=1)
    return HyperNetworkAlgorithm(hn, ServerConfig(), initial=module_params(model()))


def fedavg_algorithm() -> GlobalModelAlgorithm:
    return GlobalModelAlgorithm(module_params(model()), FedAvgOptions(momentum=0.9).server_config())


ALGORITHMS = {"pfedhn": hn_algorithm, "fedavg": fedavg_algorithm}


def warm_up(server: Server) -> None:
    """One accepted round first, so optimiser state (momentum buffers) exists and is hashed too."""
    server.receive(0, [0, 1], [good_delta(10), good_delta(11)], [5, 7])


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_round_of_only_rejected_updates_leaves_the_server_state_unchanged(name, caplog):
    server = Server(ALGORITHMS[name](), ValidationConfig(max_norm=MAX_NORM))
    warm_up(server)
    before = state_hash(server.algorithm.state_dict())
    bad = [BAD_DELTAS[c][0]() for c in sorted(BAD_DELTAS)]
    clients = list(range(len(bad)))
    with caplog.at_level(logging.WARNING, logger="shn.validation"):
        metrics = server.receive(1, clients, bad, [10] * len(bad))
        metrics_counts = server.receive(2, [0, 1, 2], [good_delta(1), good_delta(2), good_delta(3)], [0, -1, 1.5])
    assert state_hash(server.algorithm.state_dict()) == before
    assert metrics["accepted"] == 0 and metrics["rejected"] == len(bad)
    assert metrics_counts["accepted"] == 0 and metrics_counts["rejected"] == 3
    assert server.rejections.count(1) == len(bad) and server.rejections.count() == len(bad) + 3
    assert all(r.reason for r in server.rejections.by_round[1])
    logged = [r.getMessage() for r in caplog.records if "rejected update" in r.getMessage()]
    assert len(logged) == len(bad) + 3
    assert any("non-finite" in m for m in logged) and any("example count" in m for m in logged)


@pytest.mark.parametrize("bad_case", ["nan", "wrong shape", "float64", "huge norm", "missing key"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_one_bad_and_one_good_applies_only_the_good_one(name, bad_case):
    mixed = Server(ALGORITHMS[name](), ValidationConfig(max_norm=MAX_NORM))
    alone = Server(ALGORITHMS[name](), ValidationConfig(max_norm=MAX_NORM))
    warm_up(mixed)
    warm_up(alone)
    assert state_hash(mixed.algorithm.state_dict()) == state_hash(alone.algorithm.state_dict())
    before = state_hash(mixed.algorithm.state_dict())
    m = mixed.receive(1, [3, 4], [BAD_DELTAS[bad_case][0](), good_delta(5)], [8, 9])
    a = alone.receive(1, [4], [good_delta(5)], [9])
    assert m["accepted"] == 1 and m["rejected"] == 1
    assert a["accepted"] == 1 and a["rejected"] == 0
    after = state_hash(mixed.algorithm.state_dict())
    assert after != before  # the good update was applied ...
    assert after == state_hash(alone.algorithm.state_dict())  # ... and only it
    assert [r.client for r in mixed.rejections.by_round[1]] == [3]


def test_bad_example_count_with_good_delta_is_not_applied():
    mixed = Server(fedavg_algorithm(), ValidationConfig(max_norm=MAX_NORM))
    alone = Server(fedavg_algorithm(), ValidationConfig(max_norm=MAX_NORM))
    # a huge fake count would dominate FedAvg's weighting if it were let through as a float
    mixed.receive(1, [0, 1], [good_delta(1, scale=0.5), good_delta(2)], [1e9, 3])
    alone.receive(1, [1], [good_delta(2)], [3])
    assert state_hash(mixed.algorithm.state_dict()) == state_hash(alone.algorithm.state_dict())


def test_clip_norm_scales_accepted_deltas_down():
    clipped = Server(hn_algorithm(), ValidationConfig(max_norm=MAX_NORM, clip_norm=0.05))
    manual = Server(hn_algorithm(), ValidationConfig(max_norm=MAX_NORM))
    big, small = good_delta(1, scale=0.5), good_delta(2, scale=1e-4)
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in big.values()))
    assert norm > 0.05
    clipped.receive(1, [0, 1], [big, small], [1, 1])
    manual.receive(1, [0, 1], [{k: v * (0.05 / norm) for k, v in big.items()}, small], [1, 1])
    for (n, p), q in zip(clipped.algorithm.hn.named_parameters(), manual.algorithm.hn.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_local_method_has_nothing_to_validate():
    spec = SPEC
    local = GlobalModelAlgorithm(module_params(model()), ServerConfig(), personal_keys=spec.names)
    server = Server(local, ValidationConfig())
    before = state_hash(local.state_dict())
    metrics = server.receive(1, [0, 1], [{}, {}], [1, 1])
    assert metrics["rejected"] == 0 and state_hash(local.state_dict()) == before


# -- in a run: the rejection count reaches the metrics and the round continues ----------------

def test_simulation_rejects_a_corrupt_client_and_counts_it(tmp_path, monkeypatch):
    from shn.federated.client import ClientRuntime
    from shn.runner import run

    poisoned = 0
    original_fit = ClientRuntime.fit

    def fit(self, clients, server_weights, generator):
        nonlocal poisoned
        result = original_fit(self, clients, server_weights, generator)
        if 0 in clients:  # client 0 always sends NaN
            i = list(clients).index(0)
            result.deltas = {k: v.clone() for k, v in result.deltas.items()}
            result.deltas["head.bias"][i] = math.nan
            poisoned += 1
        return result

    monkeypatch.setattr(ClientRuntime, "fit", fit)
    cfg = load_config("experiments/configs/quickstart.toml", [
        "rounds=6", "eval_every=3", "local.steps=2", "task.num_clients=4", "clients_per_round=2", "task.model=mlp",
    ])
    result = run(cfg, run_dir=tmp_path, progress=False)
    assert poisoned > 0
    assert result.summary["rejected_updates"] == poisoned
    assert result.history[-1]["rejected_updates"] == poisoned
    assert all(math.isfinite(v) for k, v in result.summary["metrics"].items() if k.startswith(("test_", "val_")))
    # the server never saw a NaN: every client's generated weights are finite
    weights = result.algorithm.weights_for([0, 1, 2, 3])
    assert all(torch.isfinite(v).all() for v in weights.values())
