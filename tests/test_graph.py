"""Tests for shn/graph.py: the ClientGraph container, builders, LearnedGraph and diagnostics.

Fast paths are checked against small dense oracles computed here in float64."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given as hgiven
from hypothesis import settings
from hypothesis import strategies as st

from shn.graph import (
    feature_similarity,
    GRAPH_KINDS,
    ClientGraph,
    LearnedGraph,
    build_graph,
    complete_graph,
    connected_components,
    degree_stats,
    dirichlet_energy,
    edge_homophily,
    given_graph,
    graph_summary,
    knn_graph,
    nearest_clients,
    rayleigh_quotient,
    rewire_to_homophily,
    threshold_graph,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def undirected(pairs, n, **kw) -> ClientGraph:
    return ClientGraph.from_edge_list(pairs, n, layout="pairs", symmetrize=True, **kw)


def path_graph(n: int) -> ClientGraph:
    return undirected([(i, i + 1) for i in range(n - 1)], n)


def cycle_graph(n: int) -> ClientGraph:
    return undirected([(i, (i + 1) % n) for i in range(n)], n)


def assert_canonical(g: ClientGraph) -> None:
    row, col = g.edge_index
    assert g.edge_index.dtype == torch.long
    assert bool((row != col).all())
    key = row * g.num_nodes + col
    assert bool((key[1:] > key[:-1]).all()), "edges must be strictly sorted by (row, col)"
    if g.num_edges:
        assert int(g.edge_index.min()) >= 0 and int(g.edge_index.max()) < g.num_nodes


# ---------------------------------------------------------------------------------------------
# ClientGraph validation and helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edge_index, num_nodes, match",
    [
        (torch.tensor([[0, 1], [1, 3]]), 3, "out of range"),
        (torch.tensor([[0, -1], [1, 0]]), 3, "out of range"),
        (torch.tensor([[0, 1], [1, 1]]), 3, r"self loop \(1, 1\)"),
        (torch.tensor([[0, 1, 0], [1, 0, 1]]), 3, r"duplicate edge \(0, 1\)"),
        (torch.tensor([[0, 1, 2], [1, 0, 1], [0, 0, 0]]), 3, r"shape \[2, E\]"),
        (torch.tensor([0, 1]), 3, r"shape \[2, E\]"),
        (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 3, "integer dtype"),
        (torch.tensor([[True], [False]]), 3, "integer dtype"),
        ([[0, 1], [1, 0]], 3, "torch.Tensor"),
        (torch.tensor([[0], [1]]), 0, "at least 1"),
        (torch.tensor([[0], [1]]), 2.0, "integer"),
        (torch.tensor([[0], [1]]), True, "integer"),
    ],
)
def test_constructor_rejects_invalid_input(edge_index, num_nodes, match):
    with pytest.raises(ValueError, match=match):
        ClientGraph(edge_index, num_nodes)


@pytest.mark.parametrize(
    "weight, match",
    [
        (torch.tensor([1.0]), r"shape \[E\]"),
        (torch.tensor([1.0, -0.5]), "non-negative"),
        (torch.tensor([1.0, float("nan")]), "finite"),
        (torch.tensor([1, 2]), "floating"),
    ],
)
def test_constructor_rejects_invalid_weights(weight, match):
    with pytest.raises(ValueError, match=match):
        ClientGraph(torch.tensor([[0, 1], [1, 0]]), 2, weight)


def test_constructor_sorts_edges_and_weights():
    edges = torch.tensor([[2, 0, 1, 0], [0, 2, 0, 1]], dtype=torch.int32)
    g = ClientGraph(edges, 3, torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert g.edge_index.tolist() == [[0, 0, 1, 2], [1, 2, 0, 0]]
    assert g.edge_weight.tolist() == [1.0, 3.0, 2.0, 4.0]
    assert g.edge_index.dtype == torch.long
    assert g.num_edges == 4 and g.is_weighted
    assert "num_edges=4" in repr(g)


def test_symmetry_checks_name_the_offending_edge():
    g = ClientGraph(torch.tensor([[0, 1, 1], [1, 0, 2]]), 3)
    assert not g.is_symmetric()
    with pytest.raises(ValueError, match=r"edge \(1, 2\) has no reverse edge \(2, 1\)"):
        g.validate_symmetric()
    w = ClientGraph(torch.tensor([[0, 1], [1, 0]]), 2, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"weight"):
        w.validate_symmetric()
    s = g.symmetrized()
    assert s.is_symmetric() and s.validate_symmetric() is s
    assert s.num_edges == 4
    # A = max(A, Aᵀ) for weights
    ws = ClientGraph(torch.tensor([[0, 1, 1], [1, 0, 2]]), 3, torch.tensor([1.0, 2.0, 0.5])).symmetrized()
    assert ws.to_dense().tolist() == [[0, 2, 0], [2, 0, 0.5], [0, 0.5, 0]]


def test_degree_dense_neighbors_and_device():
    g = undirected([(0, 1), (0, 2), (0, 3)], 5)
    assert g.degree().tolist() == [3, 1, 1, 1, 0]
    assert g.neighbors(0).tolist() == [1, 2, 3] and g.neighbors(4).tolist() == []
    with pytest.raises(ValueError, match="out of range"):
        g.neighbors(5)
    dense = g.to_dense()
    assert torch.equal(dense, dense.T) and dense.sum() == 6
    w = ClientGraph(torch.tensor([[0, 1], [1, 0]]), 2, torch.tensor([0.5, 0.5]))
    assert w.degree(weighted=True).tolist() == [0.5, 0.5]
    moved = g.to("cpu")
    assert torch.equal(moved.edge_index, g.edge_index) and moved.num_nodes == 5


def test_subgraph_relabels_in_given_order():
    g = path_graph(5)  # 0-1-2-3-4
    sub = g.subgraph([3, 2, 4])
    # 3→0, 2→1, 4→2: edges {3,2} and {3,4} survive
    assert sub.num_nodes == 3
    assert sorted(map(tuple, sub.edge_index.T.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    assert_canonical(sub)
    mask = torch.tensor([True, True, False, False, True])
    assert sub_mask_edges(g.subgraph(mask)) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="duplicates"):
        g.subgraph([1, 1])
    with pytest.raises(ValueError, match="range"):
        g.subgraph([7])


def sub_mask_edges(g: ClientGraph) -> list[tuple[int, int]]:
    return [tuple(e) for e in g.edge_index.T.tolist()]


def test_add_node_attaches_a_new_client_with_its_knn():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    g = knn_graph(x, k=1)
    nb = nearest_clients(x, torch.tensor([1.0, 0.05]), k=2)
    assert nb.tolist() == [0, 1]
    g2 = g.add_node(nb)
    assert g2.num_nodes == 5 and g2.is_symmetric()
    assert g2.neighbors(4).tolist() == [0, 1]
    assert g2.num_edges == g.num_edges + 4
    with pytest.raises(ValueError, match="unweighted"):
        g.add_node(nb, edge_weight=[1.0, 1.0])
    wg = knn_graph(x, k=1, weighted=True)
    with pytest.raises(ValueError, match="required"):
        wg.add_node(nb)
    wg2 = wg.add_node(nb, edge_weight=[0.3, 0.2])
    assert wg2.is_symmetric() and wg2.to_dense()[4, 0] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="duplicate"):
        g.add_node([0, 0])


def test_from_edge_list_layouts():
    pairs = [(0, 1), (1, 2), (2, 3)]
    a = ClientGraph.from_edge_list(pairs)
    b = ClientGraph.from_edge_list(torch.tensor(pairs).T, layout="index")
    c = ClientGraph.from_edge_list(np.array(pairs).T)  # [2, 3] → read as an edge index
    assert a.num_nodes == 4 and torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_index, c.edge_index)
    # ambiguous [2, 2] reads as pairs under "auto"
    d = ClientGraph.from_edge_list([[0, 2], [1, 2]])
    assert sub_mask_edges(d) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="num_nodes is required"):
        ClientGraph.from_edge_list([])
    assert ClientGraph.from_edge_list([], num_nodes=3).num_edges == 0
    with pytest.raises(ValueError, match="integer"):
        ClientGraph.from_edge_list([(0.0, 1.0)])
    with pytest.raises(ValueError, match="duplicate"):
        ClientGraph.from_edge_list([(0, 1), (0, 1)], symmetrize=True)
    s = ClientGraph.from_edge_list([(0, 1), (1, 0), (1, 2)], symmetrize=True)
    assert s.is_symmetric() and s.num_edges == 4


def test_index_layout_self_loop_is_rejected():
    # [[0, 2], [1, 2]] as an edge index is 0→1 and 2→2: the self loop must be reported
    with pytest.raises(ValueError, match="self loop"):
        ClientGraph.from_edge_list([[0, 2], [1, 2]], layout="index")


def test_save_load_round_trip(tmp_path):
    g = knn_graph(torch.randn(12, 3, generator=gen(1)), k=3, weighted=True)
    path = g.save(tmp_path / "graph.json")
    back = ClientGraph.load(path)
    assert torch.equal(back.edge_index, g.edge_index) and back.num_nodes == g.num_nodes
    assert back.edge_weight.dtype == g.edge_weight.dtype and torch.equal(back.edge_weight, g.edge_weight)
    u = complete_graph(4)
    assert ClientGraph.load(u.save(tmp_path / "u.json")).edge_weight is None
    assert not (tmp_path / "u.json.tmp").exists()


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"format": "something-else"}),
        json.dumps({"format": "shn.ClientGraph", "version": 1, "num_nodes": 2}),
        json.dumps({"format": "shn.ClientGraph", "version": 1, "num_nodes": 2, "edge_index": [[0], [0]]}),
        json.dumps({"format": "shn.ClientGraph", "version": 1, "num_nodes": 2, "edge_index": [[0, 1], [1]]}),
        json.dumps({"format": "shn.ClientGraph", "version": 1, "num_nodes": 2, "edge_index": [[0.5], [1]]}),
        json.dumps({"format": "shn.ClientGraph", "version": 9, "num_nodes": 2, "edge_index": [[0], [1]]}),
        json.dumps(
            {"format": "shn.ClientGraph", "version": 1, "num_nodes": 2, "edge_index": [[0], [1]],
             "edge_weight": [1.0], "weight_dtype": "int64"}
        ),
    ],
)
def test_load_malformed_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken_graph.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="broken_graph.json"):
        ClientGraph.load(path)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def brute_knn_dense(x: torch.Tensor, k: int, metric: str) -> torch.Tensor:
    x = x.double()
    if metric == "cosine":
        xn = x / x.norm(dim=1, keepdim=True)
        score = xn @ xn.T
    else:
        score = -torch.cdist(x, x)
    score.fill_diagonal_(-float("inf"))
    top = score.topk(k, dim=1).indices
    a = torch.zeros(x.shape[0], x.shape[0])
    a.scatter_(1, top, 1.0)
    return torch.maximum(a, a.T)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_matches_brute_force_and_invariants(metric):
    x = torch.randn(40, 6, generator=gen(2))
    for k in (1, 3, 7):
        g = knn_graph(x, k=k, metric=metric)
        assert_canonical(g)
        assert g.is_symmetric()
        assert int(g.degree().min()) >= k
        assert degree_stats(g)["isolated"] == 0
        assert torch.equal(g.to_dense(), brute_knn_dense(x, k, metric))
        # chunking does not change the result
        assert torch.equal(knn_graph(x, k=k, metric=metric, chunk_size=7).edge_index, g.edge_index)


def test_knn_ties_break_by_lower_index():
    x = torch.ones(6, 3)  # all identical: every score ties
    g = knn_graph(x, k=2)
    # node 0 keeps {1, 2}; every other node keeps the two lowest other indices
    expected = {0: [1, 2], 1: [0, 2], 2: [0, 1], 3: [0, 1], 4: [0, 1], 5: [0, 1]}
    a = torch.zeros(6, 6)
    for i, nbrs in expected.items():
        a[i, nbrs] = 1
    assert torch.equal(g.to_dense(), torch.maximum(a, a.T))
    # duplicated rows at arbitrary positions tie exactly (no BLAS last-bit noise)
    base = torch.randn(50, 5, generator=gen(3))
    base[[10, 30, 45]] = base[3].clone()
    g1 = knn_graph(base, k=1)
    # every node tied between the copies picks the lowest, 3, so the copies hang off node 3 only
    for copy in (10, 30, 45):
        assert g1.neighbors(copy).tolist() == [3]
    assert torch.equal(knn_graph(base, k=1).edge_index, g1.edge_index)


def test_knn_k_validation_and_single_client():
    x = torch.randn(5, 2, generator=gen(4))
    with pytest.raises(ValueError, match="at least 1"):
        knn_graph(x, k=0)
    with pytest.raises(ValueError, match=r"k=5 is too large for 5 clients"):
        knn_graph(x, k=5)
    with pytest.raises(ValueError, match="integer"):
        knn_graph(x, k=2.5)
    with pytest.raises(ValueError, match="metric"):
        knn_graph(x, k=2, metric="manhattan")
    with pytest.raises(ValueError, match="all zeros"):
        knn_graph(torch.cat([x, torch.zeros(1, 2)]), k=2)
    with pytest.raises(ValueError, match="NaN"):
        knn_graph(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), k=1)
    single = knn_graph(torch.ones(1, 4), k=5)
    assert single.num_nodes == 1 and single.num_edges == 0
    assert knn_graph(x, k=4).num_edges == 20  # k = N-1 gives the complete graph


def test_knn_weighted_is_symmetric_similarity():
    x = torch.randn(20, 4, generator=gen(5))
    g = knn_graph(x, k=3, weighted=True)
    assert g.is_symmetric() and g.edge_weight.dtype == x.dtype
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    expected = (xn[g.edge_index[0]] * xn[g.edge_index[1]]).sum(1).clamp_min(0).float()
    assert torch.allclose(g.edge_weight, expected)
    ge = knn_graph(x, k=3, metric="euclidean", weighted=True)
    assert bool(((ge.edge_weight > 0) & (ge.edge_weight <= 1)).all()) and ge.is_symmetric()


def test_threshold_graph_and_isolated_repair():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.95, -0.1], [0.0, 1.0], [-0.2, 1.0], [-1.0, -0.05]])
    g = threshold_graph(x, tau=0.9)
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    s = xn @ xn.T
    dense = g.to_dense()
    above = (s > 0.9) & ~torch.eye(6, dtype=torch.bool)
    assert bool((dense[above] == 1).all())
    # node 5 has no neighbour above tau: it is joined to its nearest neighbour only (node 2)
    nearest = int(torch.where(torch.eye(6, dtype=torch.bool), -2.0, s)[5].argmax())
    assert g.neighbors(5).tolist() == [nearest]
    assert g.is_symmetric() and degree_stats(g)["isolated"] == 0
    # a huge tau leaves only nearest-neighbour edges; a tiny one gives the complete graph
    assert int(threshold_graph(x, tau=2.0).degree().min()) == 1
    assert threshold_graph(x, tau=-2.0).num_edges == 30
    ge = threshold_graph(x, tau=0.3, metric="euclidean")
    d = torch.cdist(x, x)
    assert bool((ge.to_dense()[(d < 0.3) & ~torch.eye(6, dtype=torch.bool)] == 1).all())
    assert degree_stats(ge)["isolated"] == 0
    with pytest.raises(ValueError, match="finite"):
        threshold_graph(x, tau=float("nan"))


def test_complete_graph():
    for n in (1, 2, 7):
        g = complete_graph(n)
        assert g.num_edges == n * (n - 1) and g.is_symmetric()
        assert_canonical(g)


def test_given_graph_from_adjacency_and_edge_list_round_trip():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(8, 2))
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    kernel = np.exp(-(dist**2) / dist.std() ** 2)
    kernel[kernel < 0.4] = 0.0  # sparsified Gaussian kernel, as for road sensors
    g = given_graph(kernel, weighted=True)
    assert g.is_symmetric() and g.num_nodes == 8
    off = kernel.copy()
    np.fill_diagonal(off, 0.0)  # diagonal dropped
    assert np.allclose(g.to_dense(torch.float64).numpy(), off)
    # edge list round trip ([2, E] and [E, 2])
    g2 = given_graph(g.edge_index, num_nodes=8, layout="index")
    g3 = given_graph(g.edge_index.T, num_nodes=8)
    assert torch.equal(g2.edge_index, g.edge_index) and torch.equal(g3.edge_index, g.edge_index)
    # an edge list is cleaned: self loops dropped, duplicates merged, symmetrised
    g4 = given_graph([(0, 0), (0, 1), (0, 1), (2, 1)], num_nodes=4)
    assert sub_mask_edges(g4) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    directed = given_graph([(0, 1)], num_nodes=2, symmetrize=False)
    assert sub_mask_edges(directed) == [(0, 1)]
    # from_adjacency: threshold, torch input, bool input, no symmetrisation
    a = torch.tensor([[0.0, 0.2, 0.9], [0.0, 0.0, 0.0], [0.9, 0.0, 1.0]])
    assert sub_mask_edges(ClientGraph.from_adjacency(a, threshold=0.5)) == [(0, 2), (2, 0)]
    assert sub_mask_edges(ClientGraph.from_adjacency(a, symmetrize=False)) == [(0, 1), (0, 2), (2, 0)]
    assert sub_mask_edges(ClientGraph.from_adjacency(a > 0)) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    with pytest.raises(ValueError, match="square"):
        ClientGraph.from_adjacency(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="edge_weight"):
        given_graph([(0, 1)], weighted=True)
    with pytest.raises(ValueError, match="does not match"):
        given_graph(kernel, num_nodes=5)
    w = given_graph([(0, 1), (1, 0)], weighted=True, edge_weight=[0.5, 2.0])
    assert w.edge_weight.tolist() == [2.0, 2.0]
    assert given_graph(g).edge_weight is None and given_graph(g, weighted=True).is_weighted
    # a float [2, 2] matrix is an adjacency, an integer one two pairs
    assert given_graph(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).num_nodes == 2
    assert given_graph(torch.tensor([[0, 2], [1, 2]])).num_nodes == 3


def test_build_graph_dispatch():
    x = torch.randn(10, 3, generator=gen(6))
    assert torch.equal(build_graph("knn", embeddings=x, k=3).edge_index, knn_graph(x, 3).edge_index)
    assert torch.equal(build_graph("threshold", embeddings=x, tau=0.2).edge_index, threshold_graph(x, 0.2).edge_index)
    assert build_graph("complete", num_nodes=4).num_edges == 12
    assert build_graph("complete", embeddings=x).num_nodes == 10
    assert build_graph("given", given=[(0, 1)], num_nodes=3).num_nodes == 3
    with pytest.raises(ValueError, match="allowed: knn, threshold, given, complete"):
        build_graph("learned", embeddings=x)
    with pytest.raises(ValueError, match="needs embeddings"):
        build_graph("knn")
    with pytest.raises(ValueError, match="num_nodes=5"):
        build_graph("knn", embeddings=x, num_nodes=5)
    assert GRAPH_KINDS == ("knn", "threshold", "given", "complete")


def test_learned_graph_symmetric_bounded_and_differentiable():
    z = torch.randn(12, 4, generator=gen(7), requires_grad=True)
    cand = knn_graph(z.detach(), k=5)
    lg = LearnedGraph(cand, in_features=4, hidden=8, generator=gen(0))
    g = lg(z)
    assert torch.equal(g.edge_index, cand.edge_index)
    w = g.edge_weight
    assert bool(((w > 0) & (w < 1)).all())
    assert g.is_symmetric()  # exact equality w_uv == w_vu
    loss = dirichlet_energy(z, g) + 0.1 * LearnedGraph.l1(g)
    loss.backward()
    assert z.grad is not None and bool(z.grad.abs().sum() > 0)
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lg.parameters())
    # deterministic init from a generator
    lg2 = LearnedGraph(cand, in_features=4, hidden=8, generator=gen(0))
    assert torch.equal(lg2(z).edge_weight, w)
    # temperature sharpens, pruning keeps a symmetric subgraph
    sharp = LearnedGraph(cand, 4, 8, temperature=0.1, generator=gen(0))(z).edge_weight
    assert bool(((sharp - 0.5).abs() >= (w - 0.5).abs() - 1e-6).all())
    pruned = g.pruned(float(w.detach().median()))
    assert pruned.is_symmetric() and 0 < pruned.num_edges <= g.num_edges
    with pytest.raises(ValueError, match="undirected"):
        LearnedGraph(ClientGraph(torch.tensor([[0], [1]]), 2), 4)
    with pytest.raises(ValueError, match=r"shape \[12, 4\]"):
        lg(torch.randn(12, 3))


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_degree_stats_and_components():
    g = undirected([(0, 1), (0, 2), (0, 3), (4, 5)], 7)  # star + edge + isolated node 6
    stats = degree_stats(g)
    assert stats == {"min": 0, "max": 3, "mean": pytest.approx(8 / 7), "median": 1.0, "isolated": 1}
    cc = connected_components(g)
    assert cc["num_components"] == 3
    assert cc["labels"] == [0, 0, 0, 0, 1, 1, 2]
    assert cc["sizes"] == [4, 2, 1]
    # long path: propagation converges to one component
    assert connected_components(path_graph(50))["num_components"] == 1
    # directed edges count as connections both ways
    assert connected_components(ClientGraph(torch.tensor([[2], [0]]), 3))["labels"] == [0, 1, 0]


def test_edge_homophily_exact_values():
    g = path_graph(4)  # edges {0,1}, {1,2}, {2,3}
    assert edge_homophily(g, labels=[0, 0, 1, 1]) == {"homophily": pytest.approx(2 / 3), "num_edges": 6}
    sets = [{0, 1}, {1, 2}, {3}, {3, 4}]
    out = edge_homophily(g, sets=sets)
    assert out["homophily"] == pytest.approx(2 / 3)
    assert out["mean_jaccard"] == pytest.approx((1 / 3 + 0 + 1 / 2) / 3)
    multi_hot = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert edge_homophily(g, sets=multi_hot) == out
    assert edge_homophily(complete_graph(3), labels=torch.tensor([5, 5, 5]))["homophily"] == 1.0
    assert edge_homophily(ClientGraph(torch.zeros(2, 0, dtype=torch.long), 3), labels=[0, 1, 2])["homophily"] is None
    with pytest.raises(ValueError, match="exactly one"):
        edge_homophily(g)
    with pytest.raises(ValueError, match="exactly one"):
        edge_homophily(g, labels=[0, 0, 1, 1], sets=sets)
    with pytest.raises(ValueError, match="empty set"):
        edge_homophily(g, sets=[{0}, set(), {1}, {2}])
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        edge_homophily(g, labels=[0, 1])


def test_feature_similarity_against_dense_loops():
    # two clusters of label distributions; a path graph joins them across the middle
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]], dtype=torch.float64)
    cos = lambda u, v: float(feats[u] @ feats[v] / (feats[u].norm() * feats[v].norm()))  # noqa: E731
    out = feature_similarity(path_graph(4), feats)
    assert out["edges"] == pytest.approx((cos(0, 1) + cos(1, 2) + cos(2, 3)) / 3)
    pairs = [(u, v) for u in range(4) for v in range(4) if u != v]
    assert out["chance"] == pytest.approx(sum(cos(u, v) for u, v in pairs) / len(pairs))
    top = sorted((cos(u, v) for u, v in pairs), reverse=True)[:6]  # as many ordered pairs as the graph's edges
    assert out["oracle"] == pytest.approx(sum(top) / 6)
    assert out["oracle"] >= out["edges"] > out["chance"]
    # the graph of the true clusters reaches the oracle, a graph across them stays below chance
    clusters = undirected([(0, 1), (2, 3)], 4)
    across = undirected([(0, 2), (1, 3)], 4)
    assert feature_similarity(clusters, feats)["edges"] == pytest.approx(feature_similarity(clusters, feats)["oracle"])
    assert feature_similarity(across, feats)["edges"] < out["chance"]
    assert feature_similarity(ClientGraph(torch.zeros(2, 0, dtype=torch.long), 4), feats)["edges"] is None
    with pytest.raises(ValueError, match="all zeros"):
        feature_similarity(path_graph(4), torch.tensor([[1.0, 0], [0, 0], [0, 1], [1, 1]]))
    with pytest.raises(ValueError, match=r"\[num_nodes=4, F\]"):
        feature_similarity(path_graph(4), torch.ones(3, 2))
    with pytest.raises(ValueError, match="finite"):
        feature_similarity(path_graph(4), torch.tensor([[1.0, float("nan")]] * 4))


def dense_energy(x: torch.Tensor, g: ClientGraph, normalized: bool) -> torch.Tensor:
    a = g.to_dense(torch.float64)
    x = x.double().reshape(g.num_nodes, -1)
    if normalized:
        a_aug = a + torch.eye(g.num_nodes, dtype=torch.float64)
        d_inv_sqrt = a_aug.sum(1).rsqrt()
        lap = torch.eye(g.num_nodes, dtype=torch.float64) - d_inv_sqrt[:, None] * a_aug * d_inv_sqrt[None, :]
    else:
        lap = torch.diag(a.sum(1)) - a
    return torch.trace(x.T @ lap @ x)


@pytest.mark.parametrize("normalized", [True, False])
def test_dirichlet_energy_matches_dense_laplacian(normalized):
    x = torch.randn(15, 3, generator=gen(8), dtype=torch.float64)
    unweighted = knn_graph(torch.randn(15, 4, generator=gen(9)), k=3)
    weighted = knn_graph(torch.randn(15, 4, generator=gen(9)), k=3, metric="euclidean", weighted=True)
    for g in (unweighted, weighted):
        assert torch.allclose(dirichlet_energy(x, g, normalized), dense_energy(x, g, normalized))
    # [N] features and [N, d, h] features are flattened per node
    energy_1d = dirichlet_energy(x[:, 0], unweighted, normalized)
    assert torch.allclose(energy_1d, dense_energy(x[:, :1], unweighted, normalized))
    x3 = x.reshape(15, 3, 1).expand(15, 3, 2)
    assert torch.allclose(dirichlet_energy(x3, unweighted, normalized), 2 * dense_energy(x, unweighted, normalized))


def test_dirichlet_energy_zero_cases_and_rayleigh_quotient():
    const = torch.full((8, 3), 2.5)
    assert dirichlet_energy(const, cycle_graph(8)) == 0  # regular graph, normalised form
    assert dirichlet_energy(const, complete_graph(8)) == 0
    star = undirected([(0, i) for i in range(1, 6)], 6)
    assert dirichlet_energy(torch.ones(6, 2), star, normalized=False) == 0
    assert dirichlet_energy(torch.ones(6, 2), star, normalized=True) > 0  # degrees differ
    x = torch.randn(8, 4, generator=gen(10))
    r = rayleigh_quotient(x, cycle_graph(8))
    assert torch.allclose(r, rayleigh_quotient(10 * x, cycle_graph(8)))
    assert 0 <= float(r) < 2
    assert float(rayleigh_quotient(torch.zeros(8, 4), cycle_graph(8))) == 0.0
    # alternating signs on an even cycle: the highest-frequency signal
    alt = torch.tensor([1.0, -1.0] * 4).unsqueeze(1)
    assert float(rayleigh_quotient(alt, cycle_graph(8))) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match=r"shape \[N, \.\.\.\]"):
        dirichlet_energy(torch.randn(5, 2), cycle_graph(8))


@pytest.mark.parametrize("target", [0.0, 0.25, 0.8, 1.0])
def test_rewire_moves_homophily_toward_target(target):
    x = torch.randn(40, 5, generator=gen(11))
    g = knn_graph(x, k=3)
    labels = torch.randint(0, 4, (40,), generator=gen(12))
    before = edge_homophily(g, labels=labels)["homophily"]
    r = rewire_to_homophily(g, target, labels=labels, generator=gen(13))
    after = edge_homophily(r, labels=labels)["homophily"]
    assert r.num_edges == g.num_edges and r.is_symmetric()
    assert_canonical(r)
    assert degree_stats(r)["isolated"] == 0
    m = g.num_edges // 2
    assert abs(after - target) <= abs(before - target)
    assert abs(after - target) <= 0.5 / m + 1e-12  # reachable here: within rounding of target
    again = rewire_to_homophily(g, target, labels=labels, generator=gen(13))
    assert torch.equal(again.edge_index, r.edge_index)


def test_rewire_with_sets_and_limits():
    x = torch.randn(30, 4, generator=gen(14))
    g = knn_graph(x, k=3)
    classes = torch.randint(0, 10, (30, 2), generator=gen(15))
    sets = [set(row.tolist()) for row in classes]
    before = edge_homophily(g, sets=sets)["homophily"]
    r = rewire_to_homophily(g, 0.0, sets=sets, generator=gen(0))
    assert edge_homophily(r, sets=sets)["homophily"] < before
    assert r.num_edges == g.num_edges and degree_stats(r)["isolated"] == 0
    # unreachable target: all labels equal, so no heterophilous pair exists — graph unchanged
    same = rewire_to_homophily(g, 0.0, labels=torch.zeros(30, dtype=torch.long), generator=gen(0))
    assert torch.equal(same.edge_index, g.edge_index)
    with pytest.raises(ValueError, match="unweighted"):
        rewire_to_homophily(knn_graph(x, 3, weighted=True), 0.5, labels=classes[:, 0], generator=gen(0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rewire_to_homophily(g, 1.5, labels=classes[:, 0], generator=gen(0))
    with pytest.raises(ValueError, match="undirected"):
        rewire_to_homophily(ClientGraph(torch.tensor([[0], [1]]), 2), 0.5, labels=[0, 1], generator=gen(0))


def test_graph_summary_is_json_serialisable(tmp_path):
    g = knn_graph(torch.randn(16, 3, generator=gen(16)), k=3, weighted=True)
    labels = torch.arange(16) % 3
    summary = graph_summary(g, sets=[{int(l), int(l) + 1} for l in labels], labels=labels)
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text)["num_nodes"] == 16
    assert summary["symmetric"] and summary["num_undirected_edges"] == g.num_edges // 2
    assert summary["components"]["num_components"] >= 1
    assert set(summary["set_homophily"]) == {"homophily", "num_edges", "mean_jaccard"}


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------

_pairs = st.lists(st.tuples(st.integers(-2, 9), st.integers(-2, 9)), max_size=25)


@settings(max_examples=150, deadline=None)
@hgiven(
    pairs=_pairs,
    num_nodes=st.one_of(st.integers(-1, 10), st.just(3.0), st.just(True)),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.float32, torch.bool]),
    weighted=st.booleans(),
    transpose=st.booleans(),
)
def test_constructor_accepts_canonical_or_raises_value_error(pairs, num_nodes, dtype, weighted, transpose):
    t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    t = t.to(dtype)
    edge_index = t if transpose else t.T  # transpose=True gives a wrongly shaped [E, 2] input
    weight = torch.linspace(0, 1, t.shape[0]) if weighted else None
    try:
        g = ClientGraph(edge_index, num_nodes, weight)
    except ValueError:
        return
    assert_canonical(g)
    assert isinstance(g.num_nodes, int) and g.num_nodes >= 1
    given_pairs = [tuple(p) for p in edge_index.long().T.tolist()]  # as read: columns are edges
    assert g.num_edges == len(given_pairs)
    # the stored edge set equals the input's, weights travelling with their edges
    got = {(u, v): i for i, (u, v) in enumerate(g.edge_index.T.tolist())}
    assert set(got) == set(given_pairs)
    if weighted:
        for j, pair in enumerate(given_pairs):
            assert float(g.edge_weight[got[pair]]) == float(weight[j])


@settings(max_examples=100, deadline=None)
@hgiven(pairs=_pairs, num_nodes=st.integers(1, 10))
def test_from_edge_list_symmetrize_is_symmetric_or_raises(pairs, num_nodes):
    try:
        g = ClientGraph.from_edge_list(pairs, num_nodes, layout="pairs", symmetrize=True)
    except ValueError:
        return
    assert_canonical(g)
    assert g.is_symmetric()
    assert torch.equal(g.to_dense(), g.to_dense().T)
    # where the strict constructor accepts, the lenient given_graph agrees
    lenient = given_graph(torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), num_nodes, layout="pairs")
    assert torch.equal(lenient.edge_index, g.edge_index)


@settings(max_examples=40, deadline=None)
@hgiven(
    n=st.integers(2, 12),
    k=st.integers(1, 11),
    seed=st.integers(0, 2**16),
    duplicates=st.booleans(),
    metric=st.sampled_from(["cosine", "euclidean"]),
)
def test_knn_properties(n, k, seed, duplicates, metric):
    x = torch.randn(n, 3, generator=gen(seed))
    if duplicates:
        x[n // 2 :] = x[0].clone()
    if k > n - 1:
        with pytest.raises(ValueError):
            knn_graph(x, k, metric)
        return
    g = knn_graph(x, k, metric)
    assert_canonical(g)
    assert g.is_symmetric() and int(g.degree().min()) >= k
    assert torch.equal(knn_graph(x, k, metric, chunk_size=3).edge_index, g.edge_index)


def test_feature_similarity_oracle_by_blocks_equals_the_dense_top_pairs():
    from shn.graph.diagnostics import _top_pairs_mean

    x = torch.rand(37, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    sim = (unit @ unit.T)[~torch.eye(37, dtype=torch.bool)]
    for m in (1, 60, 37 * 36):
        dense = float(sim.topk(m).values.mean())
        assert all(_top_pairs_mean(unit, m, chunk) == pytest.approx(dense, abs=1e-12) for chunk in (1, 5, 1024))
