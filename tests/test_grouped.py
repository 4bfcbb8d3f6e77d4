"""The grouped network (shn.federated.grouped) and ``local.mode = "grouped"``: the same per-client
outputs and local-training deltas as the per-client loop, within a float tolerance, for
pFedHN's CIFAR CNN and a small CNN, with momentum, weight decay and gradient clipping active."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import shn.federated.local as local
from shn.config import LocalConfig
from shn.federated.grouped import GroupedNet, grouped_unsupported
from shn.federated.local import ClientStore, LocalTrainer
from tasks.base import ClientData, classification_loss
from tasks.models import MLP, PFedHNCNN, SmallCNN
from tests.test_local import make_store, start_params

# The documented tolerance (README, performance): after K local steps, every parameter's delta
# (trained − start) agrees with the loop's to within DELTA_RTOL of that tensor's largest delta.
# The grouped kernels sum in another order than the per-client ones; nothing else differs.
DELTA_RTOL = 1e-4

MODELS = {
    "pfedhn_cnn": (lambda: PFedHNCNN(3, 10), (3, 32, 32)),
    "small_cnn": (lambda: SmallCNN(1, 10, 8, channels=(4, 8), hidden=16), (1, 8, 8)),
}


class _Everything(nn.Module):
    """The layer kinds the grouped network supports, as modules and as functions: strided,
    padded, grouped and bias-free convolutions, max and average pooling (ceil mode), flatten,
    several activations, bias-free linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), nn.Tanh(), nn.AvgPool2d(2, ceil_mode=True),
        )
        self.conv = nn.Conv2d(6, 8, 1, dilation=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(self.features(x))), kernel_size=1)
        x = torch.flatten(F.leaky_relu(x, 0.1), 1)
        return self.head(torch.sigmoid(self.fc(x)))


def _stacked(build, clients: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return start_params(build, list(range(clients)), seed)


def _per_client(template: nn.Module, params, x):
    return torch.stack([functional_call(template, {k: v[i] for k, v in params.items()}, (x[i],))
                        for i in range(x.shape[0])])


@pytest.mark.parametrize("model", ["pfedhn_cnn", "small_cnn", "everything"])
def test_grouped_net_equals_the_template_per_client(model):
    if model == "everything":
        build, shape = _Everything, (2, 8, 8)
    else:
        build, shape = MODELS[model]
    params = _stacked(build, 3)
    x = torch.randn(3, 5, *shape, generator=torch.Generator().manual_seed(1))
    template = build()
    assert grouped_unsupported(template) is None
    out = GroupedNet(template.to("meta"))(params, x)
    ref = _per_client(build(), params, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clients", [1, 3])
def test_packed_activations_are_channels_last(clients):
    """The speed of the grouped network rests on channels-last convolutions and pooling (an NCHW
    max-pool costs about as much as the convolution before it): also for a cohort of one."""
    from shn.federated.grouped import CLIENT_MAJOR, _packed

    x = torch.randn(clients, 4, 3, 8, 8)
    packed = _packed(x, CLIENT_MAJOR, clients)
    assert packed.shape == (4, clients * 3, 8, 8)
    assert packed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(packed.unflatten(1, (clients, 3)).transpose(0, 1), x)


def test_relu_then_max_pool_is_run_as_pool_then_relu_exactly():
    """The grouped network swaps ReLU → max-pool (a 4× smaller ReLU); its docstring claims the
    forward values and the gradients are exactly those of the unswapped order."""
    build, shape = MODELS["small_cnn"]
    swapped = GroupedNet(build())
    assert set(swapped.relu_after_pool) == {"relu", "relu_1"}
    plain = GroupedNet(build())
    plain.relu_after_pool = {}
    params = _stacked(build, 2)
    x = torch.randn(2, 16, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for net in (swapped, plain):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        out = net(leaves, x)
        loss = F.cross_entropy(out.flatten(0, 1), y.flatten())
        results.append((out, torch.autograd.grad(loss, list(leaves.values()))))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def _store(shape, sizes=(7, 20, 33, 50)) -> ClientStore:
    if shape == (1, 8, 8):
        return make_store(sizes)
    return make_store(sizes, shape=shape)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_grouped_deltas_equal_the_loop_within_tolerance(model):
    build, shape = MODELS[model]
    store = _store(shape)
    clients = [3, 0, 2, 1]
    # momentum, weight decay and (active: see the guard below) clipping
    cfg = dict(steps=5, lr=0.05, momentum=0.9, weight_decay=1e-2, batch_size=16, grad_clip=0.1)
    params = _stacked(build, len(clients))
    out = {}
    for mode in ("grouped", "loop"):
        trainer = LocalTrainer(build(), classification_loss, LocalConfig(mode=mode, **cfg))
        out[mode] = trainer.train(params, store, clients, torch.Generator().manual_seed(7))
    g, lp = out["grouped"], out["loop"]
    for k in params:
        dg, dl = g.params[k] - params[k], lp.params[k] - params[k]
        scale = dl.abs().max()
        assert scale > 0
        torch.testing.assert_close(dg, dl, rtol=0, atol=DELTA_RTOL * float(scale), msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(g.loss, lp.loss, rtol=1e-5, atol=1e-6)
    # guard: clipping was active (the first step's gradient norm is above the bound)
    x, y = store.split(clients[0], "train")
    grads, _ = LocalTrainer(build(), classification_loss, LocalConfig())._grad({k: v[0] for k, v in params.items()}, x, y)
    assert torch.sqrt(sum(v.pow(2).sum() for v in grads.values())) > cfg["grad_clip"]


def test_chunks_of_clients_give_the_same_deltas(monkeypatch):
    """A cohort larger than one chunk (here: one client per chunk) trains like one call; each
    chunk is trained for all its steps in turn."""
    build, shape = MODELS["small_cnn"]
    store = _store(shape, sizes=(9, 12, 15))
    clients = [0, 1, 2]
    params = _stacked(build, 3)
    cfg = LocalConfig(steps=3, lr=0.05, batch_size=8, mode="grouped")
    whole = LocalTrainer(build(), classification_loss, cfg).train(params, store, clients, torch.Generator().manual_seed(2))
    monkeypatch.setattr(local, "GROUPED_ACTIVATION_BYTES", 1)
    calls = []
    trainer = LocalTrainer(build(), classification_loss, cfg)
    real = trainer._grouped_grads

    def counting(p, batch):
        out = real(p, batch)
        calls.append(len(batch[0]))
        return out

    trainer._grouped_grads = counting
    chunked = trainer.train(params, store, clients, torch.Generator().manual_seed(2))
    assert calls == [1] * (3 * cfg.steps)  # chunks of 1 client, each for all its steps
    for k in params:
        torch.testing.assert_close(chunked.params[k], whole.params[k], rtol=1e-5, atol=1e-6)


def test_chunk_size_follows_the_activation_budget():
    build, shape = MODELS["pfedhn_cnn"]
    net = GroupedNet(build())
    params = _stacked(build, 2)
    # conv1's output is the largest activation: 16 channels × 28 × 28 per image
    assert net.activation_numel(params, torch.empty(2, 64, *shape)) == 64 * 16 * 28 * 28
    # 16 MiB of it: 5 clients in float32 (3.2 MB each), 10 in bfloat16
    for precision, chunk in (("fp32", 5), ("bf16", 10)):
        trainer = LocalTrainer(build(), classification_loss, LocalConfig(mode="grouped", precision=precision))
        assert trainer._grouped_chunk(params, shape, 64) == chunk


class _WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 6 * 6, 10)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).flatten(1))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head((x + self.conv(x)).flatten(1))


def test_unsupported_targets_are_named_and_auto_takes_the_loop():
    from tasks.forecast_models import GRUForecaster

    assert "BatchNorm2d" in grouped_unsupported(_WithBatchNorm())
    assert "single-input" in grouped_unsupported(_Residual())
    assert "no Conv2d" in grouped_unsupported(MLP(64, 10))
    assert "cannot trace" in grouped_unsupported(GRUForecaster(2, 1, 12))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for m in (_WithBatchNorm(), _Residual()):
        assert LocalTrainer(m, classification_loss, LocalConfig(mode="auto")).resolve_mode(cpu) == "loop"
    for m in (PFedHNCNN(3, 10), SmallCNN(1, 10, 8)):
        trainer = LocalTrainer(m, classification_loss, LocalConfig(mode="auto"))
        assert trainer.resolve_mode(cpu) == "grouped"
        assert trainer.resolve_mode(cuda) == "vmap"


def test_forcing_grouped_on_an_unsupported_target_says_why():
    store = make_store()
    params = _stacked(_Residual, 2)
    trainer = LocalTrainer(_Residual(), classification_loss, LocalConfig(steps=1, batch_size=4, mode="grouped"))
    with pytest.raises(ValueError, match="local.mode = 'grouped' cannot run this target: .*single-input"):
        trainer.train(params, store, [0, 1], torch.Generator().manual_seed(0))


def test_grouped_needs_stackable_clients():
    g = torch.Generator().manual_seed(0)

    def split(n, side):
        return torch.randn(n, 1, side, side, generator=g), torch.randint(0, 2, (n,), generator=g)

    store = ClientStore({0: ClientData(split(6, 8), split(2, 8), split(2, 8)),
                         1: ClientData(split(6, 12), split(2, 12), split(2, 12))})
    build = MODELS["small_cnn"][0]
    params = _stacked(build, 2)
    forced = LocalTrainer(build(), classification_loss, LocalConfig(steps=1, batch_size=4, mode="grouped"))
    with pytest.raises(ValueError, match="'grouped' needs clients whose data shapes agree"):
        forced.train(params, store, [0, 1], torch.Generator().manual_seed(0))


def test_bf16_pads_an_odd_input_channel_count_without_changing_the_outputs(monkeypatch):
    """Under bfloat16 autocast on the CPU, the RGB input is packed with a zero channel per client
    (and the weights with a zero input channel): the same outputs and gradients as unpadded."""
    import shn.federated.grouped as grouped

    build, shape = MODELS["pfedhn_cnn"]
    net = GroupedNet(build())
    params = _stacked(build, 3)
    x = torch.randn(3, 8, *shape, generator=torch.Generator().manual_seed(0))
    pads = []
    real = grouped._packed_even
    monkeypatch.setattr(grouped, "_packed_even", lambda t: pads.append(t.shape) or real(t))

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(leaves, x)
        grads = torch.autograd.grad(out.float().square().sum(), list(leaves.values()))
        return out.float(), grads

    padded, padded_grads = run()
    assert pads == [(3, 8, 3, 32, 32)]  # the first convolution only
    monkeypatch.setattr(grouped, "_cpu_bf16_autocast", lambda: False)
    plain, plain_grads = run()
    assert len(pads) == 1
    torch.testing.assert_close(padded, plain, rtol=1e-2, atol=1e-2)
    for a, b in zip(padded_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
