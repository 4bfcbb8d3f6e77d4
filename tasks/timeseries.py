"""Forecasting from time-series tables at any regular frequency: the ``"timeseries"`` task.

Data: one or more CSV / CSV.gz files (``files``, glob patterns allowed, relative to ``data_dir``
when given) with the same columns, in one of two layouts:

* **long** (``client_column`` set): one row per client and time step — ``station, time, TEMP,
  PRES, …``. ``variables`` lists the value columns (default: every other column that is numeric;
  a non-numeric one is skipped with a warning). Clients may lack variables (empty cells, or no
  value at all).
* **wide**: one row per time step, the timestamp in the first column (or ``time_column``) and one
  column per client holding one variable (named by ``variable``, default ``"value"``), e.g. a
  10-minute passenger-count table with a column per metro station.

**Time axis**: timestamps are ISO 8601 (``timestamp_format`` for others, ``"unix"`` for epoch
seconds); the step is ``freq`` (``"10min"``, ``"1h"``, ``"1D"`` …) or the most common gap between
timestamps. Every timestamp must lie on that grid from the earliest one (else: an irregular-axis
error naming the line); missing steps and empty cells are missing values. One row per client and
step (a duplicate is an error).

**Inputs and targets**: ``target_vars`` (default: the only variable) are forecast ``output_len``
steps ahead from ``input_len`` steps of ``input_vars`` (default: every variable), z-scored per
client with train statistics, plus calendar features that fit the step (``calendar = ["auto"]``:
time of day below daily steps, day of week below weekly steps, day of year for daily or coarser
steps or data covering a year; or a list of ``time_of_day``, ``day_of_week``, ``day_of_year``; ``[]``
for none), as sin/cos pairs. An input variable a client never observes in its training period is a
constant 0 input (``absent_inputs = "zero"``: every client keeps the same input size, so every
method runs) or is left out (``"drop"``: input sizes differ; methods with a personal input layer).
Every client must observe each target in every split. ``zeros_are_missing`` (default false: 0 is a
value, as in counts) masks zeros like empty cells. ``seasonal_lags`` (``["1D", "7D"]``) add the
targets one season before each forecast slot as inputs; ``seasonal_period`` sets the seasonal
naive baseline's season (``"auto"``: a day below daily steps, a week for daily steps).

Splits are chronological (train / val / test fractions of the common axis); windows, masking and
metrics (MAE, RMSE, MSE, WAPE; no MAPE) are those of :mod:`tasks.forecasting`; the naive baselines
of :mod:`tasks.naive` are scored on the same test targets.

**Client graph** (optional): ``graph_file`` (edge list or dense matrix keyed by client value,
:mod:`tasks.client_graph`), or the ``graph_k`` nearest clients by ``coordinate_columns`` (columns
of a long table — the mean over a client's rows — or of ``locations_file``, one row per client keyed
by the client column or else its first column); ``graph_metric`` ``haversine`` (latitude, longitude)
or ``euclidean``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shn.registry import TASKS
from tasks.client_graph import GRAPH_METRICS, coordinates_from_rows, read_locations_table, relation_graph
from tasks.forecast_models import FORECAST_MODELS
from tasks.forecasting import ClientSeries, ForecastTask, build_task, split_bounds
from tasks.options import as_names, as_paths, as_widths, check_bool, check_choice, check_fractions, check_int, check_path
from tasks.tables import Table, TableError, read_table, resolve_files
from tasks.timeaxis import (
    CALENDAR_FEATURES,
    auto_calendar,
    calendar_features,
    format_duration,
    infer_step,
    lag_steps,
    parse_duration,
    place_on_axis,
    season_steps,
)

__all__ = ["TimeseriesOptions", "SeriesTable", "make_timeseries", "load_series"]

log = logging.getLogger("tasks.timeseries")

LAYOUTS = ("auto", "long", "wide")
ABSENT_INPUTS = ("zero", "drop")
_TIME_NAMES = ("time", "timestamp", "datetime", "date", "date_time", "ts")


@dataclass(frozen=True)
class TimeseriesOptions:
    """Options of the ``timeseries`` task (a TOML ``[task]`` table); the module docstring has the details.

    Attributes:
        files: CSV / CSV.gz file(s) with the same columns; glob patterns allowed; relative to
            ``data_dir`` when given, else to the working directory.
        data_dir: folder the files are relative to.
        layout: "long" (one row per client and time step, needs client_column), "wide" (one
            column per client) or "auto" (long when client_column is set).
        client_column: long layout: the column naming each row's client.
        time_column: the timestamp column; None: a column named time / timestamp / datetime /
            date (wide: the first column).
        timestamp_format: strptime format of the timestamps, or "unix"; None: ISO 8601.
        freq: the time step ("10min", "1h", "1D", ...); None: the most common gap.
        variables: long layout: the value columns; empty: every other numeric column.
        variable: wide layout: the name of the one variable the client columns hold.
        target_vars: the variables to forecast; empty: the only variable.
        input_vars: the input variables; None: every variable.
        absent_inputs: an input a client never observes in training is a constant "zero" input,
            or is "drop"ped (input sizes then differ between clients).
        zeros_are_missing: treat zeros as missing values (sensor dropouts), not as values.
        calendar: calendar input features: ["auto"] (those that fit the step), [] or a list of
            time_of_day, day_of_week, day_of_year.
        seasonal_lags: durations ("1D", "7D") whose lagged targets are extra inputs.
        seasonal_period: season of the seasonal naive baseline: "auto", "none" or a duration.
        input_len: input window length in steps.
        output_len: forecast horizon in steps.
        train_fraction: chronological share of the time axis for training.
        val_fraction: the next share, for validation.
        test_fraction: the last share, for the test split.
        stride: steps between window starts.
        max_windows: keep at most this many windows per split and client (evenly spaced); None: all.
        num_clients: keep the first n clients; None: all.
        model: the forecaster: "gru" or "mlp".
        hidden: the forecaster's width.
        widths, client_widths: width multipliers of the forecaster's hidden size per client
            (heterogeneous clients, as the classification tasks' ``widths``; README: Heterogeneous
            clients).
        graph_file: a client graph (edge list or dense matrix keyed by client value).
        coordinate_columns: columns with client coordinates (of a long table, or of
            locations_file) for a kNN client graph.
        locations_file: a table with one row per client holding coordinate_columns.
        graph_metric: distance of the coordinate graph: "haversine" or "euclidean".
        graph_k: neighbours per client in the coordinate graph.
    """

    files: str | tuple[str, ...] = ()
    data_dir: str | None = None
    layout: str = "auto"
    client_column: str | None = None
    time_column: str | None = None
    timestamp_format: str | None = None
    freq: str | None = None
    variables: tuple[str, ...] = ()
    variable: str = "value"
    target_vars: tuple[str, ...] = ()
    input_vars: tuple[str, ...] | None = None
    absent_inputs: str = "zero"
    zeros_are_missing: bool = False
    calendar: tuple[str, ...] = ("auto",)
    seasonal_lags: tuple[str, ...] = ()
    seasonal_period: str = "auto"
    input_len: int = 12
    output_len: int = 12
    train_fraction: float = 0.7
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    stride: int = 1
    max_windows: int | None = None
    num_clients: int | None = None
    model: str = "gru"
    hidden: int = 32
    widths: tuple[float, ...] = ()
    client_widths: tuple[float, ...] | None = None
    graph_file: str | None = None
    coordinate_columns: tuple[str, ...] = ()
    locations_file: str | None = None
    graph_metric: str = "haversine"
    graph_k: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", as_widths(self.widths, "widths"))
        object.__setattr__(self, "client_widths", as_widths(self.client_widths, "client_widths"))
        object.__setattr__(self, "files", as_paths(self.files, "files"))
        for key in ("variables", "target_vars", "coordinate_columns", "calendar", "seasonal_lags"):
            object.__setattr__(self, key, as_names(getattr(self, key), key))
        if self.input_vars is not None:
            object.__setattr__(self, "input_vars", as_names(self.input_vars, "input_vars"))
        for key in ("client_column", "time_column", "timestamp_format", "freq"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"task option {key}={value!r} must be a non-empty string or omitted")
        for key in ("data_dir", "graph_file", "locations_file"):
            check_path(self, key)
        check_choice(self, "layout", LAYOUTS)
        check_choice(self, "absent_inputs", ABSENT_INPUTS)
        check_choice(self, "model", FORECAST_MODELS)
        check_choice(self, "graph_metric", GRAPH_METRICS)
        check_bool(self, "zeros_are_missing")
        for key in ("input_len", "output_len", "stride", "hidden", "graph_k"):
            check_int(self, key, 1)
        for key in ("max_windows", "num_clients"):
            check_int(self, key, 1, allow_none=True)
        check_fractions(self)
        if self.layout == "long" and self.client_column is None:
            raise ValueError("task option layout = \"long\" needs client_column (the column naming each row's client)")
        if self.layout == "wide" and self.client_column is not None:
            raise ValueError("task option client_column is for layout = \"long\"; a wide table has one column per client")
        bad = [c for c in self.calendar if c not in ("auto", *CALENDAR_FEATURES)]
        if bad or ("auto" in self.calendar and len(self.calendar) > 1):
            raise ValueError(f"task option calendar={list(self.calendar)!r}: expected [\"auto\"], [] or a list of "
                             f"{', '.join(CALENDAR_FEATURES)}")
        if self.freq is not None:
            parse_duration(self.freq, "freq")
        for lag in self.seasonal_lags:
            parse_duration(lag, "seasonal_lags")
        if self.seasonal_period not in ("auto", "none"):
            parse_duration(self.seasonal_period, "seasonal_period")
        if self.locations_file is not None and not self.coordinate_columns:
            raise ValueError("task option locations_file needs coordinate_columns (the columns holding the coordinates)")

    @property
    def is_long(self) -> bool:
        return self.layout == "long" or (self.layout == "auto" and self.client_column is not None)


@dataclass(frozen=True)
class SeriesTable:
    """Every client's variables on the common axis: ``values[var] [N, S]`` (NaN = missing), the
    column each variable came from per client (for messages), the axis start and step (seconds)."""

    table: Table
    names: list[str]
    values: dict[str, np.ndarray]
    columns: dict[str, list[str]]
    start: np.datetime64
    step: int
    num_steps: int
    client_of_row: np.ndarray | None  # long layout: kept-client index of each row (−1: not kept)

    def file_of(self, client: int) -> str:
        if self.client_of_row is None:
            return self.table.source
        return str(self.table.file_of(int(np.flatnonzero(self.client_of_row == client)[0])))

    def time_at(self, index: int) -> np.datetime64:
        return self.start + np.timedelta64(int(index) * self.step, "s")


def _time_column(table: Table, options: TimeseriesOptions, long: bool) -> str:
    if options.time_column is not None:
        table.require(options.time_column, "time_column")
        return options.time_column
    named = [h for h in table.header if h.strip().lower() in _TIME_NAMES]
    if named:
        return named[0]
    if long:
        raise TableError(f"{table.source}: no timestamp column (looked for {', '.join(_TIME_NAMES)}); set the task "
                         f"option time_column to one of {', '.join(table.header)}")
    return table.header[0]


def _axis(table: Table, times: np.ndarray, options: TimeseriesOptions, column: str):
    step = parse_duration(options.freq, "freq") if options.freq else infer_step(times, f"{table.source}: column {column!r}")
    start, index, num_steps = place_on_axis(times, step, table, np.arange(times.size), column, options.freq is not None)
    return step, start, index, num_steps


def _load_long(table: Table, options: TimeseriesOptions) -> SeriesTable:
    client_col = options.client_column
    clients = table.strings(client_col, "client_column")
    empty = np.flatnonzero(table.missing(client_col, "client_column"))
    if empty.size:
        raise TableError(f"{table.at(int(empty[0]))}: column {client_col!r} (task option client_column) is empty; "
                         "expected a client value on every row")
    time_col = _time_column(table, options, long=True)
    coord = set(options.coordinate_columns) if options.locations_file is None else set()
    if options.variables:
        variables = list(options.variables)
    else:
        candidates = [h for h in table.header if h not in {client_col, time_col, *coord}]
        skipped = [h for h in candidates if not table.is_numeric(h)]
        if skipped:
            log.warning("%s: columns %s are not numeric and are not used as variables (list the variables with "
                        "task option variables to silence this)", table.source, skipped)
        variables = [h for h in candidates if h not in skipped]
        if not variables:
            raise TableError(f"{table.source}: no numeric value columns besides {client_col!r} and {time_col!r}")
    values_by_var = {v: table.numeric(v, "variables", "numbers (a variable of the time series)") for v in variables}
    times = table.timestamps(time_col, "time_column", options.timestamp_format)
    step, start, index, num_steps = _axis(table, times, options, time_col)

    uniq, first, inverse = np.unique(clients, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    names = [str(uniq[i]) for i in order]
    if options.num_clients is not None:
        if options.num_clients > len(names):
            raise ValueError(f"task option num_clients={options.num_clients} exceeds the {len(names)} clients in "
                             f"column {client_col!r} of {table.source}")
        names = names[: options.num_clients]
    position = {n: i for i, n in enumerate(names)}
    client = np.array([position.get(str(u), -1) for u in uniq])[inverse]
    keep = client >= 0
    key = client[keep].astype(np.int64) * num_steps + index[keep]
    _, first_of_key, counts = np.unique(key, return_index=True, return_counts=True)
    if np.any(counts > 1):
        rows = np.flatnonzero(keep)
        dup_key = key[first_of_key[np.argmax(counts > 1)]]
        second = rows[np.flatnonzero(key == dup_key)[1]]
        raise TableError(f"{table.at(int(second))}: client {names[int(dup_key // num_steps)]!r} has a second row for "
                         f"{times[second]} (column {time_col!r}); expected one row per client and time step")
    values = {}
    for v, col in values_by_var.items():
        grid = np.full((len(names), num_steps), np.nan)
        grid[client[keep], index[keep]] = col[keep]
        values[v] = grid
    columns = {v: [v] * len(names) for v in variables}
    return SeriesTable(table, names, values, columns, start, step, num_steps, client)


def _load_wide(table: Table, options: TimeseriesOptions) -> SeriesTable:
    time_col = _time_column(table, options, long=False)
    names = [h for h in table.header if h != time_col]
    if options.num_clients is not None:
        if options.num_clients > len(names):
            raise ValueError(f"task option num_clients={options.num_clients} exceeds the {len(names)} client columns "
                             f"of {table.source}")
        names = names[: options.num_clients]
    if not names:
        raise TableError(f"{table.source}: no client columns besides the timestamp column {time_col!r}")
    grid_values = [table.numeric(n, "files (a client column)", f"numbers ({options.variable} of client {n!r})")
                   for n in names]
    times = table.timestamps(time_col, "time_column", options.timestamp_format)
    step, start, index, num_steps = _axis(table, times, options, time_col)
    _, first, counts = np.unique(index, return_index=True, return_counts=True)
    if np.any(counts > 1):
        second = np.flatnonzero(index == index[first[np.argmax(counts > 1)]])[1]
        raise TableError(f"{table.at(int(second))}: a second row for {times[second]} (column {time_col!r}); expected "
                         "one row per time step in a wide table")
    grid = np.full((len(names), num_steps), np.nan)
    grid[:, index] = np.stack(grid_values)
    return SeriesTable(table, names, {options.variable: grid}, {options.variable: list(names)}, start, step,
                       num_steps, None)


def load_series(options: TimeseriesOptions) -> SeriesTable:
    """Read the files into one :class:`SeriesTable` (checks in the module docstring)."""
    table = read_table(resolve_files(options.files, options.data_dir))
    if options.is_long:
        table.require(options.client_column, "client_column")
        return _load_long(table, options)
    return _load_wide(table, options)


# -- the task ----------------------------------------------------------------------------------

def _variables(data: SeriesTable, options: TimeseriesOptions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    have = list(data.values)
    targets = options.target_vars or (tuple(have) if len(have) == 1 else ())
    if not targets:
        raise ValueError(f"task option target_vars is not set and the data have several variables {have}; "
                         "name the ones to forecast")
    inputs = options.input_vars if options.input_vars is not None else tuple(have)
    for key, names in (("target_vars", targets), ("input_vars", inputs)):
        unknown = [v for v in names if v not in have]
        if unknown:
            raise TableError(f"{data.table.source}: no variable {unknown[0]!r} (task option {key}); the variables are "
                             f"{', '.join(have)}")
    return tuple(targets), tuple(inputs)


def _check_target_coverage(data: SeriesTable, targets: tuple[str, ...], bounds, zeros_missing: bool) -> None:
    """Every client observes each target in every split; else an error naming file, column, period."""
    for i, name in enumerate(data.names):
        for v in targets:
            series = data.values[v][i]
            observed = np.isfinite(series) & ((series != 0) if zeros_missing else True)
            if not observed.any():
                raise TableError(f"{data.file_of(i)}: client {name!r} has no value of target variable {v!r} (column "
                                 f"{data.columns[v][i]!r}); expected every client to observe the target_vars")
            for split, (lo, hi) in zip(("train", "val", "test"), bounds):
                if not observed[lo:hi].any():
                    raise TableError(
                        f"{data.file_of(i)}: client {name!r} has no observed value of {v!r} (column "
                        f"{data.columns[v][i]!r}) in the {split} period {data.time_at(lo)} … {data.time_at(hi - 1)}; "
                        "expected values in every split (the time axis is cut chronologically by the train/val/test "
                        "fractions)"
                    )


def _coordinates(data: SeriesTable, options: TimeseriesOptions) -> np.ndarray | None:
    if not options.coordinate_columns:
        return None
    if options.locations_file is not None:
        return read_locations_table(_resolve(options.locations_file, options.data_dir), data.names,
                                    options.coordinate_columns, key_column=options.client_column)
    if data.client_of_row is None:
        raise ValueError("task option coordinate_columns with a wide table needs locations_file (one row per client)")
    return coordinates_from_rows(data.table, data.client_of_row, data.names, options.coordinate_columns)


def _resolve(path: str | None, data_dir: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or not data_dir else Path(data_dir).expanduser() / p)


def make_timeseries_task(options: TimeseriesOptions, data: SeriesTable, *, seed: int) -> ForecastTask:
    """Build the forecasting task from loaded series."""
    targets, inputs = _variables(data, options)
    fractions = (options.train_fraction, options.val_fraction, options.test_fraction)
    bounds = split_bounds(data.num_steps, fractions)
    _check_target_coverage(data, targets, bounds, options.zeros_are_missing)
    axis = data.start + np.arange(data.num_steps) * np.timedelta64(data.step, "s")
    wanted = auto_calendar(data.step, data.num_steps * data.step) if options.calendar == ("auto",) else options.calendar
    cal, cal_names = calendar_features(axis, wanted)
    train = slice(*bounds[0])
    zero = options.zeros_are_missing
    series, absent = [], {}
    for i, name in enumerate(data.names):
        cols, names, normalize, zero_flags = [], [], [], []
        for v in inputs:
            col = data.values[v][i]
            seen = (np.isfinite(col[train]) & ((col[train] != 0) if zero else True)).any()
            if not seen:  # never observed while training: a constant 0 input, or none
                absent.setdefault(name, []).append(v)
                if options.absent_inputs == "drop":
                    continue
                col = np.zeros(data.num_steps)
            cols.append(col)
            names.append(v)
            normalize.append(bool(seen))
            zero_flags.append(zero and bool(seen))
        cols.extend(cal.T)
        names.extend(cal_names)
        normalize.extend([False] * len(cal_names))
        if not cols:
            raise ValueError(f"task 'timeseries': client {name!r} has no input (its input variables {list(inputs)} are "
                             "never observed in training and calendar = []); add inputs or calendar features")
        series.append(ClientSeries(
            inputs=np.stack(cols, axis=1), normalize=np.array(normalize),
            targets=np.stack([data.values[v][i] for v in targets], axis=1),
            input_names=tuple(names), target_names=targets,
            input_zero_is_missing=np.array(zero_flags + [False] * len(cal_names)),
            target_zero_is_missing=np.array([zero] * len(targets)),
        ))
    if absent:
        listed = ", ".join(f"{n!r}: {vs}" for n, vs in list(absent.items())[:10]) + (" …" if len(absent) > 10 else "")
        if options.absent_inputs == "drop":
            log.warning("%s: input variables never observed in a client's training period are left out of its "
                        "inputs (input sizes differ): %s", data.table.source, listed)
        else:
            log.info("%s: input variables never observed in a client's training period are constant 0 inputs: %s",
                     data.table.source, listed)
    coords = _coordinates(data, options)
    adjacency = relation_graph(_resolve(options.graph_file, options.data_dir), coords, options.graph_metric,
                               options.graph_k, data.names, (), data.table.source)
    try:
        season, lags = season_steps(options.seasonal_period, data.step), lag_steps(options.seasonal_lags, data.step)
    except ValueError as exc:
        raise ValueError(f"{exc} (the data's step is {format_duration(data.step)})") from None
    task = build_task(
        "timeseries", series, num_steps=data.num_steps, fractions=fractions, input_len=options.input_len,
        output_len=options.output_len, stride=options.stride, max_windows=options.max_windows, model=options.model,
        hidden=options.hidden, seed=seed, widths=options.widths, client_widths=options.client_widths, adjacency=adjacency, coordinates=coords, client_names=data.names,
        season=season, seasonal_lags=lags, mape=False, sources=[str(data.table.source)] * len(data.names),
    )
    task.start_time, task.step_seconds = data.start, data.step
    return task


@TASKS.register("timeseries", TimeseriesOptions)
def make_timeseries(options: TimeseriesOptions | None = None, *, seed: int) -> ForecastTask:
    """Forecasting from long (client, time, variables…) or wide (time, one column per client) CSV
    tables at any regular frequency; per-client variable sets; optional client graph."""
    options = options if options is not None else TimeseriesOptions()
    return make_timeseries_task(options, load_series(options), seed=seed)
