"""Graph diagnostics: degrees, connected components, edge homophily, Dirichlet energy, Rayleigh quotient.

Plain JSON-serialisable values (``None`` where undefined, e.g. the homophily of a graph without
edges), except the Dirichlet energies, which are 0-dim tensors so that they can be tracked per
layer or used in a loss. :func:`graph_summary` is what the pipeline saves next to a graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shn.graph.container import ClientGraph
from shn.graph.inputs import _INT_DTYPES, _as_tensor

__all__ = ["connected_components", "degree_stats", "dirichlet_energy", "edge_homophily", "feature_similarity",
           "graph_summary", "rayleigh_quotient"]


def degree_stats(graph: ClientGraph) -> dict[str, Any]:
    """Out-degree statistics (the degree, for a symmetric graph): ``min``, ``max``, ``mean``,
    ``median`` (average of the two middle values for even N) and ``isolated`` (degree-0 count;
    in- and out-edges both counted, so a directed sink is not isolated)."""
    deg = graph.degree().double()
    touched = torch.zeros(graph.num_nodes, dtype=torch.bool, device=graph.device)
    touched[graph.edge_index.reshape(-1)] = True
    return {
        "min": int(deg.min()),
        "max": int(deg.max()),
        "mean": float(deg.mean()),
        "median": float(torch.quantile(deg, 0.5)),
        "isolated": int((~touched).sum()),
    }


def connected_components(graph: ClientGraph) -> dict[str, Any]:
    """Connected components, ignoring edge direction.

    Returns ``{"num_components", "labels", "sizes"}``: ``labels[i]`` is the component of node
    ``i``, numbered 0.. in order of each component's smallest node; ``sizes[c]`` its size.
    Min-label propagation with pointer jumping, pure torch, O(E) per sweep.
    """
    n = graph.num_nodes
    row, col = graph.edge_index
    src, dst = torch.cat([row, col]), torch.cat([col, row])
    labels = torch.arange(n, device=graph.device)
    while True:
        # each node takes the smallest label among itself and its neighbours, then jumps
        new = labels.scatter_reduce(0, dst, labels[src], reduce="amin", include_self=True)
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    roots, comp = torch.unique(labels, sorted=True, return_inverse=True)
    sizes = torch.bincount(comp, minlength=roots.numel())
    return {"num_components": int(roots.numel()), "labels": comp.tolist(), "sizes": sizes.tolist()}


def edge_homophily(graph: ClientGraph, labels: Any = None, sets: Any = None) -> dict[str, Any]:
    """Edge homophily: the fraction of edges joining "similar" clients. Pass exactly one of

    * ``labels``: ``[N]`` integer label per client — an edge is homophilous iff its endpoints
      share the label;
    * ``sets``: per-client sets (a sequence of N non-empty iterables of hashables, e.g. each
      client's classes, or an ``[N, C]`` multi-hot tensor) — homophilous iff the sets overlap.
      Also reports ``mean_jaccard``, the mean ``|S_u ∩ S_v| / |S_u ∪ S_v|`` over edges.

    Edges are counted as stored (both orientations of an undirected edge), which for a symmetric
    graph equals the per-undirected-edge fraction. Weights are ignored. Values are ``None`` for
    a graph without edges.

    Returns: ``{"homophily": float | None, "num_edges": int}`` plus ``"mean_jaccard"`` for sets.
    """
    homophilous, jaccard = _edge_similarity(graph, labels, sets)
    e = graph.num_edges
    out: dict[str, Any] = {"homophily": float(homophilous.double().mean()) if e else None, "num_edges": e}
    if jaccard is not None:
        out["mean_jaccard"] = float(jaccard.mean()) if e else None
    return out


def feature_similarity(graph: ClientGraph, features: Any) -> dict[str, Any]:
    """How similar the clients an edge joins are, on a graded scale where homophily is binary: the
    mean cosine similarity of per-client ``features`` (e.g. label distributions) over

    * ``edges``: the graph's edges, as stored (both orientations of an undirected edge);
    * ``chance``: all ordered pairs of distinct clients, what a random graph scores on average;
    * ``oracle``: the ``E`` most similar ordered pairs, ``E`` = the graph's edge count: the most
      any graph with as many edges can score (an upper bound on ``edges``).

    So ``(edges − chance) / (oracle − chance)`` is the share of the attainable gain a graph
    reaches. Values are ``None`` where undefined (no edges, fewer than 2 clients).

    Args:
        graph: the graph over N clients.
        features: ``[N, F]`` per-client features, finite, no all-zero row.
    """
    x = _as_tensor(features, "features").to("cpu", torch.float64)
    n = graph.num_nodes
    if x.dim() != 2 or x.shape[0] != n:
        raise ValueError(f"features must be [num_nodes={n}, F], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("features must be finite")
    norms = x.norm(dim=1)
    if (norms == 0).any():
        raise ValueError(f"features: row {int((norms == 0).nonzero()[0])} is all zeros (cosine undefined)")
    unit = x / norms[:, None]
    e = graph.num_edges
    row, col = graph.edge_index.cpu()
    out: dict[str, Any] = {"edges": float((unit[row] * unit[col]).sum(dim=1).mean()) if e else None,
                           "chance": None, "oracle": None}
    if n >= 2:
        # Σ_{u≠v} ⟨u, v⟩ = ‖Σ_u u‖² − N for unit rows: no N × N matrix
        out["chance"] = float((unit.sum(dim=0).pow(2).sum() - n) / (n * (n - 1)))
        if e:
            out["oracle"] = _top_pairs_mean(unit, min(e, n * (n - 1)))
    return out


def _top_pairs_mean(unit: Tensor, m: int, chunk: int = 1024) -> float:
    """Mean of the ``m`` largest ``⟨u, v⟩`` over ordered pairs ``u ≠ v``, a block of rows at a time
    (memory ``chunk × N + m``): each row contributes at most its ``m`` best, so the running top
    ``m`` of those is the global one."""
    n = unit.shape[0]
    best = unit.new_empty(0)
    for start in range(0, n, chunk):
        block = unit[start:start + chunk] @ unit.T
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = -torch.inf  # not a pair with itself
        top = block.topk(min(m, n - 1), dim=1).values.flatten()
        best = torch.cat([best, top]).topk(min(m, best.numel() + top.numel())).values
    return float(best.mean())


def dirichlet_energy(x: Tensor, graph: ClientGraph, normalized: bool = True) -> Tensor:
    """Dirichlet energy of node features over the graph (0-dim tensor, differentiable).

    normalised (default)::  ½ Σ_{(u,v)∈E} w_uv ‖x_u/√(1+d_u) − x_v/√(1+d_v)‖²
                            = trace(Xᵀ (I − D̃^{-1/2} Ã D̃^{-1/2}) X),  Ã = A + I, D̃ = D + I
    unnormalised::          ½ Σ_{(u,v)∈E} w_uv ‖x_u − x_v‖² = trace(Xᵀ (D − A) X)

    with ``d_u = Σ_v w_uv`` (weighted out-degree) and the sum over stored directed edges, so each
    undirected edge counts once after the ½. The augmented degree ``1 + d_u`` matches GCN's
    normalisation; in the normalised form constant features on a regular graph have zero energy.

    Args:
        x: ``[N]`` or ``[N, *]`` node features (trailing dims are flattened), on the graph's device.
        graph: symmetric graph (the identity above assumes it).
    """
    feats = _node_features(x, graph)
    row, col = graph.edge_index
    w = graph.weights(feats.dtype)
    if normalized:
        deg = torch.zeros(graph.num_nodes, dtype=feats.dtype, device=feats.device).index_add(0, row, w)
        feats = feats * (1.0 + deg).rsqrt().unsqueeze(-1)
    diff = feats[row] - feats[col]
    return 0.5 * (w * diff.pow(2).sum(dim=-1)).sum()


def rayleigh_quotient(x: Tensor, graph: ClientGraph, normalized: bool = True) -> Tensor:
    """Scale-free Dirichlet energy ``dirichlet_energy(x) / ‖x‖²_F`` for over-smoothing plots
    (METHOD.md §6): 0 for features constant on components (of a regular graph, normalised form);
    0 for ``x = 0``. With ``normalized`` it lies in [0, 2) for an undirected graph."""
    feats = _node_features(x, graph)
    energy = dirichlet_energy(feats, graph, normalized)
    sq = feats.pow(2).sum()
    return torch.where(sq > 0, energy / sq.clamp_min(torch.finfo(feats.dtype).tiny), torch.zeros_like(energy))


def graph_summary(graph: ClientGraph, sets: Any = None, labels: Any = None, features: Any = None) -> dict[str, Any]:
    """JSON-serialisable summary to save next to a built graph: sizes, symmetry, degree stats,
    components (count and sizes), if ``labels``/``sets`` are given, edge homophily, and if
    ``features`` are given, :func:`feature_similarity`."""
    symmetric = graph.is_symmetric()
    components = connected_components(graph)
    out: dict[str, Any] = {
        "num_nodes": graph.num_nodes,
        "num_edges": graph.num_edges,
        "num_undirected_edges": graph.num_edges // 2 if symmetric else None,
        "symmetric": symmetric,
        "weighted": graph.is_weighted,
        "degree": degree_stats(graph),
        "components": {"num_components": components["num_components"], "sizes": components["sizes"]},
    }
    if graph.is_weighted and graph.num_edges:
        w = graph.edge_weight.detach().double()
        out["weight"] = {"min": float(w.min()), "max": float(w.max()), "mean": float(w.mean())}
    if labels is not None:
        out["label_homophily"] = edge_homophily(graph, labels=labels)
    if sets is not None:
        out["set_homophily"] = edge_homophily(graph, sets=sets)
    if features is not None:
        out["feature_similarity"] = feature_similarity(graph, features)
    return out


def _node_features(x: Tensor, graph: ClientGraph) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] != graph.num_nodes:
        raise ValueError(f"x must have shape [N, ...] with N = {graph.num_nodes}, got {list(x.shape)}")
    if x.device != graph.device:
        raise ValueError(f"x is on {x.device} but the graph is on {graph.device}")
    feats = x.reshape(graph.num_nodes, -1)
    return feats if feats.is_floating_point() else feats.to(torch.get_default_dtype())


def _multi_hot(sets: Any, num_nodes: int, device: torch.device) -> Tensor:
    """``[N, C]`` bool membership matrix from a multi-hot tensor or a sequence of N iterables."""
    if isinstance(sets, Tensor) or (hasattr(sets, "shape") and hasattr(sets, "dtype")):
        m = _as_tensor(sets, "sets")
        if m.dim() != 2 or m.shape[0] != num_nodes:
            raise ValueError(f"a multi-hot sets tensor must have shape [{num_nodes}, C], got {list(m.shape)}")
        m = m.to(device) != 0
    else:
        members: list[list[Any]] = [list(s) for s in sets]
        if len(members) != num_nodes:
            raise ValueError(f"sets must have one entry per client ({num_nodes}), got {len(members)}")
        vocab = {item: j for j, item in enumerate(sorted({i for s in members for i in s}, key=repr))}
        m = torch.zeros(num_nodes, len(vocab), dtype=torch.bool, device=device)
        for i, s in enumerate(members):  # one pass over clients, not edges
            m[i, [vocab[item] for item in s]] = True
    empty = ~m.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"client {int(empty.nonzero()[0, 0])} has an empty set: overlap is undefined")
    return m


def _labels(labels: Any, num_nodes: int, device: torch.device) -> Tensor:
    lab = _as_tensor(labels, "labels")
    if lab.shape != (num_nodes,):
        raise ValueError(f"labels must have shape [{num_nodes}], got {list(lab.shape)}")
    if lab.dtype not in _INT_DTYPES and lab.dtype != torch.bool:
        raise ValueError(f"labels must be integers, got {lab.dtype}")
    return lab.to(device)


def _check_one_attribute(labels: Any, sets: Any) -> None:
    if (labels is None) == (sets is None):
        raise ValueError("pass exactly one of labels= (one label per client) or sets= (one set per client)")


def _edge_similarity(graph: ClientGraph, labels: Any, sets: Any) -> tuple[Tensor, Tensor | None]:
    """``[E]`` homophilous flags and, for sets, ``[E]`` Jaccard indices."""
    _check_one_attribute(labels, sets)
    row, col = graph.edge_index
    if labels is not None:
        lab = _labels(labels, graph.num_nodes, graph.device)
        return lab[row] == lab[col], None
    m = _multi_hot(sets, graph.num_nodes, graph.device)
    inter = (m[row] & m[col]).sum(dim=1)
    union = (m[row] | m[col]).sum(dim=1)
    return inter > 0, inter.double() / union.double()
