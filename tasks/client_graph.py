"""Client-relation graphs given with the data: adjacency files and coordinates.

Accepted by the ``graph_file`` option of the file-based tasks (:func:`read_client_graph`), keyed by
the client values (the values of the client column, or the column names of a wide table):

* **edge list** (``.csv``): one edge per row, ``source,target`` or ``source,target,weight``, with
  or without a header row (a first row whose first two cells are not both client values is a
  header). Undirected: an edge in either direction links both clients.
* **dense matrix** (``.csv``): ``N x N`` numbers; with a header row of client values (and
  optionally a first column of them) rows and columns are matched by value and the file may hold
  more clients than the task keeps; without one, rows follow the task's client order.
* ``.npz`` (array ``adj_mx`` or the first array) and DCRNN's ``.pkl`` ``[ids, id_to_index, adj_mx]``.

A square all-numeric file is read as a dense matrix. Entries must be finite and non-negative;
the graph is symmetrised with ``max(A, Aᵀ)`` and its diagonal cleared.

From coordinates (:func:`coordinate_adjacency`): each client linked to its ``k`` nearest others,
by great-circle distance (``haversine``; columns = latitude, longitude in degrees) or Euclidean
distance, symmetrised.
"""

from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from tasks.tables import TableError, read_text

log = logging.getLogger("tasks.client_graph")

__all__ = ["symmetrize_adjacency", "haversine_km", "knn_adjacency", "coordinate_adjacency", "read_adjacency",
           "align_adjacency", "read_client_graph", "read_locations_table", "norm_id", "GRAPH_METRICS"]

GRAPH_METRICS = ("haversine", "euclidean")


def symmetrize_adjacency(adj: np.ndarray | Tensor) -> Tensor:
    """``max(A, Aᵀ)`` with a zero diagonal, float32."""
    a = torch.as_tensor(np.asarray(adj, dtype=np.float32))
    a = torch.maximum(a, a.T)
    return a.fill_diagonal_(0.0)


def haversine_km(coords: np.ndarray) -> np.ndarray:
    """Pairwise great-circle distances (km) of ``coords [N, 2]`` = (latitude, longitude) in
    degrees."""
    lat, lon = np.radians(coords[:, 0]), np.radians(coords[:, 1])
    dlat = lat[:, None] - lat[None, :]
    dlon = lon[:, None] - lon[None, :]
    a = np.sin(dlat / 2) ** 2 + np.cos(lat[:, None]) * np.cos(lat[None, :]) * np.sin(dlon / 2) ** 2
    return 2 * 6371.0088 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def knn_adjacency(dist: np.ndarray, k: int) -> Tensor:
    """Unweighted kNN graph from a distance matrix: each node links to its ``k`` nearest others
    (ties by index), symmetrised with ``max(A, Aᵀ)``, zero diagonal. ``k ≥ N-1`` → complete."""
    n = dist.shape[0]
    d = np.array(dist, dtype=np.float64)
    np.fill_diagonal(d, np.inf)
    if int(k) > n - 1:
        log.warning("graph k = %d but only %d other clients: the task's kNN graph is complete", int(k), n - 1)
    k = min(int(k), n - 1)
    adj = np.zeros((n, n), dtype=np.float32)
    if k > 0:
        nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
        adj[np.repeat(np.arange(n), k), nearest.ravel()] = 1.0
    return symmetrize_adjacency(adj)



def norm_id(value) -> str:
    """Sensor ids as strings: bytes decoded, ``"773869.0"`` → ``"773869"``."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    s = str(value).strip().strip('"')
    if s.endswith(".0") and s[:-2].lstrip("-").isdigit():
        s = s[:-2]
    return s



def is_float(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _dense_layout(rows: list[list[str]]) -> tuple[int, int] | None:
    """``(header rows, id columns)`` of (no header, no id column), (header + id column) or
    (header) that leaves a square all-numeric body; ``None`` if none does. (Ids may be numbers,
    so a header is recognised by shape, not content.)"""
    for h, c in ((0, 0), (1, 1), (1, 0)):
        body = [r[c:] for r in rows[h:]]
        n = len(body)
        if n and len(rows[0]) - c == n and all(len(r) == n for r in body) and all(is_float(x) for r in body for x in r):
            return h, c
    return None


def _adjacency_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    rows = [r for r in csv.reader(read_text(path).splitlines()) if r]
    if not rows:
        raise TableError(f"{path}: empty adjacency file, expected an N x N matrix")
    layout = _dense_layout(rows)
    if layout is not None:
        h, c = layout
        matrix = np.array([r[c:] for r in rows[h:]], dtype=np.float64)
        return matrix, ([norm_id(x) for x in rows[0][c:]] if h else None)
    widths = sorted({len(r) for r in rows})
    raise TableError(
        f"{path}: expected a square numeric N x N adjacency (optionally with a header row of sensor ids, "
        f"or a header row and a first id column); got {len(rows)} rows of {widths} columns"
        + ("" if len(widths) == 1 else " (rows differ in length)")
        + " or non-numeric cells"
    )


def read_adjacency(path: str | Path, *, allow_pickle: bool = False) -> tuple[np.ndarray, list[str] | None]:
    """``(matrix [N, N], sensor ids or None)`` from ``.csv``, ``.npz`` or DCRNN ``.pkl``.

    Unpickling runs code from the file: a ``.pkl`` is read only with ``allow_pickle=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: adjacency file not found")
    suffix = path.suffix.lower()
    ids = None
    if suffix in (".csv", ".txt") or path.name.endswith(".csv.gz"):
        matrix, ids = _adjacency_csv(path)
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if not keys:
                    raise TableError(f"{path}: empty .npz, expected an array 'adj_mx'")
                key = next((k for k in ("adj_mx", "adj", "adjacency", "A") if k in keys), keys[0])
                matrix = np.asarray(z[key])
        except (OSError, ValueError) as exc:
            raise TableError(f"{path}: not a readable .npz ({exc})") from None
    elif suffix in (".pkl", ".pickle"):
        if allow_pickle is not True:
            raise TableError(f"{path}: a python pickle, read only with task.allow_pickle = true (loading a "
                             "pickle runs code from the file: only for files you trust); or convert it "
                             "to .npz / .csv")
        try:
            with open(path, "rb") as fh:
                obj = pickle.load(fh, encoding="latin1")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a data error here
            raise TableError(f"{path}: cannot unpickle ({type(exc).__name__}: {exc})") from None
        if isinstance(obj, (list, tuple)) and len(obj) == 3:
            ids = [norm_id(s) for s in obj[0]]
            matrix = np.asarray(obj[2])
        elif isinstance(obj, np.ndarray):
            matrix = obj
        else:
            raise TableError(
                f"{path}: expected DCRNN's pickle [sensor_ids, id_to_index, adj_mx] or an array, got {type(obj).__name__}"
            )
    else:
        raise TableError(f"{path}: unknown adjacency format {suffix!r}; expected .csv, .npz or .pkl")
    try:
        matrix = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise TableError(f"{path}: adjacency is not numeric") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise TableError(f"{path}: adjacency must be square N x N, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise TableError(f"{path}: adjacency must have finite, non-negative entries")
    if ids is not None and len(ids) != matrix.shape[0]:
        raise TableError(f"{path}: {len(ids)} sensor ids for a {matrix.shape[0]} x {matrix.shape[0]} matrix")
    return matrix, ids


def align_adjacency(matrix: np.ndarray, ids: list[str] | None, sensor_ids: tuple[str, ...], path: Path) -> np.ndarray:
    """Reorder ``matrix`` to ``sensor_ids`` (when it names its sensors) and check its size."""
    n = len(sensor_ids)
    if matrix.shape[0] != n:
        raise TableError(f"{path}: adjacency is {matrix.shape[0]} x {matrix.shape[0]}, but the speed table has {n} sensors")
    if ids is None or list(ids) == list(sensor_ids):
        return matrix
    pos = {s: i for i, s in enumerate(ids)}
    missing = [s for s in sensor_ids if s not in pos]
    if missing:
        raise TableError(f"{path}: adjacency lacks sensors {missing[:5]} of the speed table")
    order = np.array([pos[s] for s in sensor_ids])
    return matrix[np.ix_(order, order)]




# -- graphs keyed by client value -----------------------------------------------------------------

_EDGE_HEADERS = {"source", "target", "src", "dst", "from", "to", "u", "v", "i", "j", "node1", "node2", "a", "b",
                 "client1", "client2", "station1", "station2", "sensor1", "sensor2", "head", "tail"}


def read_client_graph(path: str | Path, clients: Sequence[str], dropped: Sequence[str] = ()) -> np.ndarray:
    """The ``[N, N]`` adjacency over ``clients`` (in that order) from an edge list or a dense
    matrix keyed by client value (formats in the module docstring). Edges touching a client in
    ``dropped`` (clients the task left out, with a warning) are ignored; any other value that is
    not a client is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: graph file not found (task option graph_file)")
    names = [norm_id(c) for c in clients]
    pos = {c: i for i, c in enumerate(names)}
    skip = {norm_id(c) for c in dropped}
    if path.suffix.lower() in (".npz", ".pkl", ".pickle"):
        matrix, ids = read_adjacency(path)
        return _keyed_dense(matrix, ids, names, skip, path)
    lines = [(k + 1, r) for k, r in enumerate(csv.reader(read_text(path).splitlines())) if any(c.strip() for c in r)]
    if not lines:
        raise TableError(f"{path}: empty graph file, expected an edge list or an N x N matrix")
    rows = [[c.strip() for c in r] for _, r in lines]
    first = [c.lower() for c in rows[0][:2]]
    edge_header = 2 <= len(rows[0]) <= 3 and all(c in _EDGE_HEADERS for c in first)
    layout = None if edge_header else _dense_layout(rows)
    if layout is not None:
        h, c = layout
        ids = [norm_id(x) for x in rows[0][c:]] if h else None
        # A 2- or 3-wide square file can also be an edge list: dense only if it fits the clients.
        fits = len(rows) == len(names) if ids is None else set(names) <= set(ids)
        if fits or max(map(len, rows)) > 3:
            matrix = np.array([r[c:] for r in rows[h:]], dtype=np.float64)
            _check_entries(matrix, path)
            return _keyed_dense(matrix, ids, names, skip, path)
    if all(2 <= len(r) <= 3 for r in rows):
        return _edge_list(lines, rows, pos, skip, path, len(names))
    widths = sorted({len(r) for r in rows})
    raise TableError(
        f"{path}: expected an edge list (source,target[,weight] per row) or an N x N matrix keyed by client "
        f"value; got rows of {widths} cells"
    )


def _check_entries(matrix: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
        raise TableError(f"{path}: adjacency must have finite, non-negative entries")


def _keyed_dense(matrix: np.ndarray, ids: list[str] | None, names: list[str], skip: set[str], path: Path) -> np.ndarray:
    n = len(names)
    if ids is None:
        if matrix.shape[0] != n:
            raise TableError(
                f"{path}: a {matrix.shape[0]} x {matrix.shape[0]} matrix without client ids, but the task keeps {n} "
                "clients; add a header row of client values so rows and columns can be matched"
            )
        return matrix
    pos = {s: i for i, s in enumerate(ids)}
    missing = [s for s in names if s not in pos]
    if missing:
        raise TableError(f"{path}: the matrix has no row for clients {missing[:5]} ({len(missing)} missing); "
                         "expected a header row naming every client")
    order = np.array([pos[s] for s in names])
    return matrix[np.ix_(order, order)]


def _edge_list(lines, rows, pos: dict[str, int], skip: set[str], path: Path, n: int) -> np.ndarray:
    known = lambda v: norm_id(v) in pos or norm_id(v) in skip  # noqa: E731
    start = 0 if known(rows[0][0]) and known(rows[0][1]) else 1  # else the first row is a header
    adj = np.zeros((n, n), dtype=np.float64)
    examples = ", ".join(repr(c) for c in list(pos)[:3])
    for (line, _), row in zip(lines[start:], rows[start:]):
        a, b = norm_id(row[0]), norm_id(row[1])
        for v in (a, b):
            if v not in pos and v not in skip:
                raise TableError(f"{path} line {line}: {v!r} is not a client; expected client values such as {examples}")
        weight = 1.0
        if len(row) == 3:
            try:
                weight = float(row[2])
            except ValueError:
                raise TableError(f"{path} line {line}: weight {row[2]!r} is not a number") from None
            if not np.isfinite(weight) or weight < 0:
                raise TableError(f"{path} line {line}: weight {row[2]!r} must be finite and non-negative")
        if a in skip or b in skip:
            continue
        i, j = pos[a], pos[b]
        adj[i, j] = max(adj[i, j], weight)
    return adj


def read_locations_table(path: str | Path, clients: Sequence[str], columns: Sequence[str],
                         key_column: str | None = None) -> np.ndarray:
    """``[N, len(columns)]`` coordinates of ``clients`` from a CSV with one row per client: the
    client value in ``key_column`` (default: the first column) and the coordinate ``columns``."""
    from tasks.tables import read_table

    path = Path(path)
    table = read_table([path])
    key = key_column if key_column is not None and table.has(key_column) else table.header[0]
    ids = [norm_id(v) for v in table.strings(key, "locations_file")]
    values = np.stack([table.numeric(c, "coordinate_columns", "coordinates (numbers)") for c in columns], axis=1)
    rows: dict[str, int] = {}
    for r, v in enumerate(ids):
        if v in rows:
            raise TableError(f"{table.at(r)}: client {v!r} is listed twice in column {key!r}")
        rows[v] = r
    missing = [c for c in clients if norm_id(c) not in rows]
    if missing:
        raise TableError(f"{path}: column {key!r} has no row for clients {missing[:5]} ({len(missing)} missing)")
    out = values[[rows[norm_id(c)] for c in clients]]
    bad = [c for c, row in zip(clients, out) if not np.all(np.isfinite(row))]
    if bad:
        raise TableError(f"{path}: clients {bad[:5]} have missing coordinates in columns {list(columns)}")
    return out


def coordinate_adjacency(coords: np.ndarray, metric: str, k: int, where: str) -> Tensor:
    """kNN graph (``k`` nearest, symmetrised, unweighted) over client coordinates ``[N, D]``;
    ``haversine`` needs (latitude, longitude) in degrees. ``where`` names the source in errors."""
    coords = np.asarray(coords, dtype=np.float64)
    if metric == "haversine":
        if coords.shape[1] != 2:
            raise TableError(f"{where}: haversine distance needs 2 coordinate columns (latitude, longitude), got {coords.shape[1]}")
        if np.any(np.abs(coords[:, 0]) > 90) or np.any(np.abs(coords[:, 1]) > 180):
            raise TableError(f"{where}: latitude must be in [-90, 90] and longitude in [-180, 180] "
                             "(coordinate_columns = [latitude, longitude]); use graph_metric = \"euclidean\" for other coordinates")
        dist = haversine_km(coords)
    elif metric == "euclidean":
        dist = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    else:
        raise ValueError(f"graph metric {metric!r} is not allowed; choose one of {', '.join(GRAPH_METRICS)}")
    return knn_adjacency(dist, k)


def coordinates_from_rows(table, client_of_row: np.ndarray, names: Sequence[str], columns: Sequence[str]) -> np.ndarray:
    """``[N, len(columns)]`` per-client coordinates from columns of the data table: the mean over
    the client's rows (the values are usually constant per client); ``client_of_row [R]`` is the
    client index of each row (−1 = a row of no kept client)."""
    values = np.stack([table.numeric(c, "coordinate_columns", "coordinates (numbers)") for c in columns], axis=1)
    n = len(names)
    keep = client_of_row >= 0
    sums = np.zeros((n, values.shape[1]))
    counts = np.zeros((n, values.shape[1]))
    finite = np.isfinite(values[keep])
    np.add.at(sums, client_of_row[keep], np.where(finite, values[keep], 0.0))
    np.add.at(counts, client_of_row[keep], finite)
    bad = [names[i] for i in np.flatnonzero((counts == 0).any(1))]
    if bad:
        raise TableError(f"{table.source}: clients {bad[:5]} have no value in the coordinate columns {list(columns)} "
                         "(task option coordinate_columns); expected coordinates for every client")
    return sums / counts


def relation_graph(graph_file: str | Path | None, coords: np.ndarray | None, metric: str, k: int,
                   names: Sequence[str], dropped: Sequence[str], where: str) -> Tensor | None:
    """The task's client graph ``[N, N]`` (symmetric, zero diagonal): from ``graph_file`` when
    given, else the kNN graph of ``coords``, else ``None``."""
    if graph_file is not None:
        return symmetrize_adjacency(read_client_graph(graph_file, names, dropped))
    if coords is not None:
        return coordinate_adjacency(coords, metric, k, where)
    return None
