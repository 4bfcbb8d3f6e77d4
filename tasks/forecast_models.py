"""Target networks for the forecasting tasks (traffic, weather).

Both map an input window ``x [B, input_len, F]`` to a multi-horizon forecast
``[B, output_len, T]`` (z-scored targets). They are written so that engines can run many clients
at once with ``torch.func.vmap`` over stacked parameters: the GRU cell is built from ``nn.Linear``
layers (``nn.GRU`` is not vmappable over parameters), there are no in-place ops and no
data-dependent control flow (the loop over time steps has a fixed length).

Layer names are part of the contract: the first layer of every forecaster is ``input_proj`` (the
only layer whose shape depends on the client's feature count, so a "decoupled" method can keep it
personal and share the rest) and the last is ``head``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from shn.seeding import derive_seed

__all__ = ["GRUForecaster", "MLPForecaster", "FORECAST_MODELS", "make_forecaster", "seeded_init_"]

FORECAST_MODELS = ("gru", "mlp")


class GRUForecaster(nn.Module):
    """GRU encoder with a direct multi-horizon head.

    ``input_proj`` (Linear F→hidden, ReLU) embeds every input step; a GRU cell made of two Linear
    layers (``cell_x``: input→3·hidden gates, ``cell_h``: hidden→3·hidden gates; PyTorch's gate
    equations, reset gate applied to ``cell_h``'s candidate part) runs over the ``input_len`` steps;
    ``head`` (Linear hidden→output_len·T) reads all horizons off the final hidden state at once.

    Why a direct head rather than an autoregressive decoder: one matmul instead of ``output_len``
    more recurrent steps (about half the cost on CPU), no exposure bias / teacher forcing to tune,
    and on 1-hour-ahead speed/temperature it trains at least as fast.

    Input ``x [B, input_len, in_features]`` → output ``[B, output_len, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, output_len: int, hidden: int = 32):
        super().__init__()
        for key, value in (("in_features", in_features), ("out_features", out_features),
                           ("output_len", output_len), ("hidden", hidden)):
            if int(value) < 1:
                raise ValueError(f"GRUForecaster: {key} must be >= 1, got {value}")
        self.out_features, self.output_len, self.hidden = int(out_features), int(output_len), int(hidden)
        self.input_proj = nn.Linear(in_features, hidden)
        self.cell_x = nn.Linear(hidden, 3 * hidden)
        self.cell_h = nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, output_len * out_features)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        gates_x = self.cell_x(F.relu(self.input_proj(x)))  # [B, L, 3H], all steps in one matmul
        h = x.new_zeros(batch, self.hidden)
        # unbind, not gates_x[:, t]: each select's backward adds a zero-filled [B, L, 3H] gradient,
        # L of them per step (O(L²) memory traffic; over 200 vmapped clients it dominated W2)
        for gates_t in gates_x.unbind(1):  # fixed length: fine under vmap / torch.compile
            xr, xz, xn = gates_t.chunk(3, dim=-1)
            hr, hz, hn = self.cell_h(h).chunk(3, dim=-1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h
        return self.head(h).reshape(batch, self.output_len, self.out_features)

    def block_index(self, wide: "GRUForecaster") -> dict[str, tuple]:
        """Where this (narrower) forecaster's tensors sit in ``wide``'s: the first hidden units,
        and in ``cell_x`` / ``cell_h`` the first units of each of the three stacked gates (the
        wide GRU with every other weight zero computes this one: its extra units stay at 0)."""
        h, H = self.hidden, wide.hidden
        gates = torch.cat([g * H + torch.arange(h) for g in range(3)])
        out_rows = self.head.out_features
        return {"input_proj.weight": (h, self.input_proj.in_features), "input_proj.bias": (h,),
                "cell_x.weight": (gates, h), "cell_x.bias": (gates,),
                "cell_h.weight": (gates, h), "cell_h.bias": (gates,),
                "head.weight": (out_rows, h), "head.bias": (out_rows,)}


class MLPForecaster(nn.Module):
    """Per-step ``input_proj`` (Linear F→hidden, ReLU) → flatten the window → ``body`` (Linear
    input_len·hidden→hidden, ReLU) → ``head`` (Linear hidden→output_len·T).

    Input ``x [B, input_len, in_features]`` → output ``[B, output_len, out_features]``.
    """

    def __init__(self, in_features: int, input_len: int, out_features: int, output_len: int, hidden: int = 64):
        super().__init__()
        for key, value in (("in_features", in_features), ("input_len", input_len), ("out_features", out_features),
                           ("output_len", output_len), ("hidden", hidden)):
            if int(value) < 1:
                raise ValueError(f"MLPForecaster: {key} must be >= 1, got {value}")
        self.out_features, self.output_len = int(out_features), int(output_len)
        self.input_len, self.hidden = int(input_len), int(hidden)
        self.input_proj = nn.Linear(in_features, hidden)
        self.body = nn.Linear(input_len * hidden, hidden)
        self.head = nn.Linear(hidden, output_len * out_features)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        h = F.relu(self.input_proj(x)).flatten(1)
        h = F.relu(self.body(h))
        return self.head(h).reshape(batch, self.output_len, self.out_features)

    def block_index(self, wide: "MLPForecaster") -> dict[str, tuple]:
        """Where this (narrower) forecaster's tensors sit in ``wide``'s: the first hidden units;
        ``body`` reads the window flattened time-major, so its columns are the first units of
        every step."""
        h, H = self.hidden, wide.hidden
        steps = torch.cat([t * H + torch.arange(h) for t in range(self.input_len)])
        out_rows = self.head.out_features
        return {"input_proj.weight": (h, self.input_proj.in_features), "input_proj.bias": (h,),
                "body.weight": (h, steps), "body.bias": (h,),
                "head.weight": (out_rows, h), "head.bias": (out_rows,)}


def seeded_init_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every ``nn.Linear`` of ``model`` with PyTorch's default rule
    (U(-1/√fan_in, 1/√fan_in) for weight and bias) from a generator seeded by ``(seed, layer
    name)`` (:func:`shn.seeding.derive_seed`).

    So a layer's initial weights depend only on the seed, its name and its shape — not on the
    layers built before it. Two clients whose ``input_proj`` differ in size still get identical
    initial shared layers, and nothing touches the global RNG.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                g = torch.Generator().manual_seed(derive_seed(seed, "forecaster", name))
                bound = 1.0 / math.sqrt(module.in_features)
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) * (2 * bound) - bound)
                if module.bias is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=g) * (2 * bound) - bound)
    return model


def make_forecaster(name: str, in_features: int, input_len: int, out_features: int, output_len: int,
                    hidden: int, seed: int | None = None) -> nn.Module:
    """``"gru"`` → :class:`GRUForecaster`, ``"mlp"`` → :class:`MLPForecaster`; seeded init when
    ``seed`` is given (see :func:`seeded_init_`)."""
    if name == "gru":
        model: nn.Module = GRUForecaster(in_features, out_features, output_len, hidden)
    elif name == "mlp":
        model = MLPForecaster(in_features, input_len, out_features, output_len, hidden)
    else:
        raise ValueError(f"unknown forecasting model {name!r}; allowed: {', '.join(FORECAST_MODELS)}")
    return model if seed is None else seeded_init_(model, seed)
