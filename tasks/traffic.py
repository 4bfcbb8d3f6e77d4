"""Traffic-speed forecasting, one client per loop sensor: the ``"traffic"`` task.

Data (``TrafficOptions.data_dir``), two layouts:

* ``losloop`` — T-GCN's Los-loop (a 7-day METR-LA subset, ``../shared/datasets/los_loop``) or any
  speed table in the same shape: ``los_speed.csv`` (header = sensor ids, one row per 5-min step; a
  first column named ``time``/``timestamp``/``date``/``datetime`` or with an empty header cell is
  read as timestamps), ``los_adj.csv`` (N×N, no header), optional ``graph_sensor_locations.csv``.
* ``h5`` — the DCRNN METR-LA / PEMS-BAY files: ``metr-la.h5`` / ``pems-bay.h5`` (pandas fixed-format
  frame under key ``df``; needs h5py: ``pip install -e '.[h5]'``) plus the adjacency as an ``.npz``
  (``adj_mx`` or the first array), a dense ``.csv`` (optional header row / id column, e.g.
  ``metr_la_adj_mx.csv``) or DCRNN's ``adj_mx.pkl`` (``[sensor_ids, id_to_index, adj_mx]``; a
  pickle runs code when loaded, so it is read only with ``allow_pickle = true``), and optionally
  ``graph_sensor_locations[_bay].csv``.

Inputs per step: speed (z-scored per sensor with its train statistics) and, with
``add_time_of_day``, the time of day in [0, 1) (from the timestamps when the file has them, else
from the step index at ``steps_per_day`` steps per day starting at midnight, as Los-loop does).
Target: the speed of the next ``output_len`` steps. Speed 0 is a detector dropout in these data
sets and is treated as missing (see :mod:`tasks.forecasting`) — unless ``zeros_are_missing = false``:
then 0 is a value, as in flow or passenger counts (PEMS04/PEMS08 flow, a metro closed at night),
and MAPE (undefined at 0) is not reported; WAPE is. With ``seasonal_lags`` (e.g. ``["1D", "7D"]``)
the inputs also hold the values one day / one week before each forecast slot
(:func:`tasks.forecasting.add_seasonal_lags`).

Clients: the first ``num_clients`` sensors in file order (all by default). Grouping several nearby
sensors into one client is not implemented.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from shn.registry import TASKS
from tasks.forecast_models import FORECAST_MODELS
from tasks.client_graph import align_adjacency, is_float, norm_id, read_adjacency, symmetrize_adjacency
from tasks.forecasting import ClientSeries, ForecastDataError, ForecastTask, build_task, require_data_dir
from tasks.options import as_widths, check_bool, check_choice, check_fractions, check_int, check_path
from tasks.tables import read_numeric_columns, read_text, split_header
from tasks.timeaxis import DAY, infer_step, lag_steps, parse_duration, season_steps

__all__ = ["TrafficOptions", "SpeedTable", "make_traffic", "read_speed_csv", "read_speed_h5", "read_adjacency",
           "read_locations", "load_traffic"]

TRAFFIC_FORMATS = ("auto", "losloop", "h5")
_TIME_COLUMNS = ("", "time", "timestamp", "date", "datetime")


@dataclass(frozen=True)
class TrafficOptions:
    """Options of the ``traffic`` task (a TOML ``[task]`` table).

    Attributes:
        data_dir: folder with the files (required).
        format: ``"auto"`` (``los_speed.csv`` present → losloop, else an ``.h5`` → h5),
            ``"losloop"`` or ``"h5"``.
        speed_file, adjacency_file, locations_file: file names (relative to ``data_dir``) or paths
            overriding the defaults (losloop: ``los_speed.csv`` / ``los_adj.csv`` /
            ``graph_sensor_locations.csv``; h5: the only ``*.h5``, the only ``*adj*.npz`` (else
            ``*adj*.csv``; ``adj*.pkl`` first only with ``allow_pickle``),
            ``graph_sensor_locations*.csv`` if present).
        allow_pickle: permit a DCRNN ``.pkl`` adjacency. Loading a pickle runs code from the
            file: set it only for files you trust.
        input_len, output_len: window lengths in steps (12 = 1 h at 5 min).
        num_clients: keep the first ``n`` sensors; ``None`` = all.
        train_fraction, val_fraction, test_fraction: chronological split of the time axis.
        add_time_of_day: add time of day in [0, 1) as a second input feature.
        steps_per_day: steps per day when the file has no timestamps (288 = 5 min).
        model: ``"gru"`` or ``"mlp"``.
        hidden: the forecaster's width.
        widths, client_widths: width multipliers of the forecaster's hidden size per client
            (heterogeneous clients, as the classification tasks' ``widths``; README: Heterogeneous
            clients).
        stride: step between window starts.
        max_windows: keep at most this many windows per split and client (evenly spaced).
        zeros_are_missing: a value of 0 is a dropout (speed data); false for counts.
        seasonal_lags: durations (``"1D"``, ``"7D"``) whose lagged targets are extra inputs; each
            at least ``output_len`` steps.
        seasonal_period: season of the seasonal naive baseline: ``"auto"`` (one day), ``"none"``
            or a duration.
    """

    data_dir: str | None = None
    format: str = "auto"
    speed_file: str | None = None
    adjacency_file: str | None = None
    locations_file: str | None = None
    allow_pickle: bool = False
    input_len: int = 12
    output_len: int = 12
    num_clients: int | None = None
    train_fraction: float = 0.7
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    add_time_of_day: bool = True
    steps_per_day: int = 288
    model: str = "gru"
    hidden: int = 32
    widths: tuple[float, ...] = ()
    client_widths: tuple[float, ...] | None = None
    stride: int = 1
    max_windows: int | None = None
    zeros_are_missing: bool = True
    seasonal_lags: tuple[str, ...] = ()
    seasonal_period: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", as_widths(self.widths, "widths"))
        object.__setattr__(self, "client_widths", as_widths(self.client_widths, "client_widths"))
        check_bool(self, "zeros_are_missing")
        object.__setattr__(self, "seasonal_lags", tuple(self.seasonal_lags))
        for lag in self.seasonal_lags:
            parse_duration(lag, "seasonal_lags")
        if self.seasonal_period not in ("auto", "none"):
            parse_duration(self.seasonal_period, "seasonal_period")
        check_choice(self, "format", TRAFFIC_FORMATS)
        check_choice(self, "model", FORECAST_MODELS)
        for key in ("data_dir", "speed_file", "adjacency_file", "locations_file"):
            check_path(self, key)
        for key in ("input_len", "output_len", "steps_per_day", "hidden", "stride"):
            check_int(self, key, 1)
        check_int(self, "num_clients", 1, allow_none=True)
        check_int(self, "max_windows", 1, allow_none=True)
        for key in ("add_time_of_day", "allow_pickle"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"task option {key}={getattr(self, key)!r} must be true or false")
        check_fractions(self)


@dataclass(frozen=True)
class SpeedTable:
    """``speeds [S, N]`` (NaN/0 = missing), ``sensor_ids`` (N strings), ``timestamps`` (``[S]``
    datetime64 or ``None``), ``path`` (for messages)."""

    speeds: np.ndarray
    sensor_ids: tuple[str, ...]
    timestamps: np.ndarray | None
    path: Path


def _parse_times(path: Path, values: list[str]) -> np.ndarray | None:
    try:
        return np.array([v.strip().strip('"').replace(" ", "T") for v in values], dtype="datetime64[s]")
    except ValueError:
        return None


# -- speed tables -------------------------------------------------------------------------------

def read_speed_csv(path: str | Path) -> SpeedTable:
    """A speed table CSV: header = sensor ids, one row per step; optional first timestamp column."""
    path = Path(path)
    header, body = split_header(path, read_text(path))
    first = header[0].lower()
    has_time = first in _TIME_COLUMNS
    data_cols = list(range(1 if has_time else 0, len(header)))
    if not data_cols:
        raise ForecastDataError(f"{path}: expected a header row of sensor ids, got {header!r}")
    ids = tuple(norm_id(h) for h in (header[c] for c in data_cols))
    if len(set(ids)) != len(ids):
        raise ForecastDataError(f"{path}: duplicate sensor ids in the header")
    lines = [ln for ln in body.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):  # cheap pre-check with a row number the user can find
        n = ln.count(",") + 1
        if n != len(header) and '"' not in ln:
            raise ForecastDataError(
                f"{path}: row {i + 2} has {n} columns, expected {len(header)} (the header's sensor ids)"
            )
    speeds = read_numeric_columns(path, "\n".join(lines), header, data_cols)
    if speeds.shape[0] == 0:
        raise ForecastDataError(f"{path}: no data rows after the header")
    times = _parse_times(path, [ln.split(",", 1)[0] for ln in lines]) if has_time else None
    return SpeedTable(speeds, ids, times, path)


def _frame_from_hdf_group(get: Callable[[str], np.ndarray | None], path: Path) -> SpeedTable:
    """A pandas fixed-format frame (``axis0`` columns, ``axis1`` index, ``block{i}_items`` /
    ``block{i}_values``) read through ``get(name) -> array | None``."""
    columns = get("axis0")
    index = get("axis1")
    if columns is None or get("block0_values") is None:
        raise ForecastDataError(
            f"{path}: expected a pandas fixed-format frame (datasets axis0, axis1, block0_items, "
            "block0_values under key 'df'); re-save it with DataFrame.to_hdf(path, key='df', format='fixed')"
        )
    ids = [norm_id(c) for c in np.asarray(columns).ravel()]
    n_rows = None if index is None else int(np.asarray(index).shape[0])
    table = np.full((n_rows or 0, len(ids)), np.nan)
    col_of = {c: i for i, c in enumerate(ids)}
    filled = np.zeros(len(ids), dtype=bool)
    b = 0
    while (values := get(f"block{b}_values")) is not None:
        items = get(f"block{b}_items")
        items = ids if items is None and b == 0 else [norm_id(c) for c in np.asarray(items).ravel()]
        values = np.asarray(values)
        if values.ndim != 2:
            raise ForecastDataError(f"{path}: block{b}_values has shape {values.shape}, expected 2-D")
        if n_rows is None:
            n_rows = values.shape[0] if values.shape[1] == len(items) else values.shape[1]
            table = np.full((n_rows, len(ids)), np.nan)
        if values.shape == (len(items), n_rows) and values.shape != (n_rows, len(items)):
            values = values.T
        if values.shape != (n_rows, len(items)):
            raise ForecastDataError(
                f"{path}: block{b}_values has shape {values.shape}, expected ({n_rows}, {len(items)}) "
                "(rows = index axis1, columns = block items)"
            )
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            raise ForecastDataError(f"{path}: block{b}_values is not numeric (dtype {values.dtype})") from None
        for j, item in enumerate(items):
            if item not in col_of:
                raise ForecastDataError(f"{path}: block{b}_items has {item!r}, which is not in axis0")
            table[:, col_of[item]] = values[:, j]
            filled[col_of[item]] = True
        b += 1
    if not filled.all():
        raise ForecastDataError(f"{path}: columns {[ids[i] for i in np.flatnonzero(~filled)][:5]} have no values")
    times = None
    if index is not None and np.issubdtype(np.asarray(index).dtype, np.integer):
        times = np.asarray(index).astype("datetime64[ns]")  # pandas stores DatetimeIndex as int64 ns
    return SpeedTable(table, tuple(ids), times, path)


def read_speed_h5(path: str | Path) -> SpeedTable:
    """The DCRNN ``metr-la.h5`` / ``pems-bay.h5`` table (pandas fixed format, key ``df``)."""
    path = Path(path)
    if not path.is_file():
        raise ForecastDataError(f"{path}: file not found")
    try:
        import h5py
    except ImportError:
        raise ForecastDataError(
            f"{path}: reading .h5 speed tables needs the optional package h5py; install it with "
            "`pip install h5py` or the extra `pip install -e '.[h5]'` (or export the table to CSV and use format='losloop')"
        ) from None
    try:
        with h5py.File(path, "r") as f:
            keys = list(f.keys())
            key = "df" if "df" in f else (keys[0] if len(keys) == 1 else None)
            if key is None or not isinstance(f[key], h5py.Group):
                raise ForecastDataError(f"{path}: expected one pandas frame group (key 'df'), found {keys}")
            group = f[key]
            return _frame_from_hdf_group(lambda name: group[name][()] if name in group else None, path)
    except OSError as exc:
        raise ForecastDataError(f"{path}: not a readable HDF5 file ({exc})") from None


def read_locations(path: str | Path, sensor_ids: tuple[str, ...]) -> np.ndarray:
    """``[N, 2]`` (latitude, longitude) aligned with ``sensor_ids``. Accepts a header with
    ``sensor_id``/``latitude``/``longitude`` (any other columns ignored; ``lat``/``lon``/``lng`` also
    accepted) or headerless ``sensor_id,latitude,longitude`` rows (DCRNN's PEMS-BAY file)."""
    path = Path(path)
    rows = [r for r in csv.reader(read_text(path).splitlines()) if r]
    if not rows:
        raise ForecastDataError(f"{path}: empty locations file")
    head = [c.strip().lower() for c in rows[0]]

    def find(*names):
        return next((head.index(n) for n in names if n in head), None)

    i_id, i_lat, i_lon = find("sensor_id", "id", "sensor"), find("latitude", "lat"), find("longitude", "lon", "lng")
    if None in (i_id, i_lat, i_lon):
        if len(rows[0]) == 3 and is_float(rows[0][1]) and is_float(rows[0][2]):
            i_id, i_lat, i_lon, rows = 0, 1, 2, rows
        else:
            raise ForecastDataError(f"{path}: expected columns sensor_id, latitude, longitude, got {rows[0]}")
    else:
        rows = rows[1:]
    loc = {}
    for k, r in enumerate(rows):
        try:
            loc[norm_id(r[i_id])] = (float(r[i_lat]), float(r[i_lon]))
        except (IndexError, ValueError):
            raise ForecastDataError(f"{path}: row {k + 2} is not 'sensor_id, latitude, longitude' numbers: {r}") from None
    missing = [s for s in sensor_ids if s not in loc]
    if missing:
        raise ForecastDataError(f"{path}: no location for sensors {missing[:5]} ({len(missing)} missing)")
    return np.array([loc[s] for s in sensor_ids], dtype=np.float64)


# -- putting it together --------------------------------------------------------------------------

def _resolve(data_dir: Path, name: str | None) -> Path | None:
    if name is None:
        return None
    p = Path(name).expanduser()
    return p if p.is_absolute() else data_dir / p


def _only(data_dir: Path, patterns: tuple[str, ...], what: str, required: bool = True) -> Path | None:
    for pattern in patterns:
        found = sorted(data_dir.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ForecastDataError(
                f"{data_dir}: several {what} files {[f.name for f in found]}; choose one with the matching *_file option"
            )
    if required:
        raise ForecastDataError(f"{data_dir}: no {what} file (looked for {', '.join(patterns)})")
    return None


def _adjacency_file(data_dir: Path, allow_pickle: bool) -> Path:
    """The h5 layout's adjacency file: a pickle only when allowed (then first, as DCRNN ships it)."""
    plain = ("*adj*.npz", "*adj*.csv")
    if allow_pickle:
        return _only(data_dir, ("adj*.pkl", *plain), "adjacency")
    found = _only(data_dir, plain, "adjacency", required=False)
    if found is not None:
        return found
    pickles = sorted(data_dir.glob("adj*.pkl"))
    if pickles:
        raise ForecastDataError(f"{pickles[0]}: the only adjacency is a python pickle, read only with "
                                "task.allow_pickle = true (loading a pickle runs code from the file: only for "
                                "files you trust); or convert it to .npz / .csv")
    raise ForecastDataError(f"{data_dir}: no adjacency file (looked for {', '.join(plain)})")


def load_traffic(options: TrafficOptions) -> tuple[SpeedTable, np.ndarray, np.ndarray | None, dict[str, Path]]:
    """``(speed table, adjacency aligned with its sensors, coordinates or None, files used)``."""
    data_dir = require_data_dir(options, "traffic")
    fmt = options.format
    if fmt == "auto":
        speed_override = _resolve(data_dir, options.speed_file)
        if speed_override is not None:
            fmt = "h5" if speed_override.suffix.lower() in (".h5", ".hdf5", ".hdf") else "losloop"
        elif (data_dir / "los_speed.csv").is_file():
            fmt = "losloop"
        elif list(data_dir.glob("*.h5")):
            fmt = "h5"
        else:
            raise ForecastDataError(
                f"{data_dir}: cannot detect the traffic data format: no los_speed.csv and no *.h5 "
                "(set format and speed_file)"
            )
    if fmt == "losloop":
        speed_path = _resolve(data_dir, options.speed_file) or data_dir / "los_speed.csv"
        adj_path = _resolve(data_dir, options.adjacency_file) or data_dir / "los_adj.csv"
        loc_path = _resolve(data_dir, options.locations_file) or data_dir / "graph_sensor_locations.csv"
        table = read_speed_csv(speed_path)
    else:
        speed_path = _resolve(data_dir, options.speed_file) or _only(data_dir, ("*.h5",), "speed (.h5)")
        adj_path = _resolve(data_dir, options.adjacency_file) or _adjacency_file(data_dir, options.allow_pickle)
        loc_path = _resolve(data_dir, options.locations_file) or _only(
            data_dir, ("graph_sensor_locations*.csv",), "sensor locations", required=False)
        table = read_speed_h5(speed_path)
    matrix, ids = read_adjacency(adj_path, allow_pickle=options.allow_pickle)
    matrix = align_adjacency(matrix, ids, table.sensor_ids, adj_path)
    coords = None
    if loc_path is not None and (loc_path.is_file() or options.locations_file is not None):
        coords = read_locations(loc_path, table.sensor_ids)
    files = {"speed": speed_path, "adjacency": adj_path}
    if coords is not None:
        files["locations"] = loc_path
    return table, matrix, coords, files


def time_of_day(num_steps: int, timestamps: np.ndarray | None, steps_per_day: int) -> np.ndarray:
    """``[S]`` fraction of the day in [0, 1): from ``timestamps`` when given, else from the step
    index (step 0 = midnight)."""
    if timestamps is not None:
        ts = timestamps.astype("datetime64[s]")
        seconds = (ts - ts.astype("datetime64[D]")).astype(np.int64)
        return seconds / 86400.0
    return (np.arange(num_steps) % steps_per_day) / float(steps_per_day)


def make_traffic_task(options: TrafficOptions, *, seed: int, table: SpeedTable, adjacency: np.ndarray,
                      coordinates: np.ndarray | None) -> ForecastTask:
    """Build the task from already-loaded arrays (the registered factory loads them first)."""
    n = table.speeds.shape[1] if options.num_clients is None else options.num_clients
    if n > table.speeds.shape[1]:
        raise ValueError(f"task option num_clients={n} exceeds the {table.speeds.shape[1]} sensors in {table.path}")
    speeds = table.speeds[:, :n]
    num_steps = speeds.shape[0]
    tod = time_of_day(num_steps, table.timestamps, options.steps_per_day)
    series = []
    for j in range(n):
        cols = [speeds[:, j]] + ([tod] if options.add_time_of_day else [])
        series.append(ClientSeries(
            inputs=np.stack(cols, axis=1),
            normalize=np.array([True] + [False] * (len(cols) - 1)),
            targets=speeds[:, j:j + 1],
            input_names=("speed", "time_of_day")[: len(cols)],
            target_names=("speed",),
            input_zero_is_missing=np.array([options.zeros_are_missing] + [False] * (len(cols) - 1)),
            target_zero_is_missing=np.array([options.zeros_are_missing]),
        ))
    season, lags = _seasons(options, table)
    adj = symmetrize_adjacency(adjacency[:n, :n])
    coords = None if coordinates is None else coordinates[:n]
    return build_task(
        "traffic", series, num_steps=num_steps,
        fractions=(options.train_fraction, options.val_fraction, options.test_fraction),
        input_len=options.input_len, output_len=options.output_len, stride=options.stride,
        max_windows=options.max_windows, model=options.model, hidden=options.hidden, seed=seed, widths=options.widths, client_widths=options.client_widths,
        adjacency=adj, coordinates=coords, client_names=table.sensor_ids[:n],
        season=season, seasonal_lags=lags, mape=options.zeros_are_missing, sources=[str(table.path)] * n,
    )


def _seasons(options: TrafficOptions, table: SpeedTable) -> tuple[int | None, tuple[int, ...]]:
    """(season of the seasonal naive baseline, seasonal lags) in steps of the table's time step:
    its timestamps' step, else a day / ``steps_per_day``."""
    if table.timestamps is not None:
        step = infer_step(table.timestamps, str(table.path))
    elif DAY % options.steps_per_day == 0:
        step = DAY // options.steps_per_day
    elif options.seasonal_period == "auto" and not options.seasonal_lags:
        return options.steps_per_day, ()
    else:
        raise ValueError(f"task option steps_per_day={options.steps_per_day} does not divide a day into whole "
                         "seconds, so durations cannot be turned into steps; set seasonal_period = \"none\" and no seasonal_lags")
    try:
        return season_steps(options.seasonal_period, step), lag_steps(options.seasonal_lags, step)
    except ValueError as exc:
        raise ValueError(f"{exc} (the time step of {table.path})") from None


@TASKS.register("traffic", TrafficOptions)
def make_traffic(options: TrafficOptions | None = None, *, seed: int) -> ForecastTask:
    """Traffic-speed forecasting, one client per loop sensor (Los-loop CSV or METR-LA/PEMS-BAY
    h5 + adjacency); GRU/MLP forecaster; the sensor graph as the relation graph."""
    require_data_dir(options, "traffic")
    table, adjacency, coords, _ = load_traffic(options)
    return make_traffic_task(options, seed=seed, table=table, adjacency=adjacency, coordinates=coords)

