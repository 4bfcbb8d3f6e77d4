"""``shn report RUN_DIR... --out DIR``: tables and figures from recorded run directories.

Scans the given folders recursively for ``summary.json`` (a pipeline run's own summary wins
over its stage sub-folders), groups runs that differ only in ``seed`` (and ``device``,
``checkpoint_every``) and writes to ``out``:

* ``report.md`` — the main table (rows: methods, columns: settings, cells: the test primary
  metric, mean ± sample std over seeds, best per column in bold: max for accuracy-like metrics,
  min for loss / mse / mae / rmse), one detail table per setting (more metrics), the figures;
* ``results.csv`` (one row per group: mean, std per metric) and ``runs.csv`` (one row per run);
* ``curves_<setting>.png`` — validation primary metric vs round, one line per method, mean over
  seeds (shaded ± std);
* ``graph_<setting>_<kind>.png`` — the client graph of a graph method's run (its saved
  ``graph.json``; a given graph is rebuilt from the task), clients coloured by their class set,
  group, or placed at their coordinates; layout: spectral start + spring refinement in numpy;
* ``depth_<setting>.png`` — graph-encoder methods (SHN, GHN, ...): test metric and, where the
  summary records it, ``encoder_dirichlet_energy`` vs ``encoder.layers``;
* ``heterophily_<setting>.png`` — test metric vs the edge homophily of the graph actually used
  (``summary.graph``: class-set, else group, else label homophily; e.g. graphs rewired with
  ``graph.rewire_homophily``).

A setting is a task configuration (``task.*``); its label is the task name plus the task options
that differ between settings of the same task. A method label is the method name plus the
non-task options that differ between that method's groups within one setting (always
``graph.kind`` for graph methods). Every number comes from the recorded files.
"""

from __future__ import annotations

import csv
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

IGNORED_KEYS = ("seed", "device", "checkpoint_every")
MAXIMIZE = ("accuracy", "acc", "f1", "auc", "r2")
MINIMIZE = ("loss", "mse", "mae", "rmse", "mape", "wall_time_s", "energy")


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
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
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
    config: dict[str, Any] = {}
    if "config.toml" in files:
        try:
            config = flatten(tomllib.loads(files["config.toml"].read_text()))
        except (OSError, tomllib.TOMLDecodeError):
            config = {}
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
    groups = [sorted(rs, key=lambda r: (r.seed, str(r.path))) for rs in by_key.values()]
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
        out.append(Group(setting_label[setting_of[i]], m + (f" ({extra})" if extra else ""), rs))
    # two groups with the same labels (configs differing in an unlabelled way): number them
    seen: dict[tuple[str, str], int] = {}
    for g in out:
        n = seen.get((g.setting, g.method), 0)
        seen[(g.setting, g.method)] = n + 1
        if n:
            g.method = f"{g.method} #{n + 1}"
    return sorted(out, key=lambda g: (g.setting, g.method))


def better(metric: str) -> str:
    """"max" or "min" for a metric name (test_accuracy → max, test_mse → min)."""
    base = metric.removeprefix("test_").removeprefix("val_")
    if any(base == m or base.endswith("_" + m) or base.startswith(m) for m in MAXIMIZE):
        return "max"
    return "min"


# --------------------------------------------------------------------------------------------
# tables

def _fmt(x: float, metric: str = "") -> str:
    return f"{x:.1f}" if metric == "wall_time_s" or abs(x) >= 1000 else f"{x:.4f}"


def cell(stats: tuple[float, float, int] | None, metric: str = "") -> str:
    if stats is None:
        return "—"
    mean, std, n = stats
    return _fmt(mean, metric) if n == 1 else f"{_fmt(mean, metric)} ± {_fmt(std, metric)}"


def _bold_best(rows: list[list[str]], means: list[list[float | None]], directions: list[str | None],
               metrics: Sequence[str] = ()) -> None:
    """Bold the best mean of each column (ties as displayed are all bold)."""
    for j, direction in enumerate(directions):
        metric = metrics[j] if j < len(metrics) else ""
        if direction is None:
            continue
        col = [m[j] for m in means if m[j] is not None]
        if len(col) < 2:
            continue
        best = max(col) if direction == "max" else min(col)
        for i, m in enumerate(means):
            if m[j] is not None and _fmt(m[j], metric) == _fmt(best, metric):
                rows[i][j + 1] = f"**{rows[i][j + 1]}**"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_table(groups: Sequence[Group]) -> str:
    settings = sorted({g.setting for g in groups})
    methods = sorted({g.method for g in groups})
    index = {(g.setting, g.method): g for g in groups}
    primary = {s: next(g.primary for g in groups if g.setting == s) for s in settings}
    rows, means = [], []
    for m in methods:
        row, mrow = [m], []
        for s in settings:
            g = index.get((s, m))
            st = g.stats(primary[s]) if g else None
            row.append(cell(st))
            mrow.append(st[0] if st else None)
        rows.append(row)
        means.append(mrow)
    _bold_best(rows, means, [better(primary[s]) for s in settings])
    return markdown_table(["method"] + [f"{s}: {primary[s]}" for s in settings], rows)


def detail_metrics(groups: Sequence[Group]) -> list[str]:
    primary = groups[0].primary
    names = {k for g in groups for r in g.runs for k in r.summary.get("metrics", {})
             if k.startswith("test_") and isinstance(r.summary["metrics"][k], (int, float))
             and not re.search(r"_h\d+$", k)}  # per-horizon metrics: in results.csv only
    others = sorted(names - {primary}, key=lambda k: (k.endswith("loss"), k))
    val = "val_" + primary.removeprefix("test_")
    cols = [primary] + others + [val]
    if any(r.metric("encoder_dirichlet_energy") is not None for g in groups for r in g.runs):
        cols.append("encoder_dirichlet_energy")
    novel = ["novel_" + primary, "novel_init_" + primary]  # held-out clients (shn.novel)
    if any(r.metric(novel[0]) is not None for g in groups for r in g.runs):
        cols += novel
    return cols + ["wall_time_s"]


def _per_group_table(groups: Sequence[Group], cols: list[str], extra=None,
                     extra_header: Sequence[str] = ()) -> str:
    """One row per group: mean ± std of each column, the best mean per column in bold
    (Dirichlet energy is descriptive, never bolded); ``extra(group)`` appends trailing cells."""
    rows, means = [], []
    for g in groups:
        stats = [g.stats(c) for c in cols]
        rows.append([g.method] + [cell(s, c) for s, c in zip(stats, cols)]
                    + (extra(g) if extra else []))
        means.append([s[0] if s else None for s in stats])
    directions: list[str | None] = [better(c) if c != "encoder_dirichlet_energy" else None for c in cols]
    _bold_best(rows, means, directions, cols)
    return markdown_table(["method"] + cols + list(extra_header), rows)


def detail_table(groups: Sequence[Group]) -> str:
    return _per_group_table(
        groups, detail_metrics(groups),
        extra=lambda g: [str(len(g.runs)), ",".join(str(r.seed) for r in g.runs)],
        extra_header=["runs", "seeds"])


def horizon_table(groups: Sequence[Group]) -> str | None:
    """Forecasting: test MAE and RMSE at each recorded horizon (``test_mae_h3``, ...); None when
    the runs record no per-horizon metrics."""
    found = {k for g in groups for r in g.runs for k in r.summary.get("metrics", {})
             if re.fullmatch(r"test_(mae|rmse)_h\d+", k)}
    if not found:
        return None
    cols = sorted(found, key=lambda k: (k.split("_")[1], int(k.rsplit("_h", 1)[1])))
    return _per_group_table(groups, cols)


# --------------------------------------------------------------------------------------------
# figures

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80] or "x"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(groups: Sequence[Group], path: Path) -> bool:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = "val_" + groups[0].primary.removeprefix("test_")
    drawn = False
    for g in groups:
        series = []
        for r in g.runs:
            pts = {int(h["round"]): float(h[metric]) for h in r.history
                   if metric in h and isinstance(h[metric], (int, float)) and "round" in h}
            if pts:
                series.append(pts)
        if not series:
            continue
        rounds = sorted(set.intersection(*(set(s) for s in series)))
        if not rounds:
            continue
        ys = np.array([[s[r] for r in rounds] for s in series])
        mean = ys.mean(axis=0)
        line, = ax.plot(rounds, mean, marker="o", ms=3, label=f"{g.method} (n={len(series)})")
        if len(series) > 1:
            std = ys.std(axis=0, ddof=1)
            ax.fill_between(rounds, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{groups[0].setting}: {metric} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def spring_layout(adj: np.ndarray, seed: int = 0, iterations: int = 200) -> np.ndarray:
    """2-d positions: a spectral start (normalised Laplacian eigenvectors 1, 2) refined by
    Fruchterman–Reingold force iterations; deterministic for ``seed``."""
    n = adj.shape[0]
    if n == 1:
        return np.zeros((1, 2))
    a = ((adj + adj.T) > 0).astype(float)
    np.fill_diagonal(a, 0)
    deg = a.sum(1)
    d = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1e-12)), 0)
    lap = np.eye(n) - d[:, None] * a * d[None, :]
    _, vecs = np.linalg.eigh(lap)
    pos = vecs[:, 1:3] if n > 2 else np.c_[vecs[:, :1], np.zeros(n)]
    rng = np.random.default_rng(seed)
    pos = pos + 1e-3 * rng.standard_normal(pos.shape)
    pos = (pos - pos.mean(0)) / (np.abs(pos).max() + 1e-12)
    k = 1 / np.sqrt(n)
    t = 0.1
    for _ in range(iterations):
        delta = pos[:, None, :] - pos[None, :, :]
        dist = np.linalg.norm(delta, axis=-1) + 1e-9
        force = (k * k / dist ** 2)[:, :, None] * delta - (a * dist / k)[:, :, None] * delta
        np.einsum("iij->ij", force)[:] = 0
        disp = force.sum(1)
        length = np.linalg.norm(disp, axis=1, keepdims=True) + 1e-9
        pos = pos + disp / length * np.minimum(length, t)
        t *= 0.98
    return (pos - pos.mean(0)) / (np.abs(pos - pos.mean(0)).max() + 1e-12)


def _graph_data(run: Run) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(dense adjacency, client attributes) of a run's graph, or None. The saved graph.json and
    clients.json are used where present; a given graph, or missing client attributes (class
    sets, coordinates), are rebuilt from the run's task."""
    info: dict[str, Any] = {}
    if "clients.json" in run.files:
        info = json.loads(run.files["clients.json"].read_text())
    adj = None
    if "graph.json" in run.files:
        from shn.graph import ClientGraph

        adj = ClientGraph.load(run.files["graph.json"]).to_dense().numpy()
    if adj is None or not info or run.config.get("graph.kind") == "given":
        rebuilt = _from_task(run, need_graph=adj is None)
        if rebuilt is not None:
            adj = adj if adj is not None else rebuilt[0]
            info = {**rebuilt[1], **{k: v for k, v in info.items() if v is not None}}
    return (adj, info) if adj is not None else None


def _from_task(run: Run, need_graph: bool) -> tuple[np.ndarray | None, dict[str, Any]] | None:
    """Rebuild a (given) graph and the client attributes from the run's task (loads its data)."""
    try:
        from shn.config import load_config
        from shn.pipeline import client_info, resolve_graph
        from shn.runner import make_task
        from tasks.base import client_attribute

        config = load_config(run.files["config.toml"])
        task = make_task(config)
        info = client_info(task)
        coords = client_attribute(task, "coordinates")
        if coords is not None:
            info["coordinates"] = np.asarray(coords, dtype=float).tolist()
        adj = resolve_graph(config, task).to("cpu").to_dense().numpy() if need_graph else None
        return adj, info
    except Exception:  # noqa: BLE001 — no graph to draw for this run
        return None


def plot_graph(run: Run, title: str, path: Path) -> bool:
    data = _graph_data(run)
    if data is None:
        return False
    adj, info = data
    plt = _plt()
    n = adj.shape[0]
    coords = info.get("coordinates")
    if coords is not None and len(coords) == n:
        c = np.asarray(coords, dtype=float)
        pos = np.c_[c[:, 1], c[:, 0]]  # (lat, lon) → x = lon, y = lat
        layout = "coordinates"
    else:
        pos = spring_layout(adj, seed=int(run.seed))
        layout = "spectral + spring layout"
    fig, ax = plt.subplots(figsize=(6.5, 6))
    rows, cols = np.nonzero(np.triu((adj + adj.T) > 0, 1))
    for i, j in zip(rows, cols):
        ax.plot([pos[i, 0], pos[j, 0]], [pos[i, 1], pos[j, 1]], color="0.7", lw=0.6, zorder=1)
    groups, sets = info.get("groups"), info.get("label_sets")
    if groups is not None and len(groups) == n:
        keys, how = [str(x) for x in groups], "group"
    elif sets is not None and len(sets) == n and len({tuple(s) for s in sets}) > 1:
        keys, how = ["{" + ",".join(map(str, s)) + "}" for s in sets], "class set"
    else:
        keys, how = None, "degree"
    if keys is not None:
        distinct = sorted(set(keys), key=lambda s: (len(s), s))
        cmap = plt.get_cmap("tab20" if len(distinct) > 10 else "tab10")
        colors = [cmap(distinct.index(k) % cmap.N) for k in keys]
        ax.scatter(pos[:, 0], pos[:, 1], c=colors, s=60, edgecolors="k", linewidths=0.5, zorder=2)
        if len(distinct) <= 20:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], marker="o", ls="", color=cmap(i % cmap.N), label=k) for i, k in enumerate(distinct)]
            ax.legend(handles=handles, title=how, fontsize=6, title_fontsize=7, loc="best", ncol=2 if len(distinct) > 10 else 1)
    else:
        degree = ((adj + adj.T) > 0).sum(1)
        sc = ax.scatter(pos[:, 0], pos[:, 1], c=degree, cmap="viridis", s=60, edgecolors="k", linewidths=0.5, zorder=2)
        fig.colorbar(sc, ax=ax, label="degree", shrink=0.7)
    homophily = _homophily(run)
    h = f", edge homophily {homophily[1]:.3f} ({homophily[0]})" if homophily else ""
    ax.set_title(f"{title}\n{n} clients, {len(rows)} edges, coloured by {how}{h}\n({layout})", fontsize=9)
    if layout == "coordinates":
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _homophily(run: Run) -> tuple[str, float] | None:
    graph = run.summary.get("graph")
    if not isinstance(graph, Mapping):
        return None
    for key, name in (("set_homophily", "class sets"), ("group_homophily", "groups"), ("label_homophily", "labels")):
        v = graph.get(key)
        if isinstance(v, Mapping) and isinstance(v.get("homophily"), (int, float)):
            return name, float(v["homophily"])
    return None


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


def _strip_label(label: str, key: str) -> str:
    """A method label without ``key=value`` (so the x-axis variable does not split series)."""
    m = re.match(r"^(.*?) \((.*)\)$", label)
    if not m:
        return label
    parts = [p for p in m.group(2).split(", ") if not p.startswith(key + "=")]
    return m.group(1) + (f" ({', '.join(parts)})" if parts else "")


def _layers(run: Run) -> Any:
    return run.config.get("encoder.layers")


def _homophily_value(run: Run) -> float | None:
    found = _homophily(run)
    return found[1] if found else None


def _distinct(groups: Sequence[Group], x_of) -> int:
    return len({x_of(r) for g in groups for r in g.runs} - {None})


def plot_xy(groups: Sequence[Group], x_of, x_label: str, strip_key: str, path: Path, title: str,
            energy: bool = False, integer_x: bool = False, xlim: tuple[float, float] | None = None) -> bool:
    """Test primary metric (and optionally the Dirichlet energy) vs a per-run x, one series per
    method label without ``strip_key``; points are runs, lines join the per-x means."""
    plt = _plt()
    series: dict[str, list[tuple[float, float, float | None]]] = {}
    for g in groups:
        for r in g.runs:
            x, y = x_of(r), r.metric(r.primary)
            if x is None or y is None:
                continue
            series.setdefault(_strip_label(g.method, strip_key), []).append(
                (float(x), y, r.metric("encoder_dirichlet_energy")))
    if not series:
        return False
    has_energy = energy and any(e is not None for pts in series.values() for _, _, e in pts)
    ncols = 2 if energy else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    ax = axes[0, 0]
    primary = groups[0].primary
    for name, pts in sorted(series.items()):
        xs = sorted({p[0] for p in pts})
        means = [np.mean([p[1] for p in pts if p[0] == x]) for x in xs]
        line, = ax.plot(xs, means, marker="o", label=name)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=line.get_color(), alpha=0.35, s=14)
        if energy and has_energy:
            e_pts = [(p[0], p[2]) for p in pts if p[2] is not None]
            if e_pts:
                ex = sorted({p[0] for p in e_pts})
                axes[0, 1].plot(ex, [np.mean([e for x, e in e_pts if x == v]) for v in ex], marker="o", label=name)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        for a in axes[0]:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.set_xlabel(x_label)
    ax.set_ylabel(primary)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if energy:
        ex_ax = axes[0, 1]
        ex_ax.set_xlabel(x_label)
        ex_ax.set_ylabel("encoder Dirichlet energy")
        ex_ax.grid(alpha=0.3)
        if has_energy:
            ex_ax.legend(fontsize=7)
        else:
            ex_ax.text(0.5, 0.5, "encoder_dirichlet_energy\nnot recorded in these summaries", ha="center",
                       va="center", transform=ex_ax.transAxes, fontsize=9, color="0.4")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# the report

def write_csvs(groups: Sequence[Group], out: Path) -> None:
    metric_names = sorted({k for g in groups for r in g.runs for k, v in r.summary.get("metrics", {}).items()
                           if isinstance(v, (int, float)) and k.startswith(("test_", "val_"))})
    extra = ["wall_time_s"] + (["encoder_dirichlet_energy"] if any(
        r.metric("encoder_dirichlet_energy") is not None for g in groups for r in g.runs) else [])
    names = metric_names + extra
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "method", "primary_metric", "runs", "seeds"]
                   + [f"{n}_{s}" for n in names for s in ("mean", "std")])
        for g in groups:
            row: list[Any] = [g.setting, g.method, g.primary, len(g.runs), " ".join(str(r.seed) for r in g.runs)]
            for n in names:
                st = g.stats(n)
                row += [repr(st[0]), repr(st[1])] if st else ["", ""]
            w.writerow(row)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "method", "seed", "run_dir"] + names)
        for g in groups:
            for r in g.runs:
                vals = [r.metric(n) for n in names]
                w.writerow([g.setting, g.method, r.seed, str(r.path)] + ["" if v is None else repr(v) for v in vals])


def build_report(run_dirs: Sequence[str | Path], out: str | Path = "report") -> Path:
    """Write ``report.md``, ``results.csv``, ``runs.csv`` and the figures to ``out``; return the
    path of ``report.md``."""
    runs = find_runs(run_dirs)
    if not runs:
        raise FileNotFoundError(f"no run (summary.json) found under {', '.join(map(str, run_dirs))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    write_csvs(groups, out)
    settings = sorted({g.setting for g in groups})
    figures: dict[str, list[str]] = {s: [] for s in settings}
    for s in settings:
        gs = [g for g in groups if g.setting == s]
        slug = _slug(s)
        if plot_curves(gs, out / f"curves_{slug}.png"):
            figures[s].append(f"curves_{slug}.png")
        drawn: set[str] = set()
        for g in gs:
            r = g.runs[0]
            kind = str(r.config.get("graph.kind"))
            rewire = r.config.get("graph.rewire_homophily")
            name = f"graph_{slug}_{_slug(kind + ('' if rewire is None else '-h' + _fmt_value(rewire)))}.png"
            if not _needs_graph(r.method) or name in drawn:
                continue
            if plot_graph(r, f"{s}: {g.method}, seed {r.seed}", out / name):
                figures[s].append(name)
                drawn.add(name)
        enc = [g for g in gs if _needs_graph(g.runs[0].method) or any(
            r.metric("encoder_dirichlet_energy") is not None for r in g.runs)]
        # a study plot needs its x to vary: one depth or one graph is no curve
        if _distinct(enc, _layers) > 1 and plot_xy(
                enc, _layers, "encoder layers", "encoder.layers", out / f"depth_{slug}.png",
                f"{s}: depth study (test metric, Dirichlet energy)", energy=True, integer_x=True):
            figures[s].append(f"depth_{slug}.png")
        het = [g for g in gs if any(_homophily(r) for r in g.runs)]
        if _distinct(het, _homophily_value) > 1 and plot_xy(
                het, _homophily_value, "edge homophily of the graph used", "graph.rewire_homophily",
                out / f"heterophily_{slug}.png", f"{s}: test metric vs edge homophily", xlim=(-0.05, 1.05)):
            figures[s].append(f"heterophily_{slug}.png")

    lines = ["# Results", "",
             f"{len(runs)} runs in {len(groups)} groups, read from `summary.json` / `metrics.jsonl` of: "
             + ", ".join(f"`{p}`" for p in run_dirs) + ".",
             "Cells: test metric at the end of training, mean ± sample std (ddof=1) over seeds (a single run: "
             "its value). Bold: best per column (max for accuracy, min for loss / mse / mae / rmse).", "",
             "## Main table", "", main_table(groups), ""]
    for s in settings:
        gs = [g for g in groups if g.setting == s]
        lines += [f"## {s}", "", detail_table(gs), ""]
        horizons = horizon_table(gs)
        if horizons is not None:
            lines += ["Per forecast horizon (steps ahead):", "", horizons, ""]
        for fig in figures[s]:
            lines += [f"![{fig}]({fig})", ""]
    lines += ["Per-group numbers: `results.csv`; per-run numbers and run directories: `runs.csv`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
