"""Server-side algorithms (shn.federated.algorithm): the batched pFedHN VJP update against plain
autograd, optimiser options, FedAvg's weighted average, personal tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from baselines.fedavg import FedAvgOptions
from shn.config import ServerConfig, load_config
from shn.federated.algorithm import GlobalModelAlgorithm, HyperNetworkAlgorithm, weighted_mean
from shn.hypernetwork import HyperNetwork
from shn.target import ParamSpec, module_params
from tasks.models import MLP

PLAIN_SGD = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, grad_clip=0.0)


def target() -> nn.Module:
    torch.manual_seed(0)
    return MLP(6, 3, hidden=(5,))


def make_hn(num_clients: int = 7, dtype: torch.dtype = torch.float32, seed: int = 0) -> HyperNetwork:
    torch.manual_seed(seed)
    return HyperNetwork(ParamSpec.from_module(target()), num_clients, hidden=16, n_hidden=2).to(dtype)


def random_deltas(weights: dict[str, torch.Tensor], scale: float = 0.1, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in weights.items()}


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def reference_step(hn: HyperNetwork, clients, theta_tilde, lr: float, embed_lr: float | None = None,
                   reduction: str = "sum"):
    """φ − lr·∇φ [½‖θ(φ) − stopgrad(θ̃)‖²] (summed over clients; ``/ C`` with ``reduction="mean"``),
    by plain autograd on a copy of ``hn``."""
    ref = copy.deepcopy(hn)
    theta = ref(clients)
    loss = sum(0.5 * (theta[k] - theta_tilde[k].detach()).pow(2).sum() for k in theta)
    if reduction == "mean":
        loss = loss / len(clients)
    names = [n for n, _ in ref.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in ref.named_parameters()], allow_unused=True)
    out = {}
    for n, p, g in zip(names, ref.parameters(), grads):
        step_lr = embed_lr if (embed_lr is not None and n.startswith("embeddings.")) else lr
        out[n] = p.detach() - step_lr * (torch.zeros_like(p) if g is None else g)
    return out, loss.detach()


# -- the pFedHN update --------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clients", [[3], [0, 2, 5], [6, 1, 4, 2, 0]])
def test_batched_vjp_step_equals_autograd_of_half_squared_distance(dtype, clients, reduction):
    lr = 0.1
    hn = make_hn(dtype=dtype)
    alg = HyperNetworkAlgorithm(hn, ServerConfig(lr=lr, delta_reduction=reduction, **PLAIN_SGD))
    theta = alg.weights_for(clients)
    deltas = random_deltas(theta)
    theta_tilde = {k: theta[k] - deltas[k] for k in theta}  # θ̃ = θ − Δ
    expected, _ = reference_step(hn, clients, theta_tilde, lr, reduction=reduction)
    metrics = alg.apply_updates(clients, deltas, torch.tensor([10] * len(clients)))
    got = snapshot(hn)
    assert set(got) == set(expected)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert metrics["server_grad_norm"] > 0
    assert alg.steps == 1


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_update_is_one_batched_backward_over_single_client_steps(reduction):
    """The C-client step is the sum (pFedHN: one full step per client) of the C single-client
    steps, or their mean with the legacy ``delta_reduction = "mean"``."""
    clients = [0, 3, 5]
    lr = 0.05
    hn = make_hn(dtype=torch.float64)
    before = snapshot(hn)
    cfg = ServerConfig(lr=lr, delta_reduction=reduction, **PLAIN_SGD)
    alg = HyperNetworkAlgorithm(hn, cfg)
    deltas = random_deltas(alg.weights_for(clients))
    single_steps = []
    for i, c in enumerate(clients):
        h = make_hn(dtype=torch.float64)
        a = HyperNetworkAlgorithm(h, cfg)
        a.apply_updates([c], {k: v[i:i + 1] for k, v in deltas.items()}, torch.tensor([1]))
        single_steps.append({n: snapshot(h)[n] - before[n] for n in before})
    alg.apply_updates(clients, deltas, torch.tensor([1, 1, 1]))
    after = snapshot(hn)
    for n in before:
        expected = sum(s[n] for s in single_steps) / (len(clients) if reduction == "mean" else 1)
        torch.testing.assert_close(after[n] - before[n], expected, rtol=0, atol=1e-10)


def test_batched_step_equals_sequential_pfedhn_steps_to_first_order():
    """pFedHN: C sequential one-client steps (each client trained on the θ it was sent before
    the round) ≈ our one C-client step, with an error that is O(lr²): halving lr quarters it.
    Each client's embedding moves as far as in pFedHN, not C× less."""
    clients = [0, 3, 5, 6]

    def gap(lr: float) -> tuple[float, float]:
        hn = make_hn(dtype=torch.float64)
        cfg = ServerConfig(lr=lr, **PLAIN_SGD)
        batched = HyperNetworkAlgorithm(hn, cfg)
        theta = batched.weights_for(clients)
        deltas = random_deltas(theta, scale=1.0)
        seq_hn = make_hn(dtype=torch.float64)
        seq = HyperNetworkAlgorithm(seq_hn, cfg)
        for i, c in enumerate(clients):
            seq.apply_updates([c], {k: v[i:i + 1] for k, v in deltas.items()}, torch.tensor([1]))
        batched.apply_updates(clients, deltas, torch.tensor([1] * len(clients)))
        start = make_hn(dtype=torch.float64).embeddings.weight.detach()
        moved = float((hn.embeddings.weight.detach() - start).norm())
        err = max(float((p - q).detach().abs().max()) for p, q in zip(hn.parameters(), seq_hn.parameters()))
        return err, moved

    err1, moved1 = gap(1e-3)
    err2, moved2 = gap(5e-4)
    assert moved1 > 0 and abs(moved1 / moved2 - 2.0) < 1e-6  # the step is linear in lr
    assert err1 < 0.05 * moved1  # first-order agreement
    assert 3.0 < err1 / err2 < 5.0  # the difference is second order


def test_descent_moves_generated_weights_toward_trained_weights():
    clients = [1, 2, 6]
    hn = make_hn()
    alg = HyperNetworkAlgorithm(hn, ServerConfig(lr=0.01, **PLAIN_SGD))
    theta = alg.weights_for(clients)
    deltas = random_deltas(theta, scale=0.5)
    theta_tilde = {k: theta[k] - deltas[k] for k in theta}

    def distance(weights):
        return sum(float((weights[k] - theta_tilde[k]).pow(2).sum()) for k in weights)

    d0 = distance(theta)
    for _ in range(5):
        alg.apply_updates(clients, {k: v - theta_tilde[k] for k, v in alg.weights_for(clients).items()},
                          torch.tensor([1, 1, 1]))
        d1 = distance(alg.weights_for(clients))
        assert d1 < d0, "a server step must move θ(φ) toward θ̃ (grad_outputs = θ − θ̃)"
        d0 = d1
    # and the opposite sign would have moved away: the first-order change is −lr‖g‖² < 0
    assert d1 < distance(theta)


def test_embed_lr_is_its_own_parameter_group():
    clients = [0, 4]
    hn = make_hn(dtype=torch.float64)
    alg = HyperNetworkAlgorithm(hn, ServerConfig(lr=0.1, embed_lr=0.7, **PLAIN_SGD))
    groups = alg.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.1, 0.7]
    assert groups[1]["params"] == [hn.embeddings.weight]
    assert all(p is not hn.embeddings.weight for p in groups[0]["params"])
    theta = alg.weights_for(clients)
    deltas = random_deltas(theta)
    expected, _ = reference_step(hn, clients, {k: theta[k] - deltas[k] for k in theta}, 0.1, embed_lr=0.7)
    alg.apply_updates(clients, deltas, torch.tensor([1, 1]))
    got = snapshot(hn)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-10)


def test_embed_lr_defaults_to_lr_and_zero_freezes_embeddings():
    hn = make_hn()
    assert [g["lr"] for g in HyperNetworkAlgorithm(hn, ServerConfig(lr=0.03)).optimizer.param_groups] == [0.03, 0.03]
    hn = make_hn()
    alg = HyperNetworkAlgorithm(hn, ServerConfig(lr=0.1, embed_lr=0.0, **PLAIN_SGD))
    emb0, head0 = hn.embeddings.weight.detach().clone(), hn.heads["head__bias"].bias.detach().clone()
    alg.apply_updates([1, 2], random_deltas(alg.weights_for([1, 2])), torch.tensor([1, 1]))
    assert torch.equal(hn.embeddings.weight, emb0)
    assert not torch.equal(hn.heads["head__bias"].bias, head0)


def test_server_grad_clipping_bounds_the_step():
    clients = [0, 1, 2]
    lr, clip = 0.1, 1e-3
    hn = make_hn(dtype=torch.float64)
    before = snapshot(hn)
    theta = HyperNetworkAlgorithm(make_hn(dtype=torch.float64), ServerConfig()).weights_for(clients)
    deltas = random_deltas(theta, scale=1.0)
    # unclipped reference gradient g (the step of plain SGD with lr 1 is −g)
    unclipped, _ = reference_step(hn, clients, {k: theta[k] - deltas[k] for k in theta}, 1.0)
    g = {n: before[n] - unclipped[n] for n in before}
    g_norm = float(torch.sqrt(sum(v.pow(2).sum() for v in g.values())))
    assert g_norm > 10 * clip
    alg = HyperNetworkAlgorithm(hn, ServerConfig(lr=lr, optimizer="sgd", momentum=0.0, weight_decay=0.0,
                                                 grad_clip=clip))
    metrics = alg.apply_updates(clients, deltas, torch.tensor([1, 1, 1]))
    assert metrics["server_grad_norm"] == pytest.approx(g_norm, rel=1e-6)  # reported before clipping
    step = {n: before[n] - p for n, p in snapshot(hn).items()}
    step_norm = float(torch.sqrt(sum(v.pow(2).sum() for v in step.values())))
    # a sum of C clients' gradients is clipped at C× the threshold (pFedHN clips each client)
    bound = clip * len(clients)
    assert step_norm == pytest.approx(lr * bound, rel=1e-4)
    for n in step:  # same direction as the unclipped gradient
        torch.testing.assert_close(step[n], g[n] * (lr * bound / g_norm), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("server", [
    ServerConfig(),  # pFedHN defaults: SGD, momentum 0.9, weight decay 1e-3, clip 50
    ServerConfig(momentum=0.9, nesterov=True),
    ServerConfig(optimizer="adam", lr=1e-3, betas=(0.8, 0.99)),
])
def test_optimizers_run_and_state_dict_round_trips(server):
    clients = [1, 3]
    hn = make_hn()
    alg = HyperNetworkAlgorithm(hn, server)
    if server.optimizer == "adam":
        assert isinstance(alg.optimizer, torch.optim.Adam)
        assert alg.optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    else:
        assert isinstance(alg.optimizer, torch.optim.SGD)
        assert alg.optimizer.param_groups[0]["nesterov"] is server.nesterov
    before = snapshot(hn)
    for i in range(3):
        alg.apply_updates(clients, random_deltas(alg.weights_for(clients), seed=i), torch.tensor([5, 5]))
    after = snapshot(hn)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # a copy restored from state_dict takes exactly the same next step
    twin = HyperNetworkAlgorithm(make_hn(seed=123), server)
    twin.load_state_dict(copy.deepcopy(alg.state_dict()))
    assert twin.steps == alg.steps == 3
    d = random_deltas(alg.weights_for(clients), seed=9)
    alg.apply_updates(clients, d, torch.tensor([5, 5]))
    twin.apply_updates(clients, d, torch.tensor([5, 5]))
    for n, p in snapshot(hn).items():
        assert torch.equal(p, snapshot(twin.hn)[n])


# -- the global-model server (FedAvg family) -------------------------------------------------------

def test_fedavg_lr1_equals_example_weighted_average_of_trained_params():
    initial = module_params(target())
    options = FedAvgOptions()  # the registered FedAvg defaults: SGD, lr 1, no momentum
    alg = GlobalModelAlgorithm(initial, options.server_config())
    clients = [0, 2, 5]
    sent = alg.weights_for(clients)
    for k, v in sent.items():
        assert v.shape == (3, *initial[k].shape)
        assert torch.equal(v[1], initial[k])
    g = torch.Generator().manual_seed(0)
    trained = {k: v + torch.randn(v.shape, generator=g) for k, v in sent.items()}
    n = torch.tensor([10, 30, 60])
    alg.apply_updates(clients, {k: sent[k] - trained[k] for k in sent}, n)
    w = n.double() / n.sum()
    new = alg.weights_for([0])
    for k in initial:
        expected = sum(w[i] * trained[k][i].double() for i in range(3)).float()
        torch.testing.assert_close(new[k][0], expected, rtol=0, atol=1e-6)


def test_weighted_mean_normalises_weights():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    torch.testing.assert_close(weighted_mean(x, torch.tensor([1.0, 3.0])), torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(weighted_mean(x, torch.tensor([2.0, 2.0])), torch.tensor([2.0, 4.0]))


@pytest.mark.parametrize("options", [
    FedAvgOptions(momentum=0.9),
    FedAvgOptions(momentum=0.9, nesterov=True),
    FedAvgOptions(optimizer="adam", lr=0.01),
])
def test_fedopt_variants_run(options):
    initial = module_params(target())
    alg = GlobalModelAlgorithm(initial, options.server_config())
    for i in range(3):
        sent = alg.weights_for([0, 1])
        alg.apply_updates([0, 1], random_deltas(sent, seed=i), torch.tensor([3, 4]))
    new = alg.weights_for([0])
    assert all(torch.isfinite(v).all() for v in new.values())
    assert any(not torch.equal(new[k][0], initial[k]) for k in initial)
    twin = GlobalModelAlgorithm(module_params(MLP(6, 3, hidden=(5,))), options.server_config())
    twin.load_state_dict(copy.deepcopy(alg.state_dict()))
    d = random_deltas(alg.weights_for([0, 1]), seed=7)
    alg.apply_updates([0, 1], d, torch.tensor([3, 4]))
    twin.apply_updates([0, 1], d, torch.tensor([3, 4]))
    for k, v in alg.weights_for([0]).items():
        assert torch.equal(v, twin.weights_for([0])[k])


# -- personal tensors ---------------------------------------------------------------------------

def test_personal_keys_never_sent_or_received_by_hypernetwork_server():
    spec = ParamSpec.from_module(target())
    head = ("head.weight", "head.bias")
    hn = make_hn()
    initial = module_params(target())
    alg = HyperNetworkAlgorithm(hn, ServerConfig(), initial=initial, personal_keys=head)
    assert not set(head) & set(alg.server_spec.names)
    assert alg.server_spec.names == tuple(n for n in spec.names if n not in head)
    weights = alg.weights_for([0, 1])
    assert set(weights) == set(alg.server_spec.names)
    personal = alg.initial_personal()
    assert set(personal) == set(head)
    for k in head:
        assert torch.equal(personal[k], initial[k])
    # an update over the server tensors only is accepted
    alg.apply_updates([0, 1], random_deltas(weights), torch.tensor([1, 1]))


def test_local_shares_nothing_and_fedavg_shares_everything():
    initial = module_params(target())
    spec = ParamSpec.from_module(target())
    local = GlobalModelAlgorithm(initial, ServerConfig(), spec=spec, personal_keys=spec.names)
    assert local.server_spec.names == ()
    assert local.weights_for([0, 1]) == {}
    assert set(local.initial_personal()) == set(spec.names)
    assert local.apply_updates([0], {}, torch.tensor([1])) == {}
    fedavg = GlobalModelAlgorithm(initial, FedAvgOptions().server_config(), spec=spec)
    assert fedavg.server_spec == spec and fedavg.initial_personal() == {}


def test_registered_methods_respect_personal_keys(tmp_path):
    """Built through the registry and a digits config: pFedHN-PC keeps the head on the client."""
    from shn.runner import build

    base = ["task.num_clients=4", "clients_per_round=2"]
    cfg = load_config("experiments/configs/quickstart.toml", base + ["methods.pfedhn.personal_head=true"])
    built = build(cfg)
    alg = built.algorithm
    assert {"head.weight", "head.bias"} <= alg.personal_keys
    assert not any(n.startswith("head.") for n in alg.server_spec.names)
    assert not any(n.startswith("head.") for n in alg.weights_for([0, 1]))
    assert set(built.runtime.personal.initial) == {"head.weight", "head.bias"}

    plain = build(load_config("experiments/configs/quickstart.toml", base)).algorithm
    assert plain.personal_keys == frozenset() and plain.server_spec == plain.spec

    local = build(load_config("experiments/configs/quickstart.toml", base + ["method=local"])).algorithm
    assert local.server_spec.names == () and local.weights_for([0]) == {}
