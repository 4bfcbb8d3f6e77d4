"""Attack simulation ([attack]): seeded malicious clients, update attacks on the client side (both
engines), label flipping on the train split only, honest-client metrics in the summary."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from shn.config import AttackConfig, ConfigError, config_from_dict
from shn.federated.attacks import ClientAttack, label_permutation, malicious_clients
from shn.runner import build, make_task, run

TINY = {"seed": 0, "rounds": 3, "clients_per_round": 4, "eval_every": 3,
        "task": {"name": "digits", "num_clients": 5, "model": "mlp"}, "local": {"steps": 2, "batch_size": 16}}


def tiny(**attack) -> dict:
    data = json.loads(json.dumps(TINY))
    data["attack"] = attack
    return data


def test_malicious_clients_are_a_seeded_fraction():
    cfg = AttackConfig(kind="scale", fraction=0.2)
    a = malicious_clients(cfg, seed=0, num_clients=10)
    assert len(a) == 2 and list(a) == sorted(a) and all(0 <= c < 10 for c in a)
    assert malicious_clients(cfg, seed=0, num_clients=10) == a
    assert len({malicious_clients(cfg, seed=s, num_clients=10) for s in range(8)}) > 1
    assert malicious_clients(AttackConfig(kind="scale", fraction=0.01), 0, 10) != ()  # at least one
    assert malicious_clients(AttackConfig(kind="none", fraction=0.5), 0, 10) == ()
    assert malicious_clients(AttackConfig(kind="scale", fraction=0.0), 0, 10) == ()
    assert len(malicious_clients(AttackConfig(kind="scale", fraction=1.0), 0, 10)) == 10
    with pytest.raises(ConfigError, match="fraction"):
        AttackConfig(kind="scale", fraction=1.5)


def _deltas(c: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(c, 4, 3, generator=g), "b": torch.randn(c, 3, generator=g)}


@pytest.mark.parametrize("kind, factor", [("scale", 10.0), ("sign_flip", -10.0)])
def test_scale_and_sign_flip_change_only_malicious_rows(kind, factor):
    attack = ClientAttack(AttackConfig(kind=kind, fraction=0.5, scale=10.0), frozenset({2, 7}))
    clients, d = [1, 2, 5, 7], _deltas(4)
    out = attack.corrupt(clients, d, torch.Generator().manual_seed(1))
    for k in d:
        assert torch.equal(out[k][[0, 2]], d[k][[0, 2]])
        torch.testing.assert_close(out[k][[1, 3]], factor * d[k][[1, 3]])
    assert not torch.equal(out["w"], d["w"])  # the input was not modified in place ...
    assert torch.equal(d["w"], _deltas(4)["w"])  # ... at all


def test_random_attack_is_noise_seeded_by_round_and_client_not_by_cohort():
    attack = ClientAttack(AttackConfig(kind="random", fraction=0.5, noise_std=2.0), frozenset({2}))
    gen = lambda: torch.Generator().manual_seed(1234)  # noqa: E731 - the round's local-training generator
    big = attack.corrupt([1, 2, 5], _deltas(3), gen())
    alone = attack.corrupt([2], {k: v[1:2] for k, v in _deltas(3).items()}, gen())
    for k in big:
        assert torch.equal(big[k][1], alone[k][0])  # what Flower's one-client cohort sends
        assert torch.equal(big[k][0], _deltas(3)[k][0])
    other_round = attack.corrupt([2], {k: v[1:2] for k, v in _deltas(3).items()}, torch.Generator().manual_seed(99))
    assert not torch.equal(other_round["w"], alone["w"])
    noise = torch.cat([big[k][1].flatten() for k in big])
    assert 1.0 < float(noise.std()) < 3.5


def test_label_flip_permutes_train_labels_of_malicious_clients_only():
    perm = label_permutation(0, 10)
    assert sorted(perm.tolist()) == list(range(10)) and bool((perm != torch.arange(10)).all())
    cfg = config_from_dict(tiny(kind="label_flip", fraction=0.4))
    built = build(cfg)
    task = make_task(cfg)
    bad = built.runtime.attack.malicious
    assert len(bad) == 2
    for c in range(5):
        ours, truth = built.runtime.store.data[c], task.client_data(c)
        assert torch.equal(ours.train[0], truth.train[0])
        for split in ("val", "test"):
            assert torch.equal(getattr(ours, split)[1], getattr(truth, split)[1])
        if c in bad:
            assert torch.equal(ours.train[1], perm[truth.train[1]])
        else:
            assert torch.equal(ours.train[1], truth.train[1])
    attack = ClientAttack(AttackConfig(kind="label_flip", fraction=0.5), frozenset({0}))
    with pytest.raises(ConfigError, match="classification"):
        attack.poison({0: task.client_data(0)}, 0, None)


def test_summary_reports_honest_clients_and_the_malicious_list(tmp_path):
    result = run(config_from_dict(tiny(kind="sign_flip", fraction=0.4)), run_dir=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    bad = summary["malicious_clients"]
    assert len(bad) == 2 and summary["attack"] == "sign_flip"
    honest = [row["test_accuracy"] for c, row in result.per_client.items() if c not in bad]
    assert summary["honest_test_accuracy"] == pytest.approx(statistics.fmean(honest))
    assert summary["metrics"]["honest_test_accuracy"] == pytest.approx(summary["honest_test_accuracy"])
    assert "honest_test_loss" in summary and "honest_test_accuracy" in result.history[-1]


def test_no_attack_no_attack_keys():
    built = build(config_from_dict(tiny()))
    assert built.runtime.attack is None
    assert "after_training" not in built.context.extras


def test_random_attack_above_the_norm_bound_is_rejected_and_counted():
    data = tiny(kind="random", fraction=0.4, noise_std=100.0)
    data["validation"] = {"max_norm": 1e3}
    result = run(config_from_dict(data), progress=False)
    bad = set(result.summary["malicious_clients"])
    sim = result.extra["simulation"]
    rejected = [r for rs in sim.server.rejections.by_round.values() for r in rs]
    assert rejected and {r.client for r in rejected} <= bad
    assert all("above the bound" in r.reason for r in rejected)
    assert result.summary["rejected_updates"] == len(rejected)


def test_flower_engine_runs_the_same_attack(tmp_path, monkeypatch):
    pytest.importorskip("flwr")
    from shn.flower.engine import run_in_process

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    cfg = config_from_dict(tiny(kind="random", fraction=0.4, noise_std=0.05))
    ref = run(cfg, progress=False)
    got = run_in_process(cfg, run_dir=tmp_path / "run")
    a, b = ref.algorithm.hn.state_dict(), got.algorithm.hn.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    for key in ("honest_test_accuracy", "test_accuracy"):
        assert got.summary["metrics"][key] == pytest.approx(ref.summary["metrics"][key], abs=1e-7)
