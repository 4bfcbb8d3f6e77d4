"""Loading recorded runs for the report: discovery, :class:`Run`, and grouping into :class:`Group`.

A run is a directory with a ``summary.json`` (a pipeline run's own summary stands for its stage
sub-folders); its ``config.toml`` is flattened to dotted keys. Runs equal up to the ignored keys
(seed, device, checkpointing) form a group, labelled by setting (task options) and method (the
options that vary), as described in :mod:`shn.report`.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["IGNORED_KEYS", "Group", "Run", "drop_duplicates", "find_runs", "flatten", "group_runs", "load"]

IGNORED_KEYS = ("seed", "device", "checkpoint_every")

log = logging.getLogger("shn.report")


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]  # flattened "a.b" -> value
    history: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.config.get("method", self.summary.get("method", "?")))

    @property
    def task(self) -> str:
        return str(self.config.get("task.name", self.summary.get("task", "?")))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", self.summary.get("seed", 0)))

    @property
    def primary(self) -> str:
        return str(self.summary.get("primary_metric", "test_accuracy"))

    def metric(self, name: str) -> float | None:
        if name == "wall_time_s" or name.startswith("novel_"):  # top-level summary entries
            v = self.summary.get(name)
        elif name == "encoder_dirichlet_energy":
            v = _energy(self.summary.get("encoder_dirichlet_energy"))
        else:
            v = self.summary.get("metrics", {}).get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass
class Group:
    setting: str
    method: str
    runs: list[Run]
    # runs dropped as duplicates of a kept one: same config (up to IGNORED_KEYS) and same seed
    duplicates: list[tuple[Run, Run]] = field(default_factory=list)  # (dropped, kept)

    @property
    def primary(self) -> str:
        return self.runs[0].primary

    def values(self, name: str) -> list[float]:
        return [v for v in (r.metric(name) for r in self.runs) if v is not None and math.isfinite(v)]

    def stats(self, name: str) -> tuple[float, float, int] | None:
        vals = self.values(name)
        if not vals:
            return None
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        return float(np.mean(vals)), std, len(vals)


# --------------------------------------------------------------------------------------------
# discovery

def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run under ``paths`` (folders searched recursively for ``summary.json``)."""
    dirs: set[Path] = set()
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == "summary.json":
            dirs.add(p.parent.resolve())
        elif p.is_dir():
            dirs.update(s.parent.resolve() for s in p.rglob("summary.json"))
        else:
            raise FileNotFoundError(f"{p}: no such run directory")
    # a pipeline run's root summary stands for its stage sub-folders
    tops = sorted(d for d in dirs if not any(a in dirs for a in d.parents))
    runs = [r for r in (load(d) for d in tops) if r is not None]
    return runs


def load(path: Path) -> Run | None:
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not a run to report
        return None
    if not isinstance(summary, dict) or "metrics" not in summary:
        return None
    stages = sorted(path.glob("stage3_*"))
    files: dict[str, Path] = {}
    for name in ("config.toml", "metrics.jsonl", "graph.json"):
        for cand in [path / name] + [s / name for s in stages]:
            if cand.is_file():
                files[name] = cand
                break
    for name in ("graph.json", "clients.json", "graph_summary.json"):
        cand = path / "stage2_graph" / name
        if cand.is_file():
            files.setdefault(name, cand)
    config = _recorded_config(files["config.toml"]) if "config.toml" in files else {}
    config.setdefault("method", summary.get("method"))
    config.setdefault("task.name", summary.get("task"))
    config.setdefault("seed", summary.get("seed", 0))
    history: list[dict[str, Any]] = []
    if "metrics.jsonl" in files:
        from shn.federated.records import read_jsonl

        try:
            history = read_jsonl(files["metrics.jsonl"])
        except (OSError, json.JSONDecodeError):
            history = []
    return Run(path, summary, config, history, files)


def _recorded_config(path: Path) -> dict[str, Any]:
    """A run's recorded config, flattened and resolved through today's config classes, so that a
    key added since the run was recorded counts as its default (as for ``--resume``) rather than
    splitting one setting in two; as recorded where it no longer loads (e.g. a plugin's method)."""
    from shn.config import ConfigError, config_from_dict, config_to_dict

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # (TOMLDecodeError and UnicodeDecodeError are ValueErrors)
        return {}
    try:
        return flatten(config_to_dict(config_from_dict(raw)))
    except (ConfigError, TypeError, ValueError):
        return flatten(raw)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key == "sweep":
            continue
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


# --------------------------------------------------------------------------------------------
# grouping and labels

def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _needs_graph(method: str) -> bool:
    try:
        from shn.registry import METHODS

        import shn  # noqa: F401  (registers methods)

        return bool(METHODS.get(method).meta.get("needs_graph"))
    except Exception:  # noqa: BLE001 — a method not registered here
        return False


def _varying(configs: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> list[str]:
    return sorted(k for k in keys if len({repr(c.get(k)) for c in configs}) > 1)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs equal up to the ignored keys form a group; labels as in the module doc."""
    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        key = tuple(sorted((k, repr(v)) for k, v in r.config.items() if k not in IGNORED_KEYS))
        by_key.setdefault(key, []).append(r)
    deduped = [drop_duplicates(rs) for rs in by_key.values()]
    groups = [sorted(rs, key=lambda r: (r.seed, str(r.path))) for rs, _ in deduped]
    dropped = [d for _, d in deduped]
    reps = [g[0].config for g in groups]

    # settings: the task table; label = task name + task options that vary between its settings
    def task_part(c: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in c.items() if k.startswith("task.")}

    setting_of = [tuple(sorted((k, repr(v)) for k, v in task_part(c).items())) for c in reps]
    setting_label: dict[tuple, str] = {}
    for s in set(setting_of):
        cfg = dict(reps[setting_of.index(s)])
        same_task = {t for t in set(setting_of) if dict(t).get("task.name") == dict(s).get("task.name")}
        cfgs = [reps[setting_of.index(t)] for t in same_task]
        keys = _varying(cfgs, {k for c in cfgs for k in c if k.startswith("task.") and k != "task.name"})
        extra = ", ".join(f"{k.removeprefix('task.')}={_fmt_value(cfg.get(k))}" for k in keys if k in cfg)
        setting_label[s] = f"{cfg.get('task.name')}" + (f" ({extra})" if extra else "")

    # method labels: keys that vary among one method's groups within a setting
    label_keys: dict[str, set[str]] = {}
    for i, c in enumerate(reps):
        m = str(c.get("method"))
        peers = [reps[j] for j in range(len(reps)) if setting_of[j] == setting_of[i] and reps[j].get("method") == m]
        keys = {k for p in peers for k in p if not k.startswith("task.") and k not in IGNORED_KEYS}
        label_keys.setdefault(m, set()).update(_varying(peers, keys))
    out = []
    for i, rs in enumerate(groups):
        c = reps[i]
        m = str(c.get("method"))
        keys = sorted(label_keys.get(m, set()) | ({"graph.kind"} if _needs_graph(m) else set()))
        extra = ", ".join(f"{k}={_fmt_value(c.get(k))}" for k in keys if k in c)
        out.append(Group(setting_label[setting_of[i]], m + (f" ({extra})" if extra else ""), rs, dropped[i]))
    # two groups with the same labels (configs differing in an unlabelled way): number them
    seen: dict[tuple[str, str], int] = {}
    for g in out:
        n = seen.get((g.setting, g.method), 0)
        seen[(g.setting, g.method)] = n + 1
        if n:
            g.method = f"{g.method} #{n + 1}"
    return sorted(out, key=lambda g: (g.setting, g.method))


def drop_duplicates(runs: Sequence[Run]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """Runs of one group (same config up to IGNORED_KEYS) with the same seed are one experiment
    recorded twice (a pipeline run and a plain run of one config, a copied folder): counted
    once, never as two seeds. The newest (``summary.json`` time) is kept; each drop is logged
    as a warning. Returns (kept runs, [(dropped, kept)])."""
    newest: dict[int, Run] = {}
    dropped: list[tuple[Run, Run]] = []
    for r in sorted(runs, key=lambda r: (_mtime(r), str(r.path)), reverse=True):
        kept = newest.setdefault(r.seed, r)
        if kept is not r:
            dropped.append((r, kept))
            log.warning("report: %s and %s are the same config with seed %d: counted once (kept %s, the newer)",
                        r.path, kept.path, r.seed, kept.path)
    kept_ids = {id(r) for r in newest.values()}
    return [r for r in runs if id(r) in kept_ids], dropped


def _mtime(run: Run) -> float:
    try:
        return (run.path / "summary.json").stat().st_mtime
    except OSError:
        return 0.0


def _energy(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, list) and v and isinstance(v[-1], (int, float)):
        return float(v[-1])  # per-layer list: the encoder output's energy
    if isinstance(v, Mapping):
        for key in ("output", "final", "last", "value"):
            if isinstance(v.get(key), (int, float)):
                return float(v[key])
    return None
