"""The Flower engine (shn.flower): equal to the in-process engine, robust to failing clients,
deployable with TLS + SuperNode authentication, and runnable on Flower's Ray simulation.

Ray-free tests drive the real ServerApp/ClientApp code through ``InProcessGrid`` (the ClientApp
called in this process, one Context per node). The deployment test starts a real SuperLink and
SuperNodes on free loopback ports; the simulation test runs ``shn flower simulate``'s ``flwr run``
against a SuperLink in simulation mode (Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from shn.config import config_from_dict, load_config
from shn.federated.server import Server
from shn.registry import METHODS
from shn.runner import run
from tests.conftest import with_changes

flwr_app = pytest.importorskip("flwr.app")
from shn.flower.engine import (  # noqa: E402
    PERSONAL_PREFIX,
    EngineSettings,
    InProcessGrid,
    make_client_app,
    make_server_app,
    resolve_run_config,
    run_federation,
)
from shn.flower.simulation import detached_helpers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "flower_app"
BIN = Path(sys.executable).parent

SMALL = {"seed": 0, "rounds": 3, "clients_per_round": 4, "eval_every": 2,
         "task": {"name": "digits", "num_clients": 4}, "local": {"steps": 2, "batch_size": 16}}


pytestmark = pytest.mark.usefixtures("flower_env")


def make_config(**changes: Any):
    return config_from_dict(with_changes(SMALL, **changes))


def flower_run(config, tmp_path, client_app=None, grid_cls=InProcessGrid):
    grid = grid_cls(client_app or make_client_app(), config.task.options.num_clients)
    result = run_federation(grid, config, EngineSettings(run_dir=tmp_path / "run"))
    return result, grid


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a) if a else 0.0


def same_history(ref: list[dict], got: list[dict]) -> None:
    assert [h["round"] for h in ref] == [h["round"] for h in got]
    for r, g in zip(ref, got):
        keys = set(r) - {"elapsed_s"}
        assert keys == set(g) - {"elapsed_s"}
        for k in keys:
            assert g[k] == pytest.approx(r[k], rel=1e-6, abs=1e-7), k


# ---------------------------------------------------------------------------------------------
# the run directory (issue 15 items 9, 10): a finished run is not replaced unless asked

def test_a_finished_flower_run_dir_is_refused_unless_overwrite(tmp_path):
    from shn.config import ConfigError
    from shn.rundir import RunDirError

    config = make_config(method="fedavg", rounds=1)
    flower_run(config, tmp_path)
    before = (tmp_path / "run" / "summary.json").read_bytes()
    with pytest.raises(RunDirError, match="holds a finished run"):
        flower_run(config, tmp_path)
    assert (tmp_path / "run" / "summary.json").read_bytes() == before
    grid = InProcessGrid(make_client_app(), 4)
    result = run_federation(grid, config, EngineSettings(run_dir=tmp_path / "run", overwrite=True))
    assert result.summary["rounds"] == 1
    assert resolve_run_config({"overwrite": True})[1].overwrite is True
    with pytest.raises(ConfigError, match="'overwrite': expected true or false"):
        resolve_run_config({"overwrite": "yes"})


# ---------------------------------------------------------------------------------------------
# equivalence with the in-process engine (no Ray)

def test_pfedhn_equals_in_process_engine(tmp_path):
    config = make_config(method="pfedhn")
    ref = run(config, progress=False)
    got, grid = flower_run(config, tmp_path)
    assert max_diff(ref.algorithm.hn.state_dict(), got.algorithm.hn.state_dict()) <= 1e-6
    same_history(ref.history, got.history)
    assert got.per_client.keys() == ref.per_client.keys()
    # the run directory is written as by `shn run`
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["rounds"] == 3 and summary["failed_clients"] == 0
    assert summary["metrics"]["test_accuracy"] == pytest.approx(ref.summary["metrics"]["test_accuracy"])
    assert (run_dir / "config.toml").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    # identity is the partition id: node ids are unrelated (and in another order)
    by_node = [grid.contexts[n].node_config["partition-id"] for n in sorted(grid.contexts)]
    assert sorted(by_node) == [0, 1, 2, 3] and by_node != [0, 1, 2, 3]
    # every train message carried one client's personalised weights and its round/slot
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == 3 * 4
    first = [m for m in trains if m.content["config"]["round"] == 1]
    assert [int(m.content["config"]["slot"]) for m in first] == [0, 1, 2, 3]
    assert all(grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] == m.content["config"]["client"]
               for m in trains)


@pytest.mark.parametrize("method", ["fedavg", "pfedhn"])
def test_differential_privacy_equals_in_process_engine(tmp_path, method):
    """[privacy]: the clipping and the seeded noise run in the server step both engines share,
    so the noisy models, the ε in each record and the summary's privacy block are equal."""
    config = make_config(method=method, clients_per_round=2,
                         privacy={"clip_norm": 0.5, "noise_multiplier": 1.0})
    ref = run(config, progress=False)
    got, _ = flower_run(config, tmp_path)
    if method == "pfedhn":
        assert max_diff(ref.algorithm.hn.state_dict(), got.algorithm.hn.state_dict()) <= 1e-6
    else:
        assert max(float((a - b).detach().abs().max()) for a, b in zip(ref.algorithm.params, got.algorithm.params)) <= 1e-6
    same_history(ref.history, got.history)
    assert [h["epsilon"] for h in got.history] == [h["epsilon"] for h in ref.history]
    assert got.summary["privacy"] == ref.summary["privacy"] and got.summary["privacy"]["sample_rate"] == 0.5


def test_personal_head_stays_in_context_state(tmp_path):
    """pFedHN-PC: the head never travels; it lives in the node's context.state and the results
    equal the in-process engine's (whose PersonalStore is a dict)."""
    config = make_config(method="pfedhn", **{"methods.pfedhn.personal_head": True})
    ref = run(config, progress=False)
    got, grid = flower_run(config, tmp_path)
    assert max_diff(ref.algorithm.hn.state_dict(), got.algorithm.hn.state_dict()) <= 1e-6
    same_history(ref.history, got.history)
    for m in grid.sent:
        if m.metadata.message_type in ("train", "evaluate"):
            assert not any(k.startswith("head.") for k in m.content["arrays"].keys())
    ref_personal = ref.extra["simulation"].runtime.personal.values
    for client in range(4):
        state = grid.contexts[grid.node_of(client)].state
        assert [k for k in state.keys() if k.startswith(PERSONAL_PREFIX)] == [f"{PERSONAL_PREFIX}{client}"]
        mine = dict(state[f"{PERSONAL_PREFIX}{client}"].to_torch_state_dict())
        assert set(mine) == {"head.weight", "head.bias"}
        assert max_diff(ref_personal[client], mine) <= 1e-6


def test_local_method_sends_nothing(tmp_path):
    config = make_config(method="local", rounds=2)
    ref = run(config, progress=False)
    got, grid = flower_run(config, tmp_path)
    same_history(ref.history, got.history)
    assert all(len(m.content["arrays"]) == 0 for m in grid.sent if m.metadata.message_type != "query")
    assert all(f"{PERSONAL_PREFIX}{grid.contexts[n].node_config['partition-id']}" in grid.contexts[n].state
               for n in grid.contexts)


@pytest.mark.skipif("shn" not in METHODS, reason="the shn method is not registered yet")
def test_shn_equals_in_process_engine(tmp_path):
    config = make_config(method="shn", rounds=2, **{"graph.kind": "complete", "encoder.layers": 1})
    ref = run(config, progress=False)
    got, _ = flower_run(config, tmp_path)
    assert max_diff(ref.algorithm.hn.state_dict(), got.algorithm.hn.state_dict()) <= 1e-6
    same_history(ref.history, got.history)


# ---------------------------------------------------------------------------------------------
# failing clients

def test_client_error_and_disconnect_are_counted(tmp_path):
    """Partition 1 raises in round 2, partition 3 goes silent in round 3: both rounds complete
    with the others and both failures are counted."""
    real = make_client_app()

    def flaky(msg, context):
        cfg = msg.content["config"] if "config" in msg.content else {}
        if (msg.metadata.message_type == "train" and context.node_config["partition-id"] == 1
                and cfg.get("round") == 2):
            raise RuntimeError("client crashed mid-round")
        return real(msg, context)

    class DroppingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            silent = {m for m in messages if m.metadata.message_type == "train" and m.metadata.group_id == "3"
                      and m.content["config"]["client"] == 3}
            replies = super().send_and_receive([m for m in messages if m not in silent], timeout=timeout)
            self.sent.extend(silent)
            return replies

    config = make_config(method="pfedhn")
    got, _ = flower_run(config, tmp_path, client_app=flaky, grid_cls=DroppingGrid)
    assert got.summary["failed_clients"] == 2
    assert got.summary["rejected_updates"] == 0
    assert [h["round"] for h in got.history] == [2, 3]
    assert got.history[0]["failed_clients"] == 1 and got.history[1]["failed_clients"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["failed_clients"] == 2


def test_nan_delta_rejected_exactly_as_in_process(tmp_path, monkeypatch):
    """Partition 2 sends a NaN delta over the wire in round 2; in-process, the same client's delta
    is poisoned on its way into Server.receive. Both engines reject it with the same reason and
    end with the same hypernetwork."""
    config = make_config(method="pfedhn")
    original = Server.receive

    def poisoned(self, round_, clients, deltas, num_examples):
        if round_ == 2 and 2 in clients:
            i = list(clients).index(2)
            deltas = list(deltas)
            deltas[i] = {k: torch.full_like(v, float("nan")) for k, v in deltas[i].items()}
        return original(self, round_, clients, deltas, num_examples)

    with monkeypatch.context() as m:
        m.setattr(Server, "receive", poisoned)
        ref = run(config, progress=False)

    real = make_client_app()

    def nan_client(msg, context):
        reply = real(msg, context)
        if msg.metadata.message_type == "train" and msg.content["config"]["round"] == 2 \
                and context.node_config["partition-id"] == 2:
            delta = reply.content["delta"].to_torch_state_dict()
            reply.content["delta"] = flwr_app.ArrayRecord({k: torch.full_like(v, float("nan")) for k, v in delta.items()})
        return reply

    got, _ = flower_run(config, tmp_path, client_app=nan_client)
    assert got.summary["rejected_updates"] == ref.summary["rejected_updates"] == 1
    assert got.summary["failed_clients"] == 0
    ref_log = ref.extra["simulation"].server.rejections.by_round
    got_log = got.extra["simulation"].server.rejections.by_round
    assert got_log == ref_log and "non-finite" in got_log[2][0].reason and got_log[2][0].client == 2
    assert max_diff(ref.algorithm.hn.state_dict(), got.algorithm.hn.state_dict()) <= 1e-6


# ---------------------------------------------------------------------------------------------
# hostile clients (issue 15): forged evaluation reports, forged partition ids

def _forging(real, partition: int, forge):
    """A ClientApp whose node of ``partition`` rewrites its evaluation metrics with ``forge``."""

    def app(msg, context):
        reply = real(msg, context)
        if msg.metadata.message_type == "evaluate" and context.node_config["partition-id"] == partition:
            reply.content["metrics"] = flwr_app.MetricRecord(forge(dict(reply.content["metrics"])))
        return reply

    return app


@pytest.mark.parametrize("forge, reason", [
    (lambda m: {**m, "test_accuracy": 1e6}, "outside its range"),
    (lambda m: {**m, "test_accuracy": -0.5}, "outside its range"),
    (lambda m: {**m, "val_mse": 3.0}, "unexpected metrics ['val_mse']"),
    (lambda m: {**m, "owned": 1.0}, "unexpected metrics ['owned']"),
    (lambda m: {**m, "test_loss": float("nan")}, "non-finite"),
    (lambda m: {**m, "test_loss": float("inf")}, "non-finite"),
    (lambda m: {**m, "partition-id": 0}, "partition-id 0"),
    (lambda m: {"partition-id": m["partition-id"]}, "no metrics"),
])
def test_forged_evaluation_reports_are_rejected_and_counted(tmp_path, caplog, forge, reason):
    """Partition 2 forges its evaluation report: it is rejected (logged, counted in
    rejected_evaluations), so the run's metrics are the honest clients' means."""
    config = make_config(method="pfedhn", rounds=2)
    ref = run(config, progress=False)
    got, _ = flower_run(config, tmp_path, client_app=_forging(make_client_app(), 2, forge))
    assert got.summary["rejected_evaluations"] == len(got.history) == 1
    assert got.summary["failed_clients"] == 0 and set(got.per_client) == {0, 1, 3}
    honest = {c: row for c, row in ref.per_client.items() if c != 2}
    for k in ("test_accuracy", "val_accuracy", "test_loss"):
        assert got.summary["metrics"][k] == pytest.approx(sum(r[k] for r in honest.values()) / 3, rel=1e-6)
    assert set(got.summary["metrics"]) == set(ref.summary["metrics"])  # nothing added by the client
    assert any(reason in r.getMessage() and "client 2" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rejected_evaluations"] == 1


class _TwoClaimGrid(InProcessGrid):
    """Five nodes for four partitions: the extra node (an impostor) claims partition 1 too."""

    def __init__(self, client_app, num_nodes, **kwargs):
        super().__init__(client_app, num_nodes + 1, **kwargs)  # partitions 0..num_nodes
        impostor = next(n for n, c in self.contexts.items() if c.node_config["partition-id"] == num_nodes)
        self.contexts[impostor].node_config["partition-id"] = 1
        for c in self.contexts.values():
            c.node_config["num-partitions"] = num_nodes
        self.impostor = impostor


def test_a_contested_partition_is_used_by_neither_claimant(tmp_path, caplog):
    config = make_config(method="pfedhn", rounds=1)
    grid = _TwoClaimGrid(make_client_app(), 4)
    result = run_federation(grid, config, EngineSettings(run_dir=tmp_path / "run", min_nodes=3, node_timeout=5))
    assert set(result.per_client) == {0, 2, 3}  # partition 1 dropped: which claimant is genuine is unknown
    assert not any(m.metadata.message_type == "train" and m.content["config"]["client"] == 1 for m in grid.sent)
    assert any("partition 1 is claimed by nodes" in r.getMessage() for r in caplog.records)
    with pytest.raises(RuntimeError, match=r"contested: \[1\]"):  # all four needed: the run cannot start
        run_federation(_TwoClaimGrid(make_client_app(), 4), config,
                       EngineSettings(run_dir=tmp_path / "run2", node_timeout=0.2))


def test_partition_map_binds_partitions_to_node_ids(tmp_path, caplog):
    config = make_config(method="pfedhn", rounds=1)
    grid = _TwoClaimGrid(make_client_app(), 4)
    genuine = {c.node_config["partition-id"]: n for n, c in grid.contexts.items() if n != grid.impostor}
    bound = tmp_path / "partitions.toml"
    bound.write_text("".join(f'"{node}" = {part}\n' for part, node in sorted(genuine.items())))
    _, settings = resolve_run_config({"partition-map": str(bound), "run-dir": str(tmp_path / "run")})
    assert settings.partition_map == bound
    result = run_federation(grid, config, settings)
    assert set(result.per_client) == {0, 1, 2, 3}
    assert not any(m.metadata.dst_node_id == grid.impostor for m in grid.sent)  # never even asked
    assert all(grid.contexts[m.metadata.dst_node_id].node_config["partition-id"] == m.content["config"]["client"]
               for m in grid.sent if m.metadata.message_type == "train")
    # a node claiming another partition than its binding is not used
    grid = _TwoClaimGrid(make_client_app(), 4)  # the same node ids as before (deterministic)
    grid.contexts[genuine[3]].node_config["partition-id"] = 0
    result = run_federation(grid, config, EngineSettings(run_dir=tmp_path / "run3", min_nodes=3, node_timeout=5,
                                                         partition_map=bound))
    assert set(result.per_client) == {0, 1, 2}
    assert any("binds it to 3" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text, message", [
    ('"12" = 9\n', "partition 9 is not a client index 0..3"),
    ('"12" = 1\n"13" = 1\n', r"partition\(s\) \[1\] bound to more than one node"),
    ('"node" = 1\n', "is not a node id"),
    ("", "empty partition map"),
    ("not toml [", "not a readable TOML"),
])
def test_bad_partition_map_is_one_line(tmp_path, text, message):
    from shn.config import ConfigError
    from shn.flower.identity import load_partition_map

    path = tmp_path / "map.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_partition_map(path, 4)
    with pytest.raises(ConfigError, match="partition-map"):
        resolve_run_config({"partition-map": "absent.toml"}, tmp_path)


# ---------------------------------------------------------------------------------------------
# run config

def test_run_config_maps_onto_run_config(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('method = "fedavg"\nrounds = 7\n[task]\nname = "digits"\nnum_clients = 6\n')
    config, settings = resolve_run_config({
        "config": str(cfg_file), "overrides": "seed=3 local.steps=4 'server.betas=[0.8, 0.9]'",
        "num-rounds": 0, "run-dir": str(tmp_path / "out"), "min-nodes": 2, "server.lr": 0.5,
        "local.batch-size": 8,
    })
    assert (config.method, config.rounds, config.seed, config.task.options.num_clients) == ("fedavg", 7, 3, 6)
    assert (config.local.steps, config.local.batch_size, config.server.lr) == (4, 8, 0.5)
    assert config.server.betas == (0.8, 0.9)
    assert settings.run_dir == tmp_path / "out" and settings.min_nodes == 2
    # the app's declared defaults: digits quickstart, found relative to the app directory
    import tomllib

    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config, settings = resolve_run_config({**declared, "num-rounds": 2}, APP_DIR)
    assert config.task.name == "digits" and config.rounds == 2 and settings.run_dir is None
    # empty run config (run_simulation): all defaults
    assert resolve_run_config({})[0] == config_from_dict({})
    with pytest.raises(Exception, match="not found"):
        resolve_run_config({"config": "nope.toml"}, APP_DIR)


def test_flower_app_modules_run_on_a_grid(tmp_path, monkeypatch):
    """The ServerApp and ClientApp objects flwr loads from flower_app/ (its light ClientApp
    imports shn only to train or evaluate) on the in-process grid; its query reply is the
    engine's."""
    monkeypatch.syspath_prepend(str(APP_DIR))
    from shn_flower_app import client_app, server_app

    grid = InProcessGrid(client_app.app, 2)
    grid.main(server_app.app, {"config": "configs/digits.toml", "run-dir": str(tmp_path / "r"),
                               "overrides": "rounds=1 clients_per_round=2 task.num_clients=2 local.steps=1"})
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["failed_clients"] == 0 and set(summary["per_client"]) == {"0", "1"}
    query = next(m for m in grid.sent if m.metadata.message_type == "query")
    context = grid.contexts[query.metadata.dst_node_id]
    light = client_app.app(query, context).content["metrics"]
    assert dict(light) == dict(make_client_app()(query, context).content["metrics"]) == {
        "partition-id": context.node_config["partition-id"]}
    del context.node_config["partition-id"]
    with pytest.raises(ValueError, match="partition-id"):
        client_app.app(query, context)


def test_server_app_defaults_and_result_callback(tmp_path):
    results = []
    app = make_server_app(defaults={"overrides": "rounds=1 clients_per_round=2 task.num_clients=2 local.steps=1",
                                    "run-dir": str(tmp_path / "r")}, on_result=results.append)
    InProcessGrid(make_client_app(), 2).main(app)  # an empty run config, as with run_simulation
    assert results and results[0].summary["rounds"] == 1 and results[0].run_dir == tmp_path / "r"


# ---------------------------------------------------------------------------------------------
# deployment: SuperLink with TLS + SuperNode authentication, 2 SuperNodes, flwr run (slow)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return [d for k in kids for d in descendants(k)] + kids



def stop(procs: list[subprocess.Popen]) -> None:
    """Children first (each SuperLink/SuperNode spawns flower-superexec and app processes), then
    the parents; SIGKILL whatever is left after a grace period."""
    pids: list[int] = []
    for p in procs:
        pids += descendants(p.pid) + [p.pid]
    helpers = detached_helpers({p.pid for p in procs})
    pids = [d for h in helpers for d in descendants(h)] + helpers + [p for p in pids if p not in helpers]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    # a SuperNode may start one more app process between the scan above and its own exit; once
    # orphaned it stops by itself (as shn.flower.simulation._stop allows for): give it that time
    deadline = time.monotonic() + 20
    while detached_helpers({p.pid for p in procs}) and time.monotonic() < deadline:
        time.sleep(0.5)


def flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def wait_for(pred, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("pgrep") is None, reason="needs openssl, pgrep")
def test_deployment_with_tls_and_node_auth(tmp_path, monkeypatch):
    # SuperLink/SuperNode spawn flower-superexec, flwr-serverapp, flwr-clientapp by name
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(REPO / "scripts" / "flower_certs.sh"), str(certs), "3"], check=True,
                   capture_output=True, timeout=120)
    port = free_port()
    flwr_home = Path(os.environ["FLWR_HOME"])
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *cmd: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        p = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        procs.append(p)
        return p

    def supernode(name: str, key: str, partition: int) -> subprocess.Popen:
        return start(name, "flower-supernode", "--superlink", f"127.0.0.1:{port}",
                     "--root-certificates", str(certs / "ca.crt"), "--auth-supernode-private-key", str(certs / key),
                     "--node-config", f"partition-id={partition} num-partitions=2", "--port", str(free_port()),
                     "--max-retries", "2", "--max-wait-time", "20")

    # TODO(shn method): drop this fallback once baselines/shn.py is committed everywhere.
    method = "shn graph.kind=complete" if "shn" in METHODS else "pfedhn"
    try:
        start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
              "--ssl-certfile", str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key"),
              "--enable-supernode-auth", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "superlink.db"))
        # register the two SuperNodes' public keys (retried until the Control API is up)
        for key in ("supernode-1.pub", "supernode-2.pub"):
            def register(key=key):
                r = flwr("supernode", "register", str(certs / key), "deploy", "--format", "json")
                return r.returncode == 0 and json.loads(r.stdout).get("success")
            wait_for(register, 60, f"registering {key}", poll=2)
        supernode("node0", "supernode-1", 0)
        supernode("node1", "supernode-2", 1)
        intruder = supernode("intruder", "supernode-3", 1)  # key never registered

        def online() -> bool:
            r = flwr("supernode", "ls", "deploy", "--format", "json")
            nodes = json.loads(r.stdout).get("nodes", []) if r.returncode == 0 else []
            return sum(n["status"] == "online" for n in nodes) == 2
        wait_for(online, 90, "2 SuperNodes online", poll=2)

        out = tmp_path / "run"
        overrides = (f"method={method} rounds=2 clients_per_round=2 eval_every=2 task.num_clients=2 "
                     "local.steps=5 local.batch_size=16")
        r = flwr("run", str(APP_DIR), "deploy", "--format", "json",
                 "--run-config", f"overrides='{overrides}' run-dir='{out}'")
        assert r.returncode == 0, r.stdout + r.stderr
        run_id = json.loads(r.stdout)["run-id"]

        def finished():
            ls = flwr("ls", "deploy", "--run-id", str(run_id), "--format", "json")
            runs = json.loads(ls.stdout).get("runs", []) if ls.returncode == 0 else []
            return runs and runs[0]["status"].startswith("finished") and runs[0]["status"]
        status = wait_for(finished, 900, "the run to finish", poll=3)
        assert status == "finished:completed", flwr("log", str(run_id), "deploy", "--show").stdout[-4000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["failed_clients"] == 0 and summary["engine"] == "flower"
        assert summary["method"] == method.split()[0]
        assert set(summary["per_client"]) == {"0", "1"}

        # the SuperNode whose key was never registered is refused and gives up
        code = intruder.wait(timeout=120)
        assert code != 0
        assert "Failed to activate SuperNode" in (logs / "intruder.log").read_text()
        nodes = json.loads(flwr("supernode", "ls", "deploy", "--format", "json").stdout)["nodes"]
        assert len(nodes) == 2
    finally:
        stop(procs)
    assert all(p.poll() is not None for p in procs)
    assert not detached_helpers({p.pid for p in procs})


# ---------------------------------------------------------------------------------------------
# Ray simulation (one small smoke test)

def ray_processes() -> set[int]:
    """PIDs of Ray processes: actors (``ray::...``), gcs_server, raylet, Ray's Python helpers."""
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") or "site-packages/ray/" in cmd:
            found.add(int(proc.name))
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_simulation_runs_through_flwr_run_and_leaves_nothing_running(tmp_path, monkeypatch):
    """`shn flower simulate` on Flower's current API: `flwr run` against a SuperLink in simulation
    mode that the call starts on free ports and stops (not the deprecated run_simulation)."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning (no GPUs here)
    from shn.flower.simulation import _helpers, simulate

    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "fedper"\nrounds = 1\nclients_per_round = 2\neval_every = 1\n'
                   '[task]\nname = "digits"\nnum_clients = 2\n[local]\nsteps = 2\nbatch_size = 16\n')
    before = ray_processes()
    try:
        result = simulate(cfg, supernodes=2, run_dir=tmp_path / "run", extra={"local.lr": 0.01})
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        # issue 18 item 4: resumed with more rounds, FedPer's heads come back from the clients' disk
        resumed = simulate(cfg, supernodes=2, run_dir=tmp_path / "run", extra={"local.lr": 0.01, "rounds": 2},
                           resume=True)
    finally:  # Ray's actors exit by themselves shortly after the backend stops; make sure they did
        deadline = time.monotonic() + 30
        while ray_processes() - before and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in ray_processes() - before:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert summary["rounds"] == 1 and summary["failed_clients"] == 0 and set(summary["per_client"]) == {"0", "1"}
    assert summary["engine"] == "flower" and result.summary == summary
    assert load_config(tmp_path / "run" / "config.toml").local.lr == 0.01  # an extra key travels as an override
    log = result.extra["flower_log"]
    assert "DEPRECATED FEATURE" not in log and "run_simulation" not in log  # Flower's deprecation warning
    pid = result.extra["superlink_pid"]
    assert not Path(f"/proc/{pid}").exists() and not _helpers(pid)
    assert not ray_processes() - before
    from shn.flower.engine import run_in_process

    assert resumed.summary["rounds"] == 2 and list((tmp_path / "run" / "client_state").rglob("round-2.pt"))
    ref = run_in_process(load_config(cfg, ["rounds=2", "local.lr=0.01"]), run_dir=tmp_path / "ref",
                         client_state_dir=tmp_path / "ref_state")
    assert [h["test_accuracy"] for h in resumed.history] == pytest.approx([h["test_accuracy"] for h in ref.history],
                                                                          abs=1e-6)
