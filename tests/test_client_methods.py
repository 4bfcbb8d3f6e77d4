"""The client-side extension point (shn.federated.client_method, LocalObjective) and the three
methods built on it: FedProx, Ditto and FedRep (baselines/fedprox.py, ditto.py, fedrep.py).

Each method learns on digits and its defining mechanic holds: FedProx's proximal gradient (checked
against torch.optim.SGD on the same minibatches) and FedProx(mu=0) = FedAvg; Ditto's server is
FedAvg number for number while clients are evaluated with personal models kept between rounds;
FedRep trains the head alone, then the body alone, and sends only the body."""

from __future__ import annotations

import math

import pytest
import torch

import baselines  # noqa: F401 - registers the methods
from shn.config import LocalConfig, load_config
from shn.federated.client_method import ClientFit, ClientMethod, ClientRound, proximal_penalty
from shn.federated.local import LocalObjective, LocalTrainer, adam_step
from shn.runner import build, make_task, run
from shn.seeding import torch_generator
from tasks.base import classification_loss
from tests.test_local import MODELS, _minibatch_indices, check_step_against_torch, make_store, start_params

QUICKSTART = "experiments/configs/quickstart.toml"
TINY = ["task.num_clients=6", "clients_per_round=3", 'task.model="mlp"', "rounds=2", "eval_every=2",
        "local.steps=2"]
LEARN = ["rounds=8", "eval_every=8", "local.steps=5"]


def config(method: str, *overrides: str):
    return load_config(QUICKSTART, TINY + [f"method={method}", *overrides])


@pytest.fixture(scope="module")
def task():
    return make_task(config("fedavg"))


# -- the three methods learn ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fedprox", "ditto", "fedrep"])
def test_client_side_methods_learn_on_digits(method, task):
    result = run(config(method, *LEARN), task=task, progress=False)
    assert math.isfinite(result.metrics["train_loss"])
    # 10 classes: chance is 0.1 (each client sees 2 of them)
    assert result.metrics["test_accuracy"] > 0.2, result.metrics


# -- LocalObjective: the trainer's client-method phases -------------------------------------------

@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_penalty_and_frozen_tensors_equal_torch_sgd_on_the_same_minibatches(mode):
    """A phase with a proximal penalty and a frozen tensor = torch.optim.SGD on loss + penalty over
    the trainable parameters only (same minibatches, clipping over the trained tensors)."""
    build_model = MODELS["mlp"]
    store = make_store()
    clients = [2, 0, 3]
    cfg = LocalConfig(steps=4, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8, grad_clip=0.3, mode=mode)
    params = start_params(build_model, clients)
    anchor = {k: v + 0.05 * torch.randn_like(v) for k, v in params.items()}
    names = list(params)
    frozen = names[0]
    trainable = frozenset(names[1:])
    mu = 0.7
    objective = LocalObjective(penalty=proximal_penalty(mu), anchor=anchor, trainable=trainable)
    result = LocalTrainer(build_model(), classification_loss, cfg).train(
        params, store, clients, torch.Generator().manual_seed(11), objective)
    idx = _minibatch_indices(11, cfg.steps, [store.sizes[c] for c in clients], cfg.batch_size)
    for i, c in enumerate(clients):
        model = build_model()
        model.load_state_dict({k: v[i] for k, v in params.items()})
        trained = [p for n, p in model.named_parameters() if n in trainable]
        opt = torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        x, y = store.split(c, "train")
        losses = []
        for step in range(cfg.steps):
            rows = idx[step, i]
            opt.zero_grad()
            task_loss = classification_loss(model(x[rows]), y[rows])
            prox = sum((p - anchor[n][i]).pow(2).sum() for n, p in model.named_parameters())
            (task_loss + 0.5 * mu * prox).backward()
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            opt.step()
            losses.append(task_loss.detach())
        for k, v in model.named_parameters():
            torch.testing.assert_close(result.params[k][i], v.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
        assert torch.equal(result.params[frozen][i], params[frozen][i])  # frozen: untouched
        # the reported loss is the task loss alone
        torch.testing.assert_close(result.loss[i], torch.stack(losses).mean(), rtol=1e-5, atol=1e-5)


def test_objective_steps_and_trainable_names_are_checked():
    build_model = MODELS["mlp"]
    store = make_store()
    params = start_params(build_model, [0, 1])
    trainer = LocalTrainer(build_model(), classification_loss, LocalConfig(steps=2, batch_size=4, mode="vmap"))
    with pytest.raises(ValueError, match="not among the weights"):
        trainer.train(params, store, [0, 1], torch.Generator().manual_seed(0), LocalObjective(trainable=frozenset({"nope"})))
    with pytest.raises(ValueError, match="anchor"):
        LocalObjective(penalty=proximal_penalty(1.0))
    with pytest.raises(ValueError, match="steps"):
        LocalObjective(steps=0)
    # an objective of 5 steps draws 5 steps of minibatches: a different result than 2
    a = trainer.train(params, store, [0, 1], torch.Generator().manual_seed(0), LocalObjective(steps=5))
    b = trainer.train(params, store, [0, 1], torch.Generator().manual_seed(0), LocalObjective())
    c = trainer.train(params, store, [0, 1], torch.Generator().manual_seed(0))
    assert any(not torch.equal(a.params[k], b.params[k]) for k in params)
    for k in params:  # an empty objective is plain training, bit for bit
        assert torch.equal(b.params[k], c.params[k])


def test_adam_step_equals_torch_adam_after_clip_grad_norm():
    cfg = LocalConfig(lr=0.01, weight_decay=0.05, grad_clip=1.5)
    check_step_against_torch(adam_step, lambda r: torch.optim.Adam(r, lr=cfg.lr, weight_decay=cfg.weight_decay),
                             cfg, tol=1e-5)


# -- FedProx ---------------------------------------------------------------------------------------

def test_fedprox_with_mu_zero_is_fedavg_and_mu_pulls_towards_the_global_model(task):
    fedavg = run(config("fedavg"), task=task, progress=False)
    prox0 = run(config("fedprox", "methods.fedprox.mu=0.0"), task=task, progress=False)
    for a, b in zip(fedavg.algorithm.params, prox0.algorithm.params):
        assert torch.equal(a, b)
    # one round, same clients and minibatches: the larger mu, the smaller the clients' deltas
    norms = []
    for mu in (0.0, 1.0, 100.0):
        built = build(config("fedprox", f"methods.fedprox.mu={mu}", "local.steps=10", "local.lr=0.05"), task=task)
        weights = built.algorithm.weights_for([0, 1, 2])
        fit = built.runtime.fit([0, 1, 2], weights, torch_generator(0, "local-training", 1))
        norms.append(float(torch.sqrt(sum(d.pow(2).sum() for d in fit.deltas.values()))))
    assert norms[0] > norms[1] > norms[2] > 0, norms


# -- Ditto -----------------------------------------------------------------------------------------

def test_ditto_server_is_fedavg_and_clients_are_evaluated_with_their_personal_models(task):
    fedavg = run(config("fedavg"), task=task, progress=False)
    ditto = run(config("ditto", "methods.ditto.lam=0.5"), task=task, progress=False)
    for a, b in zip(fedavg.algorithm.params, ditto.algorithm.params):
        assert torch.equal(a, b)  # phase 1 is FedAvg's local update on the same minibatches
    runtime = ditto.extra["built"].runtime
    trained = [c for c in range(6) if runtime.personal.has_state(c)]
    assert trained
    weights = ditto.algorithm.weights_for(list(range(6)))
    for c in range(6):
        state = runtime.personal.get_state(c)
        personal = {k: state["ditto." + k] for k in weights}
        assert all(not k.startswith("ditto.") for k in runtime.personal.get(c))
        shared_row = {k: v[c] for k, v in weights.items()}
        own = _evaluate(runtime, c, personal if c in trained else shared_row)
        assert runtime.evaluate([c], {k: v[c:c + 1] for k, v in weights.items()})[c] == own
        if c in trained:  # the personal model is not the global one
            assert any(not torch.equal(personal[k], shared_row[k]) for k in personal)


def _evaluate(runtime, client, params):
    """A client's metrics with ``params``, computed without the client method."""
    plain = ClientMethod()
    saved, runtime.method = runtime.method, plain
    state_initial, runtime.personal.state_initial = runtime.personal.state_initial, {}
    try:
        return runtime.evaluate([client], {k: v.unsqueeze(0) for k, v in params.items()})[client]
    finally:
        runtime.method, runtime.personal.state_initial = saved, state_initial


def test_ditto_personal_model_is_pulled_to_the_global_model_by_lambda(task):
    distances = []
    for lam in (0.0, 10.0):
        built = build(config("ditto", f"methods.ditto.lam={lam}", "local.steps=10", "local.lr=0.05"), task=task)
        runtime = built.runtime
        weights = built.algorithm.weights_for([0, 1, 2])
        runtime.fit([0, 1, 2], weights, torch_generator(0, "local-training", 1))
        state = runtime.personal.get_state(0)
        distances.append(float(torch.sqrt(sum((state["ditto." + k] - v[0]).pow(2).sum() for k, v in weights.items()))))
    assert distances[0] > distances[1] > 0, distances


def test_ditto_personal_state_survives_checkpoint_resume(tmp_path, task):
    cfg = config("ditto", "rounds=4", "eval_every=2", "checkpoint_every=2")
    ref = run(cfg, task=task, progress=False)
    first = run(config("ditto", "rounds=2", "eval_every=2", "checkpoint_every=2"), task=task, run_dir=tmp_path,
                progress=False)
    assert first.history
    resumed = run(cfg, task=task, run_dir=tmp_path, resume=True, progress=False)
    assert [h["test_accuracy"] for h in resumed.history] == [h["test_accuracy"] for h in ref.history]


# -- FedRep ----------------------------------------------------------------------------------------

def test_fedrep_trains_the_head_alone_then_the_body_alone_and_sends_the_body(task):
    built = build(config("fedrep", "methods.fedrep.head_steps=3"), task=task)
    head = {k for k in built.context.spec.names if k.startswith("head.")}
    assert head and set(built.algorithm.server_spec.names) == set(built.context.spec.names) - head
    phases = []
    method = built.runtime.method
    original = method.fit

    def spy(round_: ClientRound) -> ClientFit:
        def train(start, objective=None):
            result = round_.trainer(start, objective)
            changed = {k for k in start if not torch.equal(start[k], result.params[k])}
            phases.append((objective.trainable, objective.steps, changed))
            return result

        return original(ClientRound(round_.clients, round_.received, round_.sent, round_.state, round_.fresh, train))

    method.fit = spy
    weights = built.algorithm.weights_for([0, 1, 2])
    fit = built.runtime.fit([0, 1, 2], weights, torch_generator(0, "local-training", 1))
    body = set(built.context.spec.names) - head
    assert [(set(t), s) for t, s, _ in phases] == [(head, 3), (body, None)]
    assert phases[0][2] == head and phases[1][2] == body  # each phase moved exactly its tensors
    assert set(fit.deltas) == body  # the head never leaves the client ...
    before = {k: v.clone() for k, v in built.runtime.personal.get(0).items()}
    assert set(before) == head  # ... and is kept there between rounds
    built.runtime.fit([0], {k: v[:1] for k, v in weights.items()}, torch_generator(0, "local-training", 2))
    assert any(not torch.equal(before[k], built.runtime.personal.get(0)[k]) for k in head)


# -- the protocol on clients whose architectures differ ------------------------------------------

class _Plain(ClientMethod):
    """Plain local training under another type: runs the per-client client-method path."""


def test_client_method_path_for_different_architectures_equals_the_per_client_loop(task):
    """Clients with their own templates: a ClientMethod runs each client alone on its column of the
    cohort's minibatch draw; with plain training that is exactly the existing per-client loop."""
    from tests.test_baselines import MixedInputTask

    mixed = MixedInputTask()
    cfg = config("decoupled", "clients_per_round=2", "local.steps=3", "local.batch_size=16")
    results = []
    for method in (None, _Plain()):
        built = build(cfg, task=mixed)
        if method is not None:
            built.runtime.method = method
        clients = [0, 2, 3]
        weights = built.algorithm.weights_for(clients)
        fit = built.runtime.fit(clients, weights, torch_generator(0, "local-training", 1))
        results.append((fit, {c: built.runtime.personal.get(c) for c in clients}))
    (a, pa), (b, pb) = results
    for k in a.deltas:
        assert torch.equal(a.deltas[k], b.deltas[k])
    assert torch.equal(a.loss, b.loss)
    for c in pa:
        assert all(torch.equal(pa[c][k], pb[c][k]) for k in pa[c])


def test_a_client_state_may_not_shadow_a_target_tensor(task):
    from shn.config import ServerConfig
    from shn.federated.algorithm import GlobalModelAlgorithm
    from shn.methods import register_method
    from shn.registry import METHODS

    class Shadow(ClientMethod):
        def initial_state(self, initial):
            return dict(initial)

    @register_method("_shadow_test", replace=True)
    def make(ctx):
        ctx.client = Shadow()
        return GlobalModelAlgorithm(ctx.initial, ServerConfig(), spec=ctx.spec)

    try:
        with pytest.raises(ValueError, match="prefix"):
            build(config("_shadow_test"), task=task)
    finally:
        METHODS._entries.pop("_shadow_test", None)


# -- the Flower engine runs the same client side ---------------------------------------------------

@pytest.mark.parametrize("method", ["ditto", "fedrep", "fedprox"])
def test_flower_engine_gives_the_in_process_numbers(method, tmp_path, monkeypatch):
    """Ditto's personal model in the node's context.state, FedRep's two phases, FedProx's term:
    the Flower ClientApp runs them through the same ClientRuntime, with the same numbers."""
    pytest.importorskip("flwr.app")
    from shn.flower.engine import EngineSettings, InProcessGrid, make_client_app, run_federation

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    cfg = config(method, "rounds=3", "eval_every=1", "clients_per_round=4", "methods.fedprox.mu=0.5")
    ref = run(cfg, progress=False)
    grid = InProcessGrid(make_client_app(), cfg.task.options.num_clients)
    got = run_federation(grid, cfg, EngineSettings(run_dir=tmp_path / "run"))
    for a, b in zip(ref.algorithm.params, got.algorithm.params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for r, g in zip(ref.history, got.history):
        assert g["test_accuracy"] == pytest.approx(r["test_accuracy"], rel=1e-6)
        assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
