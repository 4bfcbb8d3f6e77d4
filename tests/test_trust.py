"""Hostile inputs II (issue 15): files received from others cannot run code (checkpoints), a
checkpoint of the wrong shape or a full disk is one line, a diverged run stops, JSON output is
strict, and one client cannot crash or own the server (example counts, client ids).

Flower replies are tested in test_flower.py, sweeps in test_sweep.py, pickle data formats in
test_datasets.py / test_forecasting.py."""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shn.cli import main
from shn.config import ValidationConfig, config_from_dict, dumps_toml
from shn.federated.records import CheckpointError, WriteError, dumps_json, load_checkpoint, save_checkpoint
from shn.federated.simulation import DivergedError, write_summary
from shn.registry import METHODS
from shn.runner import build, load_run, run
from tests.conftest import state_hash, with_changes

TINY = {"seed": 0, "rounds": 2, "clients_per_round": 3, "eval_every": 1, "checkpoint_every": 1,
        "task": {"name": "digits", "num_clients": 4, "model": "mlp"}, "local": {"steps": 1, "batch_size": 16}}


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


class _Marker:
    """Unpickling this creates the file ``path``: what a crafted checkpoint would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture
def finished_run(tmp_path):
    """A 2-round run directory with config.toml, checkpoints and summary."""
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml(TINY))
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--no-progress"]) == 0
    return cfg, run_dir


# -- 1: checkpoints cannot run code ---------------------------------------------------------------

def test_crafted_checkpoint_is_refused_and_runs_no_code(finished_run, capsys):
    cfg, run_dir = finished_run
    marker = run_dir.parent / "pwned"
    (run_dir / "checkpoint.prev.pt").unlink()
    torch.save({"round": 1, "payload": _Marker(marker)}, run_dir / "checkpoint.pt")
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(run_dir), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.pt" in err and "refused" in err and "run code" in err
    with pytest.raises(CheckpointError, match="refused"):
        load_run(run_dir)
    assert not marker.exists()


def test_crafted_newest_checkpoint_falls_back_to_the_previous_one(finished_run, caplog):
    _, run_dir = finished_run
    marker = run_dir.parent / "pwned"
    torch.save({"round": 9, "payload": _Marker(marker)}, run_dir / "checkpoint.pt")
    state = load_checkpoint(run_dir)
    assert state["round"] == 1 and not marker.exists()
    assert (run_dir / "checkpoint.pt.corrupt").exists()
    assert any("refused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_every_method_checkpoint_is_plain_data_and_resumes_exactly(tmp_path, method):
    data = with_changes(TINY, method=method, rounds=3, **{"graph.kind": "complete", "server.optimizer": "adam"})
    cfg = config_from_dict(data)
    ref = run(cfg, progress=False)

    class Crash(Exception):
        pass

    def crash(r, record):
        if r == 2:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, run_dir=tmp_path, progress=False, on_eval=crash)
    torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # raises if anything is not plain data
    got = run(cfg, run_dir=tmp_path, resume=True, progress=False)
    assert state_hash(got.algorithm.state_dict()) == state_hash(ref.algorithm.state_dict())


def test_save_converts_numpy_and_paths_and_refuses_objects(tmp_path):
    save_checkpoint(tmp_path, {"round": 1, "a": np.float32(2.5), "b": np.arange(3), "p": tmp_path,
                               "param": torch.nn.Parameter(torch.ones(2))})
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["a"] == 2.5 and torch.equal(state["b"], torch.arange(3)) and state["p"] == str(tmp_path)
    assert type(state["param"]) is torch.Tensor
    with pytest.raises(TypeError, match=r"state\['x'\]: a object"):
        save_checkpoint(tmp_path, {"round": 2, "x": object()})
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["round"] == 1


# -- 13: a checkpoint of the wrong structure --------------------------------------------------------

@pytest.mark.parametrize("state, expected", [
    ({"round": 3}, "'elapsed' is missing"),
    ({"round": 3, "elapsed": 1.0, "algorithm": [], "personal": {}, "rejections": {}, "history": [],
      "per_client": {}, "failed": 0, "train_losses": []}, "'algorithm' should be a dict"),
    ({"round": -1}, "'round' should be a non-negative integer"),
])
def test_wrong_structure_checkpoint_is_one_line_exit_2(finished_run, capsys, state, expected):
    cfg, run_dir = finished_run
    (run_dir / "checkpoint.prev.pt").unlink()
    torch.save(state, run_dir / "checkpoint.pt")
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(run_dir), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "checkpoint.pt" in err
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(")):
        load_run(run_dir)


def test_checkpoint_of_another_model_is_one_line(finished_run, capsys):
    cfg, run_dir = finished_run
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["algorithm"] = {"hn": {"bogus": torch.zeros(1)}}
    (run_dir / "checkpoint.prev.pt").unlink()
    torch.save(state, run_dir / "checkpoint.pt")
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(run_dir), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit this run" in err


# -- 14: a full disk -------------------------------------------------------------------------------

def _failing_write(path_part: str, after: int = 0):
    """An ``os.write`` that raises ENOSPC on files whose path contains ``path_part``, from the
    ``after + 1``-th such file on."""
    real = os.write
    files: set[int] = set()

    def write(fd, data):
        if path_part in os.readlink(f"/proc/self/fd/{fd}"):
            files.add(os.fstat(fd).st_ino)
            if len(files) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    return write


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_disk_full_during_checkpoint_is_one_line_and_leaves_no_tmp(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml(with_changes(TINY, rounds=3)))
    run_dir = tmp_path / "run"
    monkeypatch.setattr("shn.federated.records.os.write", _failing_write("checkpoint.pt.tmp", after=1))
    assert main(["run", str(cfg), "--out", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "checkpoint" in err
    assert not list(run_dir.glob("*.tmp"))
    monkeypatch.undo()
    assert load_checkpoint(run_dir)["round"] == 1  # the good checkpoint survived


def test_disk_full_on_any_run_file_leaves_no_tmp(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("shn.federated.records.os.write", full)
    with pytest.raises(WriteError, match="No space left"):
        write_summary(tmp_path, {"a": 1})
    with pytest.raises(WriteError, match="No space left"):
        save_checkpoint(tmp_path, {"round": 1})
    assert list(tmp_path.iterdir()) == []


# -- 20: diverged runs stop; JSON is strict -------------------------------------------------------

def test_diverged_run_stops_with_one_line_and_nonzero_exit(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(dumps_toml(with_changes(TINY, method="pfedhn", rounds=3, **{"server.lr": 1e30})))
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "non-finite" in err
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(x) for x in lines]
    assert any(r.get("val_loss") is None for r in records)  # the diverged record, non-finite as null
    assert not (run_dir / "summary.json").exists()
    with pytest.raises(DivergedError):
        run(config_from_dict(with_changes(TINY, method="pfedhn", **{"server.lr": 1e30})), progress=False)


def test_json_outputs_are_strict(tmp_path):
    write_summary(tmp_path, {"metrics": {"a": math.nan, "b": math.inf, "c": 1.5}, "per_client": {"0": [-math.inf]}})
    data = _strict_json((tmp_path / "summary.json").read_text())
    assert data == {"metrics": {"a": None, "b": None, "c": 1.5}, "per_client": {"0": [None]}}
    assert _strict_json(dumps_json({"x": np.float32("nan")})) == {"x": None}


# -- 4, 5: claimed example counts ---------------------------------------------------------------

def _server_and_delta(method: str = "fedavg", **server_kwargs):
    from shn.federated.server import Server

    built = build(config_from_dict(with_changes(TINY, method=method)))
    spec = built.algorithm.server_spec
    delta = lambda scale=0.01, seed=0: {  # noqa: E731
        n: scale * torch.randn(s, generator=torch.Generator().manual_seed(seed)) for n, s in zip(spec.names, spec.shapes)}
    return Server(built.algorithm, built.config.validation, clients=range(4), **server_kwargs), delta


@pytest.mark.parametrize("count", [2**63, 2**64 - 1, np.uint64(2**64 - 1), np.uint64(2**63), 10**30, 1e30,
                                   10**9 + 1, 3.0, True, np.bool_(True), torch.tensor(2**62), "5", None, -3, 0])
def test_bad_example_counts_are_rejected_with_a_reason_not_raised(count, caplog):
    server, delta = _server_and_delta()
    before = state_hash(server.algorithm.state_dict())
    metrics = server.receive(1, [0, 1], [delta(), delta(seed=1)], [count, count])
    assert metrics["accepted"] == 0 and metrics["rejected"] == 2
    assert state_hash(server.algorithm.state_dict()) == before
    assert all("example count" in r.reason for r in server.rejections.by_round[1])


@pytest.mark.parametrize("count", [1, 10**9, np.uint64(7), np.int32(7), torch.tensor(7)])
def test_integer_counts_up_to_the_bound_are_accepted(count):
    server, delta = _server_and_delta()
    assert server.receive(1, [0], [delta()], [count])["accepted"] == 1


def test_one_client_cannot_own_the_fedavg_mean_beyond_the_bound():
    """Weights are the claimed counts, each at most max_examples: a liar at the bound weighs
    max_examples / (max_examples + honest counts), and a smaller bound shrinks that."""
    liar, delta = _server_and_delta(max_examples=100)
    honest, _ = _server_and_delta(max_examples=100)
    bad, good = delta(scale=0.5, seed=1), delta(seed=2)
    assert liar.receive(1, [0, 1], [bad, good], [2**62, 100])["rejected"] == 1
    honest.receive(1, [1], [good], [100])
    assert state_hash(liar.algorithm.state_dict()) == state_hash(honest.algorithm.state_dict())
    assert liar.max_examples == 100


def test_outlying_counts_are_logged(caplog):
    server, delta = _server_and_delta()
    server.receive(1, [0, 1, 2], [delta(seed=i) for i in range(3)], [10, 12, 10**6])
    assert any("client 2 claims 1000000 examples" in r.getMessage() for r in caplog.records)


# -- 6: client ids (Python API) ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["pfedhn", "fedavg"])
@pytest.mark.parametrize("ids, reason", [
    ([-1, 0], "not a training client"),
    ([999, 0], "not a training client"),
    ([1, 1], "appears 2 times"),
    ([1.0, 0], "not an integer"),
    ([True, 0], "not an integer"),
    (["1", 0], "not an integer"),
])
def test_forged_client_ids_are_rejected_and_counted(method, ids, reason):
    server, delta = _server_and_delta(method)
    alone, _ = _server_and_delta(method)
    metrics = server.receive(1, ids, [delta(seed=1), delta(seed=2)], [10, 10])
    bad = [r for r in server.rejections.by_round[1] if reason in r.reason]
    assert bad and metrics["rejected"] == len(server.rejections.by_round[1])
    if ids[1] == 0:  # the honest client 0 is applied exactly as on its own
        alone.receive(1, [0], [delta(seed=2)], [10])
        assert metrics["accepted"] == 1
        assert state_hash(server.algorithm.state_dict()) == state_hash(alone.algorithm.state_dict())
    else:  # a repeated id: every copy rejected, nothing applied
        assert metrics["accepted"] == 0
        assert state_hash(server.algorithm.state_dict()) == state_hash(alone.algorithm.state_dict())


@pytest.mark.parametrize("counts", [([0, 1, 2], 2, 3), ([0, 1], 3, 2), ([0, 1], 2, 1)])
def test_mismatched_lengths_reject_the_whole_round(counts):
    clients, n_deltas, n_counts = counts
    server, delta = _server_and_delta("pfedhn")
    before = state_hash(server.algorithm.state_dict())
    metrics = server.receive(1, clients, [delta(seed=i) for i in range(n_deltas)], [10] * n_counts)
    assert metrics["accepted"] == 0 and metrics["rejected"] == len(clients)
    assert all("ambiguous" in r.reason for r in server.rejections.by_round[1])
    assert state_hash(server.algorithm.state_dict()) == before


def test_hypernetwork_server_without_a_pool_knows_its_clients():
    from shn.federated.server import Server

    built = build(config_from_dict(with_changes(TINY, method="pfedhn")))
    server = Server(built.algorithm, ValidationConfig())
    spec = built.algorithm.server_spec
    d = {n: torch.zeros(s) for n, s in zip(spec.names, spec.shapes)}
    assert server.receive(1, [4], [d], [5])["rejected"] == 1  # 4 clients: ids 0..3


def test_held_out_novel_clients_cannot_send_updates():
    from shn.federated.simulation import Simulation

    built = build(config_from_dict(with_changes(TINY, method="pfedhn")))
    sim = Simulation(built.config, built.algorithm, built.runtime, pool=[0, 1, 2], progress=False)
    spec = built.algorithm.server_spec
    d = {n: torch.zeros(s) for n, s in zip(spec.names, spec.shapes)}
    assert sim.server.receive(1, [3], [d], [5])["rejected"] == 1


# -- 7: what an honest client reports is what the server expects ----------------------------------

def _honest_keys(built) -> set[str]:
    rows = built.runtime.evaluate(list(range(built.task.num_clients)),
                                  built.algorithm.weights_for(list(range(built.task.num_clients))))
    return {k for row in rows.values() for k in row}


def test_expected_metric_keys_are_the_in_process_keys(tmp_path):
    from shn.federated.validation import expected_metric_keys, validate_metrics
    from tests.test_forecasting import _write_traffic

    _write_traffic(tmp_path, n=3, steps=120)
    traffic = {"seed": 0, "rounds": 1, "clients_per_round": 3, "method": "fedavg",
               "task": {"name": "traffic", "data_dir": str(tmp_path), "input_len": 4, "output_len": 3}}
    for data in (with_changes(TINY, method="fedavg"), traffic):
        built = build(config_from_dict(data))
        expected = expected_metric_keys(built.task, built.runtime.trainer.template_for, range(built.task.num_clients))
        honest = _honest_keys(built)
        assert expected == honest, data["task"]["name"]
        rows = built.runtime.evaluate([0], built.algorithm.weights_for([0]))
        finite = {k: v for k, v in rows[0].items() if math.isfinite(v)}
        assert validate_metrics({**finite, "partition-id": 0}, expected, 0) is None


def test_disk_full_while_appending_metrics_leaves_the_log_readable(tmp_path, monkeypatch):
    from shn.federated.records import MetricsLog, read_jsonl

    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    metrics.append({"round": 1, "x": 0.5})

    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:7])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", Full)
    with pytest.raises(WriteError, match="No space left"):
        metrics.append({"round": 2, "x": 0.25})
    monkeypatch.undo()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"round": 1, "x": 0.5}]


def test_every_torch_load_in_the_library_is_weights_only():
    """No file read by shn or its tasks can run code: every torch.load passes weights_only=True."""
    import re

    root = Path(__file__).resolve().parents[1]
    calls = []
    for folder in ("shn", "tasks", "baselines", "experiments"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                end = text.find("\n", text.find(")", m.end()))
                calls.append((f"{path.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 1}", text[m.start():end]))
    code = [(where, call) for where, call in calls if not call.startswith("torch.load(...")]
    assert code, "no torch.load found: the scan is broken"
    unsafe = [where for where, call in code if "weights_only=True" not in call]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


@pytest.mark.parametrize("name, content", [("summary.json", b"{not json"), ("summary.json", b"\xff\xfe"),
                                           ("metrics.jsonl", b'{"round": 1}\n{"round": \n')])
def test_load_run_with_a_malformed_run_file_is_one_line(finished_run, name, content):
    from shn.report import build_report
    from shn.rundir import RunDirError

    _, run_dir = finished_run
    (run_dir / name).write_bytes(content)
    with pytest.raises(RunDirError, match=rf"{name}: not a readable run file"):
        load_run(run_dir)
    if name == "summary.json":  # shn report skips what is not a run
        with pytest.raises(FileNotFoundError, match="no run"):
            build_report([run_dir], out=run_dir.parent / "report")
