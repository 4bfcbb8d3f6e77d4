"""Naive forecasts (tasks.naive) on the same masked test targets, WAPE, seasonal lag inputs, and
the traffic/weather options that use them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.forecasting import (
    ClientSeries,
    add_seasonal_lags,
    build_task,
    forecast_finalize,
    forecast_metrics,
    prepare_client,
    split_bounds,
)
from tasks.naive import naive_predictions, season_back
from tasks.traffic import TrafficOptions, make_traffic
from tasks.weather import WeatherOptions, make_weather
from tests.test_forecasting import _weather_folder, _write_traffic


def _client(values, zero_missing=False):
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    zm = np.array([zero_missing])
    return ClientSeries(v, np.array([True]), v.copy(), ("v",), ("v",), zm, zm)


def test_season_back_never_reads_after_the_origin():
    assert season_back(5, 2).tolist() == [2, 2, 4, 4, 6]
    assert season_back(3, 24).tolist() == [24, 24, 24]
    assert np.all(season_back(7, 3) >= np.arange(1, 8))


def test_naive_predictions_by_hand():
    filled = np.array([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0]])
    mean, std = np.array([4.0]), np.array([2.0])
    out = naive_predictions(filled, mean, std, np.array([2]), input_len=3, output_len=3, season=2)
    # origin = step 4 (value 5): targets at steps 5, 6, 7
    assert np.allclose(out["persistence"][0, :, 0] * 2 + 4, [5, 5, 5])
    # seasonal (m = 2): step 5 ← 3, step 6 ← 4 (one season back), step 7 ← 3 (two seasons: never after the origin)
    assert np.allclose(out["seasonal_naive"][0, :, 0] * 2 + 4, [4, 5, 4])
    assert np.all(out["train_mean"] == 0)
    # a season before the start of the series falls back to the train mean (0 z-scored)
    early = naive_predictions(filled, mean, std, np.array([0]), input_len=1, output_len=2, season=4)
    assert np.all(early["seasonal_naive"] == 0)
    none = naive_predictions(filled, mean, std, np.array([0]), input_len=1, output_len=2, season=None)
    assert set(none) == {"persistence", "train_mean"}


def test_baselines_are_scored_on_the_models_test_targets():
    rng = np.random.default_rng(0)
    day = 12
    base = np.tile(10 + 5 * np.sin(2 * np.pi * np.arange(day) / day), 20) + 0.1 * rng.standard_normal(20 * day)
    values = base.copy()
    values[200] = np.nan  # a missing test target: excluded from every score
    bounds = split_bounds(values.size, (0.7, 0.1, 0.2))
    p = prepare_client(_client(values), bounds, input_len=4, output_len=3, season=day, mape=False)
    x, y, mask, scale = p.data.test
    assert set(p.baseline_sums) == {"persistence", "seasonal_naive", "train_mean"}
    for name, sums in p.baseline_sums.items():
        assert sums["count"] == float(mask.sum()) and "ape" not in sums
    r = {k: forecast_finalize(s, (3,)) for k, s in p.baseline_sums.items()}
    # seasonal naive ≈ noise (a few targets read the forward-filled gap at step 200)
    assert r["seasonal_naive"]["mse"] < 0.2 < 1 < r["persistence"]["mse"] and r["train_mean"]["mse"] > 5
    # train_mean by hand: the train-period mean predicted for every observed target
    truth = (y * scale[:, 0:1] + scale[:, 1:2])[mask > 0].numpy()
    assert r["train_mean"]["mse"] == pytest.approx(float(((truth - p.target_mean[0]) ** 2).mean()), rel=1e-5)


def test_wape_by_hand_and_mape_only_on_request():
    out = torch.zeros(1, 3, 1)
    y = torch.tensor([[[0.0], [1.0], [-1.0]]])
    mask = torch.tensor([[[1.0], [1.0], [0.0]]])
    scale = torch.tensor([[[2.0], [1.0]]])  # std 2, mean 1: truth 1, 3, (-1 masked); prediction 1
    sums = {k: float(v) for k, v in forecast_metrics(out, y, mask, scale, horizons=(), mape=False).items()}
    r = forecast_finalize(sums, ())
    assert r["wape"] == pytest.approx((0 + 2) / (1 + 3)) and "mape" not in r
    with_mape = forecast_finalize({k: float(v) for k, v in forecast_metrics(out, y, mask, scale, horizons=()).items()}, ())
    assert with_mape["mape"] == pytest.approx((0 + 2 / 3) / 2)


def test_seasonal_lag_input_by_hand():
    values = np.arange(30, dtype=float)
    s = add_seasonal_lags(_client(values), [5], output_len=2)
    assert s.input_names == ("v", "v_lag5") and s.normalize.tolist() == [True, True]
    lag = s.inputs[:, 1]
    assert np.isnan(lag[:3]).all() and np.allclose(lag[3:], values[:27])  # step t ← t + 2 − 5
    with pytest.raises(ValueError, match="shorter than output_len = 2"):
        add_seasonal_lags(_client(values), [1], output_len=2)


def test_build_task_naive_baselines_mean_over_clients():
    series = [_client(np.sin(np.arange(120) / 3) + k) for k in range(3)]
    task = build_task("t", series, num_steps=120, fractions=(0.7, 0.1, 0.2), input_len=6, output_len=3, stride=1,
                      max_windows=None, model="mlp", hidden=4, seed=0, adjacency=None, coordinates=None,
                      client_names=["a", "b", "c"], season=19, mape=False)
    b = task.naive_baselines()
    assert set(b) == {"persistence", "seasonal_naive", "train_mean"} and "test_mape" not in b["persistence"]
    per_client = [task.finalize(p.baseline_sums["persistence"])["mse"] for p in task._prepared]
    assert b["persistence"]["test_mse"] == pytest.approx(np.mean(per_client))
    assert task.season_steps == 19


def test_traffic_zeros_as_values_and_seasonal_lags(tmp_path):
    _write_traffic(tmp_path, n=3, steps=700, zeros=[(650, 1)])
    speed = make_traffic(TrafficOptions(data_dir=str(tmp_path), input_len=6, output_len=6), seed=0)
    flow = make_traffic(TrafficOptions(data_dir=str(tmp_path), input_len=6, output_len=6, zeros_are_missing=False,
                                       seasonal_lags=["1D"]), seed=0)
    starts = speed.window_starts["test"]
    i = int(np.flatnonzero(starts + 6 == 650)[0])
    assert speed.client_data(1).test[2][i, 0, 0] == 0 and flow.client_data(1).test[2][i, 0, 0] == 1
    assert flow.feature_names(0) == ("speed", "time_of_day", "speed_lag288")
    assert speed.feature_names(0) == ("speed", "time_of_day")
    assert speed.mape and not flow.mape and speed.season_steps == 288
    x, y, mask, scale = speed.client_data(0).test
    assert "mape" in speed.finalize({k: float(v) for k, v in speed.metrics(y, y, mask, scale).items()})
    assert "mape" not in flow.finalize({k: float(v) for k, v in flow.metrics(y, y, mask, scale).items()})
    with pytest.raises(ValueError, match=r"seasonal_lags='1 fortnight'"):
        TrafficOptions(data_dir="x", seasonal_lags=["1 fortnight"])


def test_weather_reports_wape_not_mape_and_takes_lags(tmp_path):
    _weather_folder(tmp_path, hours=300)
    task = make_weather(WeatherOptions(data_dir=str(tmp_path), input_len=12, output_len=6, seasonal_lags=["1D"]), seed=0)
    assert task.feature_names(0)[-1] == "TEMP_lag24" and task.season_steps == 24
    x, y, mask, scale = task.client_data(0).test
    r = task.finalize({k: float(v) for k, v in task.metrics(y, y, mask, scale).items()})
    assert "mape" not in r and r["wape"] == 0.0 and math.isfinite(task.naive_baselines()["seasonal_naive"]["test_mse"])
