"""CSV tables (tasks.tables) and regular time axes (tasks.timeaxis)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from tasks.datasets import DataError
from tasks.tables import read_table, resolve_files
from tasks.timeaxis import (
    auto_calendar,
    calendar_features,
    format_duration,
    infer_step,
    lag_steps,
    parse_duration,
    season_steps,
)


def test_read_table_several_files_in_any_column_order(tmp_path):
    (tmp_path / "a.csv").write_text('c,x\nu," 1.5"\n\nv,NA\n')
    with gzip.open(tmp_path / "b.csv.gz", "wt") as fh:
        fh.write("x,c\n2,w\n")
    t = read_table(resolve_files(["a.csv", "*.gz"], str(tmp_path)))
    assert t.header == ("c", "x") and t.num_rows == 3
    assert t.strings("c", "k").tolist() == ["u", "v", "w"]
    assert np.allclose(t.numeric("x", "k"), [1.5, np.nan, 2.0], equal_nan=True)
    assert t.at(1) == f"{tmp_path / 'a.csv'} line 4" and t.at(2) == f"{tmp_path / 'b.csv.gz'} line 2"


def test_read_table_errors(tmp_path):
    (tmp_path / "a.csv").write_text("c,x\nu,1\n")
    (tmp_path / "b.csv").write_text("c,y\nu,1\n")
    with pytest.raises(DataError, match=r"b\.csv: expected the same columns as .*a\.csv; missing \['x'\], extra \['y'\]"):
        read_table([tmp_path / "a.csv", tmp_path / "b.csv"])
    (tmp_path / "d.csv").write_text("c,c\n1,2\n")
    with pytest.raises(DataError, match=r"d\.csv: duplicate column names \['c'\]"):
        read_table([tmp_path / "d.csv"])
    (tmp_path / "e.csv").write_text("c,x\n")
    with pytest.raises(DataError, match=r"e\.csv: no data rows after the header"):
        read_table([tmp_path / "e.csv"])
    t = read_table([tmp_path / "a.csv"])
    with pytest.raises(DataError, match=r"a\.csv: no column 'z' \(task option opt\); the columns are c, x"):
        t.require("z", "opt")
    with pytest.raises(DataError, match=r"a\.csv line 2: column 'c' \(task option opt\) has 'u'; expected digits"):
        t.numeric("c", "opt", "digits")


def test_timestamps(tmp_path):
    (tmp_path / "t.csv").write_text("t\n2024-01-31\n2024/01/31 13:50\n2024-01-31T13:50:00Z\n2024-01-31 14:50:00+01:00\n")
    t = read_table([tmp_path / "t.csv"])
    got = t.timestamps("t", "time_column")
    assert [str(v) for v in got] == ["2024-01-31T00:00:00", "2024-01-31T13:50:00", "2024-01-31T13:50:00",
                                     "2024-01-31T13:50:00"]


def test_durations_steps_and_seasons():
    assert [parse_duration(s, "k") for s in ("10min", "1h", "D", "2W", "30s", "15T")] == [600, 3600, 86400, 1209600, 30, 900]
    assert format_duration(600) == "10min" and format_duration(86400) == "1D" and format_duration(90) == "90s"
    times = np.array(["2024-01-01T00:00", "2024-01-01T00:10", "2024-01-01T00:20", "2024-01-01T01:00"], dtype="datetime64[s]")
    assert infer_step(times, "x") == 600
    with pytest.raises(DataError, match="only 1 distinct timestamp"):
        infer_step(times[:1], "x")
    assert season_steps("auto", 600) == 144 and season_steps("auto", 86400) == 7 and season_steps("auto", 7 * 86400) == 52
    assert season_steps("auto", 7 * 3600) is None and season_steps("none", 600) is None and season_steps("2h", 600) == 12
    assert lag_steps(["1D", "7D"], 3600) == (24, 168)
    assert auto_calendar(600, 30 * 86400) == ("time_of_day", "day_of_week")
    assert auto_calendar(86400, 30 * 86400) == ("day_of_week", "day_of_year")
    assert auto_calendar(3600, 400 * 86400) == ("time_of_day", "day_of_week", "day_of_year")
    assert auto_calendar(7 * 86400, 400 * 86400) == ("day_of_year",)


def test_calendar_features_values():
    axis = np.array(["2024-01-01T06:00", "2024-01-03T00:00"], dtype="datetime64[s]")  # a Monday; a Wednesday
    values, names = calendar_features(axis, ("time_of_day", "day_of_week", "day_of_year"))
    assert names == ("time_of_day_sin", "time_of_day_cos", "day_of_week_sin", "day_of_week_cos",
                     "day_of_year_sin", "day_of_year_cos")
    assert np.allclose(values[0, :2], [1.0, 0.0], atol=1e-12)  # 06:00 = a quarter day
    assert np.allclose(values[0, 2:4], [0.0, 1.0]) and np.allclose(values[1, 2], np.sin(2 * np.pi * 2 / 7))
    assert np.allclose(values[1, 4], np.sin(2 * np.pi * 2 / 365.25))


def test_line_numbers_survive_quoted_line_breaks_and_blank_lines(tmp_path):
    (tmp_path / "q.csv").write_text('c,note,x\na,"two\nlines",1\n\nb,plain,oops\n')
    t = read_table([tmp_path / "q.csv"])
    assert t.num_rows == 2 and t.line.tolist() == [3, 5]
    with pytest.raises(DataError, match=r"q\.csv line 5: column 'x' \(task option k\) has 'oops'"):
        t.numeric("x", "k")
    (tmp_path / "r.csv").write_text('c,x\n"a\nb",1\n\nc\n')
    with pytest.raises(DataError, match=r"r\.csv line 5: 1 fields, expected 2"):
        read_table([tmp_path / "r.csv"])
