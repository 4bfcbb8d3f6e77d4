"""The ``timeseries`` task on small tables the tests write: wide 10-minute counts with an
adjacency file, a long daily multi-station table with per-station variable sets, every time-axis
and data error, and runs from a TOML config alone."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from shn.cli import main as cli_main
from shn.registry import TASKS
from tasks.base import Task
from tasks.datasets import DataError
from tasks.timeseries import TimeseriesOptions, make_timeseries

STATIONS = ["S1", "S2", "S3", "S4"]


def write_wide(path, days=4, *, start="2024-03-04T00:00", step_min=10, skip=(), extra="", stamp=None):
    """Passenger counts every ``step_min`` minutes per station; the metro is closed (0) 01:00–05:00."""
    rng = np.random.default_rng(0)
    times = np.arange(np.datetime64(start), np.datetime64(start) + np.timedelta64(days, "D"),
                      np.timedelta64(step_min, "m"))
    lines = ["time," + ",".join(STATIONS)]
    values = []
    for i, t in enumerate(times):
        hour = (t - t.astype("datetime64[D]")).astype("timedelta64[m]").astype(int) / 60
        row = [0 if 1 <= hour < 5 else int(20 * (k + 1) * (1.5 + np.sin(2 * np.pi * hour / 24)) + rng.poisson(3))
               for k in range(len(STATIONS))]
        values.append(row)
        if i in skip:
            continue
        text = stamp(t) if stamp else str(t).replace("T", " ")
        lines.append(text + "," + ",".join(map(str, row)))
    path.write_text("\n".join(lines) + "\n" + extra)
    return times, np.array(values, dtype=float)


def write_long(path, days=120, extra=""):
    """Daily station weather; station C has no PRES column values, B lacks RAIN after day 10."""
    rng = np.random.default_rng(1)
    lines = ["station,date,lat,lon,TEMP,RAIN,PRES,remark"]
    coords = {"A": (39.9, 116.4), "B": (39.8, 116.3), "C": (31.2, 121.5)}
    for name, (lat, lon) in coords.items():
        for d in np.arange(np.datetime64("2023-01-01"), np.datetime64("2023-01-01") + np.timedelta64(days, "D")):
            doy = (d - d.astype("datetime64[Y]")).astype(int)
            temp = 5 - 10 * np.cos(2 * np.pi * doy / 365) + rng.normal()
            rain = "" if name == "B" and doy > 10 else f"{max(0.0, rng.normal(0, 2)):.2f}"
            pres = "" if name == "C" else f"{1010 + rng.normal():.1f}"
            lines.append(f"{name},{d},{lat},{lon},{temp:.2f},{rain},{pres},ok")
    path.write_text("\n".join(lines) + "\n" + extra)


def wide_opts(path, **kw):
    return TimeseriesOptions(**{"files": str(path), "variable": "flow", "input_len": 6, "output_len": 6, **kw})


def test_wide_counts_with_adjacency_zero_counts_are_values(tmp_path):
    times, values = write_wide(tmp_path / "flow.csv", days=5)
    (tmp_path / "adj.csv").write_text("S1,S2\nS2,S3\nS4,S3\n")  # edge list without header, by station name
    task = make_timeseries(wide_opts(tmp_path / "flow.csv", graph_file="adj.csv", data_dir=str(tmp_path)), seed=0)
    assert isinstance(task, Task) and TASKS.get("timeseries").options is TimeseriesOptions
    assert task.client_names() == STATIONS and task.num_steps == times.size and task.step_seconds == 600
    # 10-minute data over 5 days: time of day and day of week, no day of year
    assert task.feature_names(0) == ("flow", "time_of_day_sin", "time_of_day_cos", "day_of_week_sin", "day_of_week_cos")
    a = task.relation_adjacency()
    assert a[0, 1] == 1 and a[2, 3] == 1 and a[3, 2] == 1 and float(a.sum()) == 6
    x, y, mask, scale = task.client_data(1).test
    assert torch.all(mask == 1)  # night-time zeros are observed counts
    truth = y * scale[:, 0:1] + scale[:, 1:2]
    assert float((truth.abs() < 1e-3).float().mean()) > 0.1
    assert "test_mape" not in {f"test_{k}" for k in task.finalize({k: float(v) for k, v in task.metrics(y, y, mask, scale).items()})}
    masked = make_timeseries(wide_opts(tmp_path / "flow.csv", zeros_are_missing=True), seed=0)
    m = masked.client_data(1).test[2]
    assert 0 < float(m.mean()) < 0.9
    assert masked.relation_adjacency() is None


def test_wide_gaps_are_missing_and_freq_can_be_given(tmp_path):
    times, values = write_wide(tmp_path / "flow.csv", skip={300, 301})
    task = make_timeseries(wide_opts(tmp_path / "flow.csv", freq="10min"), seed=0)
    assert task.num_steps == times.size
    starts = task.window_starts["train"]
    i = int(np.flatnonzero(starts + 6 == 300)[0])
    assert task.client_data(0).train[2][i, :2, 0].tolist() == [0.0, 0.0]
    hourly = make_timeseries(wide_opts(tmp_path / "flow.csv", freq="5min", calendar=[]), seed=0)
    assert hourly.num_steps == 2 * times.size - 1 and hourly.feature_names(0) == ("flow",)


def test_long_daily_stations_with_per_station_variable_sets(tmp_path, caplog):
    write_long(tmp_path / "weather.csv")
    opts = dict(files=str(tmp_path / "weather.csv"), client_column="station", target_vars=["TEMP"],
                coordinate_columns=["lat", "lon"], graph_k=1, input_len=7, output_len=3)
    with caplog.at_level(logging.WARNING, logger="tasks.timeseries"):
        task = make_timeseries(TimeseriesOptions(**opts), seed=0)
    assert any("['remark']" in r.getMessage() and "not numeric" in r.getMessage() for r in caplog.records)
    assert task.client_names() == ["A", "B", "C"] and task.step_seconds == 86400
    # every station keeps TEMP, RAIN, PRES (C's PRES is a constant 0 input): one input size for all methods
    assert task.input_sizes() == [7, 7, 7]
    assert task.feature_names(2)[:3] == ("TEMP", "RAIN", "PRES")
    assert task.feature_names(0)[3:] == ("day_of_week_sin", "day_of_week_cos", "day_of_year_sin", "day_of_year_cos")
    assert float(task.client_data(2).train[0][..., 2].abs().max()) == 0.0
    assert task.relation_adjacency()[0, 1] == 1 and task.relation_adjacency()[2].sum() == 1  # C's nearest is A or B
    assert np.allclose(task.coordinates()[2], (31.2, 121.5))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.timeseries"):
        drop = make_timeseries(TimeseriesOptions(**opts, absent_inputs="drop"), seed=0)
    assert drop.input_sizes() == [7, 7, 6] and "PRES" not in drop.feature_names(2)
    assert any("'C': ['PRES']" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="target_vars is not set and the data have several variables"):
        make_timeseries(TimeseriesOptions(**{**opts, "target_vars": ()}), seed=0)


def test_timestamp_formats(tmp_path):
    write_wide(tmp_path / "a.csv", days=3, stamp=lambda t: t.astype(object).strftime("%d/%m/%Y %H:%M"))
    task = make_timeseries(wide_opts(tmp_path / "a.csv", timestamp_format="%d/%m/%Y %H:%M"), seed=0)
    assert str(task.start_time) == "2024-03-04T00:00:00"
    write_wide(tmp_path / "b.csv", days=3, stamp=lambda t: str(t.astype("datetime64[s]").astype(np.int64)))
    assert make_timeseries(wide_opts(tmp_path / "b.csv", timestamp_format="unix"), seed=0).num_steps == 432
    write_wide(tmp_path / "c.csv", days=3, stamp=lambda t: str(t) + ":00+01:00")
    assert str(make_timeseries(wide_opts(tmp_path / "c.csv"), seed=0).start_time) == "2024-03-03T23:00:00"


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(extra="2024-03-08 00:05,1,2,3,4\n"),
     r"flow\.csv line 578: column 'time' \(task option time_column\) has 2024-03-08T00:05:00, which is not on the "
     r"10min grid starting at 2024-03-04T00:00:00 \(1 such rows\); expected a regular time axis"),
    (dict(extra="08.03.2024,1,2,3,4\n"),
     r"flow\.csv line 578: column 'time' \(task option time_column\) has '08\.03\.2024', which is not a date-time; "
     r"expected ISO 8601"),
    (dict(extra="2024-03-04 00:10,1,2,3,4\n"),
     r"flow\.csv line 578: a second row for 2024-03-04T00:10:00 \(column 'time'\); expected one row per time step"),
    (dict(extra="2024-03-08 00:00,1,2,x,4\n"),
     r"flow\.csv line 578: column 'S3' \(task option files \(a client column\)\) has 'x'; expected numbers \(flow of client 'S3'\)"),
    (dict(extra="2030-01-01 00:00,1,2,3,4\n"), r"flow\.csv: column 'time' .* spans 2024-03-04T00:00:00 to 2030-01-01"),
])
def test_time_axis_and_value_errors_name_file_line_and_column(tmp_path, kwargs, pattern):
    write_wide(tmp_path / "flow.csv", **kwargs)
    with pytest.raises(DataError, match=pattern):
        make_timeseries(wide_opts(tmp_path / "flow.csv"), seed=0)


def test_long_errors(tmp_path):
    write_long(tmp_path / "w.csv", days=60, extra="A,2023-01-05,39.9,116.4,1,1,1010,ok\n")
    base = dict(files=str(tmp_path / "w.csv"), client_column="station", target_vars=["TEMP"], input_len=5, output_len=2)
    with pytest.raises(DataError, match=r"w\.csv line 182: client 'A' has a second row for 2023-01-05T00:00:00 "
                                        r"\(column 'date'\); expected one row per client and time step"):
        make_timeseries(TimeseriesOptions(**base), seed=0)
    write_long(tmp_path / "w.csv", days=60)
    with pytest.raises(DataError, match=r"w\.csv: no column 'when' \(task option time_column\)"):
        make_timeseries(TimeseriesOptions(**base, time_column="when"), seed=0)
    with pytest.raises(DataError, match=r"no variable 'SNOW' \(task option target_vars\); the variables are lat, lon, TEMP, RAIN, PRES"):
        make_timeseries(TimeseriesOptions(**{**base, "target_vars": ["SNOW"]}), seed=0)
    with pytest.raises(DataError, match=r"w\.csv line 2: column 'remark' \(task option variables\) has 'ok'; expected numbers"):
        make_timeseries(TimeseriesOptions(**base, variables=["TEMP", "remark"]), seed=0)
    # B has RAIN only in its first days: as a target it is unobserved in val and test
    with pytest.raises(DataError, match=r"w\.csv: client 'B' has no observed value of 'RAIN' \(column 'RAIN'\) in the val "
                                        r"period 2023-02-12T00:00:00 … 2023-02-17T00:00:00; expected values in every split"):
        make_timeseries(TimeseriesOptions(**{**base, "target_vars": ["RAIN"]}), seed=0)
    with pytest.raises(DataError, match=r"client 'C' has no value of target variable 'PRES' \(column 'PRES'\)"):
        make_timeseries(TimeseriesOptions(**{**base, "target_vars": ["PRES"]}), seed=0)


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"freq='10 minutes please' is not a duration"):
        TimeseriesOptions(freq="10 minutes please")
    with pytest.raises(ValueError, match=r"months and years differ in length"):
        TimeseriesOptions(freq="1M")
    with pytest.raises(ValueError, match=r"layout = \"long\" needs client_column"):
        TimeseriesOptions(layout="long")
    with pytest.raises(ValueError, match=r"calendar=\['hour'\]"):
        TimeseriesOptions(calendar=["hour"])
    with pytest.raises(ValueError, match=r"absent_inputs='mean' is not allowed"):
        TimeseriesOptions(absent_inputs="mean")


def test_seasonal_lags_and_their_limits(tmp_path):
    times, values = write_wide(tmp_path / "flow.csv", days=6)
    task = make_timeseries(wide_opts(tmp_path / "flow.csv", seasonal_lags=["1D", "2h"], calendar=[]), seed=0)
    assert task.feature_names(0) == ("flow", "flow_lag144", "flow_lag12")
    x, y, mask, scale = task.client_data(2).test
    norm = task.normalization(2)
    lag = x[..., 1].numpy() * norm["input_std"][1] + norm["input_mean"][1]
    starts = task.window_starts["test"]
    # input step t holds the target at t + output_len - lag
    t = starts[:, None] + np.arange(6)[None, :]
    assert np.allclose(lag, values[t + 6 - 144, 2], atol=1e-3)
    with pytest.raises(ValueError, match=r"a lag of 3 steps is shorter than output_len = 6"):
        make_timeseries(wide_opts(tmp_path / "flow.csv", seasonal_lags=["30min"]), seed=0)
    with pytest.raises(ValueError, match=r"seasonal_lags='25min' is not a whole number of time steps of 10min"):
        make_timeseries(wide_opts(tmp_path / "flow.csv", seasonal_lags=["25min"]), seed=0)


def _toml(tmp_path, method: str, task: dict) -> str:
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in task.items())
    path = tmp_path / f"{method}.toml"
    path.write_text(f"""method = "{method}"
rounds = 2
clients_per_round = 2
eval_every = 1

[task]
name = "timeseries"
{body}

[local]
steps = 2
batch_size = 16

[hypernetwork]
hidden = 16
n_hidden = 1
""")
    return str(path)


@pytest.mark.parametrize("method", ["pfedhn", "fedavg"])
@pytest.mark.parametrize("layout", ["wide", "long"])
def test_runs_two_rounds_from_a_toml_config_alone_with_baselines_in_the_summary(tmp_path, method, layout):
    if layout == "wide":
        write_wide(tmp_path / "flow.csv", days=3)
        (tmp_path / "adj.csv").write_text("source,target\nS1,S2\nS2,S3\nS3,S4\n")
        task = dict(files=str(tmp_path / "flow.csv"), variable="flow", graph_file=str(tmp_path / "adj.csv"),
                    input_len=6, output_len=6, hidden=8, max_windows=20, seasonal_lags=["1D"])
    else:
        write_long(tmp_path / "weather.csv", days=90)
        task = dict(files=str(tmp_path / "weather.csv"), client_column="station", target_vars=["TEMP"],
                    coordinate_columns=["lat", "lon"], variables=["TEMP", "RAIN", "PRES"], input_len=5, output_len=2,
                    hidden=8)
    config = _toml(tmp_path, method, task)
    assert cli_main(["run", config, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert np.isfinite(summary["metrics"]["test_mse"]) and "test_wape" in summary["metrics"]
    assert "test_mape" not in summary["metrics"]
    assert set(summary["baselines"]) == {"persistence", "seasonal_naive", "train_mean"}
    assert all(np.isfinite(b["test_mse"]) for b in summary["baselines"].values())


def test_given_graph_without_one_is_a_one_line_error(tmp_path, capsys):
    write_wide(tmp_path / "flow.csv", days=3)
    config = _toml(tmp_path, "shn", dict(files=str(tmp_path / "flow.csv"), input_len=6, output_len=3, hidden=8))
    with open(config, "a") as fh:
        fh.write('\n[graph]\nkind = "given"\n')
    assert cli_main(["run", config, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "graph.kind = 'given' but task 'timeseries' has no relation graph" in err[0]
