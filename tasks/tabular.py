"""Federated classification or regression on a table with a client column: the ``"tabular"`` task.

Data: one or more CSV / CSV.gz files (``files``, glob patterns allowed, relative to ``data_dir``
when given) with the same columns; one row per example, the client in ``client_column``, the
target in ``target_column``.

* **Clients**: one per distinct value of the client column, in order of first appearance
  (``num_clients`` keeps the first ``n``). A client with fewer than ``min_rows`` rows is dropped
  with a warning naming it (``small_clients = "drop"``) or is an error (``"error"``).
* **Problem**: ``"classification"`` (cross-entropy; ``accuracy``, ``loss``) or ``"regression"``
  (MSE on the standardised target; ``mse``, ``rmse``, ``mae``, ``r2`` in the target's units). ``"auto"``:
  a target that is not numeric, or holds integers with at most ``max_classes`` distinct values, is a
  classification target; any other numeric target is a regression one. Classes are the target's
  distinct values (sorted; numerically for numbers). Rows without a target value are dropped with
  a warning.
* **Features**: ``feature_columns``, or every column except the client, target, split and coordinate
  columns and ``exclude_columns``. A column that is not numeric, or is listed in
  ``categorical_columns``, is one-hot encoded over the values seen in training rows (all clients;
  an unseen value encodes as all zeros; a missing value is a category of its own); more than
  ``max_categories`` values is an error. Numeric columns are standardised with training statistics
  — each client's own (``scaling = "client"``: no statistic leaves a client; a column a client
  never observes while training uses the pooled statistics), pooled over clients (``"global"``) or
  not at all (``"none"``) — and a missing value becomes the training mean (0 once standardised).
  Regression targets are standardised the same way; metrics are de-standardised.
* **Splits**: per client, train / val / test fractions of its rows, drawn with ``split_seed``
  (default: the run seed); ``split = "stratified"`` keeps each class's share in every split
  (``"auto"``: stratified for classification, random for regression). Each split gets at least one
  row. Or ``split_column``: a column whose values say ``train``, ``val`` (``validation``/``valid``)
  or ``test``; then a client without rows in a split is an error.
* **Target model**: an MLP with ``hidden_layers`` hidden layers of width ``hidden``.
* **Client graph** (optional, for graph methods with ``graph.kind = "given"``): ``graph_file``
  (edge list or dense matrix keyed by client value, :mod:`tasks.client_graph`), or the ``graph_k``
  nearest clients by ``coordinate_columns`` (``haversine`` on latitude, longitude in degrees, or
  ``euclidean``), taken from the data (mean over a client's rows) or from ``locations_file`` (one
  row per client, keyed by the client column or else its first column).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

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
    regression_finalize,
    regression_loss,
    regression_metrics,
)
from tasks.client_graph import GRAPH_METRICS, coordinates_from_rows, read_locations_table, relation_graph
from tasks.models import MLP
from tasks.options import as_names, as_paths, check_choice, check_fractions, check_int, check_path
from tasks.tables import Table, TableError, read_table, refuse_unstandardisable, resolve_files

__all__ = ["TabularOptions", "TabularTask", "make_tabular", "SPLIT_VALUES"]

log = logging.getLogger("tasks.tabular")

PROBLEMS = ("auto", "classification", "regression")
SCALINGS = ("client", "global", "none")
SPLITS = ("auto", "random", "stratified")
SMALL_CLIENTS = ("drop", "error")
SPLIT_VALUES = {"train": 0, "val": 1, "validation": 1, "valid": 1, "test": 2}
_SPLIT_NAMES = ("train", "val", "test")
_STD_FLOOR = 1e-8


@dataclass(frozen=True)
class TabularOptions:
    """Options of the ``tabular`` task (a TOML ``[task]`` table); the module docstring has the details.

    Attributes:
        files: CSV / CSV.gz file(s) with the same columns; glob patterns allowed; relative to
            ``data_dir`` when given, else to the working directory.
        data_dir: folder the files are relative to.
        client_column: the column naming each row's client (one client per distinct value).
        target_column: the column to predict.
        feature_columns: the input columns; empty: every column but the client, target, split,
            coordinate and excluded ones.
        exclude_columns: columns never used as features (e.g. an id).
        categorical_columns: columns one-hot encoded even if numeric (non-numeric ones always are).
        max_categories: more distinct values than this in a categorical column is an error.
        problem: "classification", "regression", or "auto" (non-numeric targets, or integers
            with at most max_classes values, are classes).
        max_classes: "auto": integer targets with more distinct values are a regression.
        scaling: standardise numeric columns with each "client"'s training statistics, "global"
            (pooled) ones, or "none".
        split: per-client train / val / test split: "stratified", "random", or "auto"
            (stratified for classification).
        split_column: a column saying train / val / test per row (instead of fractions).
        train_fraction: share of each client's rows for training.
        val_fraction: share for validation (model selection).
        test_fraction: share for the test split.
        split_seed: seed of the split; None: the run seed.
        min_rows: clients with fewer rows are dropped (or an error, see small_clients).
        small_clients: "drop" (with a warning naming them) or "error".
        num_clients: keep the first n clients (in order of appearance); None: all.
        hidden: width of the MLP target model.
        hidden_layers: hidden layers of the MLP target model.
        graph_file: a client graph (edge list or dense matrix keyed by client value).
        coordinate_columns: columns with client coordinates (of the data, or of locations_file)
            for a kNN client graph.
        locations_file: a table with one row per client holding coordinate_columns.
        graph_metric: distance of the coordinate graph: "haversine" (latitude, longitude in
            degrees) or "euclidean".
        graph_k: neighbours per client in the coordinate graph.
    """

    files: str | tuple[str, ...] = ()
    data_dir: str | None = None
    client_column: str | None = None
    target_column: str | None = None
    feature_columns: tuple[str, ...] = ()
    exclude_columns: tuple[str, ...] = ()
    categorical_columns: tuple[str, ...] = ()
    max_categories: int = 100
    problem: str = "auto"
    max_classes: int = 20
    scaling: str = "client"
    split: str = "auto"
    split_column: str | None = None
    train_fraction: float = 0.7
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int | None = None
    min_rows: int = 10
    small_clients: str = "drop"
    num_clients: int | None = None
    hidden: int = 64
    hidden_layers: int = 1
    graph_file: str | None = None
    coordinate_columns: tuple[str, ...] = ()
    locations_file: str | None = None
    graph_metric: str = "haversine"
    graph_k: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", as_paths(self.files, "files"))
        for key in ("feature_columns", "exclude_columns", "categorical_columns", "coordinate_columns"):
            object.__setattr__(self, key, as_names(getattr(self, key), key))
        for key in ("client_column", "target_column", "split_column"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"task option {key}={value!r} must be a column name")
        for key in ("data_dir", "graph_file", "locations_file"):
            check_path(self, key)
        check_choice(self, "problem", PROBLEMS)
        check_choice(self, "scaling", SCALINGS)
        check_choice(self, "split", SPLITS)
        check_choice(self, "small_clients", SMALL_CLIENTS)
        check_choice(self, "graph_metric", GRAPH_METRICS)
        for key in ("max_categories", "hidden", "hidden_layers", "graph_k"):
            check_int(self, key, 1)
        check_int(self, "max_classes", 2)
        check_int(self, "min_rows", 3)
        check_int(self, "num_clients", 1, allow_none=True)
        check_int(self, "split_seed", 0, allow_none=True)
        check_fractions(self)
        if self.locations_file is not None and not self.coordinate_columns:
            raise ValueError("task option locations_file needs coordinate_columns (the columns holding the coordinates)")
        named = [c for c in (self.client_column, self.target_column) if c is not None]
        for key in ("feature_columns", "exclude_columns"):
            clash = [c for c in getattr(self, key) if c in named]
            if clash:
                raise ValueError(f"task option {key} lists {clash}, which is the client or target column")


# -- loading ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rows:
    """The rows the task keeps: ``client [R]`` index into ``names``; ``split [R]`` 0/1/2."""

    table: Table
    names: list[str]
    dropped: list[str]
    client: np.ndarray
    split: np.ndarray


def _require(options: TabularOptions, key: str) -> str:
    value = getattr(options, key)
    if value is None:
        raise ValueError(f"task 'tabular' needs the option {key} (a column of the data); it is not set")
    return value


def _keep_rows(table: Table, options: TabularOptions, target_missing: np.ndarray) -> tuple[Table, np.ndarray, list[str], list[str]]:
    """Drop rows without a target (warning) and clients that are too small (warning or error);
    ``(table, client index per row, kept names, dropped names)``."""
    client_col = _require(options, "client_column")
    clients = table.strings(client_col, "client_column")
    no_client = np.flatnonzero(table.missing(client_col, "client_column"))
    if no_client.size:
        raise TableError(f"{table.at(int(no_client[0]))}: column {client_col!r} (task option client_column) is empty; "
                         f"expected a client value on every row ({no_client.size} rows lack one)")
    if target_missing.any():
        first = int(np.flatnonzero(target_missing)[0])
        log.warning("%s: %d rows have no value in column %r (target_column) and are dropped (first: %s)",
                    table.source, int(target_missing.sum()), options.target_column, table.at(first))
    uniq, first_row, inverse, counts = np.unique(clients, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first_row, kind="stable")  # clients in order of first appearance
    kept_rows = np.bincount(inverse[~target_missing], minlength=uniq.size)
    names = [str(uniq[i]) for i in order]
    rows_of = {str(uniq[i]): int(kept_rows[i]) for i in order}
    if options.num_clients is not None:
        if options.num_clients > len(names):
            raise ValueError(f"task option num_clients={options.num_clients} exceeds the {len(names)} clients in "
                             f"column {client_col!r} of {table.source}")
        names = names[: options.num_clients]
    small = [n for n in names if rows_of[n] < options.min_rows]
    if small:
        listed = ", ".join(f"{n!r} ({rows_of[n]} rows)" for n in small[:10]) + (" …" if len(small) > 10 else "")
        if options.small_clients == "error":
            raise TableError(f"{table.source}: clients {listed} of column {client_col!r} have fewer than min_rows = "
                             f"{options.min_rows} rows; expected at least {options.min_rows} (or set small_clients = \"drop\")")
        log.warning("%s: dropped %d clients with fewer than min_rows = %d rows (and their graph edges): %s",
                    table.source, len(small), options.min_rows, listed)
    kept = [n for n in names if n not in set(small)]
    if not kept:
        raise TableError(f"{table.source}: no client of column {client_col!r} has min_rows = {options.min_rows} rows")
    position = {n: i for i, n in enumerate(kept)}
    index_of_uniq = np.array([position.get(str(u), -1) for u in uniq])
    client = index_of_uniq[inverse]
    client[target_missing] = -1
    keep = client >= 0
    return table.take(np.flatnonzero(keep)), client[keep], kept, small


def _split_assignment(rows: np.ndarray, labels: np.ndarray | None, fractions: Sequence[float],
                      rng: np.random.Generator) -> np.ndarray:
    """0/1/2 (train/val/test) for ``rows`` of one client, per class when ``labels`` is given; every
    split gets at least one row (the client has ≥ 3)."""
    n = rows.size
    assign = np.zeros(n, dtype=np.int64)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for g in groups:
        g = rng.permutation(g)
        a = int(round(g.size * fractions[0]))
        b = min(g.size, a + int(round(g.size * fractions[1])))
        assign[g[a:b]], assign[g[b:]] = 1, 2
    for s in (1, 2, 0):
        if not np.any(assign == s):
            donor = int(np.argmax(np.bincount(assign, minlength=3)))
            assign[rng.choice(np.flatnonzero(assign == donor))] = s
    return assign


def _splits(table: Table, client: np.ndarray, names: list[str], labels: np.ndarray | None,
            options: TabularOptions, seed: int) -> np.ndarray:
    if options.split_column is not None:
        col = options.split_column
        values = np.char.lower(table.strings(col, "split_column"))
        split = np.array([SPLIT_VALUES.get(str(v), -1) for v in values])
        bad = np.flatnonzero(split < 0)
        if bad.size:
            raise TableError(f"{table.at(int(bad[0]))}: column {col!r} (task option split_column) has "
                             f"{str(table.strings(col, 'split_column')[bad[0]])!r}; expected train, val or test")
        for i, name in enumerate(names):
            have = np.bincount(split[client == i], minlength=3)
            if np.any(have == 0):
                which = _SPLIT_NAMES[int(np.flatnonzero(have == 0)[0])]
                raise TableError(f"{table.source}: client {name!r} has no rows in the {which} split (column {col!r}, "
                                 "task option split_column); expected at least one row per split for every client")
        return split
    stratified = options.split == "stratified" or (options.split == "auto" and labels is not None)
    base = options.split_seed if options.split_seed is not None else seed
    fractions = (options.train_fraction, options.val_fraction, options.test_fraction)
    split = np.zeros(client.size, dtype=np.int64)
    for i in range(len(names)):
        rows = np.flatnonzero(client == i)
        rng = np.random.default_rng(np.random.SeedSequence([int(base), i]))
        split[rows] = _split_assignment(rows, labels[rows] if stratified else None, fractions, rng)
    return split


def _problem(table: Table, options: TabularOptions) -> str:
    if options.problem != "auto":
        return options.problem
    col = options.target_column
    if not table.is_numeric(col):
        return "classification"
    values = table.numeric(col, "target_column")
    values = values[np.isfinite(values)]
    integer = np.all(values == np.round(values))
    return "classification" if integer and np.unique(values).size <= options.max_classes else "regression"


def _labels(table: Table, col: str, keep_numeric: bool) -> tuple[np.ndarray, list[str]]:
    """Class index per row and the class names (numbers sorted numerically)."""
    if keep_numeric:
        values = table.numeric(col, "target_column")
        classes, idx = np.unique(values, return_inverse=True)
        return idx.astype(np.int64), [f"{v:g}" for v in classes]
    values = table.strings(col, "target_column")
    classes, idx = np.unique(values, return_inverse=True)
    return idx.astype(np.int64), [str(c) for c in classes]


# -- features ---------------------------------------------------------------------------------

def _feature_columns(table: Table, options: TabularOptions) -> list[str]:
    if options.feature_columns:
        for c in options.feature_columns:
            table.require(c, "feature_columns")
        return list(options.feature_columns)
    for key in ("exclude_columns", "categorical_columns", "coordinate_columns"):
        for c in getattr(options, key):
            if key != "coordinate_columns" or options.locations_file is None:
                table.require(c, key)
    skip = {options.client_column, options.target_column, options.split_column, *options.exclude_columns,
            *options.coordinate_columns}
    columns = [c for c in table.header if c not in skip]
    if not columns:
        raise TableError(f"{table.source}: no feature columns left besides the client, target, split and excluded columns")
    return columns


def _standardise(values: np.ndarray, client: np.ndarray, train: np.ndarray, n_clients: int,
                 scaling: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(z-scored values with missing → 0, mean per row, std per row)`` for ``values [R, F]``
    with training statistics per client, pooled, or none."""
    r, f = values.shape
    if scaling == "none":
        return np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=-np.inf), np.zeros((r, f)), np.ones((r, f))
    tr = values[train]
    with np.errstate(all="ignore"):
        g_mean, g_std = np.nanmean(tr, 0), np.nanstd(tr, 0)
    g_mean, g_std = np.nan_to_num(g_mean), np.where(np.isfinite(g_std) & (g_std >= _STD_FLOOR), g_std, 1.0)
    if scaling == "global":
        mean, std = np.broadcast_to(g_mean, (r, f)), np.broadcast_to(g_std, (r, f))
    else:
        c_mean, c_std = np.empty((n_clients, f)), np.empty((n_clients, f))
        for i in range(n_clients):
            part = values[train & (client == i)]
            seen = (~np.isnan(part)).any(0)
            with np.errstate(all="ignore"):
                m, s = np.nanmean(part, 0), np.nanstd(part, 0)
            c_mean[i] = np.where(seen, m, g_mean)  # never observed while training: pooled statistics
            c_std[i] = np.where(seen, np.where(s >= _STD_FLOOR, s, 1.0), g_std)
        mean, std = c_mean[client], c_std[client]
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing data is refused by the callers
        z = (values - mean) / std
    return np.nan_to_num(z, nan=0.0, posinf=np.inf, neginf=-np.inf), mean, std


def _encode(table: Table, columns: list[str], options: TabularOptions, client: np.ndarray, train: np.ndarray,
            n_clients: int) -> tuple[np.ndarray, list[str]]:
    """``(X [R, D] float32, feature names)``: standardised numeric columns, then one-hot ones."""
    forced = set(options.categorical_columns)
    numeric = [c for c in columns if c not in forced and table.is_numeric(c)]
    categorical = [c for c in columns if c not in numeric]
    blocks, names = [], []
    if numeric:
        raw = np.stack([table.numeric(c, "feature_columns") for c in numeric], axis=1)
        raw[~np.isfinite(raw)] = np.nan
        z, mean, std = _standardise(raw, client, train, n_clients, options.scaling)
        refuse_unstandardisable(f"{table.source}: column(s)", numeric, raw, z, mean, std)
        blocks.append(z)
        names += numeric
    for c in categorical:
        values = table.strings(c, "categorical_columns")
        vocab = np.unique(values[train])
        if vocab.size > options.max_categories:
            raise TableError(
                f"{table.source}: column {c!r} has {vocab.size} distinct values in training rows, more than "
                f"max_categories = {options.max_categories}; expected a categorical column (exclude it with "
                "exclude_columns, or raise max_categories)"
            )
        pos = np.searchsorted(vocab, values)
        hit = (pos < vocab.size) & (vocab[np.minimum(pos, vocab.size - 1)] == values)
        onehot = np.zeros((values.size, vocab.size))
        onehot[np.flatnonzero(hit), pos[hit]] = 1.0  # unseen in training: all zeros
        blocks.append(onehot)
        names += [f"{c}={v}" for v in vocab]
    return np.concatenate(blocks, axis=1).astype(np.float32), names


# -- the task ---------------------------------------------------------------------------------

class TabularTask:
    """Per-client ``(x, y)`` (classification; ``y`` int64 class ids) or ``(x, y, scale)``
    (regression; ``y`` standardised, ``scale [n, 2]`` = (std, mean) to de-standardise), ``x [n, D]``
    float32 (see the module docstring). Deterministic for given options and seed."""

    def __init__(self, clients: Sequence[ClientData], *, problem: str, names: Sequence[str], feature_names: Sequence[str],
                 class_names: Sequence[str] | None, hidden: int, hidden_layers: int, dropped: Sequence[str] = (),
                 adjacency: Tensor | None = None, coordinates: np.ndarray | None = None, name: str = "tabular"):
        self.name = name
        self.problem = problem
        self._clients = list(clients)
        self.num_clients = len(self._clients)
        self._names = list(names)
        self.dropped_clients = list(dropped)
        self._feature_names = tuple(feature_names)
        self.class_names = None if class_names is None else list(class_names)
        self.hidden, self.hidden_layers = int(hidden), int(hidden_layers)
        self._adjacency = adjacency
        self._coordinates = coordinates
        if problem == "classification":
            self.num_classes = len(self.class_names)
            self.primary_metric = ("accuracy", "max")
        else:
            self.primary_metric = ("mse", "min")

    def client_data(self, client: int) -> ClientData:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range [0, {self.num_clients})")
        return self._clients[client]

    def make_model(self, client: int | None = None) -> nn.Module:
        """The MLP target shared by every client (all have the same encoded features)."""
        out = self.num_classes if self.problem == "classification" else 1
        return MLP(len(self._feature_names), out, hidden=(self.hidden,) * self.hidden_layers)

    def loss(self, output: Tensor, *targets: Tensor) -> Tensor:
        return classification_loss(output, *targets) if self.problem == "classification" else regression_loss(output, *targets)

    def metrics(self, output: Tensor, *targets: Tensor) -> dict[str, Tensor]:
        if self.problem == "classification":
            return classification_metrics(output, *targets)
        return regression_metrics(output, *targets)

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return classification_finalize(sums) if self.problem == "classification" else regression_finalize(sums)

    # -- per-client attributes (graph diagnostics, reports, inspect) -------------------------

    def client_names(self) -> list[str]:
        return list(self._names)

    def feature_names(self, client: int | None = None) -> tuple[str, ...]:
        return self._feature_names

    def input_sizes(self) -> list[int]:
        return [len(self._feature_names)] * self.num_clients

    def label_sets(self) -> list[frozenset[int]] | None:
        """Classes in each client's training rows (classification only)."""
        if self.problem != "classification":
            return None
        return [frozenset(int(v) for v in torch.unique(c.train[1])) for c in self._clients]

    def label_distributions(self) -> Tensor | None:
        """``[N, classes]`` training label frequencies per client (classification only)."""
        if self.problem != "classification":
            return None
        return label_frequencies(self._clients, self.num_classes)

    def relation_adjacency(self) -> Tensor | None:
        """The given client graph ``[N, N]`` (``graph_file`` or coordinates); ``None`` without one."""
        return None if self._adjacency is None else self._adjacency.clone()

    def coordinates(self) -> np.ndarray | None:
        return None if self._coordinates is None else self._coordinates.copy()

    def __repr__(self) -> str:
        sizes = [c.num_train for c in self._clients]
        kind = f"classes={self.num_classes}" if self.problem == "classification" else "regression"
        return (f"TabularTask(clients={self.num_clients}, {kind}, features={len(self._feature_names)}, "
                f"train/client={min(sizes)}..{max(sizes)})")


def _resolve(path: str | None, data_dir: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or not data_dir else Path(data_dir).expanduser() / p)


@TASKS.register("tabular", TabularOptions)
def make_tabular(options: TabularOptions | None = None, *, seed: int) -> TabularTask:
    """Classification or regression from CSV files with a client column; one-hot categoricals,
    standardised numerics, per-client splits, MLP target; optional client graph."""
    options = options if options is not None else TabularOptions()
    client_col, target_col = _require(options, "client_column"), _require(options, "target_column")
    table = read_table(resolve_files(options.files, options.data_dir))
    table.require(client_col, "client_column")
    table.require(target_col, "target_column")
    if options.split_column is not None:
        table.require(options.split_column, "split_column")
    problem = _problem(table, options)
    if problem == "regression":
        target = table.numeric(target_col, "target_column", "numbers (a regression target)")
        if np.isinf(target).any():
            row = int(np.flatnonzero(np.isinf(target))[0])
            raise TableError(f"{table.at(row)}: column {target_col!r} (task option target_column) is infinite; "
                             "expected finite numbers (a regression target)")
        target_missing = np.isnan(target)
    else:
        target_missing = table.missing(target_col, "target_column")
    table, client, names, dropped = _keep_rows(table, options, target_missing)
    n = len(names)

    labels = class_names = None
    if problem == "classification":
        labels, class_names = _labels(table, target_col, keep_numeric=table.is_numeric(target_col))
        if len(class_names) < 2:
            raise TableError(f"{table.source}: column {target_col!r} (task option target_column) has a single value "
                             f"{class_names[0]!r}; expected at least two classes (or set problem = \"regression\")")
    split = _splits(table, client, names, labels, options, seed)
    train = split == 0
    x, feature_names = _encode(table, _feature_columns(table, options), options, client, train, n)
    if problem == "classification":
        targets: tuple[np.ndarray, ...] = (labels,)
    else:
        y = table.numeric(target_col, "target_column")[:, None]
        z, mean, std = _standardise(y, client, train, n, options.scaling)
        refuse_unstandardisable(f"{table.source}: target column", [target_col], y, z, mean, std)
        targets = (z[:, 0].astype(np.float32), np.concatenate([std, mean], axis=1).astype(np.float32))

    def part(i: int, s: int) -> tuple[Tensor, ...]:
        rows = np.flatnonzero((client == i) & (split == s))
        return tuple(torch.from_numpy(np.ascontiguousarray(a[rows])) for a in (x, *targets))

    clients = [ClientData(part(i, 0), part(i, 1), part(i, 2)) for i in range(n)]
    coords = None
    if options.coordinate_columns:
        if options.locations_file is not None:
            coords = read_locations_table(_resolve(options.locations_file, options.data_dir), names,
                                          options.coordinate_columns, key_column=client_col)
        else:
            coords = coordinates_from_rows(table, client, names, options.coordinate_columns)
    adjacency = relation_graph(_resolve(options.graph_file, options.data_dir), coords, options.graph_metric,
                               options.graph_k, names, dropped, table.source)
    return TabularTask(clients, problem=problem, names=names, feature_names=feature_names, class_names=class_names,
                       hidden=options.hidden, hidden_layers=options.hidden_layers, dropped=dropped,
                       adjacency=adjacency, coordinates=coords)
