"""``shn sweep``: optuna hyperparameter search over a run config's ``[sweep]`` table.

The search space lives in the config, one entry per parameter path → distribution::

    [sweep]
    "server.lr" = { type = "float", low = 1e-3, high = 1e-1, log = true }
    "local.steps" = { type = "int", low = 10, high = 50, step = 10 }
    "encoder.sheaf_type" = { type = "categorical", choices = ["diag", "orth", "general"] }

Every trial is one ``shn.run`` of the base config with the sampled values applied, in its own
run directory ``<out>/trials/<number>``. The objective is the primary metric of the task on the
**validation** split at the end of the run (``val_accuracy``, ``val_mse``, ...; test metrics are
never looked at); the direction comes from the task (``shn.runner.primary_metric``). Each
evaluation reports its validation value (``trial.report(value, round)``) so the pruner can stop
a trial early. The pruner is a command-line / function argument (``pruner="median"`` with
``n_startup_trials`` and ``n_warmup_steps`` — warm-up counted in rounds — or ``"none"``, or any
optuna pruner object from Python), so that the ``[sweep]`` table stays parameter → distribution.

Storage: ``sqlite:///path.db`` (any SQLAlchemy URL works; SQLite gets a 60 s lock timeout) or a
journal file path (optuna's ``JournalFileBackend``; faster, ~4x fewer ms per write). ``workers``
processes share one study: the calling process is worker 0 and ``workers - 1`` more are started
with ``python -m shn.sweep``. ``trials`` is how many trials this command **adds** to the study
(optuna's ``n_trials``): every trial a process of the command starts is tagged with the command's
id, and a new one is only started, under a file lock, while the command has started fewer than
``trials`` — so the command adds exactly ``trials`` trials however many workers it has. Running
the command again with the same storage and study resumes: finished trials are kept (not re-run)
and ``trials`` more are run; ``trials = 0`` runs none and only rewrites ``trials.csv`` and
``best.toml`` (saying so in one line). Trials left RUNNING by a killed sweep are marked FAIL and
listed in the study's ``interrupted`` user attribute. Several ``shn sweep`` commands on one study
(on one machine) are safe: every process of a command holds a shared lock on
``<lock>.<study hash>.command`` while it runs, and running trials are only declared interrupted
by a command that finds no other holder (an exclusive lock); otherwise it joins the study, each
command adding its own ``trials``. (Locks are local files: commands on *other machines* sharing
an RDB study are not seen; across machines, run one command per study and add workers with
``--workers``.)

The storage is opened and read once up front: a corrupt SQLite file or journal, a database URL
whose driver is not installed (``postgresql://`` without ``psycopg2``) or an unknown scheme is a
one-line ``ConfigError``. Worker processes receive the sweep as a JSON file (never a pickle).

Sampling: ``TPESampler(seed=config.seed + worker)`` on a new study — with one worker the same
config gives the same sequence of trials. A resumed study's sampler is seeded from (seed, worker,
the study's trial count), so a resumed sweep never replays the random start-up proposals of its
first command (a sampler re-seeded identically proposes the same parameters again). Outputs in ``out``: ``trials.csv`` (one row per trial) and ``best.toml``
(the base config, overrides included, with the best trial's values applied and the ``[sweep]``
table removed: ``shn run best.toml`` runs it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from shn.config import ConfigError, RunConfig, apply_overrides, config_from_dict, dumps_toml, read_config, read_toml
from shn.sweep_storage import CommandLock, command_lock_path, file_lock, lock_path, open_storage

DISTRIBUTIONS = ("float", "int", "categorical")
_ALLOWED_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
                 "categorical": {"type", "choices"}}
PRUNERS = ("median", "none")


# --------------------------------------------------------------------------------------------
# the search space

@dataclass(frozen=True)
class Param:
    """One searched parameter: a dotted config path and its distribution."""

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def values_to_check(self) -> list[Any]:
        """Values that must make a valid config (the bounds, or every choice)."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def parse_space(table: Mapping[str, Any]) -> dict[str, Param]:
    """Validate a ``[sweep]`` table; ``ConfigError`` names the offending entry."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"sweep: expected a table of parameter = distribution, got {table!r}")
    space: dict[str, Param] = {}
    for path, dist in table.items():
        where = f"sweep.{path!r}" if "." in str(path) else f"sweep.{path}"
        if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
            raise ConfigError(f"{where}: expected a dotted config path such as \"server.lr\"")
        if path.split(".")[0] == "sweep":
            raise ConfigError(f"{where}: the [sweep] table cannot search itself")
        if not isinstance(dist, Mapping):
            raise ConfigError(f"{where}: expected a distribution table such as "
                              "{ type = \"float\", low = 1e-3, high = 1e-1, log = true }, got " + repr(dist))
        kind = dist.get("type")
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}.type: {kind!r} is not allowed; allowed values: "
                              + ", ".join(map(repr, DISTRIBUTIONS)))
        unknown = sorted(set(dist) - _ALLOWED_KEYS[kind])
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key for a {kind} distribution; allowed keys: "
                              + ", ".join(sorted(_ALLOWED_KEYS[kind])))
        if kind == "categorical":
            choices = dist.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices: expected a non-empty list, got {choices!r}")
            if any(not isinstance(c, (str, int, float, bool)) for c in choices):
                raise ConfigError(f"{where}.choices: choices must be strings, numbers or booleans, got {choices!r}")
            if len(set(map(repr, choices))) != len(choices):
                raise ConfigError(f"{where}.choices: duplicate choices in {choices!r}")
            space[path] = Param(path, kind, choices=tuple(choices))
            continue
        number = int if kind == "int" else (int, float)
        for key in ("low", "high"):
            v = dist.get(key)
            if v is None:
                raise ConfigError(f"{where}.{key}: required for a {kind} distribution")
            if isinstance(v, bool) or not isinstance(v, number) or (isinstance(v, float) and not math.isfinite(v)):
                raise ConfigError(f"{where}.{key}: expected {'an integer' if kind == 'int' else 'a finite number'}, "
                                  f"got {v!r}")
        low, high = dist["low"], dist["high"]
        if low > high:
            raise ConfigError(f"{where}: low = {low!r} is greater than high = {high!r}")
        log = dist.get("log", False)
        if not isinstance(log, bool):
            raise ConfigError(f"{where}.log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise ConfigError(f"{where}: log = true needs low > 0, got low = {low!r}")
        step = dist.get("step")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
                raise ConfigError(f"{where}.step: expected a positive {'integer' if kind == 'int' else 'number'}, "
                                  f"got {step!r}")
            if log and (kind == "float" or step != 1):
                raise ConfigError(f"{where}: step and log = true cannot be combined")
        space[path] = Param(path, kind, low, high, log, step)
    return space


def check_space(space: Mapping[str, Param], base_data: Mapping[str, Any]) -> None:
    """Every parameter must name a config key and its bounds / choices must make a valid config."""
    for p in space.values():
        for value in p.values_to_check():
            try:
                config_from_dict(without_sweep(apply_params(base_data, {p.path: value})))
            except ConfigError as e:
                raise ConfigError(f"sweep.{p.path!r}: {p.path} = {value!r} does not make a valid config: {e}") from None


def suggest(trial: Any, space: Mapping[str, Param]) -> dict[str, Any]:
    """Sample every parameter of ``space`` from an optuna trial."""
    out: dict[str, Any] = {}
    for path, p in space.items():
        if p.type == "categorical":
            out[path] = trial.suggest_categorical(path, list(p.choices))
        elif p.type == "int":
            out[path] = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            out[path] = trial.suggest_float(path, float(p.low), float(p.high), step=p.step, log=p.log)
    return out


def apply_params(data: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the raw config ``data`` with each dotted ``path = value`` of ``params`` set."""
    out = json.loads(json.dumps(data))  # deep copy of TOML-compatible data
    for path, value in params.items():
        parts = path.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"sweep.{path!r}: {part!r} is not a table in the config")
        node[parts[-1]] = value
    return out


def without_sweep(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "sweep"}


def load_base(config_path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw TOML of ``config_path`` (its ``base`` chain merged in) with ``--set`` overrides
    applied (validated)."""
    data = apply_overrides(read_config(config_path), list(overrides))
    config_from_dict(data)
    return data


# --------------------------------------------------------------------------------------------
# storage, pruner, the objective

def make_pruner(pruner: Any = "median", n_startup_trials: int = 5, n_warmup_steps: int = 0) -> Any:
    """``"median"`` → ``MedianPruner(n_startup_trials, n_warmup_steps)`` (steps are rounds),
    ``"none"`` → no pruning, or an optuna pruner object as it is."""
    import optuna

    if not isinstance(pruner, str):
        if not isinstance(pruner, optuna.pruners.BasePruner):
            raise ConfigError(f"pruner: expected one of {', '.join(PRUNERS)} or an optuna pruner, got {pruner!r}")
        return pruner
    if pruner == "median":
        if n_startup_trials < 0 or n_warmup_steps < 0:
            raise ConfigError("pruner: n_startup_trials and n_warmup_steps must be ≥ 0")
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner: {pruner!r} is not allowed; allowed values: {', '.join(PRUNERS)}")


class TrialFailed(RuntimeError):
    """The run finished without a finite validation value (e.g. it diverged)."""


class Objective:
    """The sweep objective: one ``shn.run`` of the base config with the trial's values applied.

    Returns the final validation primary metric; reports it at every evaluation and raises
    ``optuna.TrialPruned`` when the study's pruner says so. Tasks are built once per distinct
    (task config, seed) and reused across trials of this process.
    """

    def __init__(self, base_data: Mapping[str, Any], space: Mapping[str, Param], out: str | Path, *,
                 task: Any = None, task_config: RunConfig | None = None) -> None:
        self.base_data = dict(base_data)
        self.space = dict(space)
        self.out = Path(out)
        self._task_key = (task_config.task, task_config.seed) if (task is not None and task_config) else None
        self._task = task

    def config(self, params: Mapping[str, Any]) -> RunConfig:
        return config_from_dict(without_sweep(apply_params(self.base_data, params)))

    def task_for(self, config: RunConfig) -> Any:
        from shn.runner import make_task

        key = (config.task, config.seed)
        if self._task is None or self._task_key != key:
            self._task, self._task_key = make_task(config), key
        return self._task

    def __call__(self, trial: Any) -> float:
        import optuna

        from shn.runner import primary_metric, run

        params = suggest(trial, self.space)
        config = self.config(params)
        task = self.task_for(config)
        key = f"val_{primary_metric(task)[0]}"
        run_dir = self.out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))

        def on_eval(round_: int, record: Mapping[str, Any]) -> None:
            value = record.get(key)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), round_)
            if round_ < config.rounds and trial.should_prune():  # a finished run is not pruned
                raise optuna.TrialPruned(f"{key} = {value:.4g} at round {round_}")

        result = run(config, task=task, run_dir=run_dir, progress=False, on_eval=on_eval)
        value = result.summary["metrics"].get(key)
        if value is None or not math.isfinite(value):
            raise TrialFailed(f"{key} is {value!r} at the end of the run")
        return float(value)


# --------------------------------------------------------------------------------------------
# workers

@dataclass
class _Spec:
    base_data: dict[str, Any]
    space: dict[str, Param]
    storage: str
    study_name: str
    trials: int
    out: str
    seed: int
    pruner: Any
    lock: str
    threads: int | None
    progress: bool
    extra: dict[str, Any] = field(default_factory=dict)
    pruner_args: dict[str, Any] | None = None  # make_pruner's arguments: how workers rebuild it
    plugins: list[dict[str, Any]] = field(default_factory=list)  # shn.plugins.active(): what workers import
    command: str = ""  # this command's id: its trials carry it (the budget is per command)
    start_trials: int = 0  # the study's trial count when the command started (seeds the sampler)

    def to_json(self) -> str:
        """The spec for a worker process (JSON: nothing in it can run code when read)."""
        if self.pruner_args is None:
            raise ConfigError("pruner: a pruner object cannot be sent to worker processes; with --workers > 1 "
                              f"use a pruner by name ({', '.join(PRUNERS)})")
        data = {k: getattr(self, k) for k in ("base_data", "storage", "study_name", "trials", "out", "seed", "lock",
                                              "threads", "progress", "extra", "pruner_args", "plugins", "command",
                                              "start_trials")}
        data["space"] = {path: {**vars(p), "choices": list(p.choices)} for path, p in self.space.items()}
        try:
            return json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sweep: the config cannot be passed to worker processes as JSON ({e})") from None

    @classmethod
    def from_json(cls, text: str) -> "_Spec":
        data = json.loads(text)
        space = {path: Param(**{**p, "choices": tuple(p["choices"])}) for path, p in data.pop("space").items()}
        return cls(space=space, pruner=make_pruner(**data["pruner_args"]), **data)


COUNTED = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")


def _interrupted(study: Any) -> set[int]:
    return set(study.user_attrs.get("interrupted", []))


def _used(study: Any, command: str = "") -> int:
    """Trials of this command that count toward its budget: finished ones (not interrupted) and
    running ones."""
    skip = _interrupted(study)
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in COUNTED and t.number not in skip and t.user_attrs.get("command", "") == command)


def sampler_seed(seed: int, worker: int, start_trials: int) -> int:
    """``seed + worker`` on a new study; on a resumed one a seed that also depends on the study's
    trial count, so that resuming never replays the first command's proposals."""
    if start_trials == 0:
        return seed + worker
    from shn.seeding import derive_seed

    return derive_seed(seed, "sweep-sampler", worker, start_trials) % 2**32  # numpy RandomState seeds are 32-bit


def _mark_interrupted(study: Any, numbers: Sequence[int]) -> None:
    from optuna.trial import TrialState

    for n in numbers:
        with contextlib.suppress(Exception):  # already finished elsewhere
            study.tell(n, state=TrialState.FAIL, skip_if_finished=True)
    study.set_user_attr("interrupted", sorted(_interrupted(study) | set(numbers)))


def _work(spec: _Spec, worker: int, objective: Objective | None = None) -> None:
    """One worker: claim a trial while the budget allows, run it, tell the study; repeat."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec.storage)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed(spec.seed, worker, spec.start_trials))
    study = optuna.load_study(study_name=spec.study_name, storage=storage, sampler=sampler, pruner=spec.pruner)
    objective = objective or Objective(spec.base_data, spec.space, spec.out)
    lock = Path(spec.lock)
    while True:
        with file_lock(lock):
            if _used(study, spec.command) >= spec.trials:
                return
            trial = study.ask()
            trial.set_user_attr("command", spec.command)  # under the lock: counted by every worker
        trial.set_user_attr("worker", worker)
        t0 = time.perf_counter()
        note = ""
        try:
            value = objective(trial)
        except optuna.TrialPruned as e:
            study.tell(trial, state=TrialState.PRUNED)
            state, note = "PRUNED", str(e)
        except (KeyboardInterrupt, SystemExit):
            with file_lock(lock):
                _mark_interrupted(study, [trial.number])
            raise
        except Exception as e:  # a bad parameter combination or a diverged run: the sweep goes on
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            study.tell(trial, state=TrialState.FAIL)
            state, note = "FAIL", f"{type(e).__name__}: {e}"
        else:
            study.tell(trial, value)
            state, note = "COMPLETE", f"value {value:.6g}"
        if spec.progress:
            print(f"shn sweep [{spec.study_name} w{worker}] trial {trial.number} {state} ({note}) "
                  f"{time.perf_counter() - t0:.1f}s {json.dumps(trial.params)}", file=sys.stderr, flush=True)


def _worker_main(spec_path: str, worker: int) -> int:
    spec = _Spec.from_json(Path(spec_path).read_text())
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    from shn.plugins import load_specs

    load_specs(spec.plugins)  # the built-ins, and the parent's plugins (their methods, tasks, encoders)
    held = CommandLock(command_lock_path(Path(spec.lock), spec.study_name))
    held.share()  # if the command's first process dies, this worker's trials still count as live
    try:
        _work(spec, worker)
    except KeyboardInterrupt:
        return 130
    finally:
        held.release()
    return 0


# --------------------------------------------------------------------------------------------
# the command

def sweep(config_path: str | Path, trials: int = 20, storage: str | None = None, workers: int = 1,
          study_name: str | None = None, overrides: Sequence[str] = (), out: str | Path | None = None, *,
          pruner: Any = "median", n_startup_trials: int = 5, n_warmup_steps: int = 0,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) an optuna study over the config's ``[sweep]`` table; see the module doc.

    Returns a JSON-able dict: study, storage, counts per state, best value / params / trial and
    the paths of ``best.toml`` and ``trials.csv``.
    """
    import optuna

    from shn.runner import torch_threads

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ConfigError(f"--trials: the number of trials to add, must be ≥ 0, got {trials!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers: must be ≥ 1, got {workers!r}")
    base_data = load_base(config_path, overrides)
    space = parse_space(base_data.get("sweep") or {})
    if not space:
        raise ConfigError(f"{config_path}: no [sweep] table: add one, e.g. "
                          "[sweep] \"server.lr\" = { type = \"float\", low = 1e-3, high = 1e-1, log = true }")
    check_space(space, base_data)
    base = config_from_dict(without_sweep(base_data))
    study_name = study_name or Path(config_path).stem
    out = Path(out) if out is not None else Path("sweeps") / study_name
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{out / 'study.db'}"
    pruner_obj = make_pruner(pruner, n_startup_trials, n_warmup_steps)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = open_storage(storage)
    if trials == 0:
        return _no_new_trials(storage_obj, storage, study_name, out, base_data)
    lock = lock_path(storage, out)
    command = CommandLock(command_lock_path(lock, study_name))
    try:
        alone = command.acquire_alone()  # no other shn sweep command works on this study now
        task, metric, start_trials = _prepare_study(storage_obj, storage, study_name, space, base, lock, alone)
        command.share()
        threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
        pruner_args = (dict(pruner=pruner, n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
                       if isinstance(pruner, str) else None)
        from shn.plugins import active

        spec = _Spec(base_data, space, storage, study_name, trials, str(out), base.seed, pruner_obj, str(lock),
                     threads, progress, pruner_args=pruner_args, plugins=active(), command=uuid.uuid4().hex,
                     start_trials=start_trials)
        procs: list[subprocess.Popen] = []
        if workers > 1:
            from shn.federated.records import atomic_write_text

            spec_path = out / ".sweep-spec.json"
            atomic_write_text(spec_path, spec.to_json())
            procs = [subprocess.Popen([sys.executable, "-m", "shn.sweep", "--worker", str(spec_path), str(i)])
                     for i in range(1, workers)]
        try:
            with torch_threads(threads):
                _work(spec, 0, Objective(base_data, space, out, task=task, task_config=base))
        except BaseException:
            for p in procs:
                with contextlib.suppress(Exception):
                    p.wait(timeout=600)
            raise
        codes = [p.wait() for p in procs]
    finally:
        command.release()
    if any(codes):
        raise RuntimeError(f"sweep worker(s) exited with {codes}; see their output above")
    return finish(study_name, storage, out, base_data, metric)


def _no_new_trials(storage_obj: Any, storage: str, study_name: str, out: Path, base_data: Mapping[str, Any]) -> dict[str, Any]:
    """``--trials 0``: nothing runs; one line says what the study holds, and its outputs are rewritten."""
    import optuna

    if study_name not in set(optuna.get_all_study_names(storage_obj)):
        raise ConfigError(f"--trials 0: study {study_name!r} does not exist in {storage}; give --trials N to start it")
    result = finish(study_name, storage, out, base_data)
    print(f"shn sweep: study {study_name!r} already has {result['trials']} trials ({result['complete']} complete, "
          f"{result['pruned']} pruned, {result['fail']} failed); --trials 0 adds none (trials.csv and best.toml "
          "rewritten; give --trials N to run N more)", file=sys.stderr)
    return result


def _prepare_study(storage_obj: Any, storage: str, study_name: str, space: Mapping[str, Param], base: RunConfig,
                   lock: Path, alone: bool) -> tuple[Any, str, int]:
    """Create or load the study (same [sweep] table), record its metric; when this command is
    alone on the study, trials left RUNNING are interrupted ones: marked FAIL, not counted.
    Returns (the task if it was built, the metric, the study's trial count)."""
    import optuna

    from shn.runner import make_task, primary_metric

    task = None
    with file_lock(lock):
        existing = set(optuna.get_all_study_names(storage_obj))
        space_json = json.dumps({p: vars(v) for p, v in space.items()}, sort_keys=True, default=list)
        if study_name in existing:
            study = optuna.load_study(study_name=study_name, storage=storage_obj)
            recorded = study.user_attrs.get("space")
            if recorded is not None and recorded != space_json:
                raise ConfigError(f"study {study_name!r} in {storage} was created with a different [sweep] table; "
                                  "use another --study name (or the original table) to keep trials comparable")
            metric = study.user_attrs.get("metric")
        else:
            task = make_task(base)
            name, mode = primary_metric(task)
            metric = f"val_{name}"
            study = optuna.create_study(study_name=study_name, storage=storage_obj, load_if_exists=True,
                                        direction="maximize" if mode == "max" else "minimize")
        if study.user_attrs.get("space") is None:
            study.set_user_attr("space", space_json)
        if metric is None:
            task = make_task(base)
            metric = f"val_{primary_metric(task)[0]}"
        study.set_user_attr("metric", metric)
        running = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
        if running and alone:
            print(f"shn sweep: trials {running} were left running by an interrupted sweep: marked FAIL, not counted",
                  file=sys.stderr)
            _mark_interrupted(study, running)
        elif running:
            print(f"shn sweep: trials {running} are running in another shn sweep on study {study_name!r}: "
                  "joining it (each command adds its own --trials)", file=sys.stderr)
        start_trials = len(study.get_trials(deepcopy=False))
    return task, metric, start_trials


def finish(study_name: str, storage: str, out: str | Path, base_data: Mapping[str, Any],
           metric: str | None = None) -> dict[str, Any]:
    """Write ``trials.csv`` and ``best.toml`` for the study; return the JSON-able result."""
    import optuna

    out = Path(out)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    metric = metric or study.user_attrs.get("metric", "value")
    trials = study.get_trials(deepcopy=False)
    interrupted = _interrupted(study)
    write_trials_csv(out / "trials.csv", trials, interrupted, metric)
    counts = {s: sum(1 for t in trials if t.state.name == s) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    result: dict[str, Any] = {"study": study_name, "storage": storage, "direction": study.direction.name.lower(),
                              "metric": metric, "trials": len(trials), **{k.lower(): v for k, v in counts.items()},
                              "interrupted": sorted(interrupted), "trials_csv": str(out / "trials.csv"),
                              "best_trial": None, "best_value": None, "best_params": None, "best_config": None}
    if counts["COMPLETE"]:
        best = study.best_trial
        data = without_sweep(apply_params(base_data, best.params))
        config_from_dict(data)  # a best config that does not load would be a bug: fail here
        header = (f"# Best trial of optuna study {study_name!r} ({storage}): trial {best.number}, "
                  f"{metric} = {best.value:.6g} ({study.direction.name.lower()}).\n"
                  f"# {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed trials. "
                  f"Searched: {', '.join(sorted(best.params))}.\n"
                  "# Written by `shn sweep`; run it with `shn run best.toml`.\n")
        (out / "best.toml").write_text(header + dumps_toml(data))
        result.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                      best_config=str(out / "best.toml"))
    return result


def write_trials_csv(path: Path, trials: Sequence[Any], interrupted: set[int], metric: str) -> None:
    names = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", metric, *names, "last_round", "duration_s", "interrupted", "worker", "run_dir",
                    "datetime_start", "datetime_complete", "error"])
        for t in trials:
            steps = sorted(t.intermediate_values)
            duration = t.duration.total_seconds() if t.duration is not None else ""
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value,
                        *[t.params.get(n, "") for n in names], steps[-1] if steps else "",
                        duration, t.number in interrupted, t.user_attrs.get("worker", ""), t.user_attrs.get("run_dir", ""),
                        t.datetime_start or "", t.datetime_complete or "", t.user_attrs.get("error", "")])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2], int(sys.argv[3])))
    print("usage: shn sweep CONFIG ... (python -m shn.sweep --worker SPEC INDEX is internal)", file=sys.stderr)
    sys.exit(2)
