"""Station-level weather forecasting, one client per station: the ``"weather"`` task.

Data (``WeatherOptions.data_dir``): a stations table (``stations_file``, columns
``station,longitude,latitude``) and one CSV (``.csv`` or ``.csv.gz``) per station. The default
layout is the UCI Beijing multi-site air-quality release (``../shared/datasets/
beijing_multisite_air_quality``: ``PRSA_Data_<Station>_20130301-20170228.csv.gz`` with columns
``No,year,month,day,hour,PM2.5,…,TEMP,PRES,DEWP,RAIN,wd,WSPM,station``).

* **Station ↔ file**: a file belongs to a station when the station name is one of the
  ``[A-Za-z0-9]`` tokens of its file name (case-insensitive); files no name matches are matched by
  the first value of their ``station`` column. Files matching no station are ignored; a station
  with no file, or with several, is an error.
* **Time axis**: hourly. Timestamps come from ``year,month,day,hour`` columns or from one
  ``datetime``/``timestamp``/``time``/``date`` column (ISO strings). All stations are placed on
  the common hourly axis from the earliest to the latest timestamp; rows absent from a station's
  file are missing values. ``max_steps`` keeps the first ``max_steps`` hours of that axis.
* **Inputs** (``input_vars``): numeric columns are z-scored with the station's train statistics;
  ``wd`` (wind direction: 16-point compass strings, ``CV``/``calm`` = no direction, or numeric
  degrees) becomes ``wd_sin``, ``wd_cos`` (calm → 0, 0); with ``time_features``, hour-of-day and
  day-of-year sin/cos are appended. Each station uses the input variables its file has and that
  are observed at least once in its training period, so clients may differ in input size
  (:meth:`~tasks.forecasting.ForecastTask.input_sizes`; ``make_model(client)``).
  Missing inputs are forward-filled, the leading gap gets the train mean (see
  :mod:`tasks.forecasting`).
* **Targets** (``target_vars``, default ``TEMP``): every station must have them; NaN or absent
  rows are masked. Zeros are real values here (0 °C, no rain), not missing.
* **Relation graph**: kNN (``graph_k``) on the haversine distance between stations, symmetrised,
  unweighted, zero diagonal.

Defaults: ``input_len = 24`` (one diurnal cycle of context — temperature is dominated by the daily
cycle, which 12 hours do not cover), ``output_len = 12``. MAPE is not reported (it is not meaningful
for temperatures near 0 °C); WAPE, MAE and RMSE are. ``seasonal_lags`` (e.g. ``["1D"]``) add the
targets one day before each forecast slot as inputs; the seasonal naive baseline uses one day.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shn.registry import TASKS
from tasks.forecast_models import FORECAST_MODELS
from tasks.forecasting import (
    ClientSeries,
    ForecastDataError,
    ForecastTask,
    build_task,
    check_choice,
    check_fractions,
    check_int,
    check_path,
    haversine_km,
    knn_adjacency,
    read_numeric_columns,
    read_text,
    require_data_dir,
    split_bounds,
    split_header,
)
from tasks.options import as_names, as_widths
from tasks.timeaxis import lag_steps, parse_duration, season_steps

__all__ = ["WeatherOptions", "StationData", "make_weather", "read_stations", "read_station_file",
           "match_station_files", "load_weather", "COMPASS_DEGREES"]

DEFAULT_INPUT_VARS = ("TEMP", "PRES", "DEWP", "RAIN", "WSPM", "wd")
_COMPASS = ("N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE", "S", "SSW", "SW", "WSW", "W", "WNW", "NW", "NNW")
COMPASS_DEGREES = {name: 22.5 * i for i, name in enumerate(_COMPASS)}
_CALM = ("CV", "C", "CALM", "CLM")
_TIME_COLUMN_NAMES = ("datetime", "timestamp", "time", "date")
_DATE_PARTS = ("year", "month", "day", "hour")


@dataclass(frozen=True)
class WeatherOptions:
    """Options of the ``weather`` task (a TOML ``[task]`` table).

    Attributes:
        data_dir: folder with the station CSVs and the stations table (required).
        stations_file: the stations table (``station,longitude,latitude``), relative to
            ``data_dir`` or absolute.
        target_vars: numeric columns to forecast (every station must have them).
        input_vars: input columns; ``"wd"`` = wind direction → sin/cos. Stations use those they have.
        time_features: append hour-of-day and day-of-year sin/cos inputs.
        input_len, output_len: window lengths in hours.
        train_fraction, val_fraction, test_fraction: chronological split of the time axis.
        max_steps: keep only the first ``max_steps`` hours; ``None`` = all.
        num_clients: keep the first ``n`` stations of the stations table; ``None`` = all.
        stride: step between window starts.
        max_windows: keep at most this many windows per split and client (evenly spaced).
        model: ``"gru"`` or ``"mlp"``.
        hidden: the forecaster's width.
        widths, client_widths: width multipliers of the forecaster's hidden size per client
            (heterogeneous clients, as the classification tasks' ``widths``; README: Heterogeneous
            clients).
        graph_k: neighbours per station in the haversine kNN relation graph.
        seasonal_lags: durations (``"1D"``, ``"7D"``) whose lagged targets are extra inputs.
        seasonal_period: season of the seasonal naive baseline (``"auto"`` = one day, ``"none"``,
            or a duration).
    """

    data_dir: str | None = None
    stations_file: str = "stations.csv"
    target_vars: tuple[str, ...] = ("TEMP",)
    input_vars: tuple[str, ...] = DEFAULT_INPUT_VARS
    time_features: bool = True
    input_len: int = 24
    output_len: int = 12
    train_fraction: float = 0.7
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    max_steps: int | None = None
    num_clients: int | None = None
    stride: int = 1
    max_windows: int | None = None
    model: str = "gru"
    hidden: int = 32
    widths: tuple[float, ...] = ()
    client_widths: tuple[float, ...] | None = None
    graph_k: int = 3
    seasonal_lags: tuple[str, ...] = ()
    seasonal_period: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", as_widths(self.widths, "widths"))
        object.__setattr__(self, "client_widths", as_widths(self.client_widths, "client_widths"))
        object.__setattr__(self, "seasonal_lags", tuple(self.seasonal_lags))
        for lag in self.seasonal_lags:
            parse_duration(lag, "seasonal_lags")
        if self.seasonal_period not in ("auto", "none"):
            parse_duration(self.seasonal_period, "seasonal_period")
        object.__setattr__(self, "target_vars", as_names(self.target_vars, "target_vars", allow_empty=False))
        object.__setattr__(self, "input_vars", as_names(self.input_vars, "input_vars", allow_empty=True))
        if "wd" in self.target_vars:
            raise ValueError("task option target_vars cannot contain 'wd' (wind direction is an input encoding, not a numeric target)")
        check_choice(self, "model", FORECAST_MODELS)
        check_path(self, "data_dir")
        check_path(self, "stations_file")
        if self.stations_file is None:
            raise ValueError("task option stations_file must be a file name")
        for key in ("input_len", "output_len", "stride", "hidden", "graph_k"):
            check_int(self, key, 1)
        for key in ("max_steps", "num_clients", "max_windows"):
            check_int(self, key, 1, allow_none=True)
        if not isinstance(self.time_features, bool):
            raise ValueError(f"task option time_features={self.time_features!r} must be true or false")
        if not self.input_vars and not self.time_features:
            raise ValueError("task options input_vars is empty and time_features is false: the model would have no input")
        check_fractions(self)


@dataclass(frozen=True)
class StationData:
    """One station file, parsed: ``hours [R]`` (datetime64[h]), ``columns`` name → ``[R]`` float
    (``wd`` already in degrees, NaN = missing or calm … see ``calm``), ``calm [R]`` bool."""

    name: str
    path: Path
    hours: np.ndarray
    columns: dict[str, np.ndarray]
    calm: np.ndarray | None


# -- readers ---------------------------------------------------------------------------------

def read_stations(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``(station names, coords [N, 2] = (latitude, longitude))`` from a ``station,longitude,latitude``
    table (``name``/``lon``/``lng``/``lat`` also accepted, any column order)."""
    path = Path(path)
    rows = [r for r in csv.reader(read_text(path).splitlines()) if any(c.strip() for c in r)]
    if not rows:
        raise ForecastDataError(f"{path}: empty stations table, expected columns station,longitude,latitude")
    head = [c.strip().lower() for c in rows[0]]

    def find(*names):
        return next((head.index(n) for n in names if n in head), None)

    i_name, i_lon, i_lat = find("station", "name", "station_id", "id"), find("longitude", "lon", "lng"), find("latitude", "lat")
    if None in (i_name, i_lon, i_lat):
        raise ForecastDataError(f"{path}: expected columns station, longitude, latitude; got {rows[0]}")
    names, coords = [], []
    for k, r in enumerate(rows[1:]):
        try:
            names.append(r[i_name].strip())
            coords.append((float(r[i_lat]), float(r[i_lon])))
        except (IndexError, ValueError):
            raise ForecastDataError(f"{path}: row {k + 2} needs a station name and numeric longitude/latitude: {r}") from None
    if not names:
        raise ForecastDataError(f"{path}: no stations listed")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ForecastDataError(f"{path}: duplicate stations {dup}")
    coords = np.array(coords, dtype=np.float64)
    if np.any(np.abs(coords[:, 0]) > 90) or np.any(np.abs(coords[:, 1]) > 180):
        raise ForecastDataError(f"{path}: latitude must be in [-90, 90] and longitude in [-180, 180]")
    return names, coords


def _first_station_value(path: Path) -> str | None:
    """The ``station`` column of the first data row, reading only the file's start."""
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = [c.strip().lower() for c in next(reader, [])]
            row = next(reader, None)
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    if row is None or "station" not in header or header.index("station") >= len(row):
        return None
    return row[header.index("station")].strip()


def match_station_files(data_dir: Path, stations: list[str], exclude: Path | None = None) -> dict[str, Path]:
    """Station name → its CSV in ``data_dir`` (rules in the module docstring)."""
    files = sorted({*data_dir.glob("*.csv"), *data_dir.glob("*.csv.gz")})
    if exclude is not None:
        files = [f for f in files if f.resolve() != exclude.resolve()]
    lower = {s.lower(): s for s in stations}
    found: dict[str, list[Path]] = {s: [] for s in stations}
    unmatched = []
    for f in files:
        tokens = {t.lower() for t in re.split(r"[^A-Za-z0-9]+", f.name) if t}
        hits = [lower[t] for t in tokens if t in lower]
        if len(hits) == 1:
            found[hits[0]].append(f)
        elif len(hits) > 1:
            raise ForecastDataError(f"{f}: file name matches several stations {sorted(hits)}")
        else:
            unmatched.append(f)
    for f in unmatched:
        value = _first_station_value(f)
        if value is not None and value.lower() in lower:
            found[lower[value.lower()]].append(f)
    missing = [s for s, fs in found.items() if not fs]
    if missing:
        raise ForecastDataError(
            f"{data_dir}: no CSV for stations {missing} (a file matches a station by a name token or "
            "by its 'station' column)"
        )
    several = {s: [f.name for f in fs] for s, fs in found.items() if len(fs) > 1}
    if several:
        raise ForecastDataError(f"{data_dir}: several files for one station: {several}")
    return {s: fs[0] for s, fs in found.items()}


def _wind_degrees(path: Path, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(degrees with NaN = missing or calm, calm mask)`` from compass strings or numbers."""
    uniq, inverse = np.unique(np.char.upper(np.char.strip(values.astype(str))), return_inverse=True)
    deg = np.full(uniq.size, np.nan)
    calm = np.zeros(uniq.size, dtype=bool)
    bad = []
    for i, u in enumerate(uniq):
        u = u.strip('"')
        if u in COMPASS_DEGREES:
            deg[i] = COMPASS_DEGREES[u]
        elif u in _CALM:
            calm[i] = True
        elif u in ("", "NA", "NAN", "NULL", "N/A"):
            pass
        else:
            try:
                deg[i] = float(u) % 360.0
            except ValueError:
                bad.append(u)
    if bad:
        raise ForecastDataError(
            f"{path}: column wd has values {bad[:5]} that are neither 16-point compass directions, "
            "calm (CV), nor degrees"
        )
    return deg[inverse], calm[inverse]


def read_station_file(path: str | Path, name: str, variables: tuple[str, ...]) -> StationData:
    """Parse the timestamps and the ``variables`` the file has (others are skipped)."""
    path = Path(path)
    text = read_text(path)
    header, body = split_header(path, text)
    lower = [h.lower() for h in header]
    if all(p in lower for p in _DATE_PARTS):
        time_cols = [lower.index(p) for p in _DATE_PARTS]
        time_text = None
    else:
        tcol = next((lower.index(n) for n in _TIME_COLUMN_NAMES if n in lower), None)
        if tcol is None:
            raise ForecastDataError(
                f"{path}: expected columns year, month, day, hour or one datetime/timestamp column; got {header}"
            )
        time_cols, time_text = [], tcol
    numeric = [v for v in variables if v != "wd" and v in header]
    cols = time_cols + [header.index(v) for v in numeric]
    values = read_numeric_columns(path, body, header, cols) if cols else None
    if time_text is None:
        parts = values[:, :4]
        if np.isnan(parts).any():
            raise ForecastDataError(f"{path}: missing values in the year/month/day/hour columns")
        y, mo, d, h = (parts[:, i].astype(np.int64) for i in range(4))
        if np.any((mo < 1) | (mo > 12) | (d < 1) | (d > 31) | (h < 0) | (h > 23)):
            raise ForecastDataError(f"{path}: month/day/hour out of range")
        hours = ((y - 1970).astype("datetime64[Y]").astype("datetime64[M]") + (mo - 1)).astype("datetime64[D]")
        hours = (hours + (d - 1)).astype("datetime64[h]") + h
        numeric_values = values[:, 4:]
    else:
        strings = _string_column(path, body, header, time_text)
        try:
            hours = np.array([s.strip().replace(" ", "T") for s in strings], dtype="datetime64[s]").astype("datetime64[h]")
        except ValueError:
            raise ForecastDataError(f"{path}: column {header[time_text]!r} has values that are not ISO date-times") from None
        numeric_values = values if values is not None else np.zeros((hours.size, 0))
    columns = {v: numeric_values[:, i] for i, v in enumerate(numeric)}
    calm = None
    if "wd" in variables and "wd" in header:
        columns["wd"], calm = _wind_degrees(path, _string_column(path, body, header, header.index("wd")))
    if hours.size == 0:
        raise ForecastDataError(f"{path}: no data rows")
    return StationData(name, path, hours, columns, calm)


def _string_column(path: Path, body: str, header: list[str], col: int) -> np.ndarray:
    import io

    try:
        return np.loadtxt(io.StringIO(body), delimiter=",", usecols=[col], quotechar='"', dtype=str,
                          ndmin=1, comments=None)
    except ValueError as exc:
        raise ForecastDataError(f"{path}: cannot read column {header[col]!r}: {exc}") from None


# -- assembling the task ----------------------------------------------------------------------

def load_weather(options: WeatherOptions) -> tuple[list[StationData], np.ndarray]:
    """The selected stations' parsed files and their coordinates ``[N, 2]`` (lat, lon)."""
    data_dir = require_data_dir(options, "weather")
    stations_path = Path(options.stations_file).expanduser()
    stations_path = stations_path if stations_path.is_absolute() else data_dir / stations_path
    names, coords = read_stations(stations_path)
    if options.num_clients is not None:
        if options.num_clients > len(names):
            raise ValueError(f"task option num_clients={options.num_clients} exceeds the {len(names)} stations in {stations_path}")
        names, coords = names[: options.num_clients], coords[: options.num_clients]
    files = match_station_files(data_dir, names, exclude=stations_path)
    variables = tuple(dict.fromkeys((*options.input_vars, *options.target_vars)))
    stations = [read_station_file(files[n], n, variables) for n in names]
    for st in stations:
        lacking = [v for v in options.target_vars if v not in st.columns]
        if lacking:
            raise ForecastDataError(f"{st.path}: station {st.name!r} lacks the target column(s) {lacking}")
    return stations, coords


def _time_features(hours: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    hour = (hours - hours.astype("datetime64[D]")).astype(np.int64)
    doy = (hours.astype("datetime64[D]") - hours.astype("datetime64[Y]")).astype(np.int64)
    a, b = 2 * np.pi * hour / 24.0, 2 * np.pi * doy / 365.25
    return np.stack([np.sin(a), np.cos(a), np.sin(b), np.cos(b)], axis=1), ("hour_sin", "hour_cos", "doy_sin", "doy_cos")


def make_weather_task(options: WeatherOptions, *, seed: int, stations: list[StationData], coords: np.ndarray) -> ForecastTask:
    """Build the task from parsed stations (the registered factory loads them first)."""
    start = min(st.hours.min() for st in stations)
    stop = max(st.hours.max() for st in stations) + 1
    num_steps = int((stop - start).astype(np.int64))
    if options.max_steps is not None:
        num_steps = min(num_steps, options.max_steps)
    axis = start + np.arange(num_steps)
    t_feats, t_names = _time_features(axis)

    fractions = (options.train_fraction, options.val_fraction, options.test_fraction)
    train_stop = split_bounds(num_steps, fractions)[0][1]
    series = []
    for st in stations:
        idx = (st.hours - start).astype(np.int64)
        if np.unique(idx).size != idx.size:
            raise ForecastDataError(f"{st.path}: duplicate timestamps (hourly data expected)")
        keep = idx < num_steps
        idx = idx[keep]

        def place(v: np.ndarray) -> np.ndarray:
            out = np.full(num_steps, np.nan)
            out[idx] = v[keep]
            return out

        inputs, names, normalize = [], [], []
        for var in options.input_vars:
            if var not in st.columns:
                continue
            if var == "wd":
                deg = place(st.columns["wd"])
                calm = place(st.calm.astype(np.float64)) == 1.0
                rad = np.radians(deg)
                s, c = np.where(calm, 0.0, np.sin(rad)), np.where(calm, 0.0, np.cos(rad))
                cols = [("wd_sin", s), ("wd_cos", c)]
                norm = False
            else:
                cols, norm = [(var, place(st.columns[var]))], True
            for cname, col in cols:
                if np.isnan(col[:train_stop]).all():  # never observed while training: not an input here
                    continue
                inputs.append(col)
                names.append(cname)
                normalize.append(norm)
        if options.time_features:
            inputs.extend(t_feats.T)
            names.extend(t_names)
            normalize.extend([False] * len(t_names))
        if not inputs:
            raise ForecastDataError(f"{st.path}: station {st.name!r} has none of the input variables {list(options.input_vars)}")
        series.append(ClientSeries(
            inputs=np.stack(inputs, axis=1), normalize=np.array(normalize),
            targets=np.stack([place(st.columns[v]) for v in options.target_vars], axis=1),
            input_names=tuple(names), target_names=tuple(options.target_vars),
        ))
    adjacency = knn_adjacency(haversine_km(coords), options.graph_k)
    return build_task(
        "weather", series, num_steps=num_steps, fractions=fractions,
        input_len=options.input_len, output_len=options.output_len, stride=options.stride,
        max_windows=options.max_windows, model=options.model, hidden=options.hidden, seed=seed, widths=options.widths, client_widths=options.client_widths,
        adjacency=adjacency, coordinates=coords, client_names=[st.name for st in stations],
        season=season_steps(options.seasonal_period, 3600), seasonal_lags=lag_steps(options.seasonal_lags, 3600),
        mape=False, sources=[str(st.path) for st in stations],
    )


@TASKS.register("weather", WeatherOptions)
def make_weather(options: WeatherOptions | None = None, *, seed: int) -> ForecastTask:
    """Hourly station weather forecasting (default: Beijing multi-site, TEMP), one client per
    station, per-station input variables; haversine-kNN relation graph."""
    require_data_dir(options, "weather")
    stations, coords = load_weather(options)
    return make_weather_task(options, seed=seed, stations=stations, coords=coords)
