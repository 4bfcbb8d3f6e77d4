"""Target networks for the classification tasks.

Plain ``nn.Module`` templates: no client count or data baked in. Engines run them with generated
or stacked weights through ``torch.func.functional_call`` (and ``vmap`` across clients), so they
use no BatchNorm, no in-place ops and no data-dependent control flow. Every model names its last
layer ``head`` (parameters ``head.weight`` / ``head.bias``) so personal-head baselines can keep it
local; ``MLP`` also names its first layer ``input_proj``.
"""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PFedHNCNN", "SmallCNN", "MLP", "make_classifier", "MODEL_NAMES"]

MODEL_NAMES = ("auto", "pfedhn_cnn", "cnn", "mlp")


class PFedHNCNN(nn.Module):
    """pFedHN's ``CNNTarget``: two 5×5 conv + max-pool blocks, then FC 120 → 84 → classes.

    ``width`` scales every hidden width (channels and units; HeteroFL-style nesting: the flatten
    is channel-major, so a narrower model's tensors are leading blocks of a wider one's).
    For 32×32 input and ``n_kernels=16``: Conv(3→16,5) → ReLU → MaxPool2 → Conv(16→32,5) → ReLU →
    MaxPool2 → FC(32·5·5→120) → ReLU → FC(120→84) → ReLU → FC(84→C).

    Input ``[B, in_channels, image_size, image_size]``, output logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, n_kernels: int = 16, image_size: int = 32,
                 width: float = 1.0):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"PFedHNCNN needs image_size >= 16 (two 5x5 convs + pools), got {image_size}")
        k, h1, h2 = scaled(n_kernels, width), scaled(120, width), scaled(84, width)
        self.conv1 = nn.Conv2d(in_channels, k, 5)
        self.conv2 = nn.Conv2d(k, 2 * k, 5)
        self.fc1 = nn.Linear(2 * k * side * side, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.head = nn.Linear(h2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """Two 3×3 conv (padding 1) + max-pool blocks, FC(hidden), head. Sized for 8×8 digits and
    28×28 MNIST (any ``image_size >= 4``); ``width`` scales channels and hidden units.

    Input ``[B, in_channels, image_size, image_size]``, output logits ``[B, num_classes]``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 channels: tuple[int, int] = (16, 32), hidden: int = 64, width: float = 1.0):
        super().__init__()
        side = image_size // 4
        if side < 1:
            raise ValueError(f"SmallCNN needs image_size >= 4 (two 2x2 pools), got {image_size}")
        channels, hidden = (scaled(channels[0], width), scaled(channels[1], width)), scaled(hidden, width)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc1 = nn.Linear(channels[1] * side * side, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.head(x)


class MLP(nn.Module):
    """Fully connected net on flattened input: ``input_proj`` → ReLU → (hidden → ReLU)* → ``head``.

    Input ``[B, *]`` with ``prod(*) == in_features``, output logits ``[B, num_classes]``;
    ``width`` scales the hidden sizes.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128,), width: float = 1.0):
        super().__init__()
        hidden = tuple(scaled(int(h), width) for h in hidden)
        if not hidden:
            raise ValueError("MLP needs at least one hidden layer (input_proj and head are distinct layers)")
        self.input_proj = nn.Linear(in_features, hidden[0])
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:]))
        self.head = nn.Linear(hidden[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.input_proj(x.flatten(1)))
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


def scaled(units: int, width: float) -> int:
    """``units`` hidden channels or units at width multiplier ``width`` (at least 1)."""
    return max(1, int(round(units * width)))


def make_classifier(name: str, in_shape: Sequence[int], num_classes: int, width: float = 1.0) -> nn.Module:
    """Build a target classifier for inputs of shape ``in_shape`` = (C, H, W) (or (features,) for
    ``mlp``).

    ``name``: ``"pfedhn_cnn"`` (pFedHN CNNTarget, square images >= 16 px), ``"cnn"`` (SmallCNN),
    ``"mlp"``, or ``"auto"`` = ``pfedhn_cnn`` for 3×32×32 input, ``cnn`` for other images,
    ``mlp`` for flat input. ``width`` scales every hidden width (1: the published sizes).
    """
    in_shape = tuple(int(s) for s in in_shape)
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    is_image = len(in_shape) == 3
    if name == "auto":
        name = "pfedhn_cnn" if in_shape == (3, 32, 32) else ("cnn" if is_image else "mlp")
    if name == "mlp":
        return MLP(math.prod(in_shape), num_classes, width=width)
    if not is_image or in_shape[1] != in_shape[2]:
        raise ValueError(f"model {name!r} needs square images of shape (C, H, H), got in_shape={in_shape}")
    channels, size = in_shape[0], in_shape[1]
    if name == "pfedhn_cnn":
        return PFedHNCNN(channels, num_classes, image_size=size, width=width)
    return SmallCNN(channels, num_classes, image_size=size, width=width)

