"""``build_report``: the report directory (``report.md``, the CSVs, the figures) from run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shn.report.figures import _distinct, _homophily, _homophily_value, _layers, _slug, plot_curves, plot_graph, plot_xy
from shn.report.runs import _fmt_value, _needs_graph, find_runs, group_runs
from shn.report.tables import baselines_table, detail_table, horizon_table, main_table, write_csvs

__all__ = ["build_report"]


def _rewire_target(run) -> str:
    """The heterophily study's knob as a distinct value (unset counts as one)."""
    return repr(run.config.get("graph.rewire_homophily"))


def build_report(run_dirs: Sequence[str | Path], out: str | Path = "report", reference: str | None = None,
                 x: str = "updates") -> Path:
    """Write ``report.md``, ``results.csv``, ``runs.csv`` and the figures to ``out``; return the
    path of ``report.md``. With ``reference`` (a method folder name of the suite layout
    ``<dir>/<setting>/<method>/seed<s>/``), the report opens with the paired comparison of
    :mod:`shn.paired` (``paired.md`` / ``paired.csv``). ``x``: the learning curves' x-axis,
    "updates" (client updates, ``curves_<setting>.png``) or "bytes" (cumulative bytes sent and
    received, ``curves-bytes_<setting>.png``: accuracy vs communication)."""
    runs = find_runs(run_dirs)
    if not runs:
        raise FileNotFoundError(f"no run (summary.json) found under {', '.join(map(str, run_dirs))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    write_csvs(groups, out)
    settings = sorted({g.setting for g in groups})
    figures: dict[str, list[str]] = {s: [] for s in settings}
    captions: dict[str, str] = {}
    for s in settings:
        gs = [g for g in groups if g.setting == s]
        slug = _slug(s)
        name = f"curves_{slug}.png" if x == "updates" else f"curves-{x}_{slug}.png"
        curves = plot_curves(gs, out / name, x=x)
        if curves:
            figures[s].append(name)
            captions[name] = (f"{curves['ylabel']} vs {curves['xlabel']}; lines: mean over seeds "
                              "(n per method in the legend), bands: ±1 sample std.")
        drawn: set[str] = set()
        for g in gs:
            r = g.runs[0]
            kind = str(r.config.get("graph.kind"))
            rewire = r.config.get("graph.rewire_homophily")
            name = f"graph_{slug}_{_slug(kind + ('' if rewire is None else '-h' + _fmt_value(rewire)))}.png"
            if not _needs_graph(r.method) or name in drawn:
                continue
            if plot_graph(r, f"{s}: {g.method}, one run (seed {r.seed}) of {len(g.runs)}", out / name):
                figures[s].append(name)
                captions[name] = f"The client graph of one run (seed {r.seed}) of {g.method}."
                drawn.add(name)
        enc = [g for g in gs if _needs_graph(g.runs[0].method) or any(
            r.metric("encoder_dirichlet_energy") is not None for r in g.runs)]
        # a study plot needs its x to vary: one depth or one graph is no curve
        if _distinct(enc, _layers) > 1:
            depth = plot_xy(enc, _layers, "encoder layers L", "encoder.layers", out / f"depth_{slug}.png",
                            f"{s}: depth study (test metric, Dirichlet energy)", energy=True, integer_x=True,
                            log2_x=True)
            if depth:
                figures[s].append(f"depth_{slug}.png")
                captions[f"depth_{slug}.png"] = depth["title"] + "."
        # a heterophily study rewires graphs to several target homophilies; graphs that differ
        # only between seeds are no study
        het = [g for g in gs if any(_homophily(r) for r in g.runs)]
        if _distinct(het, _rewire_target) > 1 and _distinct(het, _homophily_value) > 1:
            study = plot_xy(het, _homophily_value, "edge homophily of the graph used", "graph.rewire_homophily",
                            out / f"heterophily_{slug}.png", f"{s}: test metric vs edge homophily",
                            xlim=(-0.05, 1.05))
            if study:
                figures[s].append(f"heterophily_{slug}.png")
                captions[f"heterophily_{slug}.png"] = study["title"] + "."

    kept = sum(len(g.runs) for g in groups)
    lines = ["# Results", "",
             f"{kept} runs in {len(groups)} groups, read from `summary.json` / `metrics.jsonl` of: "
             + ", ".join(f"`{p}`" for p in run_dirs) + ".",
             "Cells: test metric at the end of training, mean ± sample std (ddof=1) over seeds (a single run: "
             "its value). Bold: best per column (max for accuracy, min for loss / mse / mae / rmse).", "",
             "## Main table", "", main_table(groups), ""]
    if reference is not None:
        from shn.paired import compare, markdown

        rows = compare([d for d in run_dirs if Path(d).is_dir()], reference=reference, out=out)
        if rows:
            lines[4:4] = ["## Paired comparison", "",
                          f"Test metric at the best validation round, mean ± std over seeds; Δ = method − {reference} "
                          "on the same seeds with a 95 % t-interval; win / loss when it excludes 0.", "",
                          markdown(rows, reference), ""]
    duplicates = [(d, k) for g in groups for d, k in g.duplicates]
    if duplicates:
        lines[-4:-4] = [f"**Duplicates counted once** ({len(duplicates)}): same config and seed as a kept run — "
                        + "; ".join(f"`{d.path}` (kept `{k.path}`)" for d, k in duplicates) + ".", ""]
    for s in settings:
        gs = [g for g in groups if g.setting == s]
        lines += [f"## {s}", "", detail_table(gs), ""]
        naive = baselines_table(gs)
        if naive is not None:
            lines += ["Naive forecasts on the same test targets:", "", naive, ""]
        horizons = horizon_table(gs)
        if horizons is not None:
            lines += ["Per forecast horizon (steps ahead):", "", horizons, ""]
        for fig in figures[s]:
            lines += [f"![{fig}]({fig})", ""] + ([f"*{captions[fig]}*", ""] if fig in captions else [])
    lines += ["Per-group numbers: `results.csv`; per-run numbers and run directories: `runs.csv`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
