"""The issue-19 fixes of the hypernetwork server: embeddings learn (summed VJPs, no weight decay on
them), one dropout mask between sending θ and differentiating it, eval-mode evaluation, paired
initialisation across methods, the client-update budget and the stage-1 drift warning."""

from __future__ import annotations

import logging

import pytest
import torch

from shn.config import ServerConfig, load_config
from shn.federated.algorithm import HyperNetworkAlgorithm, eval_weights
from shn.hypernetwork import HyperNetwork, embedding_drift, initial_embeddings
from shn.runner import build, make_task, run
from shn.target import ParamSpec
from tasks.models import MLP

QUICKSTART = "experiments/configs/quickstart.toml"
TINY = ["task.num_clients=6", "clients_per_round=3", 'task.model="mlp"', "rounds=4", "eval_every=2",
        "local.steps=3", "hypernetwork.hidden=16", "hypernetwork.n_hidden=1", "encoder.layers=1"]


def cfg(*overrides: str):
    return load_config(QUICKSTART, TINY + list(overrides))


@pytest.fixture(scope="module")
def task():
    return make_task(cfg())


def hn(dropout: float = 0.0) -> HyperNetwork:
    torch.manual_seed(0)
    spec = ParamSpec.from_module(MLP(6, 3, hidden=(5,)))
    enc = None
    if dropout:
        from shn.config import EncoderConfig
        from shn.encoders import GCNDiffusionEncoder

        enc = GCNDiffusionEncoder(4, EncoderConfig(layers=1, stalk_dim=2, hidden_channels=3, dropout=dropout))
    return HyperNetwork(spec, 7, 4, enc, hidden=16, n_hidden=1)


def test_embeddings_learn_c_times_faster_than_with_the_mean_step(task):
    """Each client's embedding is reached by its own delta only: the summed step moves it C× as far."""
    moved = {}
    for reduction in ("sum", "mean"):
        result = run(cfg(f'server.delta_reduction="{reduction}"', "server.momentum=0.0"), task=task, progress=False)
        e = result.algorithm.hn.embeddings.weight.detach()
        moved[reduction] = embedding_drift(initial_embeddings(0, task.num_clients, e.shape[1]), e)["relative_change"]
    assert moved["sum"] > 2.0 * moved["mean"] > 0


def test_no_weight_decay_on_embeddings_by_default():
    h = hn()
    alg = HyperNetworkAlgorithm(h, ServerConfig(weight_decay=0.1, momentum=0.0, grad_clip=0.0))
    emb, trunk = h.embeddings.weight.detach().clone(), h.trunk[0].weight.detach().clone()
    zeros = {k: torch.zeros_like(v) for k, v in alg.weights_for([0, 1]).items()}
    alg.apply_updates([0, 1], zeros, torch.tensor([1, 1]))
    assert torch.equal(h.embeddings.weight, emb)  # no gradient, no decay
    assert not torch.equal(h.trunk[0].weight, trunk)  # the rest decays
    decayed = HyperNetworkAlgorithm(hn(), ServerConfig(weight_decay=0.1, embed_weight_decay=0.1, momentum=0.0))
    decayed.apply_updates([0, 1], zeros, torch.tensor([1, 1]))
    assert not torch.equal(decayed.hn.embeddings.weight, emb)


def test_one_dropout_mask_between_sending_and_differentiating():
    from shn.graph import complete_graph

    h = hn(dropout=0.5)
    alg = HyperNetworkAlgorithm(h, ServerConfig(), graph=complete_graph(7), seed=3)
    assert not h.training  # evaluation and diagnostics see eval mode
    sent = alg.weights_for([0, 2])
    again = alg.weights_for([0, 2])
    evaluated = eval_weights(alg, [0, 2])
    for k in sent:
        torch.testing.assert_close(sent[k], again[k], rtol=0, atol=0)  # the same mask within a step
    assert any(not torch.equal(sent[k], evaluated[k]) for k in sent)  # dropout active when sending only
    regenerated = alg.generate([0, 2], train=True)  # what apply_updates differentiates
    for k in sent:
        torch.testing.assert_close(regenerated[k].detach(), sent[k], rtol=0, atol=0)
    alg.apply_updates([0, 2], {k: 0.01 * torch.ones_like(v) for k, v in sent.items()}, torch.tensor([1, 1]))
    assert alg.steps == 1 and not h.training


def test_same_seed_same_embeddings_trunk_and_heads_across_methods(task):
    algs = {m: build(cfg(f"method={m!r}".replace("'", '"'), 'graph.kind="complete"'), task=task).algorithm.hn
            for m in ("pfedhn", "ghn", "shn", "panacea")}
    ref = algs["pfedhn"].state_dict()
    for m, h in algs.items():
        state = h.state_dict()
        for k, v in ref.items():
            if k.startswith("trunk.0."):  # reads the encoder's width: differs unless graph_branch = residual
                continue
            torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=lambda s: f"{m} {k}: {s}")
    other_seed = build(cfg("seed=1"), task=task).algorithm.hn.state_dict()
    head = next(k for k in ref if k.startswith("heads."))
    assert not torch.equal(other_seed[head], ref[head])


def test_budget_counts_every_stage_and_each_evaluation(task, tmp_path):
    plain = run(cfg(), task=task, progress=False)
    # (the budget also counts the bytes moved: shn.federated.traffic)
    assert plain.summary["budget"] == {"client_updates": 4 * 3, "bytes_total": plain.history[-1]["bytes_total"]}
    assert [h["client_updates"] for h in plain.history] == [6, 12]
    pipe = run(cfg('method="shn"', 'graph.kind="knn"', "graph.k=2", "graph.stage1_rounds=2", "rounds=2",
                   'hypernetwork.graph_branch="residual"', 'graph.stage3_init="full"'), task=task, progress=False)
    bytes_ = pipe.summary["budget"].pop("bytes_total")
    stage1_bytes, stage3_bytes = pipe.summary["budget"].pop("stage1_bytes_total"), pipe.summary["budget"].pop("stage3_bytes_total")
    assert pipe.summary["budget"] == {"client_updates": 12, "stage1_client_updates": 6, "stage3_client_updates": 6}
    assert bytes_ == stage1_bytes + stage3_bytes and stage1_bytes > 0 and stage3_bytes == pipe.history[-1]["bytes_total"] > 0


def test_stage3_full_init_continues_from_the_stage1_hypernetwork(task):
    pipe = run(cfg('method="shn"', 'graph.kind="knn"', "graph.k=2", "graph.stage1_rounds=2", "rounds=1",
                   "eval_every=1", 'hypernetwork.graph_branch="residual"', 'graph.stage3_init="full"'),
               task=task, progress=False)
    stage1 = run(cfg("rounds=2", "eval_every=1"), task=task, progress=False)
    # stage 3's first evaluation is after one more round; its stage-1 metrics are pFedHN's own
    assert pipe.summary["stage1_metrics"]["test_loss"] == stage1.summary["metrics"]["test_loss"]
    with pytest.raises(Exception, match="graph_branch"):
        run(cfg('method="shn"', 'graph.kind="knn"', "graph.k=2", "graph.stage1_rounds=1", "rounds=1",
                'graph.stage3_init="full"'), task=task, progress=False)


def test_stage1_drift_warning(task, caplog):
    with caplog.at_level(logging.WARNING, logger="shn.pipeline"):
        run(cfg('method="shn"', 'graph.kind="knn"', "graph.k=2", "graph.stage1_rounds=1", "rounds=1",
                "server.embed_lr=1e-9"), task=task, progress=False)
    assert any("mostly reflects their random initialisation" in r.getMessage() for r in caplog.records)
