"""Absurd data (issue 15 item 22): values too large to standardise (a 1e308 sentinel in a station
file, a unit error) are refused at load with one line naming the file and column; a client whose
metrics are still non-finite is counted and reported (``nonfinite_clients``), not silently
averaged away."""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from shn.cli import main
from shn.config import config_from_dict, dumps_toml
from shn.runner import make_task, run
from tasks.datasets import DataError
from tasks.tabular import make_tabular
from tasks.timeseries import make_timeseries
from tasks.weather import WeatherOptions, make_weather
from tests.test_forecasting import _weather_folder
from tests.test_tabular import opts, write_table
from tests.test_timeseries import wide_opts, write_wide


def _set_cell(path, column: str, row: int, value: str) -> None:
    """Rewrite one cell of a CSV (row 0 = first data row)."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    rows[row + 1][rows[0].index(column)] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path.write_text(out.getvalue())


# -- refused at load -------------------------------------------------------------------------------

@pytest.mark.parametrize("column, row, value", [
    ("TEMP", 50, "1e308"),    # in the training period: the statistics overflow
    ("TEMP", 190, "1e308"),   # in the test period: the standardised value overflows float32
    ("TEMP", 50, "-1e200"),
    ("PRES", 60, "1e308"),    # an input variable
])
def test_weather_station_with_an_absurd_value_is_refused_naming_file_and_column(tmp_path, column, row, value):
    _weather_folder(tmp_path)
    _set_cell(tmp_path / "third_site.csv", column, row, value)
    with pytest.raises(DataError) as info:
        make_weather(WeatherOptions(data_dir=str(tmp_path), input_len=12, output_len=6), seed=0)
    msg = str(info.value)
    assert "\n" not in msg
    for word in ("third_site.csv", "'Gamma'", column, "cannot be standardised"):
        assert word in msg, (word, msg)


def test_weather_absurd_value_is_one_line_exit_2_from_the_command_line(tmp_path, capsys):
    _weather_folder(tmp_path)
    _set_cell(tmp_path / "third_site.csv", "TEMP", 50, "1e308")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml({"method": "local", "rounds": 1, "clients_per_round": 3,
                               "task": {"name": "weather", "data_dir": str(tmp_path), "input_len": 12,
                                        "output_len": 6}}))
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "third_site.csv" in err and "TEMP" in err


def test_traffic_absurd_speed_is_refused_naming_file_and_sensor(tmp_path):
    from tasks.traffic import TrafficOptions, make_traffic
    from tests.test_forecasting import _write_traffic

    _write_traffic(tmp_path, n=3, steps=120)
    _set_cell(tmp_path / "los_speed.csv", "701", 100, "1e308")
    with pytest.raises(DataError, match=r"los_speed\.csv: task 'traffic', client '701'.*cannot be standardised"):
        make_traffic(TrafficOptions(data_dir=str(tmp_path), input_len=4, output_len=3), seed=0)


def test_timeseries_absurd_value_is_refused_naming_file_and_column(tmp_path):
    path = tmp_path / "flow.csv"
    write_wide(path)
    _set_cell(path, "S3", 40, "1e308")
    with pytest.raises(DataError, match=r"flow\.csv.*'S3'.*cannot be standardised"):
        make_timeseries(wide_opts(path), seed=0)


@pytest.mark.parametrize("scaling", ["client", "global", "none"])
def test_tabular_absurd_feature_is_refused_naming_file_and_column(tmp_path, scaling):
    path = write_table(tmp_path / "t.csv")
    _set_cell(path, "age", 3, "1e308")
    with pytest.raises(DataError, match=r"t\.csv.*\['age'\].*cannot be standardised"):
        make_tabular(opts(path, scaling=scaling), seed=0)


def test_tabular_absurd_regression_target_is_refused(tmp_path):
    path = write_table(tmp_path / "t.csv")
    _set_cell(path, "price", 3, "1e300")
    with pytest.raises(DataError, match=r"t\.csv.*\['price'\].*cannot be standardised"):
        make_tabular(opts(path, target_column="price", exclude_columns=["label"], problem="regression"), seed=0)


def test_ordinary_data_still_loads(tmp_path):
    _weather_folder(tmp_path)
    task = make_weather(WeatherOptions(data_dir=str(tmp_path), input_len=12, output_len=6), seed=0)
    assert all(torch.isfinite(t).all() for c in range(3) for t in task.client_data(c).train)


# -- counted and reported --------------------------------------------------------------------------

TINY = {"method": "fedavg", "seed": 0, "rounds": 2, "clients_per_round": 4, "eval_every": 1,
        "task": {"name": "digits", "num_clients": 4, "model": "mlp"}, "local": {"steps": 1, "batch_size": 16}}


def _with_nan_test_inputs(task, client: int):
    """``task`` whose ``client`` has NaN test inputs: data that got past its loader."""
    real = task.client_data

    def client_data(c):
        data = real(c)
        if c != client:
            return data
        x, *rest = data.test
        return replace(data, test=(torch.full_like(x, math.nan), *rest))

    task.client_data = client_data
    return task


def test_clients_with_non_finite_metrics_are_counted_and_reported(tmp_path, caplog):
    config = config_from_dict(TINY)
    task = _with_nan_test_inputs(make_task(config), 2)
    with caplog.at_level(logging.WARNING, logger="shn.simulation"):
        result = run(config, task=task, run_dir=tmp_path, progress=False)
    assert result.summary["nonfinite_clients"] == [2]
    assert [h["nonfinite_clients"] for h in result.history] == [1, 1]
    assert math.isfinite(result.metrics["test_loss"])  # the mean over the other three
    others = [row["test_loss"] for c, row in result.per_client.items() if c != 2]
    assert result.metrics["test_loss"] == pytest.approx(sum(others) / 3)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "[2]" in warnings[0]  # once, not at every evaluation


def test_a_run_without_them_reports_none():
    result = run(config_from_dict(with_rounds(1)), progress=False)
    assert result.summary["nonfinite_clients"] == [] and result.history[-1]["nonfinite_clients"] == 0


def with_rounds(rounds: int) -> dict:
    return {**TINY, "rounds": rounds}


def test_nonfinite_client_list_uses_the_primary_metric():
    from shn.federated.simulation import nonfinite_clients

    rows = {0: {"test_loss": 1.0, "test_mae": math.nan, "test_mae_h12": math.nan},
            1: {"test_loss": 1.0, "test_mae": 2.0, "test_mae_h12": math.nan},  # a horizon without targets: fine
            2: {"val_loss": math.inf, "test_mae": 2.0}}
    assert nonfinite_clients(rows, "mae") == [0, 2]
    assert np.array_equal(nonfinite_clients({}, "mae"), [])
