"""``shn suite SUITE.toml``: every (method, task, seed) of a comparison, resumable.

A suite file lists entries; each entry is a base config run with several methods and seeds::

    out = "experiments/results/suite"          # default output folder (--out overrides)
    set = ["device=\\"cpu\\""]                   # overrides for every run (optional)

    [[runs]]
    name = "cifar10-path"                      # output folder of the entry
    config = "experiments/configs/cifar10_pfedhn.toml"
    seeds = [0, 1, 2]
    set = ["rounds=60", "eval_every=10"]       # overrides for this entry's runs
    methods = [
        "local", "fedavg", "pfedhn",           # a registered method name, or a variant:
        { name = "shn-knn", method = "shn", set = ["graph.kind=\\"knn\\""] },
        { name = "fedper", method = "fedper", seeds = [0] },   # a variant may set its own seeds
    ]
    grid = { "encoder.layers" = [1, 2, 4] }    # optional: one run per combination (depth studies)

Run ``r`` of method (variant) ``m`` and seed ``s`` goes to ``<out>/<name>/<m>/seed<s>/``, or
``<out>/<name>/<m>/<key=value,...>/seed<s>/`` with a grid. Overrides apply in the order: config
file, suite ``set``, entry ``set``, variant ``set``, grid values, then ``method`` and ``seed``.
Paths in the suite (``config``, ``out``) and in the configs are relative to the working
directory (run from the repository root).

Everything is validated before anything runs: unknown keys, missing config files, unknown
method names (with the registered ones listed) and every run's resolved config; ``--only`` (a
substring of ``<name>/<variant>``) selects runs first, so a suite naming a method that does not
exist yet can still run its other parts. A run whose ``summary.json`` exists is skipped when its
recorded ``config.toml`` resolves to the config the suite would run now; when training-relevant
keys differ (anything but ``device``, ``checkpoint_every``, the ``[sweep]`` table and other
methods' ``[methods.*]`` options; keys an older run lacks count as their defaults), the old directory is moved aside to ``<dir>.stale-<n>``, the keys are logged
(and in ``suite_log.jsonl``), and the run starts again in ``<dir>`` — results never silently mix
configs. A run killed midway continues from its last checkpoint (``resume=True``; set
``checkpoint_every``), under the same check.
An error in one run is logged (``<run dir>/error.log``, ``<out>/suite_log.jsonl``) and the suite
goes on; ``shn suite`` exits non-zero at the end if any run failed. Graph methods with an inferred
graph go through the three-stage pipeline (``shn.runner.run`` does that).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from shn.config import ConfigError, RunConfig, apply_overrides, config_from_dict, read_config, read_toml
from shn.federated.records import dumps_json

log = logging.getLogger("shn.suite")

_SUITE_KEYS = {"out", "set", "runs"}
_ENTRY_KEYS = {"name", "config", "methods", "seeds", "set", "grid"}
_VARIANT_KEYS = {"name", "method", "set", "seeds"}


class SuiteError(ConfigError):
    """A malformed suite file (printed as one line by the CLI, exit code 2)."""


@dataclass(frozen=True)
class Job:
    """One run of the suite."""

    entry: str
    variant: str
    method: str
    seed: int
    grid: tuple[tuple[str, Any], ...]
    config_path: str
    overrides: tuple[str, ...]
    run_dir: Path

    @property
    def label(self) -> str:
        grid = ",".join(f"{k}={_show(v)}" for k, v in self.grid)
        return "/".join([self.entry, self.variant] + ([grid] if grid else []) + [f"seed{self.seed}"])

    def config(self) -> RunConfig:
        return config_from_dict(apply_overrides(read_config(self.config_path), list(self.overrides)))


@dataclass
class SuiteResult:
    jobs: list[Job]
    done: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)
    failed: list[tuple[Job, str]] = field(default_factory=list)
    stale: list[tuple[Job, list[str]]] = field(default_factory=list)  # rerun: their recorded config differed

    def as_dict(self) -> dict[str, Any]:
        return {"runs": len(self.jobs), "done": len(self.done), "skipped": len(self.skipped),
                "stale_rerun": [{"run": j.label, "changed": keys} for j, keys in self.stale],
                "failed": [{"run": j.label, "error": e} for j, e in self.failed]}


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise SuiteError(f"grid value {v!r}: expected a string, number, boolean or list")


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise SuiteError(f"{where}: expected a list of \"KEY=VALUE\" strings, got {value!r}")
    for s in value:
        if "=" not in s:
            raise SuiteError(f"{where}: {s!r} is not KEY=VALUE")
    return tuple(value)


def load_suite(path: str | Path, out: str | Path | None = None, extra: Sequence[str] = ()) -> tuple[list[Job], Path]:
    """Parse and expand a suite file into jobs (no config validation yet); ``extra`` overrides
    (``shn suite --set``) apply to every run after the suite's own (e.g. ``device="cuda"``)."""
    path = Path(path)
    data = read_toml(path, "suite", SuiteError)
    unknown = sorted(set(data) - _SUITE_KEYS)
    if unknown:
        raise SuiteError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_SUITE_KEYS))}")
    root = Path(out) if out is not None else Path(data.get("out") or Path("runs") / "suites" / path.stem)
    common = _strings(data.get("set"), f"{path}: set")
    entries = data.get("runs")
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{path}: no [[runs]] entries")
    jobs: list[Job] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: runs[{i}]"
        if not isinstance(entry, Mapping):
            raise SuiteError(f"{where}: expected a table")
        unknown = sorted(set(entry) - _ENTRY_KEYS)
        if unknown:
            raise SuiteError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_ENTRY_KEYS))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise SuiteError(f"{where}.name: expected a non-empty folder name, got {name!r}")
        if name in names:
            raise SuiteError(f"{where}.name: {name!r} is used by two entries")
        names.add(name)
        where = f"{path}: runs {name!r}"
        config = entry.get("config")
        if not isinstance(config, str):
            raise SuiteError(f"{where}.config: expected a config file path, got {config!r}")
        if not Path(config).is_file():
            raise SuiteError(f"{where}.config: {config} not found (paths are relative to the working directory)")
        seeds = _seeds(entry.get("seeds", [0]), f"{where}.seeds")
        entry_set = _strings(entry.get("set"), f"{where}.set")
        variants = _variants(entry.get("methods"), where)
        grid = entry.get("grid") or {}
        if not isinstance(grid, Mapping) or not all(isinstance(v, list) and v for v in grid.values()):
            raise SuiteError(f"{where}.grid: expected a table of key = [values...], got {grid!r}")
        combos = [tuple(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [()]
        # seed-major order: consecutive runs share the task (same task config and seed) and
        # the pipeline's stage-1 cache
        every_seed = sorted(set(seeds).union(*(v[3] or () for v in variants)))
        for combo, seed, (vname, method, vset, vseeds) in itertools.product(combos, every_seed, variants):
            if seed not in (seeds if vseeds is None else vseeds):
                continue
            grid_set = tuple(f"{k}={_toml_value(v)}" for k, v in combo)
            sub = ([",".join(f"{k}={_show(v)}" for k, v in combo)] if combo else []) + [f"seed{seed}"]
            overrides = (common + entry_set + vset + grid_set + tuple(extra)
                         + (f"method={json.dumps(method)}", f"seed={seed}"))
            jobs.append(Job(name, vname, method, seed, combo, config, overrides, root.joinpath(name, vname, *sub)))
    return jobs, root


def _seeds(seeds: Any, where: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int and s >= 0 for s in seeds):
        raise SuiteError(f"{where}: expected a non-empty list of integers ≥ 0, got {seeds!r}")
    return seeds


def _variants(methods: Any, where: str) -> list[tuple[str, str, tuple[str, ...], list[int] | None]]:
    if not isinstance(methods, list) or not methods:
        raise SuiteError(f"{where}.methods: expected a non-empty list of method names or variant tables")
    out, seen = [], set()
    for m in methods:
        if isinstance(m, str):
            name, method, vset, vseeds = m, m, (), None
        elif isinstance(m, Mapping):
            unknown = sorted(set(m) - _VARIANT_KEYS)
            if unknown:
                raise SuiteError(f"{where}.methods: unknown key {unknown[0]!r} in {dict(m)!r}; allowed: "
                                 + ", ".join(sorted(_VARIANT_KEYS)))
            method = m.get("method")
            name = m.get("name", method)
            if not isinstance(method, str) or not isinstance(name, str) or not name or "/" in name:
                raise SuiteError(f"{where}.methods: a variant needs method = \"<registered method>\" and a "
                                 f"folder name, got {dict(m)!r}")
            vset = _strings(m.get("set"), f"{where}.methods[{name!r}].set")
            vseeds = _seeds(m["seeds"], f"{where}.methods[{name!r}].seeds") if "seeds" in m else None
        else:
            raise SuiteError(f"{where}.methods: expected a method name or a variant table, got {m!r}")
        if name in seen:
            raise SuiteError(f"{where}.methods: {name!r} appears twice (give variants distinct names)")
        seen.add(name)
        out.append((name, method, vset, vseeds))
    return out


def select(jobs: Sequence[Job], only: Sequence[str] = ()) -> list[Job]:
    """Jobs whose ``<entry>/<variant>`` contains one of ``only`` (all when empty)."""
    if not only:
        return list(jobs)
    return [j for j in jobs if any(o in f"{j.entry}/{j.variant}" for o in only)]


def validate(jobs: Sequence[Job]) -> None:
    """Unknown methods (all listed at once) and every run's resolved config, before any run."""
    from shn.registry import METHODS

    missing = sorted({(j.entry, j.method) for j in jobs if j.method not in METHODS})
    if missing:
        what = "; ".join(f"runs {e!r}: {m!r}" for e, m in missing)
        raise SuiteError(f"unknown method(s) — {what}. Registered methods: {', '.join(METHODS.names())}. "
                         "Use --only to run the other parts of the suite")
    for j in jobs:
        try:
            j.config()
        except ConfigError as e:
            raise SuiteError(f"{j.label}: {e}") from None


def run_suite(suite_path: str | Path, out: str | Path | None = None, only: Sequence[str] = (),
              progress: bool = True, jobs: int = 1, extra: Sequence[str] = ()) -> SuiteResult:
    """Run every selected job of the suite not yet finished; see the module doc.

    ``jobs > 1`` runs independent groups of runs — one (entry, seed) each, so that the runs
    sharing a loaded task and a cached stage 1 stay in one process, in order — in that many
    worker processes with one torch thread each (a machine with many cores, or a GPU shared by
    several runs). The numbers do not depend on ``jobs``."""
    import shn  # noqa: F401  (registers methods and tasks)

    selected, root = load_suite(suite_path, out, extra)
    selected = select(selected, only)
    if not selected:
        raise SuiteError(f"--only {list(only)!r} selects no run of {suite_path}")
    if jobs < 1:
        raise SuiteError(f"--jobs must be ≥ 1, got {jobs}")
    validate(selected)
    root.mkdir(parents=True, exist_ok=True)
    copy = root / "suite.toml"
    if Path(suite_path).resolve() != copy.resolve():
        shutil.copyfile(suite_path, copy)  # provenance: the suite that made these runs
    if jobs == 1:
        return _run_jobs(selected, root, progress)
    return _run_parallel(suite_path, out, selected, root, jobs, progress, tuple(extra))


def _groups(jobs: Sequence[Job]) -> list[list[Job]]:
    """Runs that may share a cached stage 1 (``graph.stage1_cache``) stay together, in order,
    per (entry, seed); every other run is a group of its own (the most parallelism)."""
    groups: dict[Any, list[Job]] = {}
    for job in jobs:
        key = (job.entry, job.seed) if job.config().graph.stage1_cache else job.label
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: a worker whose suite process died (killed, interrupted) stops too,
    instead of running on unsupervised."""
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _worker(suite_path: str, out: str | None, labels: list[str], extra: tuple[str, ...],
            plugins: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from shn.plugins import load_specs

    load_specs(plugins)  # the built-ins, and the parent's plugins (spawned: nothing is inherited)

    jobs, root = load_suite(suite_path, out, extra)
    wanted = set(labels)
    result = _run_jobs([j for j in jobs if j.label in wanted], root, progress=False)
    return {"done": [j.label for j in result.done], "skipped": [j.label for j in result.skipped],
            "failed": [(j.label, e) for j, e in result.failed], "stale": [(j.label, k) for j, k in result.stale]}


def _run_parallel(suite_path: str | Path, out: str | Path | None, selected: Sequence[Job], root: Path, jobs: int,
                  progress: bool, extra: tuple[str, ...]) -> SuiteResult:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from shn.plugins import active

    plugins = active()
    by_label = {j.label: j for j in selected}
    result = SuiteResult(list(selected))
    groups = _groups(selected)
    bar = _bar(len(groups), progress)
    # spawn: no forked torch / OpenMP state in the workers
    import os

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_worker, str(suite_path), None if out is None else str(out), [j.label for j in g], extra,
                               plugins): g
                   for g in groups}
        for fut in as_completed(futures):
            group = futures[fut]
            try:
                got = fut.result()
            except Exception as e:  # noqa: BLE001 — a crashed worker fails its group only
                result.failed.extend((j, f"worker crashed: {type(e).__name__}: {e}") for j in group)
            else:
                result.done.extend(by_label[x] for x in got["done"])
                result.skipped.extend(by_label[x] for x in got["skipped"])
                result.failed.extend((by_label[x], e) for x, e in got["failed"])
                result.stale.extend((by_label[x], k) for x, k in got["stale"])
            bar.update(1)
    bar.close()
    if result.failed:
        log.error("%d of %d suite runs failed: %s", len(result.failed), len(selected),
                  ", ".join(j.label for j, _ in result.failed))
    return result


def _run_jobs(jobs: Sequence[Job], root: Path, progress: bool) -> SuiteResult:
    from shn.runner import run

    result = SuiteResult(list(jobs))
    bar = _bar(len(jobs), progress)
    cache: dict[str, Any] = {}  # the last task built, reused while (task config, seed) is unchanged
    for job in jobs:
        bar.set_postfix_str(job.label)
        t0 = time.perf_counter()
        status: dict[str, Any] = {"run": job.label, "run_dir": str(job.run_dir)}
        try:
            config = job.config()
            changed = config_changes(job.run_dir, config)
            if changed:
                moved = move_aside(job.run_dir)
                log.warning("suite run %s: its recorded config differs from the suite's in %s: moved to %s, "
                            "running it again", job.label, ", ".join(changed[:10]), moved)
                _log(root, {**status, "status": "stale", "changed": changed, "moved_to": str(moved)})
                result.stale.append((job, changed))
            elif (job.run_dir / "summary.json").is_file():
                result.skipped.append(job)
                bar.update(1)
                continue
            res = run(config, task=_task(config, cache), run_dir=job.run_dir, resume=True, progress=False)
        except KeyboardInterrupt:
            _log(root, {**status, "status": "interrupted", "seconds": round(time.perf_counter() - t0, 1)})
            raise
        except Exception as e:  # noqa: BLE001 — one broken run must not stop the suite
            message = f"{type(e).__name__}: {e}"
            job.run_dir.mkdir(parents=True, exist_ok=True)
            (job.run_dir / "error.log").write_text(traceback.format_exc())
            log.error("suite run %s failed: %s (traceback in %s)", job.label, message, job.run_dir / "error.log")
            result.failed.append((job, message))
            _log(root, {**status, "status": "failed", "error": message, "seconds": round(time.perf_counter() - t0, 1)})
        else:
            result.done.append(job)
            primary = res.summary.get("primary_metric")
            value = res.summary["metrics"].get(primary)
            _log(root, {**status, "status": "done", "seconds": round(time.perf_counter() - t0, 1), primary: value})
            if progress:
                shown = f"{value:.4f}" if isinstance(value, (int, float)) else repr(value)
                bar.write(f"{job.label}: {primary} = {shown} ({time.perf_counter() - t0:.0f} s)")
        bar.update(1)
    bar.close()
    if result.failed:
        log.error("%d of %d suite runs failed: %s", len(result.failed), len(jobs),
                  ", ".join(j.label for j, _ in result.failed))
    return result


# keys whose change does not change a run's numbers (where it ran, how often it saved)
UNTRAINED_KEYS = ("device", "checkpoint_every")


def recorded_config_path(run_dir: Path) -> Path | None:
    """A run directory's resolved ``config.toml`` (a pipeline run's: its stage-3 folder's)."""
    if (run_dir / "config.toml").is_file():
        return run_dir / "config.toml"
    stages = sorted(run_dir.glob("stage3_*/config.toml"))
    return stages[0] if stages else None


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(run_dir: Path, config: RunConfig) -> list[str]:
    """The training-relevant keys in which ``run_dir``'s recorded config differs from ``config``
    (sorted; ``[]`` when it has none yet or they agree). Both are resolved through the current
    dataclasses, so a key an older run lacks counts as its default; a recorded config that no
    longer loads differs in ``["config.toml"]``."""
    from shn.config import config_to_dict, load_config

    path = recorded_config_path(run_dir)
    if path is None:
        return []
    try:
        old = _flat(config_to_dict(load_config(path)))
    except ConfigError:
        return ["config.toml"]
    new = _flat(config_to_dict(config))
    keys = (set(old) | set(new)) - set(UNTRAINED_KEYS)

    def relevant(key: str) -> bool:  # the sweep table and other methods' options train nothing here
        parts = key.split(".")
        return parts[0] != "sweep" and not (parts[0] == "methods" and len(parts) > 1 and parts[1] != config.method)

    return sorted(k for k in keys if relevant(k) and old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<run_dir>.stale-<n>`` (the first free n); returns the new path."""
    n = 1
    while (target := run_dir.with_name(f"{run_dir.name}.stale-{n}")).exists():
        n += 1
    run_dir.rename(target)
    return target


def _task(config: RunConfig, cache: dict[str, Any]) -> Any:
    from shn.runner import make_task

    key = (config.task, config.seed)
    if cache.get("key") != key:
        cache.clear()  # free the previous task's data before building the next
        cache["task"], cache["key"] = make_task(config), key
    return cache["task"]


def _log(root: Path, record: Mapping[str, Any]) -> None:
    with open(root / "suite_log.jsonl", "a") as f:
        f.write(dumps_json({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix_str(self, s: str) -> None: ...

    def write(self, s: str) -> None: ...

    def close(self) -> None: ...


def _bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="suite", unit="run", dynamic_ncols=True)
