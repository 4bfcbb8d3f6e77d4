"""Regular time axes: durations such as ``"10min"``, the step of a timestamp column, placing rows
on the axis, calendar features and seasons that fit the step.

Durations: an optional count and a unit — ``s``, ``min`` (or ``T``), ``h``, ``D``, ``W`` (``"10min"``,
``"1h"``, ``"D"``, ``"2W"``). Months and years are not fixed durations and are refused.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from tasks.tables import Table, TableError

__all__ = ["parse_duration", "format_duration", "infer_step", "place_on_axis", "calendar_features",
           "auto_calendar", "season_steps", "lag_steps", "CALENDAR_FEATURES", "DAY", "WEEK"]

DAY, WEEK = 86400, 7 * 86400
_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "min": 60, "t": 60, "minute": 60, "minutes": 60,
          "h": 3600, "hour": 3600, "hours": 3600, "d": DAY, "day": DAY, "days": DAY, "w": WEEK, "week": WEEK,
          "weeks": WEEK}
CALENDAR_FEATURES = ("time_of_day", "day_of_week", "day_of_year")


def parse_duration(text: str, key: str) -> int:
    """Seconds in ``text`` (e.g. ``"10min"`` → 600); a ``ValueError`` naming ``key`` otherwise."""
    m = re.fullmatch(r"\s*(\d+)?\s*([A-Za-z]+)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or (m.group(1) is not None and int(m.group(1)) == 0):
        hint = " (months and years differ in length; use days)" if unit in ("m", "mo", "month", "months", "y", "year", "years", "a") else ""
        raise ValueError(f"task option {key}={text!r} is not a duration; expected a count and a unit s, min, h, D or W "
                         f"such as \"10min\", \"1h\", \"1D\"{hint}")
    return int(m.group(1) or 1) * _UNITS[unit]


def format_duration(seconds: int) -> str:
    for unit, size in (("W", WEEK), ("D", DAY), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def infer_step(times: np.ndarray, where: str) -> int:
    """The most common gap (seconds) between consecutive distinct ``times`` (ties: the smaller)."""
    uniq = np.unique(times.astype("datetime64[s]"))
    if uniq.size < 2:
        raise TableError(f"{where}: only {uniq.size} distinct timestamp(s); a time series needs at least two")
    gaps, counts = np.unique(np.diff(uniq).astype(np.int64), return_counts=True)
    return int(gaps[np.argmax(counts)])


def place_on_axis(times: np.ndarray, step: int, table: Table, rows: np.ndarray, column: str,
                  freq_given: bool) -> tuple[np.datetime64, np.ndarray, int]:
    """``(start, index [R], num_steps)``: each of ``times`` (the ``rows`` of ``table``) as a step
    index on the axis from the earliest time at ``step`` seconds. An off-grid time (an irregular
    axis) or an axis far longer than the data are errors naming the file, line and column."""
    times = times.astype("datetime64[s]")
    start = times.min()
    offset = (times - start).astype(np.int64)
    off_grid = np.flatnonzero(offset % step)
    if off_grid.size:
        r = int(off_grid[0])
        fix = "fix the timestamp" if freq_given else "set freq to the data's interval, or fix the timestamp"
        raise TableError(
            f"{table.at(int(rows[r]))}: column {column!r} (task option time_column) has {times[r]}, which is not on "
            f"the {format_duration(step)} grid starting at {start} ({len(off_grid)} such rows); expected a regular "
            f"time axis ({fix})"
        )
    index = offset // step
    num_steps = int(index.max()) + 1
    distinct = int(np.unique(index).size)
    if num_steps > max(10_000, 50 * distinct):
        raise TableError(
            f"{table.source}: column {column!r} (task option time_column) spans {start} to {times.max()}: "
            f"{num_steps} steps of {format_duration(step)} for only {distinct} distinct timestamps; expected a regular "
            "time axis (check for a stray timestamp, or set freq)"
        )
    return start, index, num_steps


def auto_calendar(step: int, span: int) -> tuple[str, ...]:
    """Calendar features that fit a step of ``step`` seconds over ``span`` seconds: time of day
    below daily steps, day of week below weekly steps, day of year for daily or coarser steps or
    when the data cover a year."""
    names = []
    if step < DAY:
        names.append("time_of_day")
    if step < WEEK:
        names.append("day_of_week")
    if step >= DAY or span >= 365 * DAY:
        names.append("day_of_year")
    return tuple(names)


def calendar_features(axis: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """``([S, 2·k] sin/cos columns, their names)`` for the calendar features ``names`` on ``axis``
    (``datetime64``)."""
    axis = axis.astype("datetime64[s]")
    days = axis.astype("datetime64[D]")
    cols, out_names = [], []
    for name in names:
        if name == "time_of_day":
            phase = (axis - days).astype(np.int64) / DAY
        elif name == "day_of_week":  # Monday = 0 (1970-01-01 was a Thursday)
            phase = ((days.astype(np.int64) + 3) % 7) / 7.0
        elif name == "day_of_year":
            phase = (days - axis.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64) / 365.25
        else:
            raise ValueError(f"unknown calendar feature {name!r}; choose from {', '.join(CALENDAR_FEATURES)}")
        cols += [np.sin(2 * np.pi * phase), np.cos(2 * np.pi * phase)]
        out_names += [f"{name}_sin", f"{name}_cos"]
    if not cols:
        return np.zeros((axis.size, 0)), ()
    return np.stack(cols, axis=1), tuple(out_names)


def _steps(seconds: int, step: int, key: str, text: str) -> int:
    if seconds % step:
        raise ValueError(f"task option {key}={text!r} is not a whole number of time steps of {format_duration(step)}")
    return seconds // step


def season_steps(spec: str, step: int) -> int | None:
    """Steps per season for the seasonal naive forecast: ``"auto"`` = one day below daily steps,
    one week for daily to sub-weekly steps, 52 weeks for weekly steps (``None`` where the step does
    not divide it); ``"none"``; or a duration."""
    if spec == "none":
        return None
    if spec == "auto":
        period = DAY if step < DAY else (WEEK if step < WEEK else 52 * WEEK)
        return period // step if period % step == 0 and period > step else None
    return _steps(parse_duration(spec, "seasonal_period"), step, "seasonal_period", spec)


def lag_steps(lags: Sequence[str], step: int) -> tuple[int, ...]:
    """``seasonal_lags`` durations as whole numbers of steps."""
    return tuple(_steps(parse_duration(text, "seasonal_lags"), step, "seasonal_lags", text) for text in lags)
