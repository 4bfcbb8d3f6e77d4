"""Client-side local training (shn.federated.local): vmap == loop, per-client clipping, the
``auto`` rule, and agreement with torch.optim.SGD after clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shn.config import LocalConfig
from shn.federated.local import ClientStore, LocalTrainer, sgd_step, uses_convolution
from shn.target import module_params, stack_params
from tasks.base import ClientData, classification_loss
from tasks.models import MLP, PFedHNCNN, SmallCNN

SIZES = (7, 20, 33, 50)  # different dataset sizes; 7 < batch size (sampling with replacement)


def make_store(sizes=SIZES, shape=(1, 8, 8), classes=10, seed=0) -> ClientStore:
    g = torch.Generator().manual_seed(seed)
    data = {}
    for c, n in enumerate(sizes):
        def split(m):
            return (torch.randn(m, *shape, generator=g), torch.randint(0, classes, (m,), generator=g))
        data[c] = ClientData(split(n), split(5), split(5))
    return ClientStore(data)


def start_params(build, clients, seed=0):
    """Different initial weights per client, stacked ``{name: [C, *shape]}``."""
    per_client = []
    for i in range(len(clients)):
        torch.manual_seed(seed + i)
        per_client.append(module_params(build()))
    return stack_params(per_client)


MODELS = {
    "mlp": lambda: MLP(64, 10, hidden=(32, 16)),
    "small_cnn": lambda: SmallCNN(1, 10, 8, channels=(4, 8), hidden=16),
}


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("clients", [[0, 1, 2, 3], [3, 1]])
def test_vmap_equals_loop(model, clients):
    build = MODELS[model]
    store = make_store()
    # momentum, weight decay and (small) clipping all active
    cfg = dict(steps=6, lr=0.05, momentum=0.9, weight_decay=1e-2, batch_size=16, grad_clip=0.5)
    params = start_params(build, clients)
    results = {}
    for mode in ("vmap", "loop"):
        trainer = LocalTrainer(build(), classification_loss, LocalConfig(mode=mode, **cfg))
        results[mode] = trainer.train(params, store, clients, torch.Generator().manual_seed(42))
    v, lp = results["vmap"], results["loop"]
    assert set(v.params) == set(params)
    for k in params:
        assert v.params[k].shape == params[k].shape
        torch.testing.assert_close(v.params[k], lp.params[k], rtol=0, atol=1e-5)
        assert not torch.equal(v.params[k], params[k])  # it trained
    torch.testing.assert_close(v.loss, lp.loss, rtol=0, atol=1e-5)
    assert v.loss.shape == (len(clients),)
    # the inputs were not modified in place
    assert all(not t.requires_grad for t in v.params.values())


def test_clipping_was_active_in_the_vmap_loop_comparison():
    """Guard for the test above: the initial gradients are far above the clip bound."""
    build = MODELS["mlp"]
    store = make_store()
    trainer = LocalTrainer(build(), classification_loss, LocalConfig())
    params = start_params(build, [0])
    x, y = store.split(0, "train")
    grads, _ = trainer._grad({k: v[0] for k, v in params.items()}, x, y)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
    assert norm > 0.5


def test_training_is_seeded_and_independent_of_other_clients():
    build = MODELS["mlp"]
    store = make_store()
    cfg = LocalConfig(steps=3, lr=0.05, batch_size=8, mode="vmap")
    trainer = LocalTrainer(build(), classification_loss, cfg)
    params = start_params(build, [0, 1, 2])
    a = trainer.train(params, store, [0, 1, 2], torch.Generator().manual_seed(5))
    b = trainer.train(params, store, [0, 1, 2], torch.Generator().manual_seed(5))
    c = trainer.train(params, store, [0, 1, 2], torch.Generator().manual_seed(6))
    for k in params:
        assert torch.equal(a.params[k], b.params[k])
    assert any(not torch.equal(a.params[k], c.params[k]) for k in params)


def test_sgd_step_clips_each_client_separately():
    cfg = LocalConfig(lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=1.0)
    p = {"w": torch.zeros(3, 4), "b": torch.zeros(3, 2)}
    grads = {"w": torch.tensor([[3.0, 0, 0, 0], [0.3, 0, 0, 0], [0, 0, 0, 0]]),
             "b": torch.tensor([[0.0, 4.0], [0.0, 0.4], [0.0, 0.0]])}
    new, _ = sgd_step(p, grads, None, cfg)
    # client 0: norm 5 → scaled to 1; client 1: norm 0.5 → untouched; client 2: zero stays zero
    torch.testing.assert_close(new["w"][0], -torch.tensor([0.6, 0, 0, 0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new["b"][0], -torch.tensor([0.0, 0.8]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new["w"][1], -grads["w"][1])
    torch.testing.assert_close(new["b"][1], -grads["b"][1])
    assert torch.equal(new["w"][2], torch.zeros(4)) and torch.equal(new["b"][2], torch.zeros(2))
    # grad_clip = 0 disables clipping
    new, _ = sgd_step(p, grads, None, LocalConfig(lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=0.0))
    torch.testing.assert_close(new["w"], -grads["w"])


def check_step_against_torch(step, make_optimizer, cfg: LocalConfig, tol: float) -> None:
    """``step(params, grads, state, cfg)`` on 3 stacked clients (some above the clip bound, some
    below) equals ``make_optimizer`` per client after ``clip_grad_norm_``, over 4 steps."""
    g = torch.Generator().manual_seed(0)
    C = 3
    p = {"a": torch.randn(C, 4, 3, generator=g), "b": torch.randn(C, 5, generator=g)}
    ref = [[nn.Parameter(p["a"][i].clone()), nn.Parameter(p["b"][i].clone())] for i in range(C)]
    opts = [make_optimizer(r) for r in ref]
    state = None
    for _ in range(4):
        scale = torch.tensor([3.0, 0.2, 1.0])[:, None]  # some clients above the bound, some below
        grads = {"a": torch.randn(C, 4, 3, generator=g) * scale[:, :, None], "b": torch.randn(C, 5, generator=g) * scale}
        p, state = step(p, grads, state, cfg)
        for i in range(C):
            ref[i][0].grad, ref[i][1].grad = grads["a"][i].clone(), grads["b"][i].clone()
            torch.nn.utils.clip_grad_norm_(ref[i], cfg.grad_clip)
            opts[i].step()
    for i in range(C):
        torch.testing.assert_close(p["a"][i], ref[i][0].detach(), rtol=tol, atol=1e-6)
        torch.testing.assert_close(p["b"][i], ref[i][1].detach(), rtol=tol, atol=1e-6)


def test_sgd_step_equals_torch_sgd_after_clip_grad_norm():
    cfg = LocalConfig(lr=0.1, momentum=0.9, weight_decay=0.05, grad_clip=1.5)
    check_step_against_torch(
        sgd_step, lambda r: torch.optim.SGD(r, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
        cfg, tol=1e-6)


def _minibatch_indices(generator_seed, steps, sizes, batch_size):
    """The trainer's minibatch draw (one uniform per step, client, sample)."""
    g = torch.Generator().manual_seed(generator_seed)
    u = torch.rand(steps, len(sizes), batch_size, generator=g, dtype=torch.float64)
    s = torch.tensor(sizes, dtype=torch.float64)
    return (u * s[None, :, None]).long().clamp_max((s - 1).long()[None, :, None])


@pytest.mark.parametrize("mode", ["vmap", "loop"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_trainer_equals_torch_optim_sgd_on_the_same_minibatches(mode, model):
    build = MODELS[model]
    store = make_store()
    clients = [2, 0, 3]
    cfg = LocalConfig(steps=3, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=8, grad_clip=0.3, mode=mode)
    params = start_params(build, clients)
    result = LocalTrainer(build(), classification_loss, cfg).train(params, store, clients,
                                                                   torch.Generator().manual_seed(11))
    idx = _minibatch_indices(11, cfg.steps, [store.sizes[c] for c in clients], cfg.batch_size)
    for i, c in enumerate(clients):
        model_i = build()
        model_i.load_state_dict({k: v[i] for k, v in params.items()})
        opt = torch.optim.SGD(model_i.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        x, y = store.split(c, "train")
        losses = []
        for step in range(cfg.steps):
            rows = idx[step, i]
            assert int(rows.max()) < store.sizes[c]
            opt.zero_grad()
            loss = classification_loss(model_i(x[rows]), y[rows])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model_i.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.detach())
        for k, v in model_i.named_parameters():
            torch.testing.assert_close(result.params[k][i], v.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(result.loss[i], torch.stack(losses).mean(), rtol=1e-5, atol=1e-5)


def test_auto_rule_picks_grouped_for_conv_on_cpu_and_vmap_otherwise():
    # conv targets grouped cannot run take the loop instead: tests/test_grouped.py
    cfg = LocalConfig(mode="auto")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    conv = [SmallCNN(1, 10, 8), SmallCNN(1, 10, 28), PFedHNCNN(3, 10)]
    for m in conv:
        assert uses_convolution(m)
        trainer = LocalTrainer(m, classification_loss, cfg)
        assert trainer.resolve_mode(cpu) == "grouped"
        assert trainer.resolve_mode(cuda) == "vmap"
    flat = [MLP(64, 10)]
    try:
        from tasks.forecast_models import GRUForecaster, MLPForecaster

        flat += [GRUForecaster(2, 1, 12), MLPForecaster(2, 12, 1, 12)]
    except ImportError:  # pragma: no cover
        pass
    for m in flat:
        assert not uses_convolution(m)
        assert LocalTrainer(m, classification_loss, cfg).resolve_mode(cpu) == "vmap"
    for forced in ("vmap", "loop", "grouped"):
        for m in conv + flat:
            assert LocalTrainer(m, classification_loss, LocalConfig(mode=forced)).resolve_mode(cpu) == forced


def test_auto_gives_the_same_numbers_as_the_mode_it_picks():
    build = MODELS["mlp"]
    store = make_store()
    params = start_params(build, [0, 1])
    out = {}
    for mode in ("auto", "vmap"):
        trainer = LocalTrainer(build(), classification_loss, LocalConfig(steps=2, batch_size=4, mode=mode))
        out[mode] = trainer.train(params, store, [0, 1], torch.Generator().manual_seed(3))
    for k in params:
        assert torch.equal(out["auto"].params[k], out["vmap"].params[k])


def _ragged_store() -> ClientStore:
    """Two clients whose inputs differ in trailing shape (sequence length): no vmap batch."""
    g = torch.Generator().manual_seed(0)

    def split(n, length):
        return torch.randn(n, length, 3, generator=g), torch.randint(0, 2, (n,), generator=g)

    return ClientStore({0: ClientData(split(6, 4), split(2, 4), split(2, 4)),
                        1: ClientData(split(9, 7), split(2, 7), split(2, 7))})


class _MeanPool(nn.Module):
    """Works on any sequence length: mean over time, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x.mean(1))


def test_ragged_clients_cannot_be_forced_into_vmap():
    store = _ragged_store()
    assert store.concat is None
    params = start_params(_MeanPool, [0, 1])
    trainer = LocalTrainer(_MeanPool(), classification_loss, LocalConfig(steps=2, batch_size=4, mode="vmap"))
    with pytest.raises(ValueError, match="vmap"):
        trainer.train(params, store, [0, 1], torch.Generator().manual_seed(0))


def test_auto_falls_back_to_loop_for_ragged_clients():
    store = _ragged_store()
    params = start_params(_MeanPool, [0, 1])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    auto = LocalTrainer(_MeanPool(), classification_loss, LocalConfig(steps=2, batch_size=4, mode="auto"))
    loop = LocalTrainer(_MeanPool(), classification_loss, LocalConfig(steps=2, batch_size=4, mode="loop"))
    a = auto.train(params, store, [0, 1], gen())
    b = loop.train(params, store, [0, 1], gen())
    for k in params:
        assert torch.equal(a.params[k], b.params[k])


def test_client_store_holds_tensors_and_concatenates_equal_shapes():
    store = make_store()
    assert store.clients == [0, 1, 2, 3]
    assert store.sizes == dict(enumerate(SIZES))
    assert store.concat is not None and store.concat[0].shape[0] == sum(SIZES)
    for c in store.clients:
        x, y = store.split(c, "train")
        off = store.offsets[c]
        assert torch.equal(store.concat[0][off:off + len(x)], x)
        assert torch.equal(store.concat[1][off:off + len(y)], y)
    assert store.num_train([3, 0]).tolist() == [50, 7]
    with pytest.raises(ValueError, match="no training samples"):
        make_store(sizes=(5, 0))
