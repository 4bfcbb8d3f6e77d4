"""Tests for shn.sheaf against a slow, dense float64 reference built here from the NSD definitions."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.func import functional_call

from shn.sheaf import (
    RestrictionMaps,
    SheafLaplacian,
    SheafConv,
    SheafDiffusion,
    SheafGraph,
    SheafLearner,
    build_laplacian,
    householder_orthogonal,
    sym_inv_sqrt,
    symmetric_eig,
)

torch.set_num_threads(2)

TYPES = ["diag", "orth", "general"]
D, H = 3, 4


# ---------------------------------------------------------------------------------------------
# helpers and the dense reference
# ---------------------------------------------------------------------------------------------


def random_graph(n: int, m: int, seed: int, isolated: int = 1) -> torch.Tensor:
    """A random undirected graph as a [2, E] edge list with both orientations, no self loops,
    deliberately *unsorted*; the last ``isolated`` nodes have no edges."""
    g = torch.Generator().manual_seed(seed)
    k = n - isolated
    pairs = torch.randint(0, k, (2, m), generator=g)
    pairs = pairs[:, pairs[0] != pairs[1]]
    pairs = torch.unique(torch.sort(pairs, dim=0).values, dim=1)
    both = torch.cat([pairs, pairs.flip(0)], dim=1)
    return both[:, torch.randperm(both.size(1), generator=g)]


def as_matrix(maps: torch.Tensor, kind: str) -> torch.Tensor:
    """[E, d] diagonals or [E, d, d] matrices → [E, d, d]."""
    return torch.diag_embed(maps) if kind == "diag" else maps


def dense_laplacian(maps: RestrictionMaps, weight: torch.Tensor | None = None, normalised: bool = True) -> torch.Tensor:
    """Dense float64 (N·d × N·d) sheaf Laplacian, node-major, straight from the definitions.

    ``weight``: combined per-directed-edge weight c_e (already symmetric) or None.
    """
    graph = maps.graph
    n, d = graph.num_nodes, maps.stalk_dim
    src, tgt, _ = maps.directed()
    src, tgt = as_matrix(src, maps.kind).double().detach(), as_matrix(tgt, maps.kind).double().detach()
    lap = torch.zeros(n * d, n * d, dtype=torch.float64)
    for e, (u, v) in enumerate(graph.edge_index.t().tolist()):
        c = 1.0 if weight is None else float(weight[e])
        fu, fv = src[e], tgt[e]
        lap[u * d : (u + 1) * d, v * d : (v + 1) * d] -= c * fu.T @ fv
        lap[u * d : (u + 1) * d, u * d : (u + 1) * d] += c * fu.T @ fu
    if not normalised:
        return lap
    norm = torch.zeros_like(lap)
    for u in range(n):
        blk = lap[u * d : (u + 1) * d, u * d : (u + 1) * d] + torch.eye(d, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(blk)
        norm[u * d : (u + 1) * d, u * d : (u + 1) * d] = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return norm @ lap @ norm


def combined_weight(maps: RestrictionMaps, external: torch.Tensor | None) -> torch.Tensor | None:
    """c_e = (learned w_e)² · ½(external_uv + external_vu), per directed edge."""
    _, _, learned = maps.directed()
    c = None if learned is None else learned.detach().double().square()
    if external is not None:
        edges = maps.graph.edge_index.t().tolist()
        rev = [edges.index([v, u]) for u, v in edges]
        w = 0.5 * (external.double() + external.double()[rev])
        c = w if c is None else c * w
    return c


def make_maps(kind: str, n: int = 9, seed: int = 0, edge_weights: bool | None = None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    edge_index = random_graph(n, 3 * n, seed)
    learner = SheafLearner(D, H, kind, edge_weights=edge_weights).to(dtype)
    with torch.no_grad():  # larger weights: maps far from trivial
        for p in learner.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    x = torch.randn(n, D * H, generator=g, dtype=dtype)
    graph = SheafGraph.from_edge_index(edge_index, n)
    return learner(x, graph), graph


# ---------------------------------------------------------------------------------------------
# Laplacian vs the dense reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sparse", "gather"])
@pytest.mark.parametrize("weights", ["none", "learned", "external", "both"])
@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("kind", TYPES)
def test_matrix_free_matches_dense(kind, normalised, weights, backend):
    maps, graph = make_maps(kind, edge_weights=weights in ("learned", "both"))
    external = None
    if weights in ("external", "both"):
        # asymmetric on purpose: the builder must symmetrise it
        external = torch.rand(graph.num_edges, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lap = build_laplacian(maps, external, normalised=normalised, backend=backend)
    dense = dense_laplacian(maps, combined_weight(maps, external), normalised)
    x = torch.randn(graph.num_nodes * D, 5, dtype=torch.float64)
    torch.testing.assert_close(lap.apply(x), dense @ x, atol=1e-8, rtol=1e-8)
    # the exposed blocks assemble to the same matrix
    node_blocks, edge_blocks = lap.blocks()
    assembled = torch.zeros_like(dense)
    n = graph.num_nodes
    for u in range(n):
        assembled[u * D : (u + 1) * D, u * D : (u + 1) * D] = node_blocks[u]
    for e, (u, v) in enumerate(graph.edge_index.t().tolist()):
        assembled[u * D : (u + 1) * D, v * D : (v + 1) * D] += edge_blocks[e]
    torch.testing.assert_close(assembled, dense, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("kind", TYPES)
def test_laplacian_symmetric_psd(kind, normalised):
    maps, graph = make_maps(kind, seed=3)
    external = torch.rand(graph.num_edges, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lap = build_laplacian(maps, external, normalised=normalised)
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(graph.num_nodes * D, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(graph.num_nodes * D, 6, generator=gen, dtype=torch.float64)
    # ⟨Δa, b⟩ = ⟨a, Δb⟩ column by column, and xᵀΔx ≥ 0
    torch.testing.assert_close((lap.apply(a) * b).sum(0), (a * lap.apply(b)).sum(0), atol=1e-10, rtol=1e-10)
    assert (a * lap.apply(a)).sum(0).min() >= -1e-10
    dense = dense_laplacian(maps, combined_weight(maps, external), normalised)
    torch.testing.assert_close(dense, dense.T, atol=1e-12, rtol=0)
    evals = torch.linalg.eigvalsh(dense)
    assert evals.min() >= -1e-10
    if normalised:  # augmented normalisation keeps the spectrum inside [0, 2)
        assert evals.max() < 2.0


def test_sheaf_graph_sorts_and_validates():
    edge_index = random_graph(8, 20, seed=1)
    graph = SheafGraph.from_edge_index(edge_index, 8)
    key = graph.row * 8 + graph.col
    assert bool((key[1:] > key[:-1]).all())
    assert torch.equal(edge_index[:, graph.order], graph.edge_index)
    rev = graph.reverse_edges()
    assert torch.equal(graph.edge_index[:, rev], graph.edge_index.flip(0))
    assert torch.equal(graph.ptr[1:] - graph.ptr[:-1], torch.bincount(graph.row, minlength=8))


# ---------------------------------------------------------------------------------------------
# special cases
# ---------------------------------------------------------------------------------------------


def graph_laplacian(edge_index: torch.Tensor, n: int, normalised: bool) -> torch.Tensor:
    a = torch.zeros(n, n, dtype=torch.float64)
    a[edge_index[0], edge_index[1]] = 1.0
    deg = a.sum(1)
    lap = torch.diag(deg) - a
    if normalised:
        s = (deg + 1.0).rsqrt()
        lap = s[:, None] * lap * s[None, :]
    return lap


@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("kind", TYPES)
def test_identity_maps_give_graph_laplacian(kind, normalised):
    n = 10
    graph = SheafGraph.from_edge_index(random_graph(n, 25, seed=4), n)
    e = graph.num_edges  # = 2H: one map per (undirected edge, endpoint)
    if kind == "diag":
        ident = torch.ones(D, e, dtype=torch.float64)
    else:
        ident = torch.eye(D, dtype=torch.float64).unsqueeze(-1).repeat(1, 1, e)
    maps = RestrictionMaps(kind, ident, None, graph)
    lap = build_laplacian(maps, normalised=normalised)
    expected = torch.kron(graph_laplacian(graph.edge_index, n, normalised), torch.eye(D, dtype=torch.float64))
    x = torch.randn(n * D, 3, dtype=torch.float64)
    torch.testing.assert_close(lap.apply(x), expected @ x, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_orthogonal_maps_are_orthogonal(dtype, tol):
    maps, _ = make_maps("orth", dtype=dtype)
    eye = torch.eye(D, dtype=dtype)
    src, tgt, _ = maps.directed()
    for f in (src, tgt):
        assert f.dtype == dtype
        torch.testing.assert_close(f.mT @ f, eye.expand_as(f), atol=tol, rtol=0)
        torch.testing.assert_close(f @ f.mT, eye.expand_as(f), atol=tol, rtol=0)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_householder_matches_torch(d):
    params = torch.randn(50, d * (d - 1) // 2, dtype=torch.float64)
    q = householder_orthogonal(params, d)
    v = torch.eye(d, dtype=torch.float64).repeat(50, 1, 1)
    rows, cols = [], []
    for k in range(d):  # parameters fill the strict lower triangle column by column
        rows += list(range(k + 1, d))
        cols += [k] * (d - 1 - k)
    v[:, rows, cols] = params
    tau = 2.0 / v.square().sum(1)
    torch.testing.assert_close(q, torch.linalg.householder_product(v, tau), atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", [1, 2, 3, 6])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batched_jacobi_eigendecomposition(d, dtype, tol):
    g = torch.Generator().manual_seed(d)
    a = torch.randn(200, d, d, generator=g, dtype=torch.float64)
    a = a @ a.mT
    a[:20] = torch.eye(d, dtype=torch.float64) * 3.0  # repeated eigenvalues
    a[20:40] = torch.diag_embed(torch.rand(20, d, generator=g, dtype=torch.float64))  # already diagonal
    a = a.to(dtype)
    evals, evecs = symmetric_eig(a)
    scale = a.abs().amax()
    torch.testing.assert_close(evecs @ torch.diag_embed(evals) @ evecs.mT, a, atol=tol * scale, rtol=0)
    torch.testing.assert_close(evecs.mT @ evecs, torch.eye(d, dtype=dtype).expand_as(a), atol=tol, rtol=0)
    ref = torch.linalg.eigvalsh(a.double())
    torch.testing.assert_close(evals.sort(-1).values.double(), ref, atol=tol * float(scale), rtol=0)


@pytest.mark.parametrize("batch", [7, 3000])  # LAPACK path and batched-Jacobi path
def test_sym_inv_sqrt_matches_eigh(batch):
    g = torch.Generator().manual_seed(batch)
    a = torch.randn(batch, D, D, generator=g, dtype=torch.float64)
    a = a @ a.mT + torch.eye(D, dtype=torch.float64)
    a[0] = torch.eye(D, dtype=torch.float64) * 4.0
    evals, evecs = torch.linalg.eigh(a)
    ref = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.mT
    torch.testing.assert_close(sym_inv_sqrt(a), ref, atol=1e-12, rtol=1e-12)


def test_sym_inv_sqrt_gradient_with_repeated_eigenvalues():
    a = torch.randn(4, 3, 3, dtype=torch.float64)
    a = a @ a.mT + torch.eye(3, dtype=torch.float64)
    a[0] = 2.0 * torch.eye(3, dtype=torch.float64)  # repeated eigenvalues: eigh's own gradient is inf/nan here
    sym = lambda m: sym_inv_sqrt(0.5 * (m + m.mT))  # noqa: E731 — gradcheck perturbs asymmetrically
    assert torch.autograd.gradcheck(sym, (a.requires_grad_(),))
    out = sym_inv_sqrt(a.detach())
    torch.testing.assert_close(out @ out @ a.detach(), torch.eye(3, dtype=torch.float64).expand(4, 3, 3))


# ---------------------------------------------------------------------------------------------
# the modules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES)
def test_permutation_equivariance(kind):
    n = 11
    torch.manual_seed(0)
    model = SheafDiffusion(5, D, H, layers=2, sheaf_type=kind, edge_weights=True).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    edge_index = random_graph(n, 30, seed=6)
    w = torch.rand(edge_index.size(1), dtype=torch.float64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    inv = torch.argsort(perm)  # new id of old node u is inv[u]
    out = model(x, edge_index, w)
    out_perm = model(x[perm], inv[edge_index], w)
    torch.testing.assert_close(out_perm, out[perm], atol=1e-10, rtol=1e-10)


@pytest.fixture
def one_thread():
    """Tiny sparse-kernel calls fork a thread team each time; on a loaded machine every fork can
    wait a whole scheduler slice. Gradcheck makes thousands of them, so run those single-threaded."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backend", ["sparse", "gather"])
@pytest.mark.parametrize("kind", TYPES)
def test_gradcheck_one_layer(kind, backend):
    """Gradients w.r.t. the input, the external edge weights and every parameter of one layer."""
    n = 5
    torch.manual_seed(1)
    layer = SheafConv(2, 2, kind, edge_weights=True, backend=backend).double()
    graph = SheafGraph.from_edge_index(random_graph(n, 8, seed=2), n)  # prepared once: faster gradcheck
    x = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    ew = torch.rand(graph.num_edges, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def fn(x, ew, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x, graph, ew))

    # Full Jacobian w.r.t. the inputs (their gradient crosses every custom backward: the edge
    # operator's SDDMM, the maps, Householder, the inverse square root); one random direction
    # (fast mode) w.r.t. all parameters together, to keep the test quick.
    assert torch.autograd.gradcheck(lambda x, ew: fn(x, ew, *params), (x, ew), atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(fn, (x, ew, *params), atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["orth", "general"])
def test_gradcheck_large_batch_paths(kind):
    """Fast-mode gradcheck on a graph big enough for the batched Jacobi eigensolver (general) and
    with many Householder maps, through a full two-layer model."""
    n = 1600
    torch.manual_seed(2)
    model = SheafDiffusion(3, 2, 2, layers=1, sheaf_type=kind).double()
    edge_index = random_graph(n, 3 * n, seed=3, isolated=0)
    x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x, edge_index), (x,), fast_mode=True, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", TYPES)
def test_backends_and_edge_orders_agree(kind):
    torch.manual_seed(2)
    model = SheafDiffusion(4, D, H, layers=2, sheaf_type=kind, backend="sparse").double()
    n = 12
    edge_index = random_graph(n, 30, seed=9)
    w = torch.rand(edge_index.size(1), dtype=torch.float64)
    x = torch.randn(n, 4, dtype=torch.float64)
    ref = model(x, edge_index, w)
    for backend in ("gather", "auto"):
        model.backend = backend
        torch.testing.assert_close(model(x, edge_index, w), ref, atol=1e-10, rtol=1e-10)
    model.backend = "sparse"
    shuffle = torch.randperm(edge_index.size(1))
    torch.testing.assert_close(model(x, edge_index[:, shuffle], w[shuffle]), ref, atol=1e-10, rtol=1e-10)
    graph = SheafGraph.from_edge_index(edge_index, n)
    torch.testing.assert_close(model(x, graph, graph.edge_values(w)), ref, atol=1e-10, rtol=1e-10)


def test_learned_weights_default_and_sheaf_type_aliases():
    assert SheafLearner(D, H, "orthogonal").edge_weights
    assert not SheafLearner(D, H, "diagonal").edge_weights
    assert not SheafLearner(D, H, "general").edge_weights
    assert SheafLearner(D, H, "diag", edge_weights=True).edge_weights
    with pytest.raises(ValueError, match="sheaf type"):
        SheafLearner(D, H, "cubic")
    with pytest.raises(ValueError, match="sheaf_act"):
        SheafLearner(D, H, "diag", sheaf_act="relu")


@pytest.mark.parametrize("kind", TYPES)
def test_one_module_many_graph_sizes(kind):
    model = SheafDiffusion(7, D, H, layers=2, sheaf_type=kind)
    assert model.out_dim == D * H
    for n, seed in [(5, 0), (40, 1), (13, 2)]:
        out = model(torch.randn(n, 7), random_graph(n, 2 * n, seed))
        assert out.shape == (n, D * H) and torch.isfinite(out).all()
    # a graph without edges is fine too
    out = model(torch.randn(3, 7), torch.empty(2, 0, dtype=torch.long))
    assert out.shape == (3, D * H)


@pytest.mark.parametrize("nonlinear", [True, False])
def test_layer_outputs(nonlinear):
    torch.manual_seed(3)
    model = SheafDiffusion(6, D, H, layers=3, sheaf_type="general", nonlinear=nonlinear).eval()
    assert len(model.learners) == (3 if nonlinear else 1)
    x, edge_index = torch.randn(9, 6), random_graph(9, 20, seed=3)
    outs = model.layer_outputs(x, edge_index)
    assert len(outs) == 4 and all(o.shape == (9, D * H) for o in outs)
    torch.testing.assert_close(outs[-1], model(x, edge_index))
    torch.testing.assert_close(outs[0], torch.nn.functional.elu(model.lin_in(x)))
    flat = SheafDiffusion(6, D, H, layers=0)
    (only,) = flat.layer_outputs(x, edge_index)
    torch.testing.assert_close(only, flat(x, edge_index))


def test_training_mode_dropout_and_backward():
    model = SheafDiffusion(6, D, H, layers=2, sheaf_type="orth", dropout=0.2, input_dropout=0.1).train()
    x, edge_index = torch.randn(15, 6), random_graph(15, 40, seed=4)
    model(x, edge_index).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bad_inputs():
    model = SheafDiffusion(4, D, H, layers=1)
    x = torch.randn(5, 4)
    good = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    model(x, good)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model(x, torch.tensor([[0, 5], [5, 0]]))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model(x, torch.tensor([[0, -1], [-1, 0]]))
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        model(x, torch.tensor([[0, 1, 2], [1, 0, 1], [2, 2, 0]]))
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        model(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        model(x, good.float())
    with pytest.raises(ValueError, match="both orientations"):
        model(x, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match=r"in_dim"):
        model(torch.randn(5, 3), good)
    with pytest.raises(ValueError, match=r"in_dim"):
        model(torch.randn(5), good)
    with pytest.raises(ValueError, match="edge_weight"):
        model(x, good, torch.ones(3))
    with pytest.raises(ValueError, match="not symmetric"):
        SheafGraph.from_edge_index(torch.tensor([[0, 1, 0, 2], [1, 0, 2, 1]]), 3)
    with pytest.raises(ValueError, match=r"d\*h"):
        SheafLearner(D, H)(torch.randn(5, D * H + 1), good)


def test_self_loops_are_ignored():
    torch.manual_seed(4)
    model = SheafDiffusion(4, D, H, layers=2, sheaf_type="general").double()
    n = 8
    edge_index = random_graph(n, 20, seed=5)
    x = torch.randn(n, 4, dtype=torch.float64)
    loops = torch.arange(3).repeat(2, 1)
    with_loops = torch.cat([edge_index, loops], 1)
    torch.testing.assert_close(model(x, with_loops), model(x, edge_index), atol=1e-12, rtol=1e-12)


def test_blocks_are_symmetric_across_orientations():
    maps, graph = make_maps("general", seed=8)
    lap: SheafLaplacian = build_laplacian(maps, normalised=True)
    _, edge_blocks = lap.blocks()
    rev = graph.reverse_edges()
    torch.testing.assert_close(edge_blocks[rev], edge_blocks.mT, atol=1e-12, rtol=0)


def test_no_graph_sized_state():
    model = SheafDiffusion(4, D, H, layers=2, sheaf_type="general")
    sizes = {name: tuple(t.shape) for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    model(torch.randn(30, 4), random_graph(30, 60, seed=1))
    assert sizes == {name: tuple(t.shape) for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
