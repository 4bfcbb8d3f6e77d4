"""Novel-client generalisation (shn/novel.py) for the hypernetwork methods: held-out clients stay
out of training, get a new embedding fitted with the hypernetwork frozen, are attached to the
graph by kNN, and are reported as ``novel_test_*``."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

import baselines  # noqa: F401 - registers the methods
from shn.config import load_config
from shn.federated.algorithm import make_optimizer
from shn.graph import ClientGraph, complete_graph
from shn.novel import _generate, attach, fit_novel_embedding, initial_embedding, novel_weights
from shn.pipeline import _held_out, without_clients
from shn.runner import make_task, run
from shn.seeding import torch_generator

QUICKSTART = "experiments/configs/quickstart.toml"
TINY = ["task.num_clients=6", "clients_per_round=3", 'task.model="mlp"', "rounds=2", "eval_every=2",
        "local.steps=2", "hypernetwork.hidden=16", "hypernetwork.n_hidden=1", 'graph.kind="complete"', "graph.k=2",
        "encoder.layers=1", "novel.fraction=0.34", "novel.steps=3", "novel.reattach_every=2"]


def config(method: str, *overrides: str):
    return load_config(QUICKSTART, TINY + [f"method={method}", *overrides])


@pytest.fixture(scope="module")
def task():
    return make_task(config("pfedhn"))


@pytest.mark.parametrize("method", ["pfedhn", "ghn", "panacea", "shn"])
def test_novel_client_metrics_for_every_hypernetwork_method(method, task, tmp_path):
    cfg = config(method)
    held = _held_out(cfg, task)
    assert len(held) == 2
    result = run(cfg, task=task, run_dir=tmp_path, progress=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["novel_clients"] == held
    for key in ("novel_test_accuracy", "novel_test_loss", "novel_init_test_accuracy"):
        assert math.isfinite(summary[key])
    assert sorted(summary["novel_per_client"]) == [str(c) for c in held]
    # held out of training: never sampled or evaluated with the others, no graph edges
    assert not set(held) & set(result.per_client)
    graph = result.algorithm.graph
    if graph is not None:
        assert not torch.isin(graph.edge_index, torch.tensor(held)).any()
        assert "encoder_dirichlet_energy" in summary


def test_non_hypernetwork_methods_hold_out_the_same_clients(task):
    cfg = config("fedavg")
    result = run(cfg, task=task, progress=False)
    assert set(result.per_client) == set(range(6)) - set(_held_out(cfg, task))
    assert "novel_test_accuracy" not in result.summary


def test_fit_moves_only_the_new_embedding_by_the_pfedhn_step(task):
    cfg = config("pfedhn", "novel.steps=1")
    result = run(cfg, task=task, progress=False)
    alg, runtime = result.algorithm, result.extra["built"].runtime
    c = _held_out(cfg, task)[0]
    pool = sorted(result.per_client)
    frozen = {k: v.clone() for k, v in alg.hn.state_dict().items()}
    e = fit_novel_embedding(alg, runtime, c, pool, cfg)
    assert all(torch.equal(frozen[k], v) for k, v in alg.hn.state_dict().items())  # hypernetwork frozen
    # oracle: one optimiser step on e alone with the VJP of the client's delta
    e0 = initial_embedding(alg, pool).clone().requires_grad_(True)
    assert torch.allclose(e0, alg.hn.embeddings.weight.detach()[pool].mean(0))
    theta = _generate(alg, c, e0, None)
    fit = runtime.fit([c], {k: v.detach() for k, v in theta.items()}, torch_generator(cfg.seed, "novel-local", c, 0))
    (e0.grad,) = torch.autograd.grad(list(theta.values()), [e0], [fit.deltas[k] for k in theta])
    torch.nn.utils.clip_grad_norm_([e0], cfg.server.grad_clip)
    opt = make_optimizer(replace(cfg.server, weight_decay=0.0), [{"params": [e0]}])
    opt.step()
    assert torch.allclose(e, e0.detach(), atol=1e-6) and not torch.allclose(e, initial_embedding(alg, pool))


def test_attach_joins_the_novel_client_to_its_nearest_training_clients():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0], [0.5, 0.5]])
    held = [5]
    pool = [0, 1, 2, 3, 4]
    base = without_clients(complete_graph(6), held)
    graph = attach(base, 5, pool, emb, torch.tensor([0.05, 1.0]), 2, "cosine")
    new = graph.edge_index[:, (graph.edge_index == 5).any(0)]
    assert sorted(new[1][new[0] == 5].tolist()) == [2, 3] and sorted(new[0][new[1] == 5].tolist()) == [2, 3]
    assert graph.num_edges == base.num_edges + 4 and graph.is_symmetric()
    weighted = ClientGraph(base.edge_index, 6, torch.full((base.num_edges,), 0.5))
    assert torch.allclose(attach(weighted, 5, pool, emb, emb[0], 3, "cosine").edge_weight, torch.tensor(0.5))


def test_graph_methods_reattach_by_the_current_embedding(task):
    cfg = config("ghn", "novel.steps=0")
    result = run(cfg, task=task, progress=False)
    alg = result.algorithm
    c, pool = _held_out(cfg, task)[0], sorted(result.per_client)
    table = alg.hn.embeddings.weight.detach()
    near = [novel_weights(alg, c, table[p] + 1e-3, pool, cfg) for p in pool[:2]]
    # a novel client placed on a training client's embedding gets other neighbours → other weights
    assert not torch.allclose(near[0]["head.weight"], near[1]["head.weight"])


def test_novel_clients_through_the_three_stage_pipeline(task, tmp_path):
    cfg = config("shn", 'graph.kind="knn"', "graph.stage1_rounds=1")
    result = run(cfg, task=task, run_dir=tmp_path, progress=False)
    held = _held_out(cfg, task)
    assert result.summary["novel_clients"] == held and math.isfinite(result.summary["novel_test_accuracy"])
    assert len(result.summary["encoder_dirichlet_energy"]) == 2  # input + 1 layer
    stage1 = json.loads((tmp_path / "stage1_pfedhn" / "summary.json").read_text())
    assert "novel_test_accuracy" not in stage1  # stage 1 only supplies embeddings
    assert not torch.isin(result.algorithm.graph.edge_index, torch.tensor(held)).any()
