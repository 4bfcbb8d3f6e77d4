"""Property-based tests (hypothesis): whatever a user writes in a config or a graph file, and
whatever a client sends, ends in a value or in the one documented error — never another
exception."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shn.config import ConfigError, RunConfig, ValidationConfig, apply_overrides, config_from_dict, load_config
from shn.federated.validation import safe_validate_update
from shn.graph import ClientGraph
from shn.target import ParamSpec

# -- configs ------------------------------------------------------------------------------------


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _leaf_keys(hint, f"{prefix}{f.name}.")
        elif f.name not in ("task", "methods", "sweep"):
            out.append(f"{prefix}{f.name}")
    return out


def _option_keys(prefix: str, cls: type) -> list[str]:
    return [f"{prefix}{f.name}" for f in dataclasses.fields(cls)]


def _all_keys() -> list[str]:
    from baselines.fedavg import FedAvgOptions
    from tasks.classification import ClassificationOptions

    return (_leaf_keys(RunConfig) + _option_keys("task.", ClassificationOptions)
            + _option_keys("methods.fedavg.", FedAvgOptions) + ["task.name", "method", "nokey", "local.nokey",
                                                                "attack.nokey", "methods.nomethod.lr"])


KEYS = _all_keys()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["none", "scale", "median", "sgd", "adam", "given", "digits", "pfedhn", "auto"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=5), scalars, max_size=2))


def _set(data: dict, key: str, value) -> None:
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    node[parts[-1]] = value


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=4))
def test_random_config_values_give_a_config_or_a_config_error(items):
    data: dict = {"task": {"name": "digits"}}
    for key, value in items:
        _set(data, key, value)
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    assert isinstance(cfg, RunConfig)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS + ["", "a..b", ".x"]), st.text(max_size=15)), min_size=1, max_size=3),
       st.booleans())
def test_random_set_overrides_give_a_config_or_a_config_error(items, with_equals):
    overrides = [f"{k}={v}" if with_equals else f"{k}{v}" for k, v in items]
    try:
        cfg = config_from_dict(apply_overrides({"task": {"name": "digits"}}, overrides))
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, RunConfig)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_random_toml_files_give_a_config_or_a_config_error(tmp_path, text):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, RunConfig)


# -- graph files ----------------------------------------------------------------------------------

ids = st.one_of(st.integers(-3, 8), st.floats(allow_nan=True), st.text(max_size=2), st.none(), st.booleans())
edge_lists = st.one_of(
    st.lists(st.lists(ids, max_size=6), max_size=3),
    st.lists(st.integers(-2, 8), max_size=6),
    st.none(), st.integers(), st.text(max_size=4),
)
payloads = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from(["shn.ClientGraph", "other", 3]),
        "version": st.sampled_from([1, 2, "1", None]),
        "num_nodes": st.one_of(st.integers(-2, 8), st.floats(allow_nan=True), st.text(max_size=2), st.none()),
        "edge_index": edge_lists,
        "edge_weight": st.one_of(st.none(), st.lists(st.one_of(st.floats(allow_nan=True), st.text(max_size=1)), max_size=6)),
        "weight_dtype": st.sampled_from(["float32", "float64", "int64", "bogus", None]),
    },
)


class _Task:
    name = "stub"
    num_clients = 4


def _graph_config(path: Path):
    return config_from_dict({"method": "shn", "graph": {"kind": "given", "path": str(path)}})


@settings(max_examples=250, deadline=None)
@given(st.one_of(payloads, st.lists(st.integers(), max_size=3), st.text(max_size=20)))
def test_random_graph_files_load_or_raise_value_error_naming_the_file(payload):
    from shn.pipeline import given_task_graph

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "graph.json"
        path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)
        try:
            g = ClientGraph.load(path)
        except ValueError as e:
            assert str(path) in str(e)
        else:
            assert isinstance(g, ClientGraph)
            assert g.edge_index.shape[0] == 2 and (g.edge_index.numel() == 0 or int(g.edge_index.max()) < g.num_nodes)
        try:  # through the config: one ConfigError naming graph.path
            g = given_task_graph(_graph_config(path), _Task())
        except ConfigError as e:
            assert str(e).startswith("graph") and "\n" not in str(e)
        else:
            assert g.num_nodes == 4


@pytest.mark.filterwarnings("ignore:loadtxt")
@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2)),
                         min_size=0, max_size=5), min_size=0, max_size=5))
def test_random_dense_adjacency_files_give_a_graph_or_a_config_error(rows):
    from shn.pipeline import given_task_graph

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "adj.csv"
        path.write_text("\n".join(",".join(repr(float(v)) for v in r) for r in rows))
        try:
            g = given_task_graph(_graph_config(path), _Task())
        except ConfigError as e:
            assert "graph" in str(e) and "\n" not in str(e)
        else:
            assert g.num_nodes == 4


# -- client updates -----------------------------------------------------------------------------

SPEC = ParamSpec(("a.weight", "a.bias"), ((3, 2), (3,)))
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64])
shapes = st.one_of(st.sampled_from([(3, 2), (3,), (2, 3), (1, 3), ()]), st.lists(st.integers(0, 4), max_size=3).map(tuple))
fills = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.01))


@st.composite
def tensors(draw):
    shape, dtype, fill = draw(shapes), draw(dtypes), draw(fills)
    t = torch.full(shape, 0.0 if dtype in (torch.int64, torch.bool) and not math.isfinite(fill) else fill, dtype=torch.float64)
    return t.to(dtype)


leaf = st.one_of(tensors(), st.none(), st.integers(), st.text(max_size=3), st.lists(st.floats(), max_size=3),
                 st.builds(lambda: np.zeros((3, 2), dtype=np.float32)))
deltas = st.one_of(
    st.dictionaries(st.sampled_from(["a.weight", "a.bias", "b", "", "a.weight "]), leaf, max_size=4),
    st.fixed_dictionaries({"a.weight": leaf, "a.bias": leaf}),
    st.lists(tensors(), max_size=2), st.none(), st.text(max_size=3), st.integers(),
)
counts = st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=2),
                   st.builds(torch.tensor, st.integers(-3, 5)), st.builds(torch.tensor, st.floats(-3, 5)),
                   st.builds(np.int64, st.integers(-3, 5)),
                   st.integers(2**62, 2**70), st.builds(np.uint64, st.integers(0, 2**64 - 1)))  # overflow int64


@settings(max_examples=400, deadline=None)
@given(deltas, counts)
def test_random_updates_are_accepted_or_rejected_with_a_reason_never_raised(delta, count):
    reason = safe_validate_update(SPEC, delta, count, max_norm=1e3)
    if reason is None:  # then it really is a good update
        assert set(delta) == set(SPEC.names)
        assert all(isinstance(delta[n], torch.Tensor) and delta[n].dtype == torch.float32
                   and tuple(delta[n].shape) == s and bool(torch.isfinite(delta[n]).all())
                   for n, s in zip(SPEC.names, SPEC.shapes))
        assert 0 < int(count) <= 10**9 and not isinstance(count, (bool, float))
    else:
        assert isinstance(reason, str) and reason


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(deltas, counts), min_size=1, max_size=4))
def test_server_never_raises_and_applies_only_valid_updates(batch):
    from shn.federated.algorithm import GlobalModelAlgorithm
    from shn.federated.server import Server
    from shn.config import ServerConfig

    initial = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    algorithm = GlobalModelAlgorithm(initial, ServerConfig(momentum=0.0, weight_decay=0.0, lr=1.0))
    server = Server(algorithm, ValidationConfig(max_norm=1e3))
    before = [p.detach().clone() for p in algorithm.params]
    good = [safe_validate_update(SPEC, d, n, 1e3) is None for d, n in batch]
    metrics = server.receive(1, list(range(len(batch))), [d for d, _ in batch], [n for _, n in batch])
    assert metrics["accepted"] == sum(good) and metrics["rejected"] == len(batch) - sum(good)
    after = [p.detach() for p in algorithm.params]
    if not any(good):
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(bool(torch.isfinite(p).all()) for p in after)


def test_the_fuzzed_keys_cover_the_new_tables():
    assert {"attack.kind", "attack.fraction", "faults.dropout", "validation.clip_norm",
            "methods.fedavg.aggregation", "methods.fedavg.trim_fraction"} <= set(KEYS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 2.0, "0.5", True, [0.1]])
def test_attack_fraction_bad_values_are_config_errors(value):
    with pytest.raises(ConfigError, match="attack.fraction"):
        config_from_dict({"attack": {"kind": "scale", "fraction": value}})
