"""``shn report RUN_DIR... --out DIR``: tables and figures from recorded run directories.

Scans the given folders recursively for ``summary.json`` (a pipeline run's own summary wins
over its stage sub-folders), groups runs that differ only in ``seed`` (and ``device``,
``checkpoint_every``) — two runs of a group with the same seed are one experiment recorded twice:
counted once, with a warning and a line in ``report.md``, never as two seeds — and writes to ``out``:

* ``report.md`` — the main table (rows: methods, columns: settings, cells: the test primary
  metric, mean ± sample std over seeds, best per column in bold: max for accuracy-like metrics,
  min for loss / mse / mae / rmse), one detail table per setting (more metrics, runs, seeds),
  the figures with captions;
* ``results.csv`` (one row per group: mean, std per metric) and ``runs.csv`` (one row per run);
* ``curves_<setting>.png`` — the *validation* primary metric (the tables report test) vs client
  updates (local trainings so far; a pipeline run's curve starts after its stage-1 updates, so a
  multi-stage method shows its full cost), one line per method: the mean over seeds, a ±1 std
  band, n in the legend;
* ``curves-bytes_<setting>.png`` instead, with ``--x bytes``: the same against cumulative
  communication (``bytes_total`` of the records: bytes sent to and received from clients so far,
  in MB; a pipeline run's stage 1 included) — accuracy vs bytes;
* ``graph_<setting>_<kind>.png`` — the client graph of one run of a graph method (its saved
  ``graph.json``; a given graph is rebuilt from the task), clients coloured by their class set,
  group, or placed at their coordinates; layout: spectral start + spring refinement in numpy;
* ``depth_<setting>.png`` — only for a depth study (``encoder.layers`` varies): test metric and,
  where the summary records it, ``encoder_dirichlet_energy`` (log or symlog axis, so a fall to 0
  shows) vs ``encoder.layers`` on a log-2 axis;
* ``heterophily_<setting>.png`` — only for a heterophily study (``graph.rewire_homophily`` varies):
  test metric vs the edge homophily of the graph actually used (``summary.graph``: class-set, else
  group, else label homophily).

Every figure states its split and metric, what the lines and bands are, and the seed count.

A setting is a task configuration (``task.*``); its label is the task name plus the task options
that differ between settings of the same task. A method label is the method name plus the
non-task options that differ between that method's groups within one setting (always
``graph.kind`` for graph methods). Every number comes from the recorded files.

Modules: :mod:`~shn.report.runs` (discovery, loading, grouping and labels),
:mod:`~shn.report.tables` (markdown tables, CSVs), :mod:`~shn.report.figures` (plots) and
:mod:`~shn.report.writer` (:func:`build_report`, the ``shn report`` command).
"""

from __future__ import annotations

from shn.report.figures import plot_curves, plot_graph, plot_xy, spring_layout
from shn.report.runs import IGNORED_KEYS, Group, Run, find_runs, flatten, group_runs, load
from shn.report.tables import (
    MAXIMIZE,
    MINIMIZE,
    better,
    cell,
    detail_metrics,
    detail_table,
    horizon_table,
    main_table,
    markdown_table,
    write_csvs,
)
from shn.report.writer import build_report

__all__ = [
    "IGNORED_KEYS",
    "MAXIMIZE",
    "MINIMIZE",
    "Group",
    "Run",
    "better",
    "build_report",
    "cell",
    "detail_metrics",
    "detail_table",
    "find_runs",
    "flatten",
    "group_runs",
    "horizon_table",
    "load",
    "main_table",
    "markdown_table",
    "plot_curves",
    "plot_graph",
    "plot_xy",
    "spring_layout",
    "write_csvs",
]
