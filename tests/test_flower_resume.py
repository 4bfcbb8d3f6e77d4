"""Flower parity (issue 18 item 4): a killed Flower run resumes from its checkpoint with the numbers
of an uninterrupted Flower run — clients' personal state and error-feedback residuals included,
kept on the clients' own disk (shn.flower.client_state) — and the after-training steps (novel
clients, encoder energy) run on Flower with the in-process engine's numbers.

A "kill" is a grid that raises in the middle of a round after a checkpoint: the ServerApp dies,
and the resumed run gets a fresh grid, i.e. fresh node contexts, as a new Flower run does.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from shn.config import ConfigError, config_from_dict
from shn.runner import run
from tests.conftest import with_changes

pytest.importorskip("flwr.app")
from shn.flower.client_state import ClientSnapshots, run_key  # noqa: E402
from shn.flower.engine import (  # noqa: E402
    PERSONAL_PREFIX,
    RESIDUAL_PREFIX,
    ClientUnavailable,
    EngineSettings,
    InProcessGrid,
    make_client_app,
    resolve_run_config,
    run_federation,
    run_in_process,
)

pytestmark = pytest.mark.usefixtures("flower_env")

SMALL = {"seed": 0, "rounds": 5, "clients_per_round": 2, "eval_every": 1, "checkpoint_every": 2,
         "task": {"name": "digits", "num_clients": 4}, "local": {"steps": 2, "batch_size": 16}}


class Killed(Exception):
    """The ServerApp's process dies."""


class KillingGrid(InProcessGrid):
    """Raises on the first train message of round ``at`` (after the round-2 checkpoint and the
    round-3 client snapshots: both kinds of leftovers a resumption must handle)."""

    def __init__(self, *args: Any, at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at = at

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train" and int(m.content["config"].get("round", 0)) == self.at:
                raise Killed(f"killed in round {self.at}")
        return super().send_and_receive(messages, timeout=timeout)


def make_config(**changes: Any):
    return config_from_dict(with_changes(SMALL, **changes))


def grid_for(config, state_dir: Path | None, cls=InProcessGrid, **kwargs: Any):
    run_config = {"client-state-dir": str(state_dir)} if state_dir is not None else None
    return cls(make_client_app(), config.task.options.num_clients, run_config=run_config, **kwargs)


def personal_of(grid) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for ctx in grid.contexts.values():
        for key in ctx.state.keys():
            if key.startswith((PERSONAL_PREFIX, RESIDUAL_PREFIX)):
                out[key] = dict(ctx.state[key].to_torch_state_dict())
    return out


def history_without_time(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


CASES = {
    "pfedhn": {"method": "pfedhn"},
    "pfedhn-personal-head": {"method": "pfedhn", "methods.pfedhn.personal_head": True},
    "local": {"method": "local"},
    "ditto": {"method": "ditto"},
    "fedavg-topk-error-feedback": {"method": "fedavg", "compression.kind": "topk",
                                   "compression.topk_fraction": 0.1, "compression.error_feedback": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_killed_flower_run_resumes_to_the_uninterrupted_numbers(tmp_path, case):
    config = make_config(**CASES[case])
    ref_grid = grid_for(config, tmp_path / "ref_state")
    ref = run_federation(ref_grid, config, EngineSettings(run_dir=tmp_path / "ref"))

    state = tmp_path / "client_state"
    killed = grid_for(config, state, KillingGrid, at=4)
    with pytest.raises(Killed):
        run_federation(killed, config, EngineSettings(run_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "summary.json").exists()
    snapshots = sorted(p.name for p in state.rglob("round-*.pt"))
    if personal_of(ref_grid):  # the clients left state on disk, some of it newer than the checkpoint
        assert snapshots and "round-3.pt" in snapshots
    resumed_grid = grid_for(config, state)  # a new Flower run: every context starts empty
    got = run_federation(resumed_grid, config, EngineSettings(run_dir=tmp_path / "run", resume=True))

    assert history_without_time(got.history) == history_without_time(ref.history)
    assert got.per_client == ref.per_client
    a, b = ref.algorithm.state_dict(), got.algorithm.state_dict()
    for key, value in _flat_tensors(a).items():
        assert torch.equal(value, _flat_tensors(b)[key]), key
    ref_personal, got_personal = personal_of(ref_grid), personal_of(resumed_grid)
    for key, tensors in got_personal.items():  # what the resumed run's clients hold equals the reference
        assert all(torch.equal(t, ref_personal[key][n]) for n, t in tensors.items()), key
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["communication"] == ref.summary["communication"]
    assert summary["metrics"] == ref.summary["metrics"]


def _flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(state, torch.Tensor):
        out[prefix] = state
    elif isinstance(state, dict):
        for k, v in state.items():
            out.update(_flat_tensors(v, f"{prefix}.{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_flat_tensors(v, f"{prefix}.{i}"))
    return out


def test_resume_without_client_state_loses_only_the_personal_state(tmp_path):
    """Without a state directory the server side still resumes exactly (pFedHN has no client
    state: same numbers); a method with personal tensors restarts them (documented)."""
    config = make_config(method="pfedhn")
    ref = run_federation(grid_for(config, None), config, EngineSettings(run_dir=tmp_path / "ref"))
    with pytest.raises(Killed):
        run_federation(grid_for(config, None, KillingGrid, at=4), config, EngineSettings(run_dir=tmp_path / "run"))
    got = run_federation(grid_for(config, None), config, EngineSettings(run_dir=tmp_path / "run", resume=True))
    assert history_without_time(got.history) == history_without_time(ref.history)


def test_a_resumed_flower_run_may_extend_its_rounds_and_equals_the_longer_run(tmp_path):
    short, long = make_config(method="fedper", rounds=3), make_config(method="fedper", rounds=5)
    ref = run_in_process(long, run_dir=tmp_path / "ref", client_state_dir=tmp_path / "ref_state")
    run_in_process(short, run_dir=tmp_path / "run", client_state_dir=tmp_path / "state")
    got = run_in_process(long, run_dir=tmp_path / "run", client_state_dir=tmp_path / "state", resume=True)
    assert history_without_time(got.history) == history_without_time(ref.history)
    # and both equal the in-process engine
    inproc = run(long, progress=False)
    assert [h["test_accuracy"] for h in got.history] == pytest.approx([h["test_accuracy"] for h in inproc.history],
                                                                     abs=1e-6)


def test_snapshots_are_pruned_to_what_a_resumption_can_need(tmp_path):
    config = make_config(method="local", rounds=7, clients_per_round=4, checkpoint_every=2)
    run_in_process(config, run_dir=tmp_path / "run", client_state_dir=tmp_path / "state")
    for folder in (tmp_path / "state" / run_key(config)).iterdir():
        rounds = sorted(int(p.stem.split("-")[1]) for p in folder.glob("round-*.pt"))
        # the last checkpoint before round 7 is round 6: rounds 6 and 7 are kept, nothing older
        assert rounds == [6, 7], (folder.name, rounds)


def test_a_fresh_run_never_restores_an_earlier_runs_snapshots(tmp_path):
    config = make_config(method="local", rounds=2, clients_per_round=4)
    run_in_process(config, run_dir=tmp_path / "a", client_state_dir=tmp_path / "state")
    key = tmp_path / "state" / run_key(config)
    marker = key / "client-0" / "round-99.pt"
    torch.save({f"{PERSONAL_PREFIX}0": {"fc.weight": torch.zeros(1)}}, marker)
    run_in_process(config, run_dir=tmp_path / "b", client_state_dir=tmp_path / "state")
    assert not marker.exists()  # cleared by the fresh run's first message to client 0


def test_run_key_names_the_training_config_not_the_rounds():
    a = make_config(method="fedavg")
    assert run_key(a) == run_key(make_config(method="fedavg", rounds=50, eval_every=3))
    assert run_key(a) != run_key(make_config(method="fedavg", **{"local.lr": 0.5}))
    assert run_key(a) != run_key(make_config(method="fedavg", seed=1))


# ---------------------------------------------------------------------------------------------
# hostile input: what a client reads from the server or its disk

class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_FILE}",))


EXPLOIT_FILE = Path("/tmp") / f"shn-client-snapshot-exploit-{os.getpid()}"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_snapshot_runs_no_code_and_is_one_line(tmp_path):
    from flwr.app import RecordDict

    snaps = ClientSnapshots(tmp_path, "0123456789abcdef", 3, (PERSONAL_PREFIX,))
    snaps.folder.mkdir(parents=True)
    (snaps.folder / "round-2.pt").write_bytes(pickle.dumps({f"{PERSONAL_PREFIX}3": _Exploit()}))
    from shn.flower.client_app import arrays

    with pytest.raises(ValueError, match="round-2.pt: not a readable client snapshot"):
        snaps.restore(5, RecordDict(), arrays)
    assert not EXPLOIT_FILE.exists()
    # entries of another client are refused too
    torch.save({f"{PERSONAL_PREFIX}4": {"w": torch.zeros(2)}}, snaps.folder / "round-2.pt")
    with pytest.raises(ValueError, match="not a client snapshot of client 3"):
        snaps.restore(5, RecordDict(), arrays)


@pytest.mark.parametrize("key", ["../../etc", "0123456789ABCDEF", "0123", "0123456789abcdef/..", 7])
def test_a_run_key_that_is_not_16_hex_digits_is_refused(tmp_path, key):
    with pytest.raises(ValueError, match="run-key: expected 16 hex digits"):
        ClientSnapshots(tmp_path, key, 0, (PERSONAL_PREFIX,))


def test_run_config_resume_and_client_state_dir(tmp_path):
    config, settings = resolve_run_config({"resume": True, "client-state-dir": str(tmp_path)})
    assert settings.resume is True
    assert config == resolve_run_config({})[0]  # client-state-dir is read by the clients, no config override
    with pytest.raises(ConfigError, match="'resume': expected true or false"):
        resolve_run_config({"resume": "yes"})
    with pytest.raises(ConfigError, match="'overwrite' and 'resume' exclude each other"):
        resolve_run_config({"resume": True, "overwrite": True})


def test_resume_refuses_a_changed_training_config(tmp_path):
    from shn.rundir import RunDirError

    config = make_config(method="fedavg", rounds=2)
    run_in_process(config, run_dir=tmp_path / "run")
    with pytest.raises(RunDirError, match="local.lr"):
        run_in_process(make_config(method="fedavg", rounds=3, **{"local.lr": 0.5}), run_dir=tmp_path / "run",
                       resume=True)


# ---------------------------------------------------------------------------------------------
# after-training steps on Flower

NOVEL = {"novel.fraction": 0.25, "novel.steps": 3, "rounds": 3, "clients_per_round": 3}


@pytest.mark.parametrize("method,extra", [
    ("pfedhn", {}),
    ("shn", {"graph.kind": "complete", "encoder.layers": 1}),
])
def test_after_training_steps_run_on_flower_with_in_process_numbers(tmp_path, method, extra):
    config = make_config(method=method, **NOVEL, **extra)
    ref = run(config, progress=False)
    got = run_in_process(config, run_dir=tmp_path / "run")
    assert ref.summary["novel_clients"] == got.summary["novel_clients"] == [3]
    keys = [k for k in ref.summary if k.startswith(("novel_", "encoder_"))]
    assert any(k.startswith("novel_test_") for k in keys)
    if method == "shn":
        assert "encoder_rayleigh_quotient" in keys
    for k in keys:
        assert _numbers(got.summary[k]) == pytest.approx(_numbers(ref.summary[k]), rel=1e-5, abs=1e-6), k
    assert "after_training_failed" not in got.summary
    # the held-out client's node got novel-fit and evaluation messages, never a training round
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["novel_clients"] == [3]


def _numbers(value: Any) -> list[float]:
    """A summary entry's numbers in a fixed order (entries nest: per-client tables)."""
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _numbers(value[k])]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return [float(value)]


def test_a_novel_client_that_is_gone_fails_that_step_alone(tmp_path, caplog):
    config = make_config(method="pfedhn", **NOVEL)
    grid = InProcessGrid(make_client_app(), 4)
    real = grid.send_and_receive

    def send(messages, *, timeout=None):
        messages = list(messages)
        if any(str(m.metadata.group_id).startswith("novel-") for m in messages):
            grid.drop.add(grid.node_of(3))
        return real(messages, timeout=timeout)

    grid.send_and_receive = send
    result = run_federation(grid, config, EngineSettings(run_dir=tmp_path / "run"))
    assert "novel client 3 did not answer" in result.summary["after_training_failed"][0]
    assert "novel_test_accuracy" not in result.summary and result.summary["rounds"] == 3
    assert any("after-training step failed" in r.message for r in caplog.records)


def test_a_forged_novel_update_is_rejected(tmp_path):
    from flwr.app import ArrayRecord, Message, RecordDict

    config = make_config(method="pfedhn", **NOVEL)
    real = make_client_app()

    def client_app(msg, context):
        reply = real(msg, context)
        if "novel-step" in msg.content.get("config", {}) if msg.metadata.message_type == "train" else False:
            delta = {k: torch.full_like(v, float("nan")) for k, v in reply.content["delta"].to_torch_state_dict().items()}
            return Message(RecordDict({"delta": ArrayRecord(delta), "metrics": reply.content["metrics"]}), reply_to=msg)
        return reply

    result = run_in_process(config, run_dir=tmp_path / "run", client_app=client_app)
    assert "update rejected" in result.summary["after_training_failed"][0]


def test_after_training_tolerates_only_what_it_is_told():
    """One helper runs the after-training steps for both engines: in order, into the summary; a
    tolerated error fails its step alone, any other propagates."""
    from types import SimpleNamespace

    from shn.build import after_training

    def gone(out):
        raise ClientUnavailable("client 3 did not answer")

    hooks = [lambda out: {"a": 1}, gone, lambda out: {"b": out.summary["a"] + 1}]
    built = SimpleNamespace(context=SimpleNamespace(extras={"after_training": hooks}))
    out = SimpleNamespace(summary={})
    assert after_training(built, out, tolerate=(ClientUnavailable,)) == ["client 3 did not answer"]
    assert out.summary == {"a": 1, "b": 2}
    with pytest.raises(ClientUnavailable):
        after_training(built, SimpleNamespace(summary={}))
