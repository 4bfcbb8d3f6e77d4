"""``shn inspect CONFIG``: load the task a config names and describe it — clients, split sizes,
input sizes, the client graph's degrees — without building a method or training anything.

A first check of one's own data: every data error surfaces here as it would in ``shn run``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shn.config import ConfigError, RunConfig
from tasks.base import Task, client_attribute

__all__ = ["describe_task", "format_description", "inspect_config"]


def _graph(task: Task, config: RunConfig | None) -> dict[str, Any]:
    """The graph a graph method would get without stage-1 inference, and its degrees."""
    from shn.graph import given_graph
    from shn.pipeline import given_task_graph

    kind = config.graph.kind if config is not None else "given"
    adjacency = client_attribute(task, "relation_adjacency")
    if config is not None and kind == "given":
        try:
            graph, source = given_task_graph(config, task), (config.graph.path or "the task's relation graph")
        except ConfigError as exc:  # reported, not fatal: methods without a graph still run
            return {"kind": kind, "source": None, "problem": str(exc)}
    elif adjacency is not None:
        graph, source = given_graph(adjacency, task.num_clients), "the task's relation graph"
    else:
        return {"kind": kind, "source": None}
    degree = np.bincount(graph.edge_index[0].cpu().numpy(), minlength=task.num_clients)
    return {"kind": kind, "source": source, "edges": int(graph.edge_index.shape[1]) // 2,
            "degree": degree.tolist(), "isolated": int((degree == 0).sum())}


def describe_task(task: Task, config: RunConfig | None = None) -> dict[str, Any]:
    """A plain-data description of ``task`` (what ``shn inspect`` prints)."""
    n = task.num_clients
    names = client_attribute(task, "client_names") or [str(c) for c in range(n)]
    clients = []
    for c in range(n):
        data = task.client_data(c)
        clients.append({
            "name": str(names[c]),
            "train": int(data.train[0].shape[0]), "val": int(data.val[0].shape[0]), "test": int(data.test[0].shape[0]),
            "input_shape": list(data.train[0].shape[1:]),
        })
    if getattr(task, "nested_architectures", False):  # task.widths: each client's width multiplier
        for c, row in enumerate(clients):
            row["width"] = float(task.width_of(c))
    out: dict[str, Any] = {"task": task.name, "num_clients": n, "clients": clients, "graph": _graph(task, config)}
    for key in ("problem", "num_classes", "dropped_clients", "target_names", "num_steps", "step_seconds",
                "season_steps", "input_len", "output_len"):
        value = getattr(task, key, None)
        if value is not None and not callable(value):
            out[key] = list(value) if isinstance(value, (tuple, list)) else (value.item() if hasattr(value, "item") else value)
    start = getattr(task, "start_time", None)
    if start is not None:
        out["start_time"] = str(start)
    bounds = getattr(task, "bounds", None)
    if bounds is not None:
        out["split_steps"] = {k: [int(a), int(b)] for k, (a, b) in zip(("train", "val", "test"), bounds)}
    feature_names = getattr(task, "feature_names", None)
    if callable(feature_names) and n:
        out["features_of_client_0"] = list(feature_names(0))
    return out


def format_description(desc: dict[str, Any]) -> str:
    """``describe_task``'s result as a short text report."""
    clients = desc["clients"]
    head = f"task {desc['task']!r}: {desc['num_clients']} clients"
    if desc.get("dropped_clients"):
        head += f" ({len(desc['dropped_clients'])} dropped: {', '.join(map(repr, desc['dropped_clients'][:10]))})"
    if "problem" in desc:
        head += f", {desc['problem']}" + (f" with {desc['num_classes']} classes" if "num_classes" in desc else "")
    if "target_names" in desc:
        head += f", forecasting {desc['target_names']} {desc.get('output_len')} steps from {desc.get('input_len')}"
    lines = [head]
    if "num_steps" in desc:
        from tasks.timeaxis import format_duration

        step = f" of {format_duration(int(desc['step_seconds']))}" if desc.get("step_seconds") else ""
        start = f" from {desc['start_time']}" if desc.get("start_time") else ""
        parts = ", ".join(f"{k} {b - a}" for k, (a, b) in desc.get("split_steps", {}).items())
        lines.append(f"time axis: {desc['num_steps']} steps{step}{start} ({parts})")
        if desc.get("season_steps"):
            lines.append(f"seasonal naive baseline: {desc['season_steps']} steps per season")
    if desc.get("features_of_client_0"):
        feats = desc["features_of_client_0"]
        lines.append(f"inputs (client {clients[0]['name']!r}): {', '.join(feats[:12])}" + (" …" if len(feats) > 12 else ""))
    graph = desc["graph"]
    degree = graph.get("degree")
    width = max(6, *(len(c["name"]) for c in clients))
    widths = all("width" in c for c in clients)
    lines.append(f"{'client':<{width}}  {'train':>7} {'val':>6} {'test':>6}  {'input':>10}" + ("  width" if widths else "")
                 + ("  degree" if degree else ""))
    for i, c in enumerate(clients):
        shape = "x".join(map(str, c["input_shape"]))
        lines.append(f"{c['name']:<{width}}  {c['train']:>7} {c['val']:>6} {c['test']:>6}  {shape:>10}"
                     + (f"  {'x' + format(c['width'], 'g'):>5}" if widths else "") + (f"  {degree[i]:>6}" if degree else ""))
    total = {k: sum(c[k] for c in clients) for k in ("train", "val", "test")}
    lines.append(f"{'total':<{width}}  {total['train']:>7} {total['val']:>6} {total['test']:>6}")
    if degree:
        d = np.asarray(degree)
        what = (f"graph (given, from {graph['source']})" if graph["kind"] == "given" else
                f"task graph (used with graph.kind = 'given'; this config's {graph['kind']!r} graph is inferred when training)")
        lines.append(f"{what}: {graph['edges']} edges, degree min {d.min()} / mean {d.mean():.2f} / max {d.max()}, "
                     f"{graph['isolated']} isolated")
    elif graph.get("problem"):
        lines.append(f"graph: {graph['problem']}")
    else:
        lines.append(f"graph: {graph['kind']!r}, inferred from stage-1 embeddings when training (the task has no graph of its own)")
    return "\n".join(lines)


def inspect_config(config: RunConfig) -> dict[str, Any]:
    """Build the task of ``config`` and describe it (no method, no training)."""
    from shn.runner import make_task

    task = make_task(config)
    try:
        return describe_task(task, config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
