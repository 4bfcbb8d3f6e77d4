"""The client relation graph: its container, builders, a learned variant and diagnostics.

In personalised FL each client is a node. The server-side hypernetwork diffuses client
embeddings over this graph (METHOD.md §2), and Stage 2 of SHN builds it from the Stage-1 client
embeddings when no a-priori graph exists (METHOD.md §3.3).

Modules (each imports only those above it): :mod:`~shn.graph.inputs` (argument checks, edge-list
parsing), :mod:`~shn.graph.container` (:class:`ClientGraph`), :mod:`~shn.graph.builders` (given,
kNN, threshold, complete, :func:`build_graph`), :mod:`~shn.graph.learned` (:class:`LearnedGraph`),
:mod:`~shn.graph.diagnostics` (degree, components, homophily, Dirichlet energy, Rayleigh
quotient, :func:`graph_summary`) and :mod:`~shn.graph.rewiring` (:func:`rewire_to_homophily`).

Conventions used throughout:

* A :class:`ClientGraph` stores *directed* edges ``edge_index [2, E]``; an undirected graph stores
  both orientations (the layout neural sheaf diffusion and PyG expect). Edges are kept in
  canonical order, sorted by ``(row, col)``, with no self loops and no duplicates.
* Builders are pure, deterministic torch functions: the same input gives the same graph, ties are
  broken by the lower node index, and nothing draws from a global random state.
* Similarities are computed in float64 with an elementwise (not matrix-product) distance kernel so
  that duplicated embeddings produce *exactly* equal scores — with a BLAS matmul two identical
  rows can differ in the last bit, which would make tie-breaking depend on their position.
* Diagnostics return plain, JSON-serialisable Python values (``None`` where a value is undefined,
  e.g. homophily of a graph without edges), except the Dirichlet energies, which return a 0-dim
  tensor so they can be tracked per layer or used in a loss; call ``float()`` for plots.

Decisions (METHOD.md §9, open question 1): kNN on cosine similarity, symmetrised with
``A = max(A, Aᵀ)``, unweighted, ``k = 5`` by default.
"""

from __future__ import annotations

from shn.graph.builders import (
    GRAPH_KINDS,
    METRICS,
    build_graph,
    complete_graph,
    given_graph,
    knn_graph,
    nearest_clients,
    threshold_graph,
)
from shn.graph.container import ClientGraph
from shn.graph.diagnostics import (
    connected_components,
    degree_stats,
    dirichlet_energy,
    edge_homophily,
    feature_similarity,
    graph_summary,
    rayleigh_quotient,
)
from shn.graph.learned import LearnedGraph
from shn.graph.rewiring import rewire_to_homophily

__all__ = [
    "ClientGraph",
    "given_graph",
    "knn_graph",
    "threshold_graph",
    "complete_graph",
    "nearest_clients",
    "LearnedGraph",
    "build_graph",
    "GRAPH_KINDS",
    "METRICS",
    "degree_stats",
    "connected_components",
    "edge_homophily",
    "feature_similarity",
    "dirichlet_energy",
    "rayleigh_quotient",
    "rewire_to_homophily",
    "graph_summary",
]

