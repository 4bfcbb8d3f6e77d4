"""shn.target (parameter spec, functional execution) and shn.hypernetwork (heads derived from
the target, embeddings, encoder contract)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shn.config import ServerConfig
from shn.federated.algorithm import HyperNetworkAlgorithm
from shn.hypernetwork import Encoder, HyperNetwork, IdentityEncoder, default_embed_dim
from shn.target import (
    ParamSpec,
    as_template,
    batched_forward,
    check_params,
    functional_forward,
    module_params,
    select,
    stack_params,
)
from tasks.models import MLP, PFedHNCNN, SmallCNN

# Every target model of tasks/models.py (and tasks/forecast_models.py when present), with an
# input shape (without the batch dimension) and the output shape per sample.
TARGETS = {
    "pfedhn_cnn_cifar10": (lambda: PFedHNCNN(3, 10), (3, 32, 32), (10,)),
    "pfedhn_cnn_cifar100": (lambda: PFedHNCNN(3, 100), (3, 32, 32), (100,)),
    "small_cnn_8x8": (lambda: SmallCNN(1, 10, 8), (1, 8, 8), (10,)),
    "small_cnn_28x28": (lambda: SmallCNN(1, 10, 28), (1, 28, 28), (10,)),
    "mlp_digits": (lambda: MLP(64, 10), (1, 8, 8), (10,)),
    "mlp_deep": (lambda: MLP(20, 4, hidden=(16, 8, 8)), (20,), (4,)),
}
try:
    from tasks.forecast_models import GRUForecaster, MLPForecaster

    TARGETS["gru_forecaster"] = (lambda: GRUForecaster(2, 1, 12, hidden=32), (12, 2), (12, 1))
    TARGETS["mlp_forecaster"] = (lambda: MLPForecaster(3, 12, 2, 6, hidden=16), (12, 3), (6, 2))
except ImportError:  # pragma: no cover - forecasting models are optional here
    pass


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return MLP(6, 3, hidden=(5, 4))


# -- ParamSpec ----------------------------------------------------------------------------------

def test_spec_from_module_follows_named_parameters():
    model = small_model()
    spec = ParamSpec.from_module(model)
    assert spec.names == tuple(n for n, _ in model.named_parameters())
    assert spec.shapes == tuple(tuple(p.shape) for _, p in model.named_parameters())
    assert spec.numels == tuple(p.numel() for p in model.parameters())
    assert spec.total == sum(p.numel() for p in model.parameters())
    assert spec.shape_of("hidden.0.weight") == (4, 5)


def test_spec_of_module_without_parameters_is_an_error():
    with pytest.raises(ValueError, match="ReLU has no parameters"):
        ParamSpec.from_module(nn.ReLU())


@pytest.mark.parametrize("batch", [(), (3,), (2, 4)])
def test_flatten_unflatten_round_trip(batch):
    spec = ParamSpec.from_module(small_model())
    g = torch.Generator().manual_seed(1)
    params = {n: torch.randn(*batch, *s, generator=g) for n, s in zip(spec.names, spec.shapes)}
    flat = spec.flatten(params, batch_dims=len(batch))
    assert flat.shape == (*batch, spec.total)
    back = spec.unflatten(flat)
    assert list(back) == list(spec.names)
    for n in spec.names:
        assert torch.equal(back[n], params[n])
    # and the other way round: flat → dict → flat
    assert torch.equal(spec.flatten(spec.unflatten(flat), batch_dims=len(batch)), flat)


def test_flatten_uses_spec_order_not_dict_order():
    spec = ParamSpec.from_module(small_model())
    params = module_params(small_model())
    shuffled = dict(reversed(list(params.items())))
    assert torch.equal(spec.flatten(shuffled), spec.flatten(params))
    assert torch.equal(spec.flatten(params)[: spec.numels[0]], params[spec.names[0]].flatten())


def test_subset_keeps_model_order_and_rejects_unknown_names():
    spec = ParamSpec.from_module(small_model())
    sub = spec.subset(["head.bias", "input_proj.weight"])
    assert sub.names == ("input_proj.weight", "head.bias")
    assert sub.shapes == (spec.shape_of("input_proj.weight"), spec.shape_of("head.bias"))
    assert spec.subset([]).names == ()
    with pytest.raises(KeyError, match="nope"):
        spec.subset(["head.bias", "nope"])


def test_stack_select_and_module_params():
    models = [small_model() for _ in range(3)]
    for i, m in enumerate(models):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(i)
    stacked = stack_params([module_params(m) for m in models])
    spec = ParamSpec.from_module(models[0])
    check_params(spec, stacked, batch_dims=1)
    one = select(stacked, 2)
    for n, p in models[2].named_parameters():
        assert torch.equal(one[n], p)
    copy = module_params(models[0])
    copy["head.bias"].add_(1.0)
    assert not torch.equal(copy["head.bias"], models[0].head.bias)  # a copy, not a view


def test_check_params_errors_name_the_problem():
    spec = ParamSpec.from_module(small_model())
    good = module_params(small_model())
    check_params(spec, good)
    missing = {k: v for k, v in good.items() if k != "head.weight"}
    with pytest.raises(ValueError, match=r"missing \['head.weight'\]"):
        check_params(spec, missing)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        check_params(spec, {**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'head.bias' has shape \(4,\), the model expects \(3,\)"):
        check_params(spec, {**good, "head.bias": torch.zeros(4)})
    batched = {k: v.unsqueeze(0).repeat(2, *[1] * v.dim()) for k, v in good.items()}
    check_params(spec, batched, batch_dims=1)
    with pytest.raises(ValueError, match="shape"):
        check_params(spec, batched)  # the batch dimension is not part of the shape


def test_functional_forward_on_meta_template_matches_module():
    model = small_model()
    template = as_template(model)
    assert all(p.device.type == "meta" for p in template.parameters())
    x = torch.randn(7, 6)
    out = functional_forward(template, module_params(model), x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_batched_forward_gives_each_client_its_own_weights():
    models = [small_model() for _ in range(3)]
    for i, m in enumerate(models):
        with torch.no_grad():
            m.head.bias.add_(10.0 * i)
    params = stack_params([module_params(m) for m in models])
    x = torch.randn(3, 5, 6)
    out = batched_forward(as_template(models[0]))(params, x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x[i]), rtol=1e-6, atol=1e-6)


# -- HyperNetwork -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TARGETS))
def test_heads_match_target_shapes_and_generated_weights_run(name):
    build, in_shape, out_shape = TARGETS[name]
    torch.manual_seed(0)
    model = build()
    spec = ParamSpec.from_module(model)
    hn = HyperNetwork(spec, num_clients=6, hidden=16, n_hidden=1)
    # one head per target tensor, sized from the spec
    assert len(hn.heads) == len(spec.names)
    for n, p in model.named_parameters():
        head = hn.heads[n.replace(".", "__")]
        assert head.out_features == p.numel()
        assert head.in_features == 16
    clients = [4, 0, 5]
    weights = hn(clients)
    assert list(weights) == list(spec.names)
    for n, p in model.named_parameters():
        assert weights[n].shape == (len(clients), *p.shape)
    check_params(spec, weights, batch_dims=1)
    # the generated weights drive the template, one client and a vmapped batch
    template = as_template(model)
    x = torch.randn(len(clients), 2, *in_shape)
    out = batched_forward(template)(weights, x)
    assert out.shape == (len(clients), 2, *out_shape)
    single = functional_forward(template, select(weights, 1), x[1])
    torch.testing.assert_close(out[1], single, rtol=1e-4, atol=1e-4)


def test_weights_for_returns_batched_detached_weights_in_client_order():
    spec = ParamSpec.from_module(small_model())
    torch.manual_seed(0)
    hn = HyperNetwork(spec, num_clients=8, hidden=12, n_hidden=2)
    alg = HyperNetworkAlgorithm(hn, ServerConfig())
    clients = [7, 2, 2, 5]
    weights = alg.weights_for(clients)
    assert set(weights) == set(spec.names)
    for n, s in zip(spec.names, spec.shapes):
        assert weights[n].shape == (4, *s)
        assert not weights[n].requires_grad
    # row i belongs to clients[i]; a repeated client gets identical rows
    for i, c in enumerate(clients):
        own = alg.weights_for([c])
        for n in spec.names:
            torch.testing.assert_close(weights[n][i], own[n][0], rtol=1e-6, atol=1e-6)
    for n in spec.names:
        assert torch.equal(weights[n][1], weights[n][2])
    # distinct clients get distinct weights (distinct embeddings)
    assert not torch.allclose(weights["head.weight"][0], weights["head.weight"][1])


def test_forward_touches_only_requested_rows():
    spec = ParamSpec.from_module(small_model())
    hn = HyperNetwork(spec, num_clients=5, hidden=8, n_hidden=1)
    out = hn([1, 3])
    loss = sum(t.sum() for t in out.values())
    loss.backward()
    grad = hn.embeddings.weight.grad
    assert grad[[1, 3]].abs().sum() > 0
    assert torch.count_nonzero(grad[[0, 2, 4]]) == 0


@pytest.mark.parametrize("n,expected", [(1, 1), (4, 2), (10, 3), (50, 13), (100, 26), (207, 52)])
def test_default_embed_dim_is_pfedhn_rule(n, expected):
    assert default_embed_dim(n) == expected
    spec = ParamSpec.from_module(small_model())
    hn = HyperNetwork(spec, num_clients=n, hidden=4, n_hidden=0)
    assert hn.embed_dim == expected
    assert hn.embeddings.weight.shape == (n, expected)
    assert hn.trunk[0].in_features == expected


def test_explicit_embed_dim_and_parameter_groups():
    spec = ParamSpec.from_module(small_model())
    hn = HyperNetwork(spec, num_clients=10, embed_dim=7, hidden=4, n_hidden=0)
    assert hn.embeddings.weight.shape == (10, 7)
    emb = {id(p) for p in hn.embedding_parameters()}
    other = {id(p) for p in hn.other_parameters()}
    assert emb == {id(hn.embeddings.weight)}
    assert not emb & other
    assert emb | other == {id(p) for p in hn.parameters()}


def test_num_clients_must_be_positive():
    spec = ParamSpec.from_module(small_model())
    with pytest.raises(ValueError, match="num_clients"):
        HyperNetwork(spec, num_clients=0)


class _WrongWidth(Encoder):
    """Claims ``out_dim`` but returns ``actual`` columns."""

    def __init__(self, in_dim: int, out_dim: int, actual: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.proj = nn.Linear(in_dim, actual)

    def forward(self, embeddings, graph=None):
        return self.proj(embeddings)


class _DropsRows(Encoder):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.out_dim = in_dim

    def forward(self, embeddings, graph=None):
        return embeddings[:-1]


class _NeedsGraph(IdentityEncoder):
    needs_graph = True


def test_encoder_output_width_mismatch_is_a_clear_error():
    spec = ParamSpec.from_module(small_model())
    hn = HyperNetwork(spec, num_clients=4, embed_dim=3, encoder=_WrongWidth(3, 5, 7), hidden=8)
    assert hn.trunk[0].in_features == 5  # the trunk is sized from encoder.out_dim
    with pytest.raises(ValueError, match=r"_WrongWidth returned shape \(4, 7\).*\(4, 5\).*encoder.out_dim"):
        hn([0, 1])


def test_encoder_row_count_mismatch_is_a_clear_error():
    spec = ParamSpec.from_module(small_model())
    hn = HyperNetwork(spec, num_clients=4, embed_dim=3, encoder=_DropsRows(3), hidden=8)
    with pytest.raises(ValueError, match=r"_DropsRows returned shape \(3, 3\).*num_clients"):
        hn([0])


def test_graph_encoder_without_graph_is_a_clear_error():
    spec = ParamSpec.from_module(small_model())
    hn = HyperNetwork(spec, num_clients=4, embed_dim=3, encoder=_NeedsGraph(3), hidden=8)
    with pytest.raises(ValueError, match="needs a client graph"):
        hn([0])


def test_representations_identity_is_the_embedding_table():
    spec = ParamSpec.from_module(small_model())
    hn = HyperNetwork(spec, num_clients=4, hidden=8)
    assert torch.equal(hn.representations(), hn.embeddings.weight)
    z = hn.representations()[[2]]
    gen = hn.generate(z)
    direct = hn([2])
    for n in spec.names:
        assert torch.equal(gen[n], direct[n])
