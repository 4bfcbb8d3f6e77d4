"""The ``tabular`` task on small CSV files the tests write: encoding, splits, problems, client
graphs, every data error, and runs from a TOML config alone."""

from __future__ import annotations

import gzip
import json
import logging

import numpy as np
import pytest
import torch

from shn.cli import main as cli_main
from shn.config import ConfigError, config_from_dict
from shn.registry import TASKS
from shn.runner import make_task
from tasks.base import Task
from tasks.datasets import DataError
from tasks.tabular import TabularOptions, make_tabular

SITES = {"alpha": (48.85, 2.35), "beta": (51.51, -0.13), "gamma": (52.52, 13.40), "delta": (40.42, -3.70)}


def write_table(path, rows_per_client=24, seed=0, small=None, extra_rows=()):
    """A CSV with client ``site``, numeric ``age`` (with gaps), categorical ``color``, coordinates,
    a numeric regression target ``price`` and a string class ``label``."""
    rng = np.random.default_rng(seed)
    lines = ["site,age,color,lat,lon,price,label"]
    for k, (site, (lat, lon)) in enumerate(SITES.items()):
        for i in range(rows_per_client):
            age = "" if i == 5 else f"{rng.normal(30 + 10 * k, 5):.2f}"
            color = ["red", "blue", "green"][i % 3] if site != "delta" or i % 2 else "violet"
            label = "yes" if i % 2 else "no"
            price = 100 * k + 3 * i + rng.normal()
            lines.append(f"{site},{age},{color},{lat},{lon},{price:.3f},{label}")
    for i in range(small or 0):
        lines.append(f"tiny,30,red,45.0,9.0,{i}.5,{'yes' if i % 2 else 'no'}")
    lines.extend(extra_rows)
    text = "\n".join(lines) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def opts(path, **kw):
    base = dict(files=str(path), client_column="site", target_column="label", exclude_columns=["price"])
    base.update(kw)
    return TabularOptions(**base)


def test_classification_encoding_and_splits(tmp_path):
    path = write_table(tmp_path / "data.csv")
    task = make_tabular(opts(path, coordinate_columns=["lat", "lon"]), seed=0)
    assert isinstance(task, Task) and TASKS.get("tabular").options is TabularOptions
    assert task.problem == "classification" and task.class_names == ["no", "yes"] and task.num_classes == 2
    assert task.client_names() == list(SITES)
    names = task.feature_names()
    # numerics first (coordinates excluded from features), then one-hot over training values
    assert names[0] == "age" and "lat" not in names and {"color=red", "color=blue", "color=green"} <= set(names)
    for c in range(task.num_clients):
        data = task.client_data(c)
        sizes = [s[0].shape[0] for s in (data.train, data.val, data.test)]
        assert sum(sizes) == 24 and min(sizes) >= 1 and sizes[0] == pytest.approx(17, abs=1)
        x = data.train[0]
        # per-client standardisation with training statistics (missing age → the mean, 0)
        assert abs(float(x[:, 0].mean())) < 1e-5 and float(x[:, 0].std(unbiased=False)) == pytest.approx(1.0, abs=0.1)
        onehot = x[:, 1:]
        assert torch.all(onehot.sum(1) <= 1)
        # stratified: both classes in the training split
        assert set(data.train[1].tolist()) == {0, 1} and data.train[1].dtype == torch.int64
    assert task.label_sets() == [frozenset({0, 1})] * 4
    assert torch.allclose(task.label_distributions().sum(dim=1), torch.ones(4, dtype=torch.float64))
    # deterministic for the seed, different for another
    again = make_tabular(opts(path, coordinate_columns=["lat", "lon"]), seed=0)
    other = make_tabular(opts(path, coordinate_columns=["lat", "lon"]), seed=1)
    assert torch.equal(task.client_data(2).test[0], again.client_data(2).test[0])
    assert not torch.equal(task.client_data(2).test[0], other.client_data(2).test[0])
    model = task.make_model()
    assert model(task.client_data(0).train[0]).shape == (task.client_data(0).num_train, 2)


def test_unseen_category_encodes_as_zeros(tmp_path):
    # "violet" exists only for delta; with a split column it appears only in delta's test rows
    lines = ["site,color,label,fold"]
    for site in ("a", "b"):
        for i in range(12):
            fold = "train" if i < 8 else ("val" if i < 10 else "test")
            color = "violet" if site == "b" and fold == "test" else ["red", "blue"][i % 2]
            lines.append(f"{site},{color},{i % 2},{fold}")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    task = make_tabular(TabularOptions(files=str(tmp_path / "d.csv"), client_column="site", target_column="label",
                                       split_column="fold"), seed=0)
    assert task.feature_names() == ("color=blue", "color=red")
    test_x = task.client_data(1).test[0]
    assert test_x.shape == (2, 2) and float(test_x.abs().sum()) == 0.0
    assert [task.client_data(0).num_train, task.client_data(0).val[0].shape[0]] == [8, 2]


def test_regression_metrics_in_target_units_and_scaling_options(tmp_path):
    path = write_table(tmp_path / "data.csv.gz")
    task = make_tabular(TabularOptions(files=str(path), client_column="site", target_column="price",
                                       exclude_columns=["label"]), seed=0)
    assert task.problem == "regression" and task.primary_metric == ("mse", "min")
    assert task.label_distributions() is None and task.label_sets() is None
    x, y, scale = task.client_data(1).train
    assert abs(float(y.mean())) < 1e-5  # standardised per client
    true = y * scale[:, 0] + scale[:, 1]
    assert float(true.mean()) == pytest.approx(100 + 3 * 11.5, abs=15)
    out = torch.zeros(y.shape[0], 1)  # predicts the client's training mean
    r = task.finalize({k: float(v) for k, v in task.metrics(out, y, scale).items()})
    assert r["mse"] == pytest.approx(float(((true - scale[:, 1]) ** 2).mean()), rel=1e-5)
    assert r["mae"] == pytest.approx(float((true - scale[:, 1]).abs().mean()), rel=1e-5)
    assert r["r2"] == pytest.approx(0.0, abs=1e-5) and r["loss"] == pytest.approx(float((y ** 2).mean()), rel=1e-5)
    glob_task = make_tabular(TabularOptions(files=str(path), client_column="site", target_column="price",
                                            exclude_columns=["label"], scaling="global"), seed=0)
    gy = glob_task.client_data(3).train[1]
    assert float(gy.mean()) > 0.5  # the last client's prices are above the pooled mean
    raw = make_tabular(TabularOptions(files=str(path), client_column="site", target_column="price",
                                      exclude_columns=["label"], scaling="none"), seed=0)
    assert torch.all(raw.client_data(0).train[2] == torch.tensor([1.0, 0.0]))


def test_problem_inference_and_override(tmp_path):
    lines = ["c,f,y"] + [f"{c},{i},{i % 3}" for c in "ab" for i in range(15)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    auto = make_tabular(TabularOptions(files=str(tmp_path / "d.csv"), client_column="c", target_column="y"), seed=0)
    assert auto.problem == "classification" and auto.class_names == ["0", "1", "2"]
    reg = make_tabular(TabularOptions(files=str(tmp_path / "d.csv"), client_column="c", target_column="y",
                                      problem="regression"), seed=0)
    assert reg.problem == "regression"
    few = make_tabular(TabularOptions(files=str(tmp_path / "d.csv"), client_column="c", target_column="y",
                                      max_classes=2), seed=0)
    assert few.problem == "regression"


def test_several_files_by_glob_and_width_option(tmp_path):
    write_table(tmp_path / "part1.csv", seed=1)
    write_table(tmp_path / "part2.csv", seed=2)
    task = make_tabular(TabularOptions(files="part*.csv", data_dir=str(tmp_path), client_column="site",
                                       target_column="label", exclude_columns=["price"], hidden=7, hidden_layers=2),
                        seed=0)
    assert sum(sum(s[0].shape[0] for s in (d.train, d.val, d.test)) for d in map(task.client_data, range(4))) == 4 * 48
    shapes = [tuple(p.shape) for p in task.make_model().parameters()]
    assert shapes[0][0] == 7 and len(shapes) == 6  # input_proj, one hidden layer 7x7, head


def test_small_clients_dropped_with_a_warning_or_an_error(tmp_path, caplog):
    path = write_table(tmp_path / "data.csv", small=4)
    with caplog.at_level(logging.WARNING, logger="tasks.tabular"):
        task = make_tabular(opts(path), seed=0)
    assert task.num_clients == 4 and "tiny" not in task.client_names() and task.dropped_clients == ["tiny"]
    assert any("'tiny' (4 rows)" in r.getMessage() and "min_rows = 10" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match=r"data\.csv: clients 'tiny' \(4 rows\) of column 'site' have fewer than min_rows = 10"):
        make_tabular(opts(path, small_clients="error"), seed=0)
    assert make_tabular(opts(path, min_rows=4), seed=0).num_clients == 5


def test_rows_without_target_are_dropped_with_a_warning(tmp_path, caplog):
    path = write_table(tmp_path / "data.csv", extra_rows=["alpha,31,red,48.85,2.35,,yes"])
    with caplog.at_level(logging.WARNING, logger="tasks.tabular"):
        task = make_tabular(TabularOptions(files=str(path), client_column="site", target_column="price",
                                           exclude_columns=["label"]), seed=0)
    d = task.client_data(0)
    assert sum(s[0].shape[0] for s in (d.train, d.val, d.test)) == 24
    assert any("1 rows have no value in column 'price'" in r.getMessage() and "line 98" in r.getMessage()
               for r in caplog.records)


def test_client_graph_from_edge_list_dense_and_coordinates(tmp_path):
    path = write_table(tmp_path / "data.csv", small=4)
    (tmp_path / "edges.csv").write_text("source,target,weight\nalpha,beta,1\ngamma,delta,0.5\nbeta,tiny,1\n")
    task = make_tabular(opts(path, graph_file="edges.csv", data_dir=str(tmp_path), files="data.csv"), seed=0)
    a = task.relation_adjacency()
    expected = torch.zeros(4, 4)
    expected[0, 1] = expected[1, 0] = 1.0
    expected[2, 3] = expected[3, 2] = 0.5
    assert torch.equal(a, expected)  # the edge to the dropped client 'tiny' is ignored
    names = list(SITES)[::-1]
    dense = "," + ",".join(names) + "\n" + "\n".join(
        n + "," + ",".join("1" if {n, m} == {"alpha", "delta"} else "0" for m in names) for n in names) + "\n"
    (tmp_path / "dense.csv").write_text(dense)
    a = make_tabular(opts(path, graph_file=str(tmp_path / "dense.csv"), min_rows=20), seed=0).relation_adjacency()
    assert a[0, 3] == 1 and a[3, 0] == 1 and float(a.sum()) == 2
    # coordinates: haversine kNN (Paris–London nearest; Madrid's nearest is Paris)
    geo = make_tabular(opts(path, coordinate_columns=["lat", "lon"], graph_k=1, min_rows=20), seed=0)
    a = geo.relation_adjacency()
    assert a[0, 1] == 1 and a[3, 0] == 1 and torch.equal(a, a.T) and torch.all(a.diagonal() == 0)
    assert np.allclose(geo.coordinates()[2], SITES["gamma"])
    (tmp_path / "loc.csv").write_text("site,x,y\nalpha,0,0\nbeta,10,0\ngamma,0,1\ndelta,10,1\n")
    euc = make_tabular(opts(path, coordinate_columns=["x", "y"], locations_file=str(tmp_path / "loc.csv"),
                            graph_metric="euclidean", graph_k=1, min_rows=20), seed=0)
    a = euc.relation_adjacency()
    assert a[0, 2] == 1 and a[1, 3] == 1 and float(a.sum()) == 4


@pytest.mark.parametrize("kwargs, extra, pattern", [
    (dict(target_column="cost"), (), r"data\.csv: no column 'cost' \(task option target_column\); the columns are site, age"),
    (dict(client_column="city"), (), r"data\.csv: no column 'city' \(task option client_column\)"),
    (dict(feature_columns=["age", "height"]), (), r"no column 'height' \(task option feature_columns\)"),
    (dict(target_column="price", problem="regression"), ("beta,30,red,1,1,cheap,no",),
     r"data\.csv line 98: column 'price' \(task option target_column\) has 'cheap'; expected numbers \(a regression target\)"),
    (dict(split_column="label"), (), r"data\.csv line 2: column 'label' \(task option split_column\) has 'no'; expected train, val or test"),
    (dict(max_categories=2), (), r"column 'color' has 4 distinct values in training rows, more than max_categories = 2"),
    ({}, (",30,red,1,1,1,no",), r"data\.csv line 98: column 'site' \(task option client_column\) is empty"),
    ({}, ("beta,30,red,1,1",), r"data\.csv line 98: 5 fields, expected 7"),
])
def test_data_errors_name_file_column_and_expectation(tmp_path, kwargs, extra, pattern):
    path = write_table(tmp_path / "data.csv", extra_rows=extra)
    with pytest.raises(DataError, match=pattern):
        make_tabular(opts(path, **{"exclude_columns": [], **kwargs}), seed=0)


def test_client_without_rows_in_a_split_is_an_error(tmp_path):
    lines = ["site,f,label,fold"] + [f"{s},{i},{i % 2},{'test' if s == 'b' and i > 7 else ('train' if i < 8 else 'val')}"
                                     for s in "ab" for i in range(12)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.csv: client 'a' has no rows in the test split \(column 'fold', task option "
                                        r"split_column\); expected at least one row per split"):
        make_tabular(TabularOptions(files=str(tmp_path / "d.csv"), client_column="site", target_column="label",
                                    split_column="fold"), seed=0)


def test_missing_file_and_bad_options_are_config_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found \(task option files\)"):
        make_tabular(TabularOptions(files=str(tmp_path / "nope.csv"), client_column="a", target_column="b"), seed=0)
    with pytest.raises(DataError, match=r"\*\.csv: task option files: no file matches"):
        make_tabular(TabularOptions(files=str(tmp_path / "*.csv"), client_column="a", target_column="b"), seed=0)
    with pytest.raises(ConfigError, match="scaling=.robust. is not allowed; choose one of client, global, none"):
        config_from_dict({"task": {"name": "tabular", "scaling": "robust"}})
    with pytest.raises(ConfigError, match="needs the option client_column"):
        make_task(config_from_dict({"task": {"name": "tabular", "files": "x.csv"}}))


def _toml(tmp_path, method: str, **task) -> str:
    table = "\n".join(f"{k} = {json.dumps(v)}" for k, v in task.items())
    path = tmp_path / f"{method}.toml"
    path.write_text(f"""method = "{method}"
rounds = 2
clients_per_round = 2
eval_every = 1

[task]
name = "tabular"
{table}

[local]
steps = 2
batch_size = 8

[hypernetwork]
hidden = 16
n_hidden = 1
""")
    return str(path)


@pytest.mark.parametrize("method", ["pfedhn", "fedavg"])
@pytest.mark.parametrize("target", ["label", "price"])
def test_runs_two_rounds_from_a_toml_config_alone(tmp_path, capsys, method, target):
    write_table(tmp_path / "data.csv")
    config = _toml(tmp_path, method, files=str(tmp_path / "data.csv"), client_column="site", target_column=target,
                   exclude_columns=["label" if target == "price" else "price"], hidden=8)
    assert cli_main(["run", config, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    key = "test_accuracy" if target == "label" else "test_mse"
    assert summary["num_clients"] == 4 and np.isfinite(summary["metrics"][key])


def test_cli_data_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    write_table(tmp_path / "data.csv", extra_rows=["beta,30,red,1,1,cheap,no"])
    config = _toml(tmp_path, "fedavg", files=str(tmp_path / "data.csv"), client_column="site", target_column="price",
                   problem="regression")
    assert cli_main(["run", config, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "data.csv line 98: column 'price'" in err[0] and "expected numbers" in err[0]
