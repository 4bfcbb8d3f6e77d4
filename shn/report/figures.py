"""Report figures (matplotlib, Agg): learning curves, the client graph, depth and heterophily studies.

Every figure is drawn from recorded files only; a graph is read from the run's saved
``graph.json`` (or, for a given graph, rebuilt from the run's task) and laid out at the clients'
coordinates or by a spectral start refined with spring iterations (:func:`spring_layout`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from shn.report.runs import Group, Run

__all__ = ["plot_curves", "plot_graph", "plot_xy", "spring_layout"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80] or "x"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _split_name(metric: str) -> str:
    split, _, name = metric.partition("_")
    return {"val": "validation", "test": "test"}.get(split, split) + " " + name.replace("_", " ")


X_AXES = ("updates", "bytes")  # the curves' x: client updates, or cumulative bytes (shn report --x)
MB = 1e6


def _updates_offset(run: Run, x: str = "updates") -> int:
    """Client updates (or bytes) spent before this run's recorded curve: a pipeline run's stage 1."""
    budget = run.summary.get("budget")
    key = "stage1_client_updates" if x == "updates" else "stage1_bytes_total"
    if isinstance(budget, Mapping) and isinstance(budget.get(key), int):
        return int(budget[key])
    return 0


def _curve(run: Run, metric: str, x: str = "updates") -> dict[int, tuple[float, float]]:
    """``{round: (x so far, value)}`` of one run, after the pipeline's stage 1. ``x = "updates"``:
    the records' ``client_updates`` (older records without it: round × clients_per_round);
    ``"bytes"``: their cumulative ``bytes_total`` in MB (records without it are left out)."""
    if x == "bytes":
        budget = run.summary.get("budget")
        if isinstance(budget, Mapping) and "stage1_bytes_total" in budget and not _number(budget["stage1_bytes_total"]):
            return {}  # a pipeline run whose stage-1 bytes are unknown (a cache entry from before byte counting)
        offset = _updates_offset(run, "bytes")
        return {h["round"]: ((offset + float(h["bytes_total"])) / MB, float(h[metric])) for h in run.history
                if _number(h.get(metric)) and _number(h.get("bytes_total")) and isinstance(h.get("round"), int)}
    offset = _updates_offset(run)
    per_round = run.config.get("clients_per_round")
    if per_round is None:  # not in the recorded config: it ran with the default
        from shn.config import RunConfig

        per_round = RunConfig.clients_per_round
    out = {}
    for h in run.history:
        value, r = h.get(metric), h.get("round")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not isinstance(r, int):
            continue
        updates = h.get("client_updates")
        if not isinstance(updates, (int, float)):
            if not isinstance(per_round, int):
                continue
            updates = r * per_round
        out[r] = (offset + float(updates), float(value))
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_curves(groups: Sequence[Group], path: Path, x: str = "updates") -> dict[str, Any] | None:
    """Validation primary metric vs client updates (local trainings so far, a pipeline's stage 1
    included) or, ``x = "bytes"``, vs cumulative communication (bytes down + up so far, in MB),
    mean over seeds with a ±1 std band; None when no run has a curve. Returns what was drawn
    (labels, scale, each series' points) for the report and tests."""
    if x not in X_AXES:
        raise ValueError(f"x: {x!r} is not a curve axis; allowed: {', '.join(X_AXES)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    metric = "val_" + groups[0].primary.removeprefix("test_")
    drawn: dict[str, Any] = {"series": {}}
    seeds: set[int] = set()
    staged = False
    for g in groups:
        series = [c for c in (_curve(r, metric, x) for r in g.runs) if c]
        if not series:
            continue
        rounds = sorted(set.intersection(*(set(c) for c in series)))
        if not rounds:
            continue
        xs = np.array([[c[r][0] for r in rounds] for c in series]).mean(axis=0)
        ys = np.array([[c[r][1] for r in rounds] for c in series])
        mean = ys.mean(axis=0)
        n = len(series)
        band = ", band ±1 std" if n > 1 else ""
        line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{g.method} (n={n} seed{'s' if n > 1 else ''}{band})")
        if n > 1:
            std = ys.std(axis=0, ddof=1)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        drawn["series"][g.method] = {"x": xs.tolist(), "y": mean.tolist(), "n": n}
        seeds.update(r.seed for r in g.runs)
        staged = staged or any(_updates_offset(r, x) for r in g.runs)
    if not drawn["series"]:
        plt.close(fig)
        return None
    ns = sorted({v["n"] for v in drawn["series"].values()})
    stage1 = "; pipeline runs include stage 1" if staged else ""
    xlabel = (f"client updates (local trainings so far{stage1})" if x == "updates" else
              f"cumulative communication, MB (10^6 bytes sent to + received from clients so far{stage1})")
    ylabel = f"{_split_name(metric)} ({metric})"
    title = (f"{groups[0].setting}: {_split_name(metric)} during training — mean over seeds "
             f"(n = {', '.join(map(str, ns))}); the tables report test")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    drawn.update(xlabel=xlabel, ylabel=ylabel, title=title, seeds=sorted(seeds))
    return drawn


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
            energy: bool = False, integer_x: bool = False, xlim: tuple[float, float] | None = None,
            log2_x: bool = False) -> dict[str, Any] | None:
    """Test primary metric (and optionally the Dirichlet energy, on a log axis) vs a per-run x,
    one series per method label without ``strip_key``; points are runs, lines join the per-x
    means over seeds. ``log2_x``: a base-2 log x axis (depths 1, 2, 4, 8). The seed count is in
    the title. Returns what was drawn, or None."""
    plt = _plt()
    series: dict[str, list[tuple[float, float, float | None, int]]] = {}
    for g in groups:
        for r in g.runs:
            x, y = x_of(r), r.metric(r.primary)
            if x is None or y is None:
                continue
            series.setdefault(_strip_label(g.method, strip_key), []).append(
                (float(x), y, r.metric("encoder_dirichlet_energy"), r.seed))
    if not series:
        return None
    has_energy = energy and any(e is not None for pts in series.values() for _, _, e, _ in pts)
    ncols = 2 if energy else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    ax = axes[0, 0]
    primary = groups[0].primary
    per_x = [len([p for p in pts if p[0] == x]) for pts in series.values() for x in {p[0] for p in pts}]
    ns = sorted(set(per_x))
    log2_x = log2_x and all(p[0] > 0 for pts in series.values() for p in pts)
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
    for a in axes[0]:
        if log2_x:
            from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

            a.set_xscale("log", base=2)
            ticks = sorted({p[0] for pts in series.values() for p in pts})
            a.xaxis.set_major_locator(FixedLocator(ticks))
            a.xaxis.set_major_formatter(ScalarFormatter())
            a.xaxis.set_minor_locator(NullLocator())
        elif integer_x:
            from matplotlib.ticker import MaxNLocator

            a.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xlim is not None:
        ax.set_xlim(*xlim)
    shown_x = x_label + (" (log2 scale)" if log2_x else "")
    ax.set_xlabel(shown_x)
    ax.set_ylabel(f"{_split_name(primary)} ({primary})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    energy_scale = None
    if energy:
        ex_ax = axes[0, 1]
        ex_ax.set_xlabel(shown_x)
        ex_ax.grid(alpha=0.3)
        if has_energy:
            values = [p[2] for pts in series.values() for p in pts if p[2] is not None]
            positive = [v for v in values if v > 0]
            if positive and len(positive) == len(values):
                ex_ax.set_yscale("log")
                energy_scale = "log"
            elif positive:  # zeros (total over-smoothing) stay visible below the smallest positive value
                ex_ax.set_yscale("symlog", linthresh=min(positive))
                energy_scale = "symlog"
            ex_ax.set_ylabel(f"encoder Dirichlet energy ({energy_scale or 'linear'} scale)")
            ex_ax.legend(fontsize=7)
        else:
            ex_ax.set_ylabel("encoder Dirichlet energy")
            ex_ax.text(0.5, 0.5, "encoder_dirichlet_energy\nnot recorded in these summaries", ha="center",
                       va="center", transform=ex_ax.transAxes, fontsize=9, color="0.4")
    full_title = (f"{title} — n = {', '.join(map(str, ns))} seed{'s' if ns != [1] else ''} per point "
                  "(lines: means over seeds, dots: runs)")
    fig.suptitle(full_title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"xlabel": shown_x, "xscale": "log2" if log2_x else "linear", "energy_scale": energy_scale,
            "title": full_title, "series": {k: sorted({p[0] for p in v}) for k, v in series.items()}}
