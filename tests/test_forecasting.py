"""Forecasting tasks: splits/windows, normalisation, masking, metrics, loaders, models."""

from __future__ import annotations

import gzip
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, stack_module_state, vmap

from shn.registry import TASKS
from tasks.base import ClientData, Task
from tasks.forecast_models import GRUForecaster, MLPForecaster
from tasks.forecasting import (
    ClientSeries,
    ForecastDataError,
    build_task,
    forecast_finalize,
    forecast_loss,
    forecast_metrics,
    forward_fill,
    knn_adjacency,
    prepare_client,
    split_bounds,
    window_starts,
)
from tasks.traffic import TrafficOptions, _frame_from_hdf_group, make_traffic, read_adjacency, read_speed_csv, read_speed_h5
from tasks.weather import WeatherOptions, make_weather

from tests.conftest import shared_dataset

FRACTIONS = (0.7, 0.1, 0.2)


# -- helpers ------------------------------------------------------------------------------------

def _series(values: np.ndarray, *, normalize=True, targets=None, zero_missing=False) -> ClientSeries:
    """One-feature client whose target is the feature itself (or ``targets``)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    targets = values if targets is None else np.asarray(targets, dtype=np.float64).reshape(-1, 1)
    zm = np.array([zero_missing])
    return ClientSeries(values, np.array([normalize]), targets, ("v",), ("v",), zm, zm)


def _time_of(x_or_y: torch.Tensor, scale_row) -> np.ndarray:
    std, mean = float(scale_row[0]), float(scale_row[1])
    return np.rint(x_or_y.numpy() * std + mean).astype(np.int64)


def _write_traffic(tmp_path, n=4, steps=120, *, seed=0, zeros=()):
    rng = np.random.default_rng(seed)
    ids = [f"{700 + i}" for i in range(n)]
    speeds = 50 + 10 * rng.standard_normal((steps, n))
    for t, j in zeros:
        speeds[t, j] = 0.0
    lines = [",".join(ids)] + [",".join(f"{v:.4f}" for v in row) for row in speeds]
    (tmp_path / "los_speed.csv").write_text("\n".join(lines) + "\n")
    adj = np.zeros((n, n))
    for i in range(n - 1):
        adj[i, i + 1] = 0.5 + 0.1 * i  # directed chain: the task must symmetrise it
    np.fill_diagonal(adj, 1.0)
    np.savetxt(tmp_path / "los_adj.csv", adj, delimiter=",", fmt="%.6g")
    return ids, speeds, adj


# -- splits and windows -------------------------------------------------------------------------

def test_split_bounds_are_chronological_and_cover_the_axis():
    assert split_bounds(100, FRACTIONS) == ((0, 70), (70, 80), (80, 100))
    assert split_bounds(2016, FRACTIONS) == ((0, 1411), (1411, 1613), (1613, 2016))
    (a, b), (c, d), (e, f) = split_bounds(37, (0.5, 0.25, 0.25))
    assert a == 0 and b == c and d == e and f == 37


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 50), st.integers(1, 12), st.integers(1, 12), st.integers(1, 7))
def test_window_count_and_bounds(length, start, input_len, output_len, stride):
    stop = start + length
    s = window_starts(start, stop, input_len, output_len, stride)
    expected = max(0, (length - input_len - output_len) // stride + 1) if length >= input_len + output_len else 0
    assert s.size == expected
    if s.size:
        assert s[0] == start and s[-1] + input_len + output_len <= stop
        assert np.all(np.diff(s) == stride)


def test_max_windows_keeps_evenly_spaced_windows_inside_the_part():
    s = window_starts(10, 110, 4, 3, 1, max_windows=5)
    assert s.size == 5 and s[0] == 10 and s[-1] == 110 - 7
    assert np.all(np.diff(s) > 0)


@pytest.mark.parametrize("stride,max_windows", [(1, None), (3, None), (1, 17)])
def test_no_window_crosses_a_split_boundary(stride, max_windows):
    steps, il, ol = 200, 12, 6
    t = np.arange(steps, dtype=np.float64) + 1.0  # value = time index + 1, never 0
    prep = prepare_client(_series(t, normalize=False), split_bounds(steps, FRACTIONS), il, ol, stride, max_windows)
    bounds = split_bounds(steps, FRACTIONS)
    seen = {}
    for name, (lo, hi), split in zip(("train", "val", "test"), bounds, (prep.data.train, prep.data.val, prep.data.test)):
        x, y, mask, scale = split
        assert x.shape[1:] == (il, 1) and y.shape[1:] == (ol, 1) and scale.shape[1:] == (2, 1)
        times_x = x[..., 0].numpy().astype(np.int64) - 1
        times_y = _time_of(y[..., 0], scale[0, :, 0]) - 1
        assert times_x.min() >= lo and times_y.max() < hi
        # windows are contiguous: inputs then targets
        assert np.array_equal(times_y[:, 0], times_x[:, -1] + 1)
        assert np.all(np.diff(times_x, axis=1) == 1) and np.all(np.diff(times_y, axis=1) == 1)
        seen[name] = (times_x.min(), max(times_x.max(), times_y.max()))
    # No test (or val) time step appears anywhere in a training window.
    assert seen["train"][1] < bounds[1][0] <= seen["val"][0]
    assert seen["val"][1] < bounds[2][0] <= seen["test"][0]


def test_strided_view_windows_equal_gathered_windows():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(150)
    bounds = split_bounds(150, FRACTIONS)
    view = prepare_client(_series(v), bounds, 8, 4, 2).data.train
    starts = window_starts(*bounds[0], 8, 4, 2)
    gathered = prepare_client(_series(v), bounds, 8, 4, 2, max_windows=10_000).data.train  # same windows
    for a, b in zip(view, gathered):
        assert torch.equal(a, b)
    assert view[0].shape[0] == starts.size


# -- normalisation and missing values ---------------------------------------------------------

def test_normalisation_uses_train_statistics_only():
    rng = np.random.default_rng(1)
    steps = 300
    bounds = split_bounds(steps, FRACTIONS)
    v = 20 + 3 * rng.standard_normal(steps)
    w = v.copy()
    w[bounds[0][1]:] = 1000.0 + rng.standard_normal(steps - bounds[0][1])  # wild val/test period
    a = prepare_client(_series(v), bounds, 6, 6)
    b = prepare_client(_series(w), bounds, 6, 6)
    train = v[: bounds[0][1]]
    assert np.allclose(a.input_mean, train.mean()) and np.allclose(a.input_std, train.std())
    assert np.allclose(b.target_mean, train.mean()) and np.allclose(b.target_std, train.std())
    for ta, tb in zip(a.data.train, b.data.train):
        assert torch.equal(ta, tb)  # train windows do not see the later period at all
    assert torch.allclose(b.data.test[3][0, :, 0], torch.tensor([train.std(), train.mean()], dtype=torch.float32))
    # the z-scored train inputs have mean ~0 / std ~1 over the train period
    x = (v[: bounds[0][1]] - a.input_mean[0]) / a.input_std[0]
    assert abs(x.mean()) < 1e-9 and abs(x.std() - 1) < 1e-9


def test_forward_fill_and_leading_gap():
    v = np.array([[np.nan, 1.0], [2.0, np.nan], [np.nan, np.nan], [5.0, 3.0]])
    out = forward_fill(v)
    assert np.isnan(out[0, 0]) and out[1, 0] == 2 and out[2, 0] == 2 and out[3, 0] == 5
    assert out[1, 1] == 1 and out[2, 1] == 1 and out[3, 1] == 3


def test_missing_values_fill_inputs_and_mask_targets():
    steps = 120
    v = np.linspace(10, 20, steps)
    v[0] = np.nan  # leading gap → train mean (0 once z-scored)
    v[30] = np.nan  # gap → forward fill
    v[31] = 0.0  # zero = missing (traffic convention)
    prep = prepare_client(_series(v, zero_missing=True), split_bounds(steps, FRACTIONS), 4, 4)
    x, y, mask, scale = prep.data.train
    xs = x[..., 0].numpy() * prep.input_std[0] + prep.input_mean[0]
    assert abs(xs[0, 0] - prep.input_mean[0]) < 1e-4
    assert abs(xs[28, 2] - v[29]) < 1e-4 and abs(xs[28, 3] - v[29]) < 1e-4  # steps 30, 31 carry step 29
    # target steps 30 and 31 are masked out, and their stored values are 0
    assert mask[26, 0, 0] == 0 and mask[26, 1, 0] == 0 and mask[26, 2, 0] == 1
    assert y[26, 0, 0] == 0 and y[26, 1, 0] == 0
    assert torch.isfinite(x).all() and torch.isfinite(y).all()


def test_missing_target_changes_neither_loss_nor_metrics():
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(5, 12, 2, generator=g), torch.randn(5, 12, 2, generator=g)
    mask = (torch.rand(5, 12, 2, generator=g) > 0.3).float()
    scale = torch.tensor([[3.0, 2.0], [50.0, -1.0]]).expand(5, 2, 2)
    y2 = torch.where(mask > 0, y, y + 1e3 * torch.randn(5, 12, 2, generator=g))
    assert torch.equal(forecast_loss(out, y, mask, scale), forecast_loss(out, y2, mask, scale))
    m1, m2 = forecast_metrics(out, y, mask, scale), forecast_metrics(out, y2, mask, scale)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert torch.allclose(m1[k], m2[k]), k


def test_metrics_in_original_units_and_horizons():
    out = torch.zeros(2, 4, 1)
    y = torch.tensor([1.0, -1.0, 2.0, 0.5]).view(1, 4, 1).repeat(2, 1, 1)
    mask = torch.ones(2, 4, 1)
    mask[1, 3] = 0
    scale = torch.tensor([[2.0], [10.0]]).expand(2, 2, 1)  # std 2, mean 10
    sums = {k: float(v) for k, v in forecast_metrics(out, y, mask, scale, horizons=(3, 6, 12)).items()}
    assert "count_h6" not in sums and "count_h12" not in sums  # output_len = 4
    r = forecast_finalize(sums, (3, 6, 12))
    err = np.abs(np.array([1, -1, 2, 0.5, 1, -1, 2]) * 2.0)  # |pred - true| in original units
    true = np.array([1, -1, 2, 0.5, 1, -1, 2]) * 2.0 + 10
    assert math.isclose(r["mae"], err.mean(), rel_tol=1e-6)
    assert math.isclose(r["rmse"], math.sqrt((err**2).mean()), rel_tol=1e-6)
    assert math.isclose(r["mse"], (err**2).mean(), rel_tol=1e-6)
    assert math.isclose(r["mape"], (err / true).mean(), rel_tol=1e-6)
    assert math.isclose(r["loss"], (np.array([1, -1, 2, 0.5, 1, -1, 2]) ** 2).mean(), rel_tol=1e-6)
    assert math.isclose(r["mae_h3"], 4.0, rel_tol=1e-6) and "mae_h6" not in r
    assert r.keys() >= {"mae", "rmse", "mse", "mape", "loss", "mae_h3", "rmse_h3", "mse_h3", "mape_h3"}


def test_loss_is_vmap_safe():
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(3, 4, 12, 1, generator=g), torch.randn(3, 4, 12, 1, generator=g)
    mask = (torch.rand(3, 4, 12, 1, generator=g) > 0.5).float()
    mask[1] = 0  # a client with nothing observed: loss 0, not NaN
    scale = torch.ones(3, 4, 2, 1)
    batched = vmap(forecast_loss)(out, y, mask, scale)
    loop = torch.stack([forecast_loss(out[i], y[i], mask[i], scale[i]) for i in range(3)])
    assert torch.allclose(batched, loop) and batched[1] == 0
    sums = vmap(forecast_metrics)(out, y, mask, scale)
    assert sums["count"].shape == (3,)


# -- traffic ----------------------------------------------------------------------------------

def test_traffic_options_are_validated():
    with pytest.raises(ValueError, match="format='xlsx'.*auto, losloop, h5"):
        TrafficOptions(data_dir="x", format="xlsx")
    with pytest.raises(ValueError, match="model='lstm'.*gru, mlp"):
        TrafficOptions(data_dir="x", model="lstm")
    with pytest.raises(ValueError, match="input_len"):
        TrafficOptions(data_dir="x", input_len=0)
    with pytest.raises(ValueError, match="sum to 1"):
        TrafficOptions(data_dir="x", train_fraction=0.8)
    with pytest.raises(ValueError, match="data_dir"):
        make_traffic(TrafficOptions(), seed=0)
    assert TASKS.get("traffic").options is TrafficOptions and TASKS.get("weather").options is WeatherOptions


def test_traffic_task_from_generated_files(tmp_path):
    ids, speeds, adj = _write_traffic(tmp_path, n=4, steps=120, zeros=[(105, 2)])
    task = make_traffic(TrafficOptions(data_dir=str(tmp_path), input_len=6, output_len=6), seed=3)
    assert isinstance(task, Task) and task.num_clients == 4 and task.client_names() == ids
    x, y, mask, scale = task.client_data(2).test
    assert x.shape[2] == 2 and y.shape[2] == 1
    tod = x[..., 1]
    assert float(tod.min()) >= 0 and float(tod.max()) < 1
    # step 105's zero speed is masked for client 2, observed for the others
    starts = task.window_starts["test"]
    i = int(np.flatnonzero(starts + 6 == 105)[0])
    assert mask[i, 0, 0] == 0 and task.client_data(1).test[2][i, 0, 0] == 1
    a = task.relation_adjacency()
    expected = np.maximum(adj, adj.T)
    np.fill_diagonal(expected, 0)
    assert torch.allclose(a, torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(a, a.T) and torch.all(a.diagonal() == 0)
    assert task.coordinates() is None  # no locations file
    # num_clients keeps the first sensors
    small = make_traffic(TrafficOptions(data_dir=str(tmp_path), input_len=6, output_len=6, num_clients=2), seed=3)
    assert small.num_clients == 2 and small.relation_adjacency().shape == (2, 2)


def test_speed_csv_with_timestamp_column(tmp_path):
    times = np.arange(np.datetime64("2020-01-01T00:00"), np.datetime64("2020-01-01T20:00"), np.timedelta64(30, "m"))
    rows = ["timestamp,5,6"] + [f"{str(t).replace('T', ' ')},{50 + i % 3},NA" if i == 4 else f"{t},{50 + i % 3},{40 + i % 5}"
                                  for i, t in enumerate(times)]
    (tmp_path / "speeds.csv").write_text("\n".join(rows) + "\n")
    table = read_speed_csv(tmp_path / "speeds.csv")
    assert table.sensor_ids == ("5", "6") and table.speeds.shape == (40, 2) and np.isnan(table.speeds[4, 1])
    assert table.timestamps[3] == np.datetime64("2020-01-01T01:30")
    np.savetxt(tmp_path / "a.csv", np.ones((2, 2)), delimiter=",")
    task = make_traffic(TrafficOptions(data_dir=str(tmp_path), format="losloop", speed_file="speeds.csv",
                                       adjacency_file="a.csv", input_len=2, output_len=1), seed=0)
    x = task.client_data(0).train[0]
    assert abs(float(x[1, 0, 1]) - 0.5 / 24) < 1e-6  # second window starts at 00:30


def test_traffic_adjacency_formats_align_with_sensor_order(tmp_path):
    ids, speeds, adj = _write_traffic(tmp_path, n=4, steps=120)
    perm = [2, 0, 3, 1]
    weights = np.arange(16, dtype=np.float64).reshape(4, 4) / 16
    weights = weights + weights.T
    np.fill_diagonal(weights, 0)
    shuffled = weights[np.ix_(perm, perm)]
    shuffled_ids = [ids[p] for p in perm]
    with open(tmp_path / "adj_mx.pkl", "wb") as fh:
        pickle.dump([shuffled_ids, {s: i for i, s in enumerate(shuffled_ids)}, shuffled.astype(np.float32)], fh, protocol=2)
    lines = ["," + ",".join(shuffled_ids)] + [s + "," + ",".join(f"{v:.6g}" for v in row) for s, row in zip(shuffled_ids, shuffled)]
    (tmp_path / "adj_ids.csv").write_text("\n".join(lines) + "\n")
    np.savez(tmp_path / "adj.npz", adj_mx=weights)
    for name in ("adj_mx.pkl", "adj_ids.csv", "adj.npz"):
        task = make_traffic(TrafficOptions(data_dir=str(tmp_path), adjacency_file=name, input_len=6, output_len=6,
                                           allow_pickle=name.endswith(".pkl")), seed=0)
        assert torch.allclose(task.relation_adjacency(), torch.tensor(weights, dtype=torch.float32), atol=1e-6), name


class _Marker:
    """Unpickling this creates the file ``path`` (what a crafted pickle would do)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def test_traffic_pickle_adjacency_only_with_allow_pickle(tmp_path):
    from tasks.traffic import _adjacency_file, read_adjacency

    _write_traffic(tmp_path, n=3, steps=80)
    marker = tmp_path / "pwned"
    with open(tmp_path / "adj_mx.pkl", "wb") as fh:
        pickle.dump(_Marker(marker), fh)
    opts = dict(data_dir=str(tmp_path), adjacency_file="adj_mx.pkl", input_len=4, output_len=4)
    with pytest.raises(ForecastDataError, match=r"adj_mx.pkl: a python pickle.*allow_pickle = true.*runs code"):
        make_traffic(TrafficOptions(**opts), seed=0)
    with pytest.raises(ForecastDataError, match="allow_pickle"):
        read_adjacency(tmp_path / "adj_mx.pkl")
    h5 = tmp_path / "h5"
    h5.mkdir()
    (tmp_path / "adj_mx.pkl").rename(h5 / "adj_mx.pkl")
    with pytest.raises(ForecastDataError, match=r"the only adjacency is a python pickle.*allow_pickle = true"):
        _adjacency_file(h5, allow_pickle=False)  # the h5 layout's discovery never picks the pickle
    assert _adjacency_file(h5, allow_pickle=True).name == "adj_mx.pkl"
    np.savez(h5 / "adj.npz", adj_mx=np.zeros((3, 3)))
    assert _adjacency_file(h5, allow_pickle=False).name == "adj.npz"
    assert not marker.exists()
    with pytest.raises(ValueError, match="allow_pickle"):
        TrafficOptions(data_dir=str(tmp_path), allow_pickle=1)


def test_traffic_loader_errors_name_the_file(tmp_path):
    _write_traffic(tmp_path, n=3, steps=80)
    ok = dict(data_dir=str(tmp_path), input_len=4, output_len=4)
    bad = tmp_path / "bad_speed.csv"
    bad.write_text("1,2,3\n1,2,3\n4,5\n")
    with pytest.raises(ForecastDataError, match=r"bad_speed\.csv.*row 3 has 2 columns, expected 3"):
        read_speed_csv(bad)
    bad.write_text("1,2,3\n1,2,3\n4,x,6\n")
    with pytest.raises(ForecastDataError, match=r"bad_speed\.csv.*numeric"):
        read_speed_csv(bad)
    with pytest.raises(ForecastDataError, match=r"nope\.csv.*not found"):
        make_traffic(TrafficOptions(speed_file="nope.csv", **ok), seed=0)
    (tmp_path / "rect.csv").write_text("0,1,0\n1,0,1\n")
    with pytest.raises(ForecastDataError, match=r"rect\.csv.*square"):
        read_adjacency(tmp_path / "rect.csv")
    (tmp_path / "ragged.csv").write_text("0,1\n1\n")
    with pytest.raises(ForecastDataError, match=r"ragged\.csv.*differ in length"):
        read_adjacency(tmp_path / "ragged.csv")
    np.savetxt(tmp_path / "big.csv", np.eye(5), delimiter=",")
    with pytest.raises(ForecastDataError, match=r"big\.csv.*5 x 5.*3 sensors"):
        make_traffic(TrafficOptions(adjacency_file="big.csv", **ok), seed=0)
    np.savez(tmp_path / "nonsq.npz", adj_mx=np.ones((3, 2)))
    with pytest.raises(ForecastDataError, match=r"nonsq\.npz.*square"):
        read_adjacency(tmp_path / "nonsq.npz")
    (tmp_path / "neg.csv").write_text("0,-1,0\n1,0,0\n0,0,0\n")
    with pytest.raises(ForecastDataError, match=r"neg\.csv.*non-negative"):
        read_adjacency(tmp_path / "neg.csv")
    with pytest.raises(ForecastDataError, match=r"missing_adj\.csv.*not found"):
        make_traffic(TrafficOptions(adjacency_file="missing_adj.csv", **ok), seed=0)
    with pytest.raises(ForecastDataError, match="not a directory"):
        make_traffic(TrafficOptions(data_dir=str(tmp_path / "absent")), seed=0)
    with pytest.raises(ValueError, match="fewer than input_len"):
        make_traffic(TrafficOptions(data_dir=str(tmp_path), input_len=12, output_len=12), seed=0)


def test_traffic_h5_reader(tmp_path):
    path = tmp_path / "metr-la.h5"
    try:
        import h5py  # noqa: F401
    except ImportError:
        path.write_bytes(b"\x89HDF\r\n")
        with pytest.raises(ForecastDataError, match=r"metr-la\.h5.*pip install h5py"):
            read_speed_h5(path)
    else:  # pragma: no cover - only where h5py is installed
        import h5py

        ts = np.arange(np.datetime64("2012-03-01T00:00"), np.datetime64("2012-03-01T01:40"), np.timedelta64(5, "m"))
        with h5py.File(path, "w") as f:
            g = f.create_group("df")
            g["axis0"] = np.array([b"11", b"22"])
            g["axis1"] = ts.astype("datetime64[ns]").astype(np.int64)
            g["block0_items"] = np.array([b"11", b"22"])
            g["block0_values"] = np.arange(40, dtype=np.float64).reshape(20, 2)
        table = read_speed_h5(path)
        assert table.sensor_ids == ("11", "22") and table.speeds.shape == (40, 2)
    # the pandas fixed-format decoding itself, on an in-memory stand-in for the h5 group
    ts = np.arange(np.datetime64("2012-03-01T00:00"), np.datetime64("2012-03-01T00:20"), np.timedelta64(5, "m"))
    group = {
        "axis0": np.array([b"773869", b"767541", b"767542"]),
        "axis1": ts.astype("datetime64[ns]").astype(np.int64),
        "block0_items": np.array([b"767542", b"773869"]),
        "block0_values": np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]),
        "block1_items": np.array([b"767541"]),
        "block1_values": np.array([[9.0], [10.0], [11.0], [12.0]]),
    }
    table = _frame_from_hdf_group(group.get, path)
    assert table.sensor_ids == ("773869", "767541", "767542")
    assert np.array_equal(table.speeds[:, 0], [2, 4, 6, 8]) and np.array_equal(table.speeds[:, 1], [9, 10, 11, 12])
    assert table.timestamps[1] == np.datetime64("2012-03-01T00:05")
    with pytest.raises(ForecastDataError, match=r"metr-la\.h5.*fixed-format"):
        _frame_from_hdf_group({}.get, path)
    bad = dict(group, block1_values=np.zeros((3, 1)))
    with pytest.raises(ForecastDataError, match=r"metr-la\.h5.*block1_values has shape"):
        _frame_from_hdf_group(bad.get, path)


def test_traffic_on_los_loop():
    root = shared_dataset("los_loop")
    task = make_traffic(TrafficOptions(data_dir=str(root)), seed=0)
    assert task.num_clients == 207 and task.num_steps == 2016
    x, y, mask, scale = task.client_data(0).train
    assert x.shape == (1411 - 23, 12, 2) and y.shape == (1388, 12, 1) and mask.all()
    a = task.relation_adjacency()
    assert a.shape == (207, 207) and torch.equal(a, a.T) and int((a > 0).sum()) == 2833 - 207
    coords = task.coordinates()
    assert coords.shape == (207, 2) and np.allclose(coords[0], [34.15497, -118.31829])
    # DCRNN's directed adjacency with header + id column, symmetrised
    directed = make_traffic(TrafficOptions(data_dir=str(root), adjacency_file="metr_la_adj_mx.csv", num_clients=20,
                                           max_windows=8), seed=0)
    d = directed.relation_adjacency()
    assert d.shape == (20, 20) and torch.equal(d, d.T) and torch.all(d.diagonal() == 0)
    # a few optimiser steps on one sensor lower the training loss. One thread: this model's ops
    # are tiny, and two OpenMP threads on a busy 2-core machine are ~50x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = task.make_model(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        batch = tuple(t[:128] for t in task.client_data(0).train)
        first = None
        for _ in range(20):
            loss = task.loss(model(batch[0]), *batch[1:])
            first = float(loss.detach()) if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert float(loss.detach()) < 0.7 * first
    sums = {k: float(v) for k, v in task.metrics(model(batch[0]), *batch[1:]).items()}
    r = task.finalize(sums)
    assert 0 < r["mae"] < 20 and r["loss"] > 0 and "rmse_h12" in r


# -- weather ----------------------------------------------------------------------------------

_WEATHER_HEADER = ["No", "year", "month", "day", "hour", "PM2.5", "TEMP", "PRES", "DEWP", "RAIN", "wd", "WSPM", "station"]


def _write_station(path, name, hours, rng, *, drop=(), skip_rows=(), nan_temp=(), gz=True, calm_rows=()):
    cols = [c for c in _WEATHER_HEADER if c not in drop]
    lines = [",".join(f'"{c}"' for c in cols)]
    start = np.datetime64("2015-01-01T00", "h")
    compass = ["N", "NE", "E", "SE", "S", "SW", "W", "NW"]
    for i in range(hours):
        if i in skip_rows:
            continue
        t = start + i
        y, m, d = str(t.astype("datetime64[D]")).split("-")
        row = {
            "No": str(i + 1), "year": y, "month": str(int(m)), "day": str(int(d)), "hour": str(i % 24),
            "PM2.5": "NA" if i % 7 == 0 else f"{rng.uniform(5, 200):.0f}",
            "TEMP": "NA" if i in nan_temp else f"{5 + 8 * np.sin(2 * np.pi * i / 24) + rng.normal():.1f}",
            "PRES": f"{1015 + rng.normal():.1f}", "DEWP": f"{-5 + rng.normal():.1f}", "RAIN": "0",
            "wd": '"CV"' if i in calm_rows else (f'"{compass[i % 8]}"' if i % 11 else "NA"),
            "WSPM": f"{abs(rng.normal(2)):.1f}", "station": f'"{name}"',
        }
        lines.append(",".join(row[c] for c in cols))
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def _weather_folder(tmp_path, hours=200):
    rng = np.random.default_rng(0)
    (tmp_path / "stations.csv").write_text(
        "station,longitude,latitude\nAlpha,116.40,39.98\nBeta,116.23,40.22\nGamma,116.42,39.93\n")
    _write_station(tmp_path / "PRSA_Data_Alpha_2015.csv.gz", "Alpha", hours, rng, skip_rows={153, 154},
                   nan_temp={120}, calm_rows={5})
    _write_station(tmp_path / "PRSA_Data_Beta_2015.csv.gz", "Beta", hours, rng, drop=("PRES",))
    # no station token in the file name: matched by its 'station' column
    _write_station(tmp_path / "third_site.csv", "Gamma", hours, rng, gz=False)


def test_weather_per_client_input_sizes_and_decoupled_error(tmp_path):
    _weather_folder(tmp_path)
    task = make_weather(WeatherOptions(data_dir=str(tmp_path), input_len=12, output_len=6), seed=1)
    assert task.client_names() == ["Alpha", "Beta", "Gamma"]
    assert task.input_sizes() == [11, 10, 11]
    assert "PRES" not in task.feature_names(1) and "wd_sin" in task.feature_names(0)
    with pytest.raises(ValueError, match=r"different input sizes.*decoupled"):
        task.make_model(None)
    m0, m1 = task.make_model(0), task.make_model(1)
    assert m0.input_proj.in_features == 11 and m1.input_proj.in_features == 10
    # the shared layers start identical whatever the input size (seeded per layer name)
    p0, p1 = dict(m0.named_parameters()), dict(m1.named_parameters())
    assert all(torch.equal(p0[k], p1[k]) for k in p0 if not k.startswith("input_proj"))
    x, y, mask, scale = task.client_data(1).train
    out = m1(x)
    assert out.shape == y.shape and torch.isfinite(task.loss(out, y, mask, scale))
    names = task.feature_names(0)
    assert names[-4:] == ("hour_sin", "hour_cos", "doy_sin", "doy_cos")
    # wind direction: hour 5 is calm → (0, 0); hour 8 blows from N → (sin, cos) = (0, 1)
    x0 = task.client_data(0).train[0][0]  # window 0 reads hours 0..11
    ws, wc = names.index("wd_sin"), names.index("wd_cos")
    assert x0[5, ws] == 0 and x0[5, wc] == 0
    assert abs(float(x0[8, ws])) < 1e-6 and abs(float(x0[8, wc]) - 1) < 1e-6
    # hour of day from the timestamps: hour 6 → sin = 1
    assert abs(float(x0[6, names.index("hour_sin")]) - 1) < 1e-6


def test_weather_gaps_are_masked(tmp_path):
    _weather_folder(tmp_path)
    task = make_weather(WeatherOptions(data_dir=str(tmp_path), input_len=12, output_len=6), seed=1)
    assert task.num_steps == 200
    starts = task.window_starts["train"]  # hours 120 (NaN TEMP) lies in train (0..140)
    i = int(np.flatnonzero(starts + 12 == 120)[0])
    assert task.client_data(0).train[2][i, 0, 0] == 0 and task.client_data(2).train[2][i, 0, 0] == 1
    j = int(np.flatnonzero(task.window_starts["val"] + 12 == 153)[0])  # rows 153/154 absent from the file
    mask = task.client_data(0).val[2]
    assert mask[j, 0, 0] == 0 and mask[j, 1, 0] == 0 and mask[j, 2, 0] == 1
    assert all(torch.isfinite(t).all() for c in range(3) for s in ("train", "val", "test")
               for t in getattr(task.client_data(c), s))


def test_weather_relation_graph_is_knn_on_haversine(tmp_path):
    _weather_folder(tmp_path)
    task = make_weather(WeatherOptions(data_dir=str(tmp_path), input_len=12, output_len=6, graph_k=1), seed=0)
    a = task.relation_adjacency()
    # Alpha–Gamma are ~6 km apart, Beta ~30 km from both: Alpha↔Gamma, Beta→(nearest) Alpha
    assert torch.equal(a, a.T) and torch.all(a.diagonal() == 0)
    assert a[0, 2] == 1 and a[0, 1] == 1 and a[1, 2] == 0
    assert np.allclose(task.coordinates()[1], [40.22, 116.23])
    d = np.array([[0, 1, 5], [1, 0, 2], [5, 2, 0.0]])
    assert torch.equal(knn_adjacency(d, 1), torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0.0]]))
    assert torch.equal(knn_adjacency(d, 5), 1 - torch.eye(3))


def test_weather_errors(tmp_path):
    _weather_folder(tmp_path)
    with pytest.raises(ValueError, match="data_dir"):
        make_weather(WeatherOptions(), seed=0)
    with pytest.raises(ValueError, match="model='rnn'"):
        WeatherOptions(data_dir="x", model="rnn")
    with pytest.raises(ValueError, match="target_vars"):
        WeatherOptions(data_dir="x", target_vars=[])
    assert WeatherOptions(data_dir="x", target_vars=["TEMP", "DEWP"]).target_vars == ("TEMP", "DEWP")
    with pytest.raises(ForecastDataError, match=r"PRSA_Data_Beta_2015\.csv\.gz.*lacks the target.*PRES"):
        make_weather(WeatherOptions(data_dir=str(tmp_path), target_vars=("PRES",), input_len=12, output_len=6), seed=0)
    (tmp_path / "stations.csv").write_text("station,longitude,latitude\nAlpha,116.4,39.9\nDelta,116.1,40.0\n")
    with pytest.raises(ForecastDataError, match=r"no CSV for stations \['Delta'\]"):
        make_weather(WeatherOptions(data_dir=str(tmp_path), input_len=12, output_len=6), seed=0)
    (tmp_path / "stations.csv").write_text("name,lon\nAlpha,116.4\n")
    with pytest.raises(ForecastDataError, match=r"stations\.csv.*station, longitude, latitude"):
        make_weather(WeatherOptions(data_dir=str(tmp_path)), seed=0)
    (tmp_path / "stations.csv").write_text("station,longitude,latitude\nAlpha,116.4,north\n")
    with pytest.raises(ForecastDataError, match=r"stations\.csv.*row 2"):
        make_weather(WeatherOptions(data_dir=str(tmp_path)), seed=0)
    (tmp_path / "stations.csv").write_text("station,longitude,latitude\nGamma,116.4,39.9\n")
    (tmp_path / "third_site.csv").write_text('"TEMP","station"\n1.0,"Gamma"\n')
    with pytest.raises(ForecastDataError, match=r"third_site\.csv.*year, month, day, hour"):
        make_weather(WeatherOptions(data_dir=str(tmp_path)), seed=0)


def test_weather_on_beijing():
    root = shared_dataset("beijing_multisite_air_quality")
    task = make_weather(WeatherOptions(data_dir=str(root), num_clients=3, max_steps=2000), seed=0)
    assert task.client_names() == ["Aotizhongxin", "Changping", "Dingling"]
    assert task.input_sizes() == [11, 11, 11] and task.num_steps == 2000
    model = task.make_model()  # all stations have all variables: one shared architecture
    x, y, mask, scale = task.client_data(0).test
    assert x.shape[1:] == (24, 11) and y.shape[1:] == (12, 1)
    r = task.finalize({k: float(v) for k, v in task.metrics(model(x), y, mask, scale).items()})
    assert math.isfinite(r["mae"]) and math.isfinite(r["loss"])
    # first row of Aotizhongxin: TEMP -0.7 at 2013-03-01 00:00; the scale holds train mean/std in °C
    mean, std = task.normalization(0)["target_mean"][0], task.normalization(0)["target_std"][0]
    assert -20 < mean < 30 and 1 < std < 20
    a = task.relation_adjacency()
    assert a.shape == (3, 3) and torch.equal(a, a.T)
    assert np.allclose(task.coordinates()[0], [39.982, 116.397])


# -- models: vmap over stacked per-client parameters == a per-client loop ------------------------

@pytest.mark.parametrize("make", [
    lambda: GRUForecaster(3, 2, output_len=5, hidden=8),
    lambda: MLPForecaster(3, input_len=7, out_features=2, output_len=5, hidden=8),
])
def test_models_vmap_equals_loop(make):
    torch.manual_seed(0)
    models = [make() for _ in range(3)]
    names = [n for n, _ in models[0].named_parameters()]
    assert names[0].startswith("input_proj.") and names[-1].startswith("head.")
    params, buffers = stack_module_state(models)
    x = torch.randn(3, 4, 7, 3)
    y = torch.randn(3, 4, 5, 2)
    mask = (torch.rand(3, 4, 5, 2) > 0.2).float()
    base = make().to("meta")

    def forward(p, b, xi):
        return functional_call(base, (p, b), (xi,))

    batched = vmap(forward)(params, buffers, x)
    loop = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert batched.shape == (3, 4, 5, 2)
    assert torch.allclose(batched, loop, atol=1e-5)

    def loss_fn(p, b, xi, yi, mi):
        return forecast_loss(functional_call(base, (p, b), (xi,)), yi, mi)

    grads = vmap(grad(loss_fn))(params, buffers, x, y, mask)
    for i, m in enumerate(models):
        m.zero_grad()
        forecast_loss(m(x[i]), y[i], mask[i]).backward()
        for n, p in m.named_parameters():
            assert torch.allclose(grads[n][i], p.grad, atol=1e-5), n


def test_client_data_is_a_valid_split_tuple(tmp_path):
    _write_traffic(tmp_path, n=2, steps=100)
    task = make_traffic(TrafficOptions(data_dir=str(tmp_path), input_len=4, output_len=4, model="mlp"), seed=0)
    data = task.client_data(0)
    assert isinstance(data, ClientData) and len(data.train) == 4
    moved = data.to("cpu")
    assert all(torch.equal(a, b) for a, b in zip(moved.test, data.test))
    model = task.make_model()
    assert model.input_proj.in_features == 2 and model(data.val[0]).shape == data.val[1].shape
    series = [_series(np.arange(1.0, 101.0)), _series(np.arange(1.0, 101.0))]
    t = build_task("toy", series, num_steps=100, fractions=FRACTIONS, input_len=4, output_len=4, stride=1,
                   max_windows=None, model="gru", hidden=4, seed=0, adjacency=None, coordinates=None,
                   client_names=["a", "b"])
    assert t.relation_adjacency() is None and t.horizons == (3,)
