"""``shn flower simulate``: the Flower app on Flower's simulation runtime, through Flower's current
API — ``flwr run`` against a SuperLink in simulation mode — not the deprecated
``flwr.simulation.run_simulation``.

One call owns everything it starts: a Flower app written to a temporary folder (the same
ServerApp / ClientApp as ``flower_app/``), a temporary ``FLWR_HOME`` holding one SuperLink
connection, and a ``flower-superlink --simulation`` on free loopback ports (never the fixed ports
of Flower's managed local SuperLink, which stays running after ``flwr run``). It submits the run,
waits for it to finish, stops the SuperLink and its helper processes, and returns the run directory
read back as a :class:`~shn.build.RunResult` (no trained server state: the ServerApp ran in
Flower's process). A run that fails is a ``RuntimeError`` carrying the end of Flower's log.
Plugins (:mod:`shn.plugins`) reach the ServerApp and ClientApp processes through ``SHN_PLUGINS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

from shn.config import ConfigError, dumps_toml

__all__ = ["simulate", "write_app"]

CONNECTION = "shn-simulate"

_PYPROJECT = '''[project]
name = "shn-flower-simulate"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "shn"

[tool.flwr.app.components]
serverapp = "shn_simulate_app.server_app:app"
clientapp = "shn_simulate_app.client_app:app"

[tool.flwr.app.config]
'''
_SERVER = "from shn.flower.engine import make_server_app\n\napp = make_server_app()\n"
_CLIENT = "from shn.flower.engine import make_client_app\n\napp = make_client_app()\n"


def write_app(folder: Path) -> Path:
    """A minimal Flower app in ``folder`` whose ServerApp and ClientApp are the installed
    ``shn.flower.engine``'s; its run-config keys are the engine's (``RUN_CONFIG_DEFAULTS``)."""
    from shn.flower.engine import RUN_CONFIG_DEFAULTS

    package = folder / "shn_simulate_app"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""shn on Flower\'s simulation runtime (written by shn flower simulate)."""\n')
    (package / "server_app.py").write_text(_SERVER)
    (package / "client_app.py").write_text(_CLIENT)
    (folder / "pyproject.toml").write_text(_PYPROJECT + dumps_toml(RUN_CONFIG_DEFAULTS))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    return dumps_toml({"v": value}).split("=", 1)[1].strip()


def _run_config(config_path: Path, overrides: Sequence[str], run_dir: Path | str,
                extra: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--run-config`` table: Flower refuses keys the app does not declare, so every extra
    key that is not an engine key becomes an override (``server.lr`` → ``server.lr=0.01``)."""
    import shlex

    from shn.flower.engine import RUN_CONFIG_DEFAULTS

    items = list(overrides)
    config: dict[str, Any] = {"config": str(config_path), "run-dir": str(run_dir)}
    for key, value in dict(extra or {}).items():
        if key in RUN_CONFIG_DEFAULTS:
            config[key] = value
        else:
            items.append(f"{str(key).replace('-', '_')}={_toml_value(value)}")
    config["overrides"] = shlex.join(items)
    return config


def _env(flwr_home: Path) -> dict[str, str]:
    from shn.plugins import ENV_VAR, specs_json

    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    source_root = str(Path(__file__).resolve().parents[2])  # where this shn is imported from
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # never a `uv sync` (downloads)
        "PATH": bin_dir + os.pathsep + env.get("PATH", ""),  # flower-superexec, flwr-simulation by name
        "PYTHONPATH": os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p),
        ENV_VAR: specs_json(),
    })
    return env


def _flwr(env: Mapping[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    flwr = Path(sys.executable).parent / "flwr"
    return subprocess.run([str(flwr) if flwr.exists() else "flwr", *args], capture_output=True, text=True,
                          env=dict(env), timeout=timeout)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def _helpers(parent: int) -> list[int]:
    """Flower's helper processes started with ``--parent-pid`` of ``parent`` or of one of those,
    transitively (Linux /proc; they also exit by themselves once their parent has gone)."""
    found: list[int] = []
    frontier = {parent}
    while frontier:  # one /proc scan per generation
        direct = [p for p in detached_helpers(frontier) if p not in found]
        found += direct
        frontier = set(direct)
    return found


def detached_helpers(parents: set[int]) -> list[int]:
    """Processes started with ``--parent-pid P`` for one of ``parents`` (flower-superexec and
    flwr-*app helpers): once P has exited they are re-parented to init, so a process-tree walk
    misses them."""
    found: list[int] = []
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return found
    for proc in proc_dir.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--parent-pid" in args:
            i = args.index("--parent-pid")
            if i + 1 < len(args) and args[i + 1].isdigit() and int(args[i + 1]) in parents:
                found.append(int(proc.name))
    return found


def _stop(superlink: subprocess.Popen) -> None:
    """Stop the SuperLink this call started, its process group and its detached helpers."""
    helpers = _helpers(superlink.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(superlink.pid, signal.SIGTERM)  # its own session: the SuperLink and what stayed in it
    with contextlib.suppress(subprocess.TimeoutExpired):
        superlink.wait(timeout=15)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{h}").exists() for h in helpers):
        time.sleep(0.3)
    for pid in helpers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if superlink.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(superlink.pid, signal.SIGKILL)
        superlink.wait(timeout=10)


def simulate(config_path: str | Path, *, overrides: Sequence[str] = (), supernodes: int | None = None,
             run_dir: str | Path | None = None, cpus_per_client: int = 1, extra: Mapping[str, Any] | None = None,
             verbose: bool = False, startup_timeout: float = 60.0, overwrite: bool = False,
             resume: bool = False) -> Any:
    """Run the shn Flower app on Flower's simulation runtime (``flwr run``, see the module doc);
    one simulated SuperNode per client by default. Returns the run directory as a RunResult.
    The simulated clients keep their state in ``<run dir>/client_state`` (unless ``extra`` sets
    ``client-state-dir``), so ``resume`` continues a killed run exactly from its checkpoint."""
    from shn.build import RunResult, make_task
    from shn.federated.records import read_jsonl
    from shn.flower.engine import default_run_dir, resolve_run_config

    config_path = Path(config_path).resolve()
    run_config = _run_config(config_path, overrides, Path(run_dir).resolve() if run_dir else "",
                             {"overwrite": overwrite, "resume": resume, **dict(extra or {})})
    config, settings = resolve_run_config(run_config)  # a bad config is one line, before anything starts
    out = (settings.run_dir or default_run_dir(config)).resolve()
    run_config["run-dir"] = str(out)
    if not run_config.get("client-state-dir"):
        run_config["client-state-dir"] = str(out / "client_state")
    if supernodes is None:
        supernodes = make_task(config).num_clients
    if supernodes < 1:
        raise ConfigError(f"--supernodes: must be ≥ 1, got {supernodes}")
    if float(cpus_per_client) != int(cpus_per_client) or int(cpus_per_client) < 1:
        raise ConfigError(f"--cpus-per-client: Flower's simulation runtime takes a whole number of CPUs ≥ 1 per "
                          f"client, got {cpus_per_client}")
    with tempfile.TemporaryDirectory(prefix="shn-flower-") as tmp:
        tmp_path = Path(tmp)
        app = write_app(tmp_path / "app")
        port, control, fleet, health = (_free_port() for _ in range(4))
        home = tmp_path / "flwr_home"
        home.mkdir()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        (tmp_path / "run_config.toml").write_text(dumps_toml(run_config))
        env = _env(home)
        log_path = tmp_path / "superlink.log"
        with open(log_path, "w") as log:
            superlink = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
                 "--isolation", "subprocess", "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(port), "--control-api-address", f"127.0.0.1:{control}",
                 "--fleet-api-address", f"127.0.0.1:{fleet}", "--health-server-address", f"127.0.0.1:{health}",
                 "--database", str(tmp_path / "superlink.db")],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(), start_new_session=True)
        try:
            deadline = time.monotonic() + startup_timeout
            while not _healthy(port):
                if superlink.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"flower-superlink did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.3)
            federation = (f"num-supernodes={int(supernodes)} client-resources-num-cpus={int(cpus_per_client)} "
                          f"init-args-num-cpus={os.cpu_count() or 1} verbose={'true' if verbose else 'false'}")
            submitted = _flwr(env, "run", str(app), CONNECTION, "--format", "json", "--federation-config", federation,
                              "--run-config", str(tmp_path / "run_config.toml"))
            try:
                run_id = json.loads(submitted.stdout)["run-id"]
            except (ValueError, KeyError):
                raise RuntimeError(f"flwr run failed: {(submitted.stdout + submitted.stderr)[-2000:]}") from None
            status = _wait(env, run_id, superlink)
            logs = _flwr(env, "log", str(run_id), CONNECTION, "--show").stdout
            if verbose:
                print(logs, file=sys.stderr)
            if status != "finished:completed":
                raise RuntimeError(f"the Flower simulation ended with status {status!r}; its log ends:\n{logs[-3000:]}")
        finally:
            _stop(superlink)
    if not (out / "summary.json").is_file():
        raise RuntimeError(f"the Flower simulation finished but wrote no {out / 'summary.json'}")
    summary = json.loads((out / "summary.json").read_text())
    history = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
    per_client = {int(c): dict(m) for c, m in summary.get("per_client", {}).items()}
    return RunResult(config, summary, history, per_client, out, None,
                     {"flower_run_id": run_id, "flower_log": logs, "superlink_pid": superlink.pid})


def _wait(env: Mapping[str, str], run_id: Any, superlink: subprocess.Popen, poll: float = 2.0) -> str:
    """Poll the run's status until it is finished (``finished:completed`` on success)."""
    while True:
        if superlink.poll() is not None:
            return f"superlink exited with code {superlink.returncode}"
        listed = _flwr(env, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=120)
        with contextlib.suppress(ValueError, KeyError, IndexError):
            status = json.loads(listed.stdout)["runs"][0]["status"]
            if status.startswith("finished"):
                return status
        time.sleep(poll)
