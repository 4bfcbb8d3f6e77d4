"""Heterogeneous clients from one hypernetwork (issue 18 item 1).

Width-scaled targets (``task.widths``): a narrower model's tensors are leading blocks of the
widest one's, which every hypernetwork method generates; each client trains the block that fits
its architecture, the clients of one architecture as one batch, and its delta comes back
zero-padded (the exact gradient input of the slicing). Clients whose inputs differ train with a
hypernetwork through ``hypernetwork.personal_input`` (DEPT's decoupling).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from shn.build import build
from shn.config import ConfigError, config_from_dict
from shn.federated.local import LocalConfig, LocalTrainer
from shn.runner import run
from shn.seeding import torch_generator
from shn.target import ParamSpec, block_index, leading_index, module_params, nests_in, put_block, take_block
from tasks.models import MLP, PFedHNCNN, SmallCNN
from tests.conftest import with_changes
from tests.test_baselines import MixedInputTask

WIDTHS = [0.5, 1, 2]


def cfg(method: str = "pfedhn", **changes):
    data = {"method": method, "seed": 0, "rounds": 2, "clients_per_round": 6, "eval_every": 1,
            "task": {"name": "digits", "num_clients": 6, "widths": WIDTHS, "model": "cnn"},
            "local": {"steps": 3, "batch_size": 16}}
    for key, value in changes.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(data)


@pytest.mark.parametrize("make", [
    lambda w: PFedHNCNN(3, 10, width=w),
    lambda w: SmallCNN(1, 10, image_size=8, width=w),
    lambda w: MLP(20, 5, hidden=(16, 12), width=w),
])
def test_a_narrow_model_is_the_wide_model_with_its_outer_units_zeroed(make):
    """Nesting: the narrow model on the leading blocks computes what the wide model computes
    when every weight outside those blocks is zero (the channel-major flatten keeps fc1 aligned)."""
    torch.manual_seed(0)
    wide, narrow = make(2.0), make(0.5)
    assert nests_in(ParamSpec.from_module(narrow), ParamSpec.from_module(wide))
    params = module_params(wide)
    shapes = {n: p.shape for n, p in narrow.named_parameters()}
    index = block_index(narrow, wide)
    blocks = {n: take_block(params[n], index[n]) for n in params}
    masked = {n: put_block(blocks[n], index[n], params[n].shape) for n in params}
    assert all(blocks[n].shape == shapes[n] for n in params)
    x = torch.randn(4, *((3, 32, 32) if isinstance(wide, PFedHNCNN) else (1, 8, 8) if isinstance(wide, SmallCNN) else (20,)))
    assert torch.allclose(functional_call(narrow, blocks, (x,)), functional_call(wide, masked, (x,)), atol=1e-5)


@pytest.mark.parametrize("index", [(4, 2), (torch.tensor([0, 1, 3, 4]), 2), (torch.tensor([5, 0, 2, 3]), torch.tensor([4, 1]))])
def test_put_block_is_the_adjoint_of_take_block(index):
    x, y = torch.randn(3, 6, 5, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    assert torch.allclose((take_block(x, index, 1) * y).sum(), (x * put_block(y, index, (6, 5), 1)).sum())


def test_a_block_that_does_not_fit_is_refused():
    x = torch.randn(3, 6, 5)
    with pytest.raises(ValueError, match="does not fit"):
        take_block(x, leading_index((7, 2)), 1)
    with pytest.raises(ValueError, match="does not fit"):
        take_block(x, (torch.tensor([6]), 2), 1)


def test_the_server_generates_the_widest_architecture_and_clients_train_their_block():
    built = build(cfg())
    assert built.task.nested_architectures and [built.task.width_of(c) for c in range(6)] == [0.5, 1, 2, 0.5, 1, 2]
    spec = built.algorithm.server_spec
    assert dict(zip(spec.names, spec.shapes))["conv1.weight"] == (32, 1, 3, 3)  # width 2 of SmallCNN's 16
    runtime = built.runtime
    weights = built.algorithm.weights_for([0, 1, 2])
    per_client = runtime.client_weights([0, 1, 2], weights)
    assert [p["conv1.weight"].shape[0] for p in per_client] == [8, 16, 32]
    assert torch.equal(per_client[0]["fc1.weight"], weights["fc1.weight"][0, :32, :8 * 2 * 2 * 2])


def test_one_batch_per_architecture_equals_each_client_alone():
    """The grouped path (a batch per width, each client its column of the cohort's draw) equals
    training every client alone from its block with the loop, and the deltas are zero outside."""
    built = build(cfg(**{"local.mode": "loop"}))
    runtime, alg = built.runtime, built.algorithm
    clients = [0, 1, 2, 3, 4, 5]
    weights = alg.weights_for(clients)
    fit = runtime.fit(clients, weights, torch_generator(0, "local-training", 1))
    trainer = runtime.trainer
    starts = runtime.client_weights(clients, weights)
    each, _ = trainer.train_each(starts, runtime.store, clients, torch_generator(0, "local-training", 1))
    for i, c in enumerate(clients):
        for k in weights:
            own = starts[i][k] - each[i][k]
            got = fit.deltas[k][i]
            assert torch.allclose(take_block(got, leading_index(own.shape)), own, atol=1e-6), (c, k)
            outside = got.clone()
            outside[tuple(slice(0, s) for s in own.shape)] = 0
            assert not outside.any()


@pytest.mark.parametrize("method,extra", [
    ("pfedhn", {}),
    ("ghn", {"graph.kind": "complete"}),
    ("shn", {"graph.kind": "complete", "encoder.layers": 1}),
    ("panacea", {"graph.kind": "complete"}),
])
def test_every_hypernetwork_method_runs_width_heterogeneous_clients(method, extra):
    result = run(cfg(method, **extra), progress=False)
    assert set(result.per_client) == set(range(6))
    assert all(torch.isfinite(torch.tensor(row["test_loss"])) for row in result.per_client.values())


def test_width_heterogeneous_pfedhn_learns():
    result = run(cfg(rounds=30, eval_every=10, **{"local.steps": 10}), progress=False)
    assert result.history[-1]["test_accuracy"] > 0.8, result.history
    for width in (0.5, 1.0, 2.0):  # every width learns, not only the widest
        rows = [row for c, row in result.per_client.items() if result.config.task.options.widths[c % 3] == width]
        assert min(r["test_accuracy"] for r in rows) > 0.6, (width, rows)


def test_methods_that_average_tensors_refuse_widths_and_local_runs():
    with pytest.raises(ConfigError, match=r"shares .*widths.*hypernetwork method"):
        build(cfg("fedavg"))
    result = run(cfg("local"), progress=False)
    assert set(result.per_client) == set(range(6))


def test_widths_are_checked():
    for bad in ([0, 1], ["a"], 3, [float("inf")]):
        with pytest.raises(ConfigError, match="widths"):
            cfg(**{"task.widths": bad})
    with pytest.raises(ConfigError, match="client_widths has 2 entries, expected one per client"):
        cfg(**{"task.client_widths": [1, 2]})


def test_clients_may_declare_their_own_widths():
    built = build(cfg(**{"task.widths": [], "task.client_widths": [2, 1, 1, 0.5, 0.5, 0.5]}))
    task = built.task
    assert [task.width_of(c) for c in range(6)] == [2, 1, 1, 0.5, 0.5, 0.5] and task.width_of(None) == 2
    assert [p["conv1.weight"].shape[0] for p in built.runtime.client_weights(
        range(6), built.algorithm.weights_for(list(range(6))))] == [32, 16, 16, 8, 8, 8]


@pytest.mark.parametrize("compression", [{}, {"compression.kind": "topk", "compression.topk_fraction": 0.2},
                                         {"compression.kind": "qsgd8"}])
def test_width_heterogeneous_flower_equals_in_process(tmp_path, flower_env, compression):
    """Each client receives and sends only its block, on both engines (same numbers, same bytes)."""
    pytest.importorskip("flwr.app")
    from shn.flower.engine import InProcessGrid, make_client_app, run_in_process

    config = cfg(**compression)
    ref = run(config, progress=False)
    grid = InProcessGrid(make_client_app(), 6)
    got = run_in_process(config, run_dir=tmp_path / "run", grid=grid)
    assert [h["test_accuracy"] for h in got.history] == pytest.approx([h["test_accuracy"] for h in ref.history],
                                                                       abs=1e-6)
    for k, v in ref.algorithm.hn.state_dict().items():
        assert torch.allclose(v, got.algorithm.hn.state_dict()[k], atol=1e-6), k
    assert got.summary["communication"] == ref.summary["communication"]
    widths = config.task.options.widths
    for m in grid.sent:
        if m.metadata.message_type in ("train", "evaluate"):
            c = int(m.content["config"]["client"])
            assert m.content["arrays"]["conv1.weight"].shape[0] == int(16 * widths[c % 3])


def test_a_narrow_client_receives_and_sends_its_block_and_the_bytes_say_so():
    result = run(cfg(rounds=1), progress=False)
    per_client = result.summary["communication"]["per_client"]
    down = {int(c): v["bytes_down"] for c, v in per_client.items()}
    up = {int(c): v["bytes_up"] for c, v in per_client.items()}
    assert down[0] < down[1] < down[2] and up[0] < up[1] < up[2]  # widths 0.5, 1, 2
    from shn.federated.traffic import payload_bytes

    built = build(cfg())
    block = built.runtime.client_weights([0], built.algorithm.weights_for([0]))[0]
    assert down[0] == payload_bytes(block) == up[0]


def test_an_upload_in_other_shapes_than_its_block_is_rejected(tmp_path, flower_env):
    """A width-0.5 client that sends a delta in the widest shapes (reaching tensors it does not
    have) is rejected, never padded or applied."""
    pytest.importorskip("flwr.app")
    from flwr.app import ArrayRecord, Message, RecordDict

    from shn.flower.engine import make_client_app, run_in_process

    real = make_client_app()
    spec = build(cfg()).algorithm.server_spec
    widest = dict(zip(spec.names, spec.shapes))

    def client_app(msg, context):
        reply = real(msg, context)
        if msg.metadata.message_type == "train" and int(msg.content["config"]["client"]) == 0:
            delta = {k: torch.zeros(widest[k]) for k in reply.content["delta"].keys()}
            return Message(RecordDict({"delta": ArrayRecord(delta), "metrics": reply.content["metrics"]}), reply_to=msg)
        return reply

    result = run_in_process(cfg(rounds=1), run_dir=tmp_path / "run", client_app=client_app)
    assert result.summary["rejected_updates"] == 1


# -- clients whose inputs differ: the hypernetwork generates the body, the input layer is personal

@pytest.mark.parametrize("method,extra", [
    ("pfedhn", {}),
    ("ghn", {"graph.kind": "complete"}),
    ("shn", {"graph.kind": "complete", "encoder.layers": 1}),
])
def test_hypernetwork_methods_train_clients_whose_inputs_differ(method, extra):
    task = MixedInputTask()
    config = cfg(method, rounds=20, eval_every=20, clients_per_round=4,
                 **{"hypernetwork.personal_input": True, "local.steps": 8, "local.lr": 0.1, **extra})
    result = run(config, task=task, progress=False)
    assert set(result.algorithm.server_spec.names) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    runtime = result.extra["runtime"]
    for c, f in enumerate(task.sizes):
        assert runtime.personal.get(c)["input_proj.weight"].shape == (8, f)
    assert result.metrics["test_accuracy"] > 0.7, result.metrics
    with pytest.raises(ConfigError, match="personal_input"):
        build(cfg(method, clients_per_round=2, **extra), task=task)


def test_group_trainer_keeps_the_cohort_columns():
    """A group of slots of a cohort draws exactly those columns of the cohort's draw."""
    from shn.federated.local import cohort_trainer

    model = MLP(4, 2, hidden=(3,))
    trainer = LocalTrainer(model, torch.nn.functional.cross_entropy, LocalConfig(steps=2, batch_size=4))
    full = trainer.minibatch_uniforms(torch_generator(0, "x"), 5)
    group = cohort_trainer(trainer, [1, 3], 5).minibatch_uniforms(torch_generator(0, "x"), 2)
    assert torch.equal(group, full[:, [1, 3]])
    with pytest.raises(ValueError, match="outside a cohort"):
        cohort_trainer(trainer, [5], 5)


def test_the_hypernetwork_generates_only_the_tensors_it_sends():
    """Issue 18 item 2: with a personal head (pFedHN-PC) or personal input layer, the heads of
    those tensors are not built; the rest of the hypernetwork, and what it generates, is unchanged."""
    full = build(cfg(**{"task.widths": []})).algorithm
    pc = build(cfg(**{"task.widths": [], "methods.pfedhn.personal_head": True,
                      "hypernetwork.personal_input": True})).algorithm
    assert set(pc.hn.spec.names) == set(pc.server_spec.names) == set(full.server_spec.names) - {
        "head.weight", "head.bias", "conv1.weight", "conv1.bias"}
    assert not any(k.startswith(("heads.head", "heads.conv1")) for k in pc.hn.state_dict())
    a, b = full.weights_for([0, 1]), pc.weights_for([0, 1])
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert set(pc.initial_personal()) == {"head.weight", "head.bias", "conv1.weight", "conv1.bias"}


def test_inspect_shows_each_clients_width():
    from shn.inspect import format_description, inspect_config

    desc = inspect_config(cfg())
    assert [c["width"] for c in desc["clients"]] == [0.5, 1, 2, 0.5, 1, 2]
    text = format_description(desc)
    assert "  width" in text and "x0.5" in text and "x2" in text
    assert "width" not in format_description(inspect_config(cfg(**{"task.widths": []})))


# -- forecasters: the GRU's gates are stacked, the MLP's body reads a time-major flatten

@pytest.mark.parametrize("kind", ["gru", "mlp"])
def test_a_narrow_forecaster_is_the_wide_one_with_its_outer_units_zeroed(kind):
    from tasks.forecast_models import make_forecaster

    wide = make_forecaster(kind, 5, 6, 2, 3, hidden=12, seed=0)
    narrow = make_forecaster(kind, 5, 6, 2, 3, hidden=4, seed=1)
    index = block_index(narrow, wide)
    params = module_params(wide)
    own = module_params(narrow)
    assert all(take_block(params[n], index[n]).shape == own[n].shape for n in own)
    masked = {n: put_block(own[n], index[n], params[n].shape) for n in own}  # narrow's weights, zeros elsewhere
    x = torch.randn(7, 6, 5)
    assert torch.allclose(functional_call(narrow, own, (x,)), functional_call(wide, masked, (x,)), atol=1e-5)
    if kind == "gru":  # not the leading block: the first units of each gate
        assert index["cell_x.weight"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 24, 25, 26, 27]


@pytest.mark.parametrize("method,extra", [("pfedhn", {}), ("shn", {"graph.kind": "given", "encoder.layers": 1})])
def test_forecasting_clients_of_different_widths_share_one_hypernetwork(tmp_path, method, extra, flower_env):
    from tests.test_timeseries import write_wide

    write_wide(tmp_path / "flow.csv", days=3)
    (tmp_path / "adj.csv").write_text("source,target\nS1,S2\nS2,S3\nS3,S4\n")
    config = config_from_dict(with_changes({
        "method": method, "seed": 0, "rounds": 3, "clients_per_round": 4, "eval_every": 3,
        "task": {"name": "timeseries", "files": str(tmp_path / "flow.csv"), "variable": "flow",
                 "graph_file": str(tmp_path / "adj.csv"), "input_len": 6, "output_len": 6, "hidden": 8,
                 "max_windows": 20, "widths": [0.5, 1, 2]},
        "local": {"steps": 2, "batch_size": 16}, "hypernetwork": {"hidden": 16, "n_hidden": 1}}, **extra))
    result = run(config, progress=False)
    shapes = dict(zip(result.algorithm.server_spec.names, result.algorithm.server_spec.shapes))
    assert shapes["cell_x.weight"] == (48, 16)  # the widest GRU: hidden 8 x 2
    assert torch.isfinite(torch.tensor(result.summary["metrics"]["test_mse"]))
    runtime = result.extra["runtime"]
    sent = runtime.client_weights([0, 1, 2], result.algorithm.weights_for([0, 1, 2]))
    assert [p["cell_h.weight"].shape for p in sent] == [(12, 4), (24, 8), (48, 16)]
    if method == "pfedhn":  # on Flower each client gets its gate-wise block: the same numbers
        pytest.importorskip("flwr.app")
        from shn.flower.engine import run_in_process

        got = run_in_process(config, run_dir=tmp_path / "flower")
        assert got.summary["metrics"]["test_mse"] == pytest.approx(result.summary["metrics"]["test_mse"], rel=1e-5)
        assert got.summary["communication"] == result.summary["communication"]
    with pytest.raises(ConfigError, match="client_widths has 2 entries"):
        build(config_from_dict(with_changes({"method": "pfedhn", "task": dict(config.task.options.__dict__,
                                                                             name="timeseries", client_widths=[1, 2],
                                                                             widths=[])})))
