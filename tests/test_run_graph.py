"""The graph of a run (shn.run_graph) from hostile or degenerate input (issue 15 items 19, 21): an
asymmetric graph.json is symmetrised as an adjacency matrix is (with a warning), an empty file or
a graph without edges is one line, and a kNN k beyond the client count warns that the graph is
complete."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from shn.cli import main
from shn.config import ConfigError, config_from_dict, dumps_toml
from shn.run_graph import given_task_graph, infer_graph
from shn.runner import make_task

BASE = {"method": "shn", "seed": 0, "rounds": 1, "clients_per_round": 3, "eval_every": 1,
        "task": {"name": "digits", "num_clients": 4, "model": "mlp"}, "local": {"steps": 1, "batch_size": 16},
        "hypernetwork": {"hidden": 16}, "encoder": {"layers": 1}}


def _config(**graph):
    return config_from_dict({**BASE, "graph": {"kind": "given", **graph}})


@pytest.fixture(scope="module")
def task():
    return make_task(config_from_dict(BASE))


def _graph_json(path, edge_index, num_nodes=4):
    path.write_text(json.dumps({"format": "shn.ClientGraph", "version": 1, "num_nodes": num_nodes,
                                "edge_index": edge_index, "edge_weight": None, "weight_dtype": None}))
    return path


# -- 19: an asymmetric graph.json --------------------------------------------------------------------

def test_asymmetric_graph_json_is_symmetrised_with_a_warning(task, tmp_path, caplog):
    path = _graph_json(tmp_path / "g.json", [[0, 1, 2], [1, 2, 3]])
    with caplog.at_level(logging.WARNING, logger="shn.run_graph"):
        graph = given_task_graph(_config(path=str(path)), task)
    assert graph.is_symmetric() and graph.num_edges == 6
    assert sorted(map(tuple, graph.edge_index.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    assert any("g.json" in r.getMessage() and "not symmetric" in r.getMessage() for r in caplog.records)


def test_asymmetric_graph_json_trains_from_the_command_line(tmp_path, capsys):
    path = _graph_json(tmp_path / "g.json", [[0, 1, 2], [1, 2, 3]])
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml({**BASE, "graph": {"kind": "given", "path": str(path)}}))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0


# -- 21: empty graphs are errors ----------------------------------------------------------------------

@pytest.mark.parametrize("name, content, words", [
    ("empty.csv", "", ["empty.csv", "empty"]),
    ("blank.csv", "\n\n", ["blank.csv", "no numbers"]),
    ("spaces.csv", "\n  \n", ["spaces.csv", "expected a dense numeric"]),
    ("empty.json", "", ["empty.json", "empty"]),
    ("negative.csv", "\n".join([",".join(["-1"] * 4)] * 4), ["negative.csv", "no edges", "complete"]),
    ("zeros.csv", "\n".join([",".join(["0"] * 4)] * 4), ["zeros.csv", "no edges"]),
    ("loops.csv", "\n".join(",".join("1" if i == j else "0" for j in range(4)) for i in range(4)),
     ["loops.csv", "no edges"]),
])
def test_a_graph_file_without_edges_is_one_line(task, tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        given_task_graph(_config(path=str(path)), task)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("graph.path")
    for w in words:
        assert w in msg, (w, msg)


def test_graph_json_without_edges_is_one_line(task, tmp_path):
    path = _graph_json(tmp_path / "none.json", [[], []])
    with pytest.raises(ConfigError, match=r"none.json.*no edges"):
        given_task_graph(_config(path=str(path)), task)


def test_empty_graph_csv_exits_2_from_the_command_line(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml({**BASE, "graph": {"kind": "given", "path": str(tmp_path / "empty.csv")}}))
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty.csv" in err


def test_a_task_relation_graph_without_edges_is_one_line(task, monkeypatch):
    monkeypatch.setattr(task, "relation_adjacency", lambda: torch.zeros(4, 4), raising=False)
    with pytest.raises(ConfigError, match="task 'digits''s relation graph has no edges"):
        given_task_graph(_config(), task)


# -- 21: k beyond the client count -------------------------------------------------------------------

@pytest.mark.parametrize("graph, key", [({"kind": "knn", "k": 50}, "graph.k = 50"),
                                        ({"kind": "learned", "candidate_k": 9}, "graph.candidate_k = 9")])
def test_k_beyond_the_clients_warns_that_the_graph_is_complete(task, caplog, graph, key):
    config = config_from_dict({**BASE, "graph": graph})
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="shn.run_graph"):
        g = infer_graph(config, task, emb, [0, 1, 2, 3])
    assert g.num_edges == 12  # complete over 4 clients
    assert any(key in r.getMessage() and "complete" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shn.run_graph"):
        infer_graph(config_from_dict({**BASE, "graph": {"kind": "knn", "k": 3}}), task, emb, [0, 1, 2, 3])
    assert not caplog.records  # k = N - 1 asks for the complete graph: no warning


def test_dense_npy_adjacency_still_loads(task, tmp_path):
    adj = np.zeros((4, 4))
    adj[0, 1] = adj[2, 3] = 1.0
    np.save(tmp_path / "a.npy", adj)
    graph = given_task_graph(_config(path=str(tmp_path / "a.npy")), task)
    assert graph.num_edges == 4 and graph.is_symmetric()


def test_a_task_knn_graph_with_k_beyond_its_clients_warns(caplog):
    from tasks.client_graph import knn_adjacency

    dist = np.abs(np.subtract.outer(np.arange(4.0), np.arange(4.0)))
    with caplog.at_level(logging.WARNING, logger="tasks.client_graph"):
        adj = knn_adjacency(dist, 9)
    assert int(adj.sum()) == 12
    assert any("graph k = 9" in r.getMessage() and "complete" in r.getMessage() for r in caplog.records)


# -- graph.kind = "labels": the oracle graph of the clients' label distributions ---------------------
def test_label_graph_joins_clients_with_the_same_classes():
    """Digits, 6 clients × 2 classes: in the 1-NN graph of the label distributions every client
    that shares a class with another is joined to one it shares a class with; a held-out client
    gets no edges."""
    from shn.graph import feature_similarity
    from shn.run_graph import resolve_graph

    cfg = config_from_dict({**BASE, "task": {"name": "digits", "num_clients": 6, "model": "mlp"},
                            "graph": {"kind": "labels", "k": 1}})
    task = make_task(cfg)
    graph = resolve_graph(cfg, task)
    sets = task.label_sets()
    assert graph.is_symmetric() and graph.num_edges > 0
    for u in range(6):
        if any(sets[u] & sets[v] for v in range(6) if v != u):
            assert any(sets[u] & sets[v] for v in graph.neighbors(u).tolist())
    sim = feature_similarity(graph, task.label_distributions())
    assert sim["edges"] > sim["chance"]
    held = resolve_graph(cfg, task, held_out=[0])
    assert 0 not in held.edge_index.flatten().tolist() and held.num_nodes == 6


def test_label_graph_on_a_task_without_labels_is_one_error():
    from types import SimpleNamespace

    from shn.run_graph import resolve_graph

    cfg = config_from_dict({**BASE, "graph": {"kind": "labels"}})
    with pytest.raises(ConfigError, match="graph.kind = 'labels' needs a classification task.*'series' has none"):
        resolve_graph(cfg, SimpleNamespace(name="series", num_clients=4))
    with pytest.raises(ConfigError, match="at least 2 training clients"):
        resolve_graph(cfg, make_task(cfg), held_out=[0, 1, 2])


def test_a_run_on_a_graph_it_did_not_infer_records_the_graph(tmp_path):
    """Given / complete / labels graphs land in the summary as an inferred graph does."""
    from shn.runner import run

    cfg = config_from_dict({**BASE, "task": {"name": "digits", "num_clients": 6, "model": "mlp"},
                            "graph": {"kind": "labels", "k": 2}})
    summary = run(cfg, run_dir=tmp_path / "run", progress=False).summary
    graph = summary["graph"]
    assert graph["num_nodes"] == 6 and graph["symmetric"] and graph["degree"]["min"] >= 2
    assert graph["feature_similarity"]["edges"] > graph["feature_similarity"]["chance"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["graph"]["feature_similarity"] == graph["feature_similarity"]
