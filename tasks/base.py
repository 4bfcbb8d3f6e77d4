"""The task protocol: what a federated task hands to the engines.

A task owns the clients' data (already split into train / val / test tensors), a factory for
the *target model* (the network each client runs), the training loss and the evaluation
metrics. Engines never look inside the tensors beyond "the first tensor is the model input".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

# A split of one client: (inputs, *targets). Classification: (x, y). Forecasting with
# missing values: (x, y, mask). The first tensor is the model input; the rest go to the loss.
Split = tuple[Tensor, ...]


@dataclass(frozen=True)
class ClientData:
    """One client's data, every tensor with the sample dimension first."""

    train: Split
    val: Split
    test: Split

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            if not isinstance(split, tuple) or len(split) < 2:
                raise ValueError(f"ClientData.{name} must be a tuple (inputs, targets, ...), got {type(split).__name__}")
            n = {int(t.shape[0]) for t in split}
            if len(n) != 1:
                raise ValueError(f"ClientData.{name}: tensors disagree on the number of samples {sorted(n)}")

    @property
    def num_train(self) -> int:
        return int(self.train[0].shape[0])

    def to(self, device: torch.device | str) -> "ClientData":
        move = lambda split: tuple(t.to(device) for t in split)  # noqa: E731
        return ClientData(move(self.train), move(self.val), move(self.test))


@runtime_checkable
class Task(Protocol):
    """What every engine needs from a task.

    ``loss(output, *targets)`` must be written with tensor ops only (no ``.item()``, no data-
    dependent Python control flow) so that it can run under ``torch.func.vmap``; it returns
    the mean loss of the batch as a 0-d tensor.

    ``metrics(output, *targets)`` returns *sums* over the given samples (e.g. ``{"correct": 17.,
    "count": 32.}`` or ``{"sq_err": ..., "count": ...}``); ``finalize`` turns accumulated sums
    into reported metrics (``accuracy``, ``mse`` ...). Sums let the engines evaluate in chunks and
    pool over clients without losing precision.
    """

    name: str
    num_clients: int

    def client_data(self, client: int) -> ClientData: ...

    def make_model(self, client: int | None = None) -> nn.Module:
        """The target network. ``client`` is given for tasks whose clients differ in input
        size (personal input layers); ``None`` asks for the shared architecture."""
        ...

    def loss(self, output: Tensor, *targets: Tensor) -> Tensor: ...

    def metrics(self, output: Tensor, *targets: Tensor) -> dict[str, Tensor]: ...

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]: ...


def client_attribute(task: Task, name: str) -> Sequence | None:
    """An optional per-client attribute a task may expose (e.g. ``label_sets``, ``groups``,
    ``coordinates``), used by graph diagnostics and reports. ``None`` when the task has none."""
    value = getattr(task, name, None)
    return value() if callable(value) else value


def label_frequencies(clients: Sequence[ClientData], num_classes: int) -> Tensor:
    """``[N, num_classes]`` float64: each client's training label frequencies (rows sum to 1; a
    client without training rows gets a zero row), for classification tasks'
    ``label_distributions``."""
    counts = torch.stack([torch.bincount(c.train[1].long(), minlength=num_classes) for c in clients])
    return counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)


# -- reusable loss / metric helpers (vmap-safe) ------------------------------------------------

def classification_loss(output: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(output, y)


def classification_metrics(output: Tensor, y: Tensor) -> dict[str, Tensor]:
    loss_sum = nn.functional.cross_entropy(output, y, reduction="sum")
    correct = (output.argmax(-1) == y).sum().to(output.dtype)
    return {"loss_sum": loss_sum, "correct": correct, "count": torch.tensor(float(y.shape[0]))}


def classification_finalize(sums: Mapping[str, float]) -> dict[str, float]:
    count = max(float(sums["count"]), 1.0)
    return {"accuracy": float(sums["correct"]) / count, "loss": float(sums["loss_sum"]) / count}


def regression_loss(output: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """MSE on standardised targets: ``output [B, 1]``, ``y [B]`` (z-scored), ``scale [B, 2]`` =
    (std, mean) — unused here, it de-normalises in :func:`regression_metrics`."""
    return (output.squeeze(-1) - y).square().mean()


def regression_metrics(output: Tensor, y: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """Sums in original units: ``sq_err``, ``abs_err``, ``sum_y``, ``sum_y2`` (for R²), and the
    standardised ``zsq_err`` (for ``loss``)."""
    z = output.detach().squeeze(-1)
    std, mean = scale[:, 0], scale[:, 1]
    err = (z - y) * std
    true = y * std + mean
    return {"sq_err": err.square().sum(), "abs_err": err.abs().sum(), "zsq_err": (z - y).square().sum(),
            "sum_y": true.sum(), "sum_y2": true.square().sum(), "count": torch.tensor(float(y.shape[0]))}


def regression_finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """``mse``, ``rmse``, ``mae`` (original units), ``r2`` (1 − SSE/SST over the given samples; NaN
    when the targets do not vary) and ``loss`` (standardised MSE, the training loss)."""
    n = float(sums["count"])
    if n <= 0:
        return {k: float("nan") for k in ("mse", "rmse", "mae", "r2", "loss")}
    mse = float(sums["sq_err"]) / n
    sst = float(sums["sum_y2"]) - float(sums["sum_y"]) ** 2 / n
    return {"mse": mse, "rmse": mse ** 0.5, "mae": float(sums["abs_err"]) / n,
            "r2": 1.0 - float(sums["sq_err"]) / sst if sst > 1e-12 * max(1.0, float(sums["sum_y2"])) else float("nan"),
            "loss": float(sums["zsq_err"]) / n}


TaskFactory = Callable[..., Task]
