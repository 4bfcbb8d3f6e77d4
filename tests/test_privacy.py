"""Client-level differential privacy (shn.federated.privacy): ε against the accountant computed
directly (and a closed form), clipping bounds a forged client's contribution, the noise has std
σ·C and is seeded, configuration errors, and tiny DP runs end to end (records, summary, resume,
the three-stage pipeline)."""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest
import torch
from torch import nn

from shn.config import ConfigError, PrivacyConfig, ServerConfig, config_from_dict
from shn.federated.algorithm import GlobalModelAlgorithm, HyperNetworkAlgorithm
from shn.federated.privacy import GaussianMechanism, PrivacyAccountant, epsilon
from shn.hypernetwork import HyperNetwork
from shn.runner import build, run
from shn.target import ParamSpec, module_params
from tasks.models import MLP
from tests.conftest import tiny_digits_toml, with_changes

PLAIN_SGD = dict(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0, grad_clip=0.0)
DP = {"privacy.clip_norm": 0.5, "privacy.noise_multiplier": 1.0}


def tiny(method: str, rounds: int = 3, **changes):
    """The conftest's 4-client digits config, 2 clients a round (sampling rate 1/2)."""
    data = with_changes(tomllib.loads(tiny_digits_toml(method, rounds)), clients_per_round=2, **changes)
    return config_from_dict(data)


def target() -> nn.Module:
    torch.manual_seed(0)
    return MLP(6, 3, hidden=(5,))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------------------------
# accounting

def test_epsilon_is_the_opacus_accountants_value_computed_directly():
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.analysis import rdp

    sigma, q, steps, delta = 1.1, 0.1, 200, 1e-5
    orders = RDPAccountant.DEFAULT_ALPHAS
    direct, _ = rdp.get_privacy_spent(orders=orders, rdp=rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                                         orders=orders), delta=delta)
    assert epsilon(sigma, q, steps, delta, "rdp") == pytest.approx(float(direct), rel=1e-12)
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    assert epsilon(sigma, q, steps, delta, "prv") == pytest.approx(prv.get_epsilon(delta=delta), rel=1e-9)
    # PRV is the tighter accountant; both are in the range known for this setting
    assert 0 < epsilon(sigma, q, steps, delta, "prv") < epsilon(sigma, q, steps, delta, "rdp") < 10


def test_epsilon_without_subsampling_is_the_closed_form_gaussian_rdp():
    """q = 1: T steps of the Gaussian mechanism have RDP T·α/(2σ²) at order α, converted to
    (ε, δ) by Balle et al. 2020 (Thm 21): an oracle written here, not opacus's subsampling code."""
    from opacus.accountants import RDPAccountant

    sigma, steps, delta = 2.0, 30, 1e-6
    a = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    eps = steps * a / (2 * sigma ** 2) - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert epsilon(sigma, 1.0, steps, delta, "rdp") == pytest.approx(float(eps.min()), rel=1e-12)


def test_accountant_sampling_rate_rounds_and_edge_cases():
    cfg = PrivacyConfig(clip_norm=1.0, noise_multiplier=0.8, delta=1e-4)
    acc = PrivacyAccountant(cfg, clients_per_round=5, pool_size=50)
    assert acc.sample_rate == 0.1
    assert acc.epsilon(10) == pytest.approx(epsilon(0.8, 0.1, 10, 1e-4))
    assert 0 < acc.epsilon(1) < acc.epsilon(10) < acc.epsilon(100)  # ε grows with the rounds
    assert PrivacyAccountant(cfg, 5, 50, prior_steps=10).epsilon(5) == pytest.approx(acc.epsilon(15))
    assert PrivacyAccountant(cfg, 9, 4).sample_rate == 1.0
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 5, 1e-5) == math.inf  # clipping only: no guarantee
    report = acc.report(10)
    assert report == {"epsilon": acc.epsilon(10), "delta": 1e-4, "noise_multiplier": 0.8, "clip_norm": 1.0,
                      "accountant": "rdp", "sample_rate": 0.1, "steps": 10}


# ---------------------------------------------------------------------------------------------
# clipping and noise

def fedavg(privacy: GaussianMechanism | None) -> GlobalModelAlgorithm:
    alg = GlobalModelAlgorithm(module_params(target()), ServerConfig(**PLAIN_SGD))
    alg.privacy = privacy
    return alg


def test_a_forged_huge_fedavg_delta_contributes_at_most_the_clip_norm():
    C = 0.5
    alg = fedavg(GaussianMechanism(C, 0.0))
    before = {n: p.detach().clone() for n, p in zip(alg.server_spec.names, alg.params)}
    g = torch.Generator().manual_seed(0)
    honest = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in before.items()}  # norm < C: unchanged
    forged = {n: 1e3 * torch.randn(p.shape, generator=g) for n, p in before.items()}
    stacked = {n: torch.stack([honest[n], forged[n]]) for n in before}
    out = alg.apply_updates([0, 1], stacked, torch.tensor([10, 10**9]))  # the claimed count has no weight
    assert out["dp_clipped_clients"] == 1.0
    forged_norm = float(flat(forged.values()).norm())
    expected = {n: (honest[n] + forged[n] * (C / forged_norm)) / 2 for n in before}
    for n, p in zip(alg.server_spec.names, alg.params):  # SGD lr 1: θ ← θ − pseudo-gradient
        torch.testing.assert_close(before[n] - p.detach(), expected[n], rtol=1e-5, atol=1e-7)
    step = flat(before[n] - p.detach() for n, p in zip(alg.server_spec.names, alg.params))
    assert float(step.norm()) <= (C + float(flat(honest.values()).norm())) / 2 + 1e-6


def make_hn_algorithm(num_clients: int = 5, privacy: GaussianMechanism | None = None) -> HyperNetworkAlgorithm:
    torch.manual_seed(0)
    hn = HyperNetwork(ParamSpec.from_module(target()), num_clients, hidden=16, n_hidden=2).double()
    alg = HyperNetworkAlgorithm(hn, ServerConfig(**PLAIN_SGD))
    alg.privacy = privacy
    return alg


def client_vjp(alg: HyperNetworkAlgorithm, client: int, delta: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """(∂θ_c/∂φ)ᵀ Δ_c from generating client c alone (pFedHN's clients are independent)."""
    params = [p for p in alg.hn.parameters() if p.requires_grad]
    theta = alg.generate([client])
    names = list(theta)
    grads = torch.autograd.grad([theta[n] for n in names], params, [delta[n][None] for n in names], allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def test_hypernetwork_gradient_is_the_sum_of_clipped_per_client_vjps():
    """The oracle: each client's VJP computed on its own, clipped by hand, summed (σ = 0); a
    forged huge delta moves the hypernetwork by exactly C in parameter space."""
    C = 0.05
    alg = make_hn_algorithm(privacy=GaussianMechanism(C, 0.0))
    clients = [0, 2, 3]
    g = torch.Generator().manual_seed(1)
    spec = alg.server_spec
    deltas = {n: 1e-3 * torch.randn(len(clients), *s, generator=g, dtype=torch.float64)
              for n, s in zip(spec.names, spec.shapes)}
    for n in deltas:
        deltas[n][1] *= 1e6  # client 2 forges a huge update
    vjps = [client_vjp(alg, c, {n: d[i] for n, d in deltas.items()}) for i, c in enumerate(clients)]
    norms = [float(flat(v).norm()) for v in vjps]
    assert norms[1] > 100 * C and norms[0] < C and norms[2] < C
    oracle = [sum(v[k] * min(1.0, C / nrm) for v, nrm in zip(vjps, norms)) for k in range(len(vjps[0]))]
    params = [p for p in alg.hn.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    out = alg.apply_updates(clients, deltas, torch.ones(3, dtype=torch.long))
    assert out["dp_clipped_clients"] == 1.0
    for b, p, o in zip(before, params, oracle):  # SGD lr 1, no decay or clipping: φ ← φ − gradient
        torch.testing.assert_close(b - p.detach(), o, rtol=1e-9, atol=1e-12)
    # alone, the forged client's step has norm exactly C
    alone = make_hn_algorithm(privacy=GaussianMechanism(C, 0.0))
    start = flat(p.detach().clone() for p in alone.hn.parameters())
    alone.apply_updates([2], {n: d[1:2] for n, d in deltas.items()}, torch.ones(1, dtype=torch.long))
    assert float((start - flat(p.detach() for p in alone.hn.parameters())).norm()) == pytest.approx(C, rel=1e-9)


def test_noise_std_is_sigma_times_clip_norm_and_seeded():
    sigma, C = 1.3, 0.4
    mech = GaussianMechanism(C, sigma, seed=7)
    zeros = [torch.zeros(4, 100_000), torch.zeros(4, 50)]  # 4 clients, all-zero deltas
    mean, clipped = mech.mean_update(zeros, step=3)
    z = flat(mean) * 4  # the noise on the sum, before dividing by the 4 clients
    assert clipped == 0
    # 100,050 draws: the std's standard error is ~0.22%; the mean's ~0.3% of the std
    assert float(z.std()) == pytest.approx(sigma * C, rel=0.01)
    assert abs(float(z.mean())) < 0.01 * sigma * C
    again, _ = mech.mean_update(zeros, step=3)
    assert torch.equal(flat(again), flat(mean))  # same (seed, step): same noise
    assert not torch.equal(flat(mech.mean_update(zeros, step=4)[0]), flat(mean))
    assert not torch.equal(flat(GaussianMechanism(C, sigma, seed=8).mean_update(zeros, step=3)[0]), flat(mean))
    shifted = GaussianMechanism(C, sigma, seed=7, prior_steps=1)  # a later stage never reuses a stream
    assert torch.equal(flat(shifted.mean_update(zeros, step=2)[0]), flat(mean))


def test_hypernetwork_noise_has_std_sigma_times_clip_norm_on_every_reached_parameter():
    sigma, C = 2.0, 0.1
    alg = make_hn_algorithm(num_clients=5, privacy=GaussianMechanism(C, sigma, seed=3))
    params = [p for p in alg.hn.parameters() if p.requires_grad]
    theta = alg.generate([1, 4])
    names = list(theta)
    grads, clipped = alg.privacy.hypernetwork_gradient([theta[n] for n in names], params,
                                                       [torch.zeros_like(theta[n]) for n in names], step=0)
    assert clipped == 0 and all(g is not None for g in grads)
    z = flat(grads)
    assert z.numel() > 1000  # the std's standard error is below 2%
    assert float(z.std()) == pytest.approx(sigma * C, rel=0.06)
    assert abs(float(z.mean())) < 0.1 * sigma * C


# ---------------------------------------------------------------------------------------------
# configuration

def test_noise_without_clipping_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^privacy\.noise_multiplier: noise needs privacy\.clip_norm > 0"):
        tiny("fedavg", **{"privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match=r"^privacy\.delta: must be in \(0, 1\)"):
        tiny("fedavg", **DP, **{"privacy.delta": 1.0})
    with pytest.raises(ConfigError, match=r"^privacy\.accountant: 'gdp' is not allowed"):
        tiny("fedavg", **DP, **{"privacy.accountant": "gdp"})
    assert not tiny("fedavg").privacy.enabled and tiny("fedavg", **DP).privacy.enabled


@pytest.mark.parametrize("method, changes, match", [
    ("local", {}, r"^privacy\.clip_norm: method 'local' shares nothing"),
    ("attentive", {}, r"^privacy\.clip_norm: method 'attentive' \(AttentiveKeyLayerAlgorithm\) has no"),
    ("fedavg", {"methods.fedavg.aggregation": "median"}, r"^methods\.fedavg\.aggregation: differential privacy"),
])
def test_methods_without_a_private_server_step_are_refused(method, changes, match):
    with pytest.raises(ConfigError, match=match):
        build(tiny(method, **DP, **changes))


# ---------------------------------------------------------------------------------------------
# end to end

@pytest.mark.parametrize("method, changes", [("fedavg", {}), ("pfedhn", {}),
                                             ("panacea", {"graph.kind": "complete"})])
def test_dp_runs_report_epsilon_in_every_record_and_the_summary(tmp_path, method, changes):
    config = tiny(method, **DP, **changes)
    result = run(config, run_dir=tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:  # q = 2 of 4 clients, one step per round, δ = 1e-5
        assert r["epsilon"] == pytest.approx(epsilon(1.0, 0.5, r["round"], 1e-5, "rdp"))
        assert math.isfinite(r["test_accuracy"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"] == {"epsilon": pytest.approx(records[-1]["epsilon"]), "delta": 1e-5,
                                  "noise_multiplier": 1.0, "clip_norm": 0.5, "accountant": "rdp",
                                  "sample_rate": 0.5, "steps": 3}
    assert summary["metrics"]["epsilon"] == pytest.approx(records[-1]["epsilon"])
    assert result.summary["privacy"]["epsilon"] == pytest.approx(records[-1]["epsilon"])


def test_dp_run_is_deterministic_noisy_and_resumes_exactly(tmp_path):
    config = tiny("fedavg", rounds=4, **DP)
    ref = run(config, progress=False)
    again = run(config, progress=False)
    no_noise = run(tiny("fedavg", rounds=4, **{"privacy.clip_norm": 0.5}), progress=False)
    params = lambda r: flat(p.detach() for p in r.algorithm.params)  # noqa: E731
    assert torch.equal(params(ref), params(again))
    assert not torch.equal(params(ref), params(no_noise))
    assert no_noise.history[-1]["epsilon"] == math.inf  # clipping only: no finite ε
    # 2 rounds, then extended to 4 by resuming: the noise stream continues where it stopped
    run(tiny("fedavg", rounds=2, **DP), run_dir=tmp_path / "run", progress=False)
    resumed = run(config, run_dir=tmp_path / "run", resume=True, progress=False)
    assert torch.equal(params(resumed), params(ref))
    assert [h["epsilon"] for h in resumed.history] == [h["epsilon"] for h in ref.history]


def test_the_pipeline_composes_stage_one_into_epsilon():
    """SHN with an inferred graph: stage 1 (pFedHN) ran the mechanism too, so stage 3's ε counts
    its rounds as well."""
    config = tiny("shn", rounds=2, **DP, **{"graph.kind": "knn", "graph.k": 1, "graph.stage1_rounds": 3})
    result = run(config, progress=False)
    assert [h["epsilon"] for h in result.history] == pytest.approx([epsilon(1.0, 0.5, s, 1e-5) for s in (4, 5)])
    assert result.summary["privacy"]["steps"] == 5
    assert result.summary["stage1_metrics"]["epsilon"] == pytest.approx(epsilon(1.0, 0.5, 3, 1e-5))


def test_the_readme_privacy_table_is_a_valid_config():
    from tests.conftest import REPO

    section = (REPO / "README.md").read_text().split("## Client-level differential privacy", 1)[1].split("\n## ", 1)[0]
    (block,) = [b for b in section.split("```toml\n")[1:2]]
    privacy = config_from_dict(tomllib.loads(block.split("```", 1)[0])).privacy
    assert privacy == PrivacyConfig(clip_norm=0.5, noise_multiplier=1.0, delta=1e-5, accountant="rdp")
