"""Neural sheaf diffusion (Bodnar et al., NeurIPS 2022): the hot path of the SHN encoder.

The package keeps NSD's three ideas apart, each taking the graph at call time:

1. :class:`SheafLearner` — features + edges → restriction maps ``F_{u◁uv} = act(W [x_u ‖ x_v])``
   of type ``"diag"``, ``"orth"`` or ``"general"`` (:class:`RestrictionMaps`).
2. :func:`build_laplacian` — maps + edges → :class:`SheafLaplacian`, a *matrix-free* (optionally
   normalised) sheaf Laplacian ``Δ = (D+I)^{-1/2} L (D+I)^{-1/2}`` kept as per-edge and per-node
   ``d×d`` blocks (memory ``O(E·d²)``), never as an ``N·d × N·d`` matrix.
3. :class:`SheafDiffusionLayer` — ``X ← (1 + tanh ε) ⊙ X − ELU(Δ (I ⊗ W_left) X W_rightᵀ)``.

:class:`SheafConv` is one nonlinear NSD layer (1 + 2 + 3) and :class:`SheafDiffusion` the encoder
(input projection, ``L`` layers, readout).

Conventions
-----------
* ``edge_index`` is ``[2, E]`` with **both orientations** of every undirected edge (``E`` counts
  directed edges), as in PyG and NSD. Self loops are dropped (a loop contributes nothing to a
  sheaf Laplacian). :class:`SheafGraph` sorts and validates the edges once per call; callers running
  many passes on one graph may build it once and pass it instead of ``edge_index``.
* A node feature is ``d`` stalk dimensions × ``h`` channels. Public tensors are node-major,
  ``[N, d·h]`` or ``[N·d, h]`` (NSD's layout). Internally the diffusion state is *stalk-major*
  (``[d, N, h]``) and per-edge quantities are *component-major* (``[d, d, E]``: one contiguous
  vector per matrix entry), so every per-edge step is a handful of vectorised elementwise ops —
  batched ``bmm``/``einsum`` on millions of 3×3 blocks is an order of magnitude slower on CPU.

Why it is fast (see ``tests/benchmarks/test_bench_sheaf.py``):

* ``W [x_u ‖ x_v] = W_l x_u + W_r x_v``: both halves are applied once per *node*; per edge only a
  gather and an add remain (no ``[E, 2dh]`` concatenation).
* Maps are computed once per *undirected* edge ``{u<v}`` for both endpoints (NSD computes each
  map twice, once per orientation) and the block ``T_vu = T_uvᵀ`` is reused for the reverse edge.
* The edge part of ``Δ`` is applied by the sparse-dense product built into torch: the per-edge
  block entries are the value array of a CSR matrix whose structure is the graph's own adjacency
  (one fused gather–multiply–scatter; ``torch.sparse.mm`` / ``sampled_addmm``; no torch_sparse).
  The operator is symmetric, so its backward is the same product plus one sampled dense–dense
  product for the block gradients. ``backend="gather"`` is the plain ``index_select``/multiply/
  ``index_add_`` formulation, used for small graphs (as fast, and it does not start a thread team
  per call) and on devices or dtypes without sparse CSR kernels.
* Small per-edge matrix products, the Householder map and the inverse square root have
  hand-written backward passes (autograd through per-entry indexing would allocate a zero tensor
  of the full operand size per slice), and no op goes through MKL VML (``tanh``, ``sqrt``), which
  is slower than the alternatives and starts a thread team even for tiny inputs.
* The general normalisation needs ``(D_u + I)^{-1/2}`` for each node's ``d×d`` block: a batched
  cyclic Jacobi eigensolver for many nodes (elementwise across nodes; LAPACK ``eigh`` for few) and
  an exact, jitter-free backward (Daleckii–Krein), instead of ``N`` LAPACK calls plus autograd
  through ``eigh``.

Modules (each imports only those above it):

* :mod:`shn.sheaf.graph` — :class:`SheafGraph` (edge list, undirected pairing, CSR index cache);
* :mod:`shn.sheaf.linalg` — component-major kernels: matrix product, Jacobi eigensolver,
  inverse square root, ``tanh``;
* :mod:`shn.sheaf.maps` — sheaf types, :class:`SheafLearner`, :class:`RestrictionMaps`, Householder maps;
* :mod:`shn.sheaf.laplacian` — :func:`build_laplacian`, :class:`SheafLaplacian`, the edge operators;
* :mod:`shn.sheaf.layers` — :class:`SheafDiffusionLayer`, :class:`SheafConv`, :class:`SheafDiffusion`.

Cost per layer (``N`` nodes, ``E`` directed edges): ``O(N·d·h·(p + h) + E·d²·h)`` time,
``O(E·d² + N·d·h)`` memory.
"""

from __future__ import annotations

from shn.sheaf.graph import SheafGraph
from shn.sheaf.laplacian import SheafLaplacian, build_laplacian
from shn.sheaf.layers import SheafConv, SheafDiffusion, SheafDiffusionLayer
from shn.sheaf.linalg import sym_inv_sqrt, symmetric_eig
from shn.sheaf.maps import SHEAF_TYPES, RestrictionMaps, SheafLearner, canonical_sheaf_type, householder_orthogonal

__all__ = [
    "SHEAF_TYPES",
    "SheafGraph",
    "RestrictionMaps",
    "SheafLaplacian",
    "SheafLearner",
    "SheafDiffusionLayer",
    "SheafConv",
    "SheafDiffusion",
    "build_laplacian",
    "canonical_sheaf_type",
    "householder_orthogonal",
    "sym_inv_sqrt",
    "symmetric_eig",
]
