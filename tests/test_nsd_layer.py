"""One full SHN diffusion layer (input projection, map learner, normalised sheaf Laplacian,
residual update) against an independent dense float64 computation written here with NSD's
conventions: maps ``F_{u◁uv} = act(W [x_u ‖ x_v])`` — for the orthogonal sheaf the activation is
applied to the Householder parameters, as NSD's learner does — ``Δ = (D + I)^{-1/2} L (D + I)^{-1/2}``
and ``X ← (1 + tanh ε) X − ELU(Δ (I ⊗ W_left) X W_rightᵀ)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shn.sheaf import SheafDiffusion, householder_orthogonal

ACT = {"tanh": torch.tanh, "elu": F.elu, "id": lambda t: t}


def edges() -> torch.Tensor:
    und = [(0, 1), (1, 2), (2, 3), (3, 0), (1, 4), (4, 5), (2, 5)]
    return torch.tensor([[u for u, v in und] + [v for u, v in und], [v for u, v in und] + [u for u, v in und]])


def dense_layer(model: SheafDiffusion, x: torch.Tensor, edge_index: torch.Tensor, kind: str, act: str) -> torch.Tensor:
    d, h = model.stalk_dim, model.hidden_channels
    n = x.shape[0]
    feats = F.elu(x @ model.lin_in.weight.double().T + model.lin_in.bias.double())  # [N, d·h]
    W = model.learners[0].map_linear.weight.double()

    def restriction(u: int, v: int) -> torch.Tensor:
        pre = ACT[act](W @ torch.cat([feats[u], feats[v]]))
        if kind == "diag":
            return torch.diag(pre)
        if kind == "general":
            return pre.view(d, d)
        return householder_orthogonal(pre.view(1, -1), d)[0]

    lap = torch.zeros(n * d, n * d, dtype=torch.float64)
    for u, v in edge_index.t().tolist():
        fu, fv = restriction(u, v), restriction(v, u)
        lap[u * d:(u + 1) * d, v * d:(v + 1) * d] -= fu.T @ fv
        lap[u * d:(u + 1) * d, u * d:(u + 1) * d] += fu.T @ fu
    norm = torch.zeros_like(lap)
    for u in range(n):
        blk = lap[u * d:(u + 1) * d, u * d:(u + 1) * d] + torch.eye(d, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(blk)
        norm[u * d:(u + 1) * d, u * d:(u + 1) * d] = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    delta = norm @ lap @ norm
    layer = model.layers[0]
    X = feats.view(n * d, h)  # node-major stalks: rows u·d … u·d + d − 1 are node u's d×h block
    Y = torch.block_diag(*[layer.left.double()] * n) @ X @ layer.right.double().T
    coeff = (1 + torch.tanh(layer.epsilon.double())).repeat(n).unsqueeze(1)
    return (coeff * X - F.elu(delta @ Y)).view(n, d * h)


@pytest.mark.parametrize("act", ["tanh", "id"])
@pytest.mark.parametrize("kind", ["diag", "orth", "general"])
def test_one_layer_matches_the_dense_nsd_update(kind, act):
    torch.manual_seed(0)
    model = SheafDiffusion(5, stalk_dim=3, hidden_channels=2, layers=1, sheaf_type=kind, edge_weights=False,
                           sheaf_act=act).double()
    with torch.no_grad():  # move every parameter off its special initialisation
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, 5, dtype=torch.float64)
    ei = edges()
    torch.testing.assert_close(model(x, ei), dense_layer(model, x, ei, kind, act), atol=1e-10, rtol=1e-10)


def test_orthogonal_maps_apply_the_activation_to_the_householder_parameters():
    """NSD applies ``sheaf_act`` before the Householder map; ``"id"`` reproduces the unactivated maps."""
    torch.manual_seed(1)
    tanh = SheafDiffusion(5, 3, 2, layers=1, sheaf_type="orth", edge_weights=False).double()
    ident = SheafDiffusion(5, 3, 2, layers=1, sheaf_type="orth", edge_weights=False, sheaf_act="id").double()
    ident.load_state_dict(tanh.state_dict())
    with torch.no_grad():
        tanh.learners[0].map_linear.weight.mul_(5.0)  # large pre-activations: tanh saturates
        ident.learners[0].map_linear.weight.mul_(5.0)
    x = torch.randn(6, 5, dtype=torch.float64)
    assert not torch.allclose(tanh(x, edges()), ident(x, edges()), atol=1e-6)
