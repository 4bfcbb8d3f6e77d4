"""Heterophily studies: :func:`rewire_to_homophily` moves a graph's edge homophily toward a target.

Edge swaps that keep the edge count and never isolate a node, every random choice drawn from
the caller's generator (METHOD.md §6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shn.graph.container import ClientGraph
from shn.graph.diagnostics import _check_one_attribute, _labels, _multi_hot

__all__ = ["rewire_to_homophily"]


def rewire_to_homophily(
    graph: ClientGraph,
    target_h: float,
    *,
    labels: Any = None,
    sets: Any = None,
    generator: torch.Generator,
) -> ClientGraph:
    """Rewire an undirected graph so its edge homophily moves toward ``target_h`` (METHOD.md §6).

    With ``m`` undirected edges of which ``h`` are homophilous (see :func:`edge_homophily`, pass
    ``labels`` or ``sets``), the goal is ``t = round(target_h · m)``. Each swap removes one edge of
    the over-represented kind and adds one absent edge of the other kind, so the edge count is
    kept and homophily moves by exactly one edge toward ``t`` — never past it. Removed edges are
    drawn at random among those whose endpoints keep degree ≥ 1 (no new isolated nodes), added
    edges uniformly among the absent pairs of the needed kind; an excess edge hanging off a
    degree-1 node is instead moved (that node keeps it, the other end moves). Passes repeat
    until ``t`` is met or no swap is possible (e.g. no heterophilous pair exists), so the target
    may be missed when out of reach. The result is symmetric, unweighted and without self loops
    or duplicates; deterministic given ``generator``. Uses an ``[N, N]`` boolean relation: fine
    for a few thousand clients.
    """
    graph.validate_symmetric()
    if graph.is_weighted:
        raise ValueError("rewire_to_homophily works on unweighted graphs (new edges would have no weight)")
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator (every random choice is drawn from it)")
    target_h = float(target_h)
    if not 0.0 <= target_h <= 1.0:
        raise ValueError(f"target_h must be in [0, 1], got {target_h}")
    relation = _homophily_relation(graph.num_nodes, labels, sets, graph.device)  # [N, N] bool
    # Several passes: additions of one pass raise degrees, freeing removals in the next.
    while True:
        rewired, progressed = _rewire_pass(graph, relation, target_h, generator)
        if not progressed:
            return rewired
        graph = rewired


def _homophily_relation(num_nodes: int, labels: Any, sets: Any, device: torch.device) -> Tensor:
    """``[N, N]`` bool: which client pairs would form a homophilous edge."""
    _check_one_attribute(labels, sets)
    if labels is not None:
        lab = _labels(labels, num_nodes, device)
        return lab[:, None] == lab[None, :]
    m = _multi_hot(sets, num_nodes, device).float()
    return (m @ m.T) > 0


def _rewire_pass(
    graph: ClientGraph, relation: Tensor, target_h: float, generator: torch.Generator
) -> tuple[ClientGraph, bool]:
    """One batch of swaps toward ``target_h``; returns the graph and whether anything changed."""
    n = graph.num_nodes
    row, col = graph.edge_index
    upper = row < col
    u, v = row[upper], col[upper]
    m = int(u.numel())
    hom = relation[u, v]
    t = round(target_h * m)
    current = int(hom.sum())
    if m == 0 or current == t:
        return graph, False
    need_hom = current < t

    # additions: absent pairs of the needed kind, in random order
    absent = graph.to_dense(torch.float32) == 0
    cand = torch.triu((relation == need_hom) & absent, diagonal=1).nonzero()
    cand = cand[torch.randperm(cand.shape[0], generator=generator).to(cand.device)]
    budget = min(abs(t - current), int(cand.shape[0]))

    # removals: edges of the excess kind, random priority, keeping every endpoint's degree ≥ 1
    excess = (hom != need_hom).nonzero(as_tuple=True)[0]
    excess = excess[torch.randperm(excess.numel(), generator=generator).to(excess.device)]
    degree = graph.degree()
    removed = _removals_keeping_degree(u[excess], v[excess], degree, budget)
    if removed.numel() == 0:
        return _move_pendant_edge(graph, u[excess], v[excess], relation, need_hom, absent, degree, generator)
    keep = torch.ones(m, dtype=torch.bool, device=graph.device)
    keep[excess[removed]] = False
    added = cand[: removed.numel()]
    pairs = torch.cat([torch.stack([u[keep], v[keep]], dim=1), added], dim=0)
    return ClientGraph.from_edge_list(pairs, n, layout="pairs", symmetrize=True), True


def _move_pendant_edge(
    graph: ClientGraph,
    u: Tensor,
    v: Tensor,
    relation: Tensor,
    need_hom: bool,
    absent: Tensor,
    degree: Tensor,
    generator: torch.Generator,
) -> tuple[ClientGraph, bool]:
    """Fallback when every excess edge ``{a, b}`` (in priority order ``u, v``) has a degree-1
    endpoint: keep that endpoint ``a`` and move the edge's other end from ``b`` (degree ≥ 2) to a
    random ``w`` with ``{a, w}`` of the needed kind. One swap; the outer loop repeats."""
    for a, b in zip(u.tolist(), v.tolist()):  # stops at the first movable edge
        if degree[a] >= 2:
            a, b = b, a
        if degree[a] != 1 or degree[b] < 2:
            continue
        options = ((relation[a] == need_hom) & absent[a]).nonzero(as_tuple=True)[0]
        options = options[options != a]
        if options.numel() == 0:
            continue
        w = int(options[torch.randint(options.numel(), (1,), generator=generator)])
        row, col = graph.edge_index
        drop = ((row == a) & (col == b)) | ((row == b) & (col == a))
        edge_index = torch.cat(
            [graph.edge_index[:, ~drop], torch.tensor([[a, w], [w, a]], device=graph.device)], dim=1
        )
        return ClientGraph(edge_index, graph.num_nodes), True
    return graph, False


def _removals_keeping_degree(u: Tensor, v: Tensor, degree: Tensor, budget: int) -> Tensor:
    """Positions (into the priority-ordered candidates ``u, v``) of up to ``budget`` edges whose
    joint removal leaves every node with degree ≥ 1, preferring earlier candidates.

    Vectorised in rounds: a candidate is taken if, at both endpoints, fewer than ``deg − 1``
    higher-priority candidates share that endpoint — a conservative rule that can never strip a
    node. The top remaining feasible candidate always passes, so each round makes progress.
    """
    c = int(u.numel())
    deg = degree.clone()
    remaining = torch.arange(c, device=u.device)
    chosen: list[Tensor] = []
    while budget > 0 and remaining.numel():
        ru, rv = u[remaining], v[remaining]
        feasible = (deg[ru] >= 2) & (deg[rv] >= 2)
        remaining, ru, rv = remaining[feasible], ru[feasible], rv[feasible]
        r = int(remaining.numel())
        if r == 0:
            break
        # rank of each candidate among the candidates sharing the same endpoint, by priority
        node = torch.cat([ru, rv])
        prio = torch.arange(r, device=u.device).repeat(2)
        order = torch.argsort(node * r + prio)
        counts = torch.bincount(node, minlength=deg.numel())
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(2 * r, device=u.device) - starts[node[order]]
        ok = (rank[:r] < deg[ru] - 1) & (rank[r:] < deg[rv] - 1)
        take = ok.nonzero(as_tuple=True)[0][:budget]
        chosen.append(remaining[take])
        budget -= int(take.numel())
        ends = torch.cat([ru[take], rv[take]])
        deg.index_add_(0, ends, torch.full_like(ends, -1).to(deg.dtype))
        left = torch.ones(r, dtype=torch.bool, device=u.device)
        left[take] = False
        remaining = remaining[left]
    return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long, device=u.device)
