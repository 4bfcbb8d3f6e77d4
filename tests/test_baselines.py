"""The baselines (baselines/*.py): every method runs end to end and learns, and each one's
defining property holds (GHN-0 = pFedHN, Panacea λ=0 = GHN, attention weights, FedPer heads,
decoupled input layers with different input sizes, FedAvg's server optimiser)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import baselines  # noqa: F401 - registers the methods
from baselines.panacea import graph_reconstruction_loss, sample_non_edges
from shn.aggregation import attentive_step, layer_attention
from shn.config import ConfigError, LocalConfig, load_config
from shn.federated.local import ClientStore, LocalTrainer
from shn.federated.simulation import Simulation
from shn.graph import ClientGraph
from shn.runner import build, make_task, run
from shn.seeding import torch_generator
from tasks.base import ClientData, classification_finalize, classification_loss, classification_metrics

QUICKSTART = "experiments/configs/quickstart.toml"
TINY = ["task.num_clients=6", "clients_per_round=3", 'task.model="mlp"', "rounds=2", "eval_every=2",
        "local.steps=2", "hypernetwork.hidden=16", "hypernetwork.n_hidden=1", 'graph.kind="complete"',
        "encoder.layers=1"]


def config(method: str, *overrides: str):
    return load_config(QUICKSTART, TINY + [f"method={method}", *overrides])


@pytest.fixture(scope="module")
def task():
    return make_task(config("fedavg"))


def ring(tmp_path, n: int = 6) -> str:
    adj = np.zeros((n, n))
    for i in range(n):
        adj[i, (i + 1) % n] = adj[(i + 1) % n, i] = 1
    np.save(tmp_path / "ring.npy", adj)
    return f'graph.path="{tmp_path / "ring.npy"}"'


def same_weights(a, b, clients=range(6)) -> bool:
    wa, wb = a.weights_for(list(clients)), b.weights_for(list(clients))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- every method, end to end --------------------------------------------------------------------

LEARN = ["rounds=8", "eval_every=8", "local.steps=5"]
HN_LEARN = LEARN + ["server.lr=0.2"]


@pytest.mark.parametrize("method,extra", [
    ("pfedhn", HN_LEARN), ("ghn", HN_LEARN), ("panacea", HN_LEARN), ("shn", HN_LEARN), ("attentive", LEARN),
    ("fedper", LEARN), ("decoupled", LEARN), ("fedavg", LEARN), ("local", LEARN),
])
def test_method_runs_and_learns_on_the_quickstart(method, extra, task, tmp_path):
    result = run(config(method, *extra), task=task, run_dir=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == method and math.isfinite(summary["metrics"]["test_loss"])
    # 10 classes: chance is 0.1 (each client sees 2 of them)
    assert result.metrics["test_accuracy"] > 0.2, result.metrics


def test_decoupled_runs_on_the_default_cnn():
    cnn = make_task(load_config(QUICKSTART, ["task.num_clients=6"]))
    result = run(config("decoupled", 'task.model="auto"', "clients_per_round=2", "rounds=1", "eval_every=1",
                        "local.steps=1"), task=cnn, progress=False)
    assert result.algorithm.personal_keys == {"conv1.weight", "conv1.bias"}  # the first layer
    assert math.isfinite(result.metrics["test_loss"])


# -- GHN and Panacea -----------------------------------------------------------------------------

def test_gcn_stack_ghn_with_zero_layers_is_pfedhn(task):
    stack = 'encoder.kind="gcn_stack"'
    ghn = run(config("ghn", stack, "encoder.layers=0", "rounds=3"), task=task, progress=False)
    pfedhn = run(config("pfedhn", "rounds=3"), task=task, progress=False)
    assert same_weights(ghn.algorithm, pfedhn.algorithm)
    assert [h["test_loss"] for h in ghn.history] == [h["test_loss"] for h in pfedhn.history]
    assert ghn.per_client == pfedhn.per_client
    # and before training too
    fresh = [build(config("ghn", stack, "encoder.layers=0"), task=task).algorithm,
             build(config("pfedhn"), task=task).algorithm]
    assert same_weights(*fresh)


@pytest.mark.parametrize("method", ["ghn", "shn", "panacea"])
def test_residual_graph_branch_starts_at_pfedhn(task, method):
    """Paired initialisation: with the residual branch every graph method of a seed generates
    exactly pFedHN's weights before training (the branch starts at zero)."""
    algs = [build(config(m, 'hypernetwork.graph_branch="residual"'), task=task).algorithm for m in (method, "pfedhn")]
    clients = list(range(task.num_clients))
    a, b = (alg.weights_for(clients) for alg in algs)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_ghn_encoder_is_shn_with_the_gcn_laplacian_and_records_its_energy(task):
    result = run(config("ghn", "encoder.layers=3"), task=task, progress=False)
    enc = result.algorithm.hn.encoder
    assert type(enc).__name__ == "GCNDiffusionEncoder" and len(enc.layers) == 3
    shn = build(config("shn", "encoder.layers=3"), task=task).algorithm.hn.encoder.diffusion
    # the same projection, residual layers and weights as SHN: only the operator differs
    assert [type(m).__name__ for m in enc.layers] == [type(m).__name__ for m in shn.layers]
    assert enc.lin_in.weight.shape == shn.lin_in.weight.shape
    energy = result.summary["encoder_dirichlet_energy"]
    assert len(energy) == 4 and all(math.isfinite(e) and e >= 0 for e in energy)
    assert len(result.summary["encoder_rayleigh_quotient"]) == 4


def test_panacea_with_zero_weight_is_ghn(task, tmp_path):
    graph = ring(tmp_path)
    common = ('graph.kind="given"', graph, "rounds=3")
    ghn = run(config("ghn", *common), task=task, progress=False)
    panacea = run(config("panacea", *common, "methods.panacea.graph_loss_weight=0.0"), task=task, progress=False)
    assert same_weights(ghn.algorithm, panacea.algorithm)
    assert [h["test_loss"] for h in ghn.history] == [h["test_loss"] for h in panacea.history]
    weighted = run(config("panacea", *common, "methods.panacea.graph_loss_weight=1.0"), task=task, progress=False)
    assert not same_weights(ghn.algorithm, weighted.algorithm)


def test_panacea_negatives_are_non_edges_from_the_generator():
    graph = ClientGraph.from_adjacency(torch.tensor([[0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 0, 0],
                                                     [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]]))
    nodes = torch.tensor([0, 1, 2, 3])  # node 4: held out, never a negative
    pairs = sample_non_edges(graph, nodes, 20, torch_generator(0, "t"))
    edges = set(map(tuple, graph.edge_index.T.tolist()))
    assert pairs.shape[0] == 2 and pairs.shape[1] > 0
    for u, v in pairs.T.tolist():
        assert u != v and (u, v) not in edges and u in nodes and v in nodes
    again = sample_non_edges(graph, nodes, 20, torch_generator(0, "t"))
    assert torch.equal(pairs, again)
    z = torch.randn(5, 3, requires_grad=True)
    loss = graph_reconstruction_loss(z, graph, nodes, torch_generator(0, "t"))
    loss.backward()
    assert loss > 0 and z.grad.abs().sum() > 0
    # embeddings that encode the graph reconstruct it better than ones that contradict it
    good = torch.tensor([[3.0, 0], [3, 0], [3, 0], [0, 3], [0, 3]])
    assert graph_reconstruction_loss(good, graph, nodes, torch_generator(0, "t")) < \
        graph_reconstruction_loss(-good.roll(1, 0), graph, nodes, torch_generator(0, "t"))


# -- attentive key-layer aggregation -------------------------------------------------------------

@pytest.mark.parametrize("similarity", ["l2", "cosine"])
def test_attention_weights_sum_to_one(similarity):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(7, 12, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.5
    mask[:, 0] = True
    alpha = layer_attention(keys[:3], keys, 0.7, similarity, mask)
    assert torch.allclose(alpha.sum(1), torch.ones(3)) and (alpha >= 0).all()
    assert (alpha[~mask] == 0).all()
    # τ → ∞: uniform, so a full step gives the plain mean
    flat = layer_attention(keys[:3], keys, 1e12, similarity)
    assert torch.allclose(attentive_step(keys[:3], keys, flat, 1.0), keys.mean(0).expand(3, -1), atol=1e-6)
    assert torch.equal(attentive_step(keys[:3], keys, alpha, 0.0), keys[:3])


def _attentive(task, *overrides):
    algorithm = build(config("attentive", *overrides), task=task).algorithm
    for n in algorithm.key_layers:  # distinct per-client key layers
        algorithm.keys[n] = algorithm.keys[n] + torch.randn_like(algorithm.keys[n])
    return algorithm


def test_attentive_temperature_to_infinity_gives_the_plain_mean(task):
    alg = _attentive(task, "methods.attentive.temperature=1e12", "methods.attentive.step=1.0")
    sent = alg.weights_for([0, 4])
    for n in alg.key_layers:
        assert torch.allclose(sent[n], alg.keys[n].mean(0).expand_as(sent[n]), atol=1e-5)


def test_attentive_zero_step_keeps_each_clients_own_layer(task):
    result = run(config("attentive", "methods.attentive.step=0.0", "rounds=3"), task=task, progress=False)
    alg, runtime = result.algorithm, result.extra["built"].runtime
    sent = alg.weights_for(list(range(6)))
    for n in alg.key_layers:
        assert torch.equal(sent[n], alg.keys[n])
    trained = [c for c in range(6) if not torch.equal(alg.keys["head.weight"][c], alg.backbone._initial.get(
        "head.weight", build(config("attentive"), task=task).algorithm.keys["head.weight"][c]))]
    assert len(trained) > 1 and not torch.equal(alg.keys["head.weight"][trained[0]], alg.keys["head.weight"][trained[1]])
    assert runtime.personal.values == {}  # the server keeps the key layers, the client nothing


def test_attentive_mixes_only_neighbours_and_backbone_is_fedavg(task, tmp_path):
    alg = _attentive(task, "methods.attentive.neighbours=true", 'graph.kind="given"', ring(tmp_path))
    alpha = alg.attention([0], "head.weight")[0]
    assert set(alpha.nonzero().flatten().tolist()) <= {5, 0, 1}
    before = alg.weights_for([0, 1])
    deltas = {k: torch.randn_like(v) for k, v in before.items()}
    alg.apply_updates([0, 1], deltas, torch.tensor([1, 3]))
    after = alg.weights_for([2])
    w = torch.tensor([0.25, 0.75])
    body = "input_proj.weight"
    assert torch.allclose(after[body][0], torch.tensordot(w, before[body] - deltas[body], dims=1), atol=1e-6)
    assert torch.allclose(alg.keys["head.bias"][:2], before["head.bias"] - deltas["head.bias"])


# -- personal layers -----------------------------------------------------------------------------

def test_fedper_head_never_leaves_the_client_and_persists(task):
    built = build(config("fedper", "local.steps=1"), task=task)
    alg, runtime = built.algorithm, built.runtime
    head = {"head.weight", "head.bias"}
    assert alg.personal_keys == head and not head & set(alg.server_spec.names)
    sent, received, starts = [], [], []
    weights_for, apply_updates, train = alg.weights_for, alg.apply_updates, runtime.trainer.train
    alg.weights_for = lambda c: sent.append(weights_for(c)) or sent[-1]
    alg.apply_updates = lambda c, d, n: received.append(d) or apply_updates(c, d, n)
    runtime.trainer.train = lambda p, *a: starts.append(({k: v.clone() for k, v in p.items()}, a[1])) or train(p, *a)
    sim = Simulation(built.config, alg, runtime, progress=False)
    seen = {}
    for r in range(1, 7):
        clients = sim.sampler.clients(r)
        sim.run_round(r)
        start, trained_clients = starts[-1]
        for i, c in enumerate(trained_clients):
            if c in seen:  # it starts from the head it ended its last round with
                assert torch.equal(start["head.weight"][i], seen[c])
            seen[c] = runtime.personal.get(c)["head.weight"].clone()
        assert trained_clients == clients
    assert all(not head & set(w) for w in sent) and all(not head & set(d) for d in received)
    assert len(seen) > 1 and not torch.equal(*[seen[c] for c in list(seen)[:2]])


class MixedInputTask:
    """Four clients whose inputs have 3, 3, 5 and 4 features (stations lacking variables); the
    label is the sign of the first two features' sum. No shared architecture exists."""

    name = "mixed-inputs"

    def __init__(self, sizes=(3, 3, 5, 4)):
        self.sizes = sizes
        self.num_clients = len(sizes)
        g = torch.Generator().manual_seed(0)

        def split(n, f):
            x = torch.randn(n, f, generator=g)
            return x, (x[:, 0] + x[:, 1] > 0).long()

        self.data = [ClientData(split(64, f), split(32, f), split(32, f)) for f in sizes]

    def client_data(self, client):
        return self.data[client]

    def make_model(self, client=None):
        if client is None:
            raise ValueError("clients have different input sizes")
        return _TinyNet(self.sizes[client])

    def loss(self, output, *targets):
        return classification_loss(output, *targets)

    def metrics(self, output, *targets):
        return classification_metrics(output, *targets)

    def finalize(self, sums):
        return classification_finalize(sums)


class _TinyNet(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.input_proj = nn.Linear(features, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(torch.relu(self.input_proj(x)))))


def test_decoupled_trains_clients_with_different_input_sizes():
    task = MixedInputTask()
    cfg = config("decoupled", "clients_per_round=2", "rounds=8", "eval_every=8", "local.steps=8", "local.lr=0.1",
                 "local.batch_size=16", 'local.mode="auto"')
    result = run(cfg, task=task, progress=False)
    runtime = result.extra["built"].runtime
    for c, f in enumerate(task.sizes):
        personal = runtime.personal.get(c)
        assert set(personal) == {"input_proj.weight", "input_proj.bias"}
        assert personal["input_proj.weight"].shape == (8, f)
    assert set(result.algorithm.server_spec.names) == {"body.weight", "body.bias", "head.weight", "head.bias"}
    assert result.metrics["test_accuracy"] > 0.7, result.metrics
    # a method that shares the input layer cannot run on this task, and says why
    with pytest.raises(ConfigError, match="decoupled"):
        build(config("fedavg", "clients_per_round=2"), task=task)


def test_per_client_training_matches_the_loop_path(task):
    cfg = LocalConfig(steps=3, lr=0.05, batch_size=8, mode="loop")
    template = task.make_model()
    trainer = LocalTrainer(template, task.loss, cfg, templates={c: template for c in range(3)})
    store = ClientStore.from_task(task, [0, 1, 2])
    params = {n: p.detach().expand(3, *p.shape) + 0.01 * torch.randn(3, *p.shape) for n, p in template.named_parameters()}
    batched = trainer.train(params, store, [0, 1, 2], torch_generator(0, "x"))
    each, loss = trainer.train_each([{k: v[i] for k, v in params.items()} for i in range(3)], store, [0, 1, 2],
                                    torch_generator(0, "x"))
    for i in range(3):
        for k in params:
            assert torch.allclose(each[i][k], batched.params[k][i], atol=1e-6)
    assert torch.allclose(loss, batched.loss, atol=1e-6)


# -- FedAvg's server optimiser -------------------------------------------------------------------

def test_fedavg_lr_one_without_momentum_is_example_weighted_averaging(task):
    alg = build(config("fedavg"), task=task).algorithm
    theta = alg.weights_for([0])
    deltas = {k: torch.randn(3, *v.shape[1:]) for k, v in theta.items()}
    n = torch.tensor([10, 30, 60])
    alg.apply_updates([0, 1, 2], deltas, n)
    new = alg.weights_for([5])
    for k in theta:
        trained = theta[k] - deltas[k]  # [3, ...] each client's trained weights
        expected = (n.double().view(-1, *[1] * (trained.dim() - 1)) * trained).sum(0) / n.sum()
        assert torch.allclose(new[k][0], expected.float(), atol=1e-6)


@pytest.mark.parametrize("server", [
    ["methods.fedavg.momentum=0.5", "methods.fedavg.nesterov=true", "methods.fedavg.lr=0.7"],
    ['methods.fedavg.optimizer="adam"', "methods.fedavg.lr=0.03"],
])
def test_fedavg_nesterov_and_adam_learn(server, task):
    result = run(config("fedavg", *LEARN, *server), task=task, progress=False)
    opt = result.algorithm.optimizer
    assert type(opt).__name__ == ("Adam" if "adam" in server[0] else "SGD")
    assert result.metrics["test_accuracy"] > 0.2, result.metrics
