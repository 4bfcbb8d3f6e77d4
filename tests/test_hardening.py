"""Hardening (issue 8): per-round rejection counts in the metrics, robust aggregation, delta
clipping in a run, client dropout, crash-safe checkpoints (SIGKILL + resume, corrupt files) and
one-line user errors from the CLI. Update validation itself is tested in test_validation.py."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shn.cli import main
from shn.config import ConfigError, config_from_dict
from shn.federated.records import CheckpointError, load_checkpoint, save_checkpoint
from shn.federated.robust import coordinate_median, make_aggregate, trimmed_mean
from shn.federated.server import Server
from shn.federated.simulation import RoundFaults
from shn.runner import build, run
from tests.conftest import state_hash, with_changes

REPO = Path(__file__).resolve().parents[1]

TINY = {"seed": 0, "rounds": 4, "clients_per_round": 4, "eval_every": 2,
        "task": {"name": "digits", "num_clients": 6, "model": "mlp"}, "local": {"steps": 2, "batch_size": 16}}


def tiny(**changes) -> dict:
    return with_changes(TINY, **changes)




# -- rejections per round, in a whole engine round ---------------------------------------------

@pytest.mark.parametrize("method", ["pfedhn", "fedavg"])
def test_engine_round_with_every_update_rejected_leaves_state_unchanged(method):
    from shn.federated.simulation import Simulation

    built = build(config_from_dict(tiny(method=method, **{"validation.max_norm": 1e-12})))
    sim = Simulation(built.config, built.algorithm, built.runtime, progress=False)
    before = state_hash(built.algorithm.state_dict())
    metrics = sim.run_round(1)
    assert metrics["accepted"] == 0 and metrics["rejected"] == built.config.clients_per_round
    assert state_hash(built.algorithm.state_dict()) == before
    assert all("above the bound" in r.reason for r in sim.server.rejections.by_round[1])


def test_rejections_are_counted_per_evaluation_period():
    cfg = config_from_dict(tiny(rounds=6, eval_every=2, clients_per_round=2, **{"validation.max_norm": 1e-12}))
    result = run(cfg, progress=False)
    per_period = [h["rejected_this_period"] for h in result.history]
    assert per_period == [4, 4, 4]  # 2 clients x 2 rounds per period, every update rejected
    assert [h["rejected_updates"] for h in result.history] == [4, 8, 12]
    assert result.summary["rejected_updates"] == 12


def test_a_raising_update_is_rejected_not_raised():
    from shn.federated.validation import safe_validate_update

    built = build(config_from_dict(tiny()))
    spec = built.algorithm.server_spec

    class Hostile(dict):
        def __getitem__(self, key):
            raise RuntimeError("boom")

    hostile = Hostile({n: torch.zeros(s) for n, s in zip(spec.names, spec.shapes)})
    assert "boom" in safe_validate_update(spec, hostile, 3, 1e4)
    sparse = {n: torch.zeros(s).to_sparse() for n, s in zip(spec.names, spec.shapes)}
    assert "dense" in safe_validate_update(spec, sparse, 3, 1e4)
    server = Server(built.algorithm, built.config.validation)
    before = state_hash(built.algorithm.state_dict())
    assert server.receive(1, [0, 1], [hostile, sparse], [3, 3])["accepted"] == 0
    assert state_hash(built.algorithm.state_dict()) == before


# -- robust aggregation ------------------------------------------------------------------------

def test_median_and_trimmed_mean_are_coordinatewise_and_order_free():
    x = torch.tensor([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0], [-50.0, 3.0]])
    w = torch.ones(5)
    assert coordinate_median(x, w).tolist() == [2.0, 1.0]
    assert coordinate_median(x[:4], w[:4]).tolist() == [2.5, 0.5]  # even C: mean of the middle two
    # trim 1 each side of 5: mean of the middle three per coordinate
    torch.testing.assert_close(trimmed_mean(x, w, 0.2), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(trimmed_mean(x, w, 0.0), x.mean(0))
    assert trimmed_mean(x[:2], w[:2], 0.49).tolist() == x[:2].mean(0).tolist()  # k capped: something is left
    perm = torch.randperm(5)
    assert torch.equal(coordinate_median(x[perm], w), coordinate_median(x, w))
    torch.testing.assert_close(trimmed_mean(x[perm], w, 0.2), trimmed_mean(x, w, 0.2))
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(x, w, 0.5)
    with pytest.raises(ValueError, match="unknown aggregation"):
        make_aggregate("mode")


def test_one_huge_update_moves_mean_but_not_median():
    honest = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * 0.01
    attacked = torch.cat([honest, torch.full((1, 10), 1e6)])
    w = torch.ones(5)
    assert make_aggregate("mean")(attacked, w).abs().min() > 1e5
    assert make_aggregate("median")(attacked, w).abs().max() < 0.1
    assert make_aggregate("trimmed_mean", 0.2)(attacked, w).abs().max() < 0.1


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_fedavg_aggregation_option_is_wired(aggregation):
    cfg = config_from_dict(tiny(method="fedavg", methods={"fedavg": {"aggregation": aggregation, "trim_fraction": 0.25}}))
    built = build(cfg)
    stacked = torch.tensor([[0.0], [1.0], [2.0], [1000.0]])
    got = built.algorithm.aggregate(stacked, torch.tensor([1.0, 1.0, 1.0, 100.0]))
    assert float(got) == 1.5  # median of 4 = mean of the middle two; trim 1 per side = the same here
    with pytest.raises(ConfigError, match="aggregation"):
        config_from_dict(tiny(method="fedavg", methods={"fedavg": {"aggregation": "mode"}}))
    with pytest.raises(ConfigError, match="trim_fraction"):
        config_from_dict(tiny(method="fedavg", methods={"fedavg": {"trim_fraction": 0.5}}))


def test_clip_norm_bounds_every_delta_the_hypernetwork_sees(monkeypatch):
    from shn.federated.algorithm import HyperNetworkAlgorithm

    seen = []
    original = HyperNetworkAlgorithm.apply_updates

    def spy(self, clients, deltas, num_examples):
        flat = torch.cat([d.flatten(1) for d in deltas.values()], 1).double()
        seen.extend(flat.norm(dim=1).tolist())
        return original(self, clients, deltas, num_examples)

    monkeypatch.setattr(HyperNetworkAlgorithm, "apply_updates", spy)
    run(config_from_dict(tiny(rounds=2, **{"attack.kind": "scale", "attack.fraction": 0.5, "attack.scale": 1e3,
                                           "validation.clip_norm": 0.05})), progress=False)
    assert len(seen) == 8 and max(seen) <= 0.05 * (1 + 1e-6)
    assert min(seen) > 0


# -- client dropout ----------------------------------------------------------------------------

def test_half_of_the_clients_failing_every_round_still_finishes(tmp_path):
    cfg = config_from_dict(tiny(rounds=6, **{"faults.dropout": 0.5}))
    result = run(cfg, run_dir=tmp_path, progress=False)
    faults = RoundFaults(dropout=0.5)
    expected = 0
    for r in range(1, 7):
        sampled = [0, 1, 2, 3]  # only the count matters here
        expected += len(sampled) - len(faults.surviving(cfg.seed, r, sampled))
    assert 0 < expected < 24
    assert result.summary["failed_clients"] == expected
    assert sum(h["failed_this_period"] for h in result.history) == expected
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed_clients"] == expected and math.isfinite(summary["metrics"]["test_accuracy"])
    with pytest.raises(ConfigError, match="dropout"):
        config_from_dict(tiny(**{"faults.dropout": 1.0}))


# -- checkpoints ---------------------------------------------------------------------------------

def _metrics(summary: dict) -> dict:
    return {k: v for k, v in summary["metrics"].items() if k != "elapsed_s"}


def _write_cfg(path: Path, **changes) -> Path:
    from shn.config import dumps_toml

    path.write_text(dumps_toml(tiny(**changes)))
    return path


def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    rounds = 12
    cfg = _write_cfg(tmp_path / "cfg.toml", rounds=rounds, eval_every=3, checkpoint_every=1, clients_per_round=3,
                     **{"faults.dropout": 0.2, "local.steps": 3})
    ref_dir = tmp_path / "ref"
    assert main(["run", str(cfg), "--out", str(ref_dir), "--no-progress"]) == 0
    ref = json.loads((ref_dir / "summary.json").read_text())
    window = ref["wall_time_s"] * (rounds - 2) / rounds  # about the time from the first checkpoint to the end

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random()
    for attempt in range(4):  # the kill must land while the run is still going
        run_dir = tmp_path / f"killed{attempt}"
        # the killed run uses the in-process runs' thread count: float sums depend on it (OMP_NUM_THREADS
        # or a many-core machine would otherwise give the child another one)
        proc = subprocess.Popen([sys.executable, "-m", "shn.cli", "--threads", str(torch.get_num_threads()), "run",
                                 str(cfg), "--out", str(run_dir), "--no-progress"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while not (run_dir / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, window) / 2 ** attempt)  # a random moment after the first checkpoint
            alive = proc.poll() is None
            if alive:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        if alive and not (run_dir / "summary.json").exists():
            break
    else:
        pytest.fail("the run always finished before it could be killed")
    state = load_checkpoint(run_dir)
    assert state is not None and 1 <= state["round"] <= rounds
    assert main(["run", str(cfg), "--out", str(run_dir), "--resume", "--no-progress"]) == 0
    got = json.loads((run_dir / "summary.json").read_text())
    assert _metrics(got) == _metrics(ref)
    assert got["per_client"] == ref["per_client"] and got["failed_clients"] == ref["failed_clients"]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [3, 6, 9, 12]


def test_resume_is_exact_with_dropout_in_the_graph_encoder(tmp_path):
    """The encoder's dropout draws from torch's global RNG; each round seeds it from (seed, round)
    so a resumed run (here: crashed after round 2's checkpoint) matches an uninterrupted one."""
    data = tiny(method="shn", rounds=4, eval_every=1, checkpoint_every=1, **{
        "graph.kind": "complete", "encoder.dropout": 0.5, "hypernetwork.hidden": 16})
    cfg = config_from_dict(data)
    ref = run(cfg, progress=False)

    class Crash(Exception):
        pass

    def crash(r, record):
        if r == 3:
            raise Crash

    with pytest.raises(Crash):
        run(cfg, run_dir=tmp_path, progress=False, on_eval=crash)
    assert load_checkpoint(tmp_path)["round"] == 2
    torch.rand(7)  # whatever the global RNG did in between does not matter
    got = run(cfg, run_dir=tmp_path, resume=True, progress=False)
    assert [{k: v for k, v in h.items() if k != "elapsed_s"} for h in got.history] == \
        [{k: v for k, v in h.items() if k != "elapsed_s"} for h in ref.history]
    assert state_hash(got.algorithm.state_dict()) == state_hash(ref.algorithm.state_dict())


def test_corrupt_newest_checkpoint_falls_back_and_keeps_the_good_one(tmp_path, caplog):
    save_checkpoint(tmp_path, {"round": 1, "x": torch.ones(3)})
    save_checkpoint(tmp_path, {"round": 2, "x": torch.ones(3)})
    newest = tmp_path / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:40])  # truncated
    with caplog.at_level("WARNING", logger="shn.records"):
        state = load_checkpoint(tmp_path)
    assert state["round"] == 1
    assert any("checkpoint.pt" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoint.pt.corrupt").exists()
    # the next save does not rotate the corrupt file over the good one
    save_checkpoint(tmp_path, {"round": 2, "x": torch.ones(3)})
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=False)["round"] == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["round"] == 2


def test_all_checkpoints_corrupt_is_one_line_exit_2_and_nothing_is_deleted(tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "cfg.toml", rounds=2, eval_every=2, checkpoint_every=1)
    run_dir = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--no-progress"]) == 0
    (run_dir / "checkpoint.pt").write_bytes(b"\x80\x02garbage")
    (run_dir / "checkpoint.prev.pt").write_bytes(b"")
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(run_dir), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "checkpoint.pt" in err and "checkpoint.prev.pt" in err and "corrupt or truncated" in err
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / "checkpoint.prev.pt").exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(run_dir)


# -- user errors: one line, exit code 2, no traceback ---------------------------------------------

def _graph_file(path: Path) -> Path:
    path.write_text(json.dumps({"format": "shn.ClientGraph", "version": 1, "num_nodes": 6,
                                "edge_index": [[0, 1], ["a", 2]]}))
    return path


CLI_ERRORS = {
    "unknown key": (["--set", "local.stepz=3"], "local.stepz: unknown key"),
    "unknown nested table key": (["--set", "attack.kind=scale", "--set", "attack.fracton=0.1"], "attack.fracton"),
    "bad literal": (["--set", "attack.kind=explode"], "attack.kind: 'explode' is not allowed"),
    "wrong type": (["--set", "rounds=many"], "rounds: expected an integer"),
    "out of range": (["--set", "attack.fraction=1.5"], "attack.fraction: must be in [0, 1]"),
    "unknown method": (["--set", "method=fedmagic"], "unknown method 'fedmagic'"),
    "unknown task": (["--set", "task.name=imagenet"], "unknown task 'imagenet'"),
    "missing data dir": (["--set", "task.name=mnist", "--set", "task.data_dir=/nonexistent/mnist"], "/nonexistent/mnist"),
    "malformed data file": (["--set", "task.name=mnist", "--set", "task.data_dir={mnist}"], "bad magic"),
    "malformed graph file": (["--set", "method=shn", "--set", "graph.kind=given", "--set", "graph.path={graph}"],
                             "malformed client graph file"),
    "missing graph file": (["--set", "method=shn", "--set", "graph.kind=given", "--set", "graph.path=/no/graph.json"],
                           "graph.path: /no/graph.json not found"),
    "bad --set syntax": (["--set", "noequals"], "expected KEY=VALUE"),
}


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_user_errors_are_one_line_exit_2(case, tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "cfg.toml", rounds=1)
    graph = _graph_file(tmp_path / "bad.json")
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    (mnist / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(60))  # a labels magic: wrong file
    (mnist / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(8))
    args, expected = CLI_ERRORS[case]
    args = [a.replace("{graph}", str(graph)).replace("{mnist}", str(mnist)) for a in args]
    code = main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("shn: error: ") and expected in err, err


@pytest.mark.parametrize("content, expected", [
    (None, "config file not found"),
    ("rounds = [1, \n", "not valid TOML"),
    ("[task]\nname = 3\n", "task.name"),
    ("[local]\nsteps = -1\n", "local.steps: must be > 0"),
    ("[attack]\nkind = 'scale'\nscale = 'big'\n", "attack.scale: expected a number"),
])
def test_cli_config_file_errors_are_one_line_exit_2(content, expected, tmp_path, capsys):
    path = tmp_path / "cfg.toml"
    if content is not None:
        path.write_text(content)
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    if content is None:
        assert str(path) in err


def test_cli_threads_must_be_positive(tmp_path, capsys):
    cfg = _write_cfg(tmp_path / "cfg.toml", rounds=1)
    code = main(["--threads", "0", "run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "shn: error: --threads must be >= 1, got 0", err
    assert not (tmp_path / "run").exists()


def test_cli_threads_applies_during_the_command_and_is_restored(monkeypatch):
    import torch

    import shn.cli as cli

    seen = []
    monkeypatch.setattr(cli, "_cmd_run", lambda args, pipeline=False: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert before != 1  # the autouse fixture runs tests with 2 threads
    assert cli.main(["--threads", "1", "run", "unused.toml"]) == 0
    assert seen == [1] and torch.get_num_threads() == before
