"""The ``shn`` command line.

    shn run CONFIG [--set KEY=VALUE]... [--out DIR] [--resume | --force]
    shn pipeline CONFIG [...]         three-stage SHN: pFedHN → graph from embeddings → SHN
    shn sweep CONFIG --trials N --storage URL [--workers W] [--study NAME]   N more trials
    shn suite SUITE.toml [--jobs N]   every (method, task, seed) of a comparison, resumable
    shn compare SUITE_OUT... [--reference pfedhn]   paired Δ over seeds with 95 % CIs and verdicts
    shn report RUN_DIR... [--out DIR] tables and plots from recorded metrics
    shn inspect CONFIG [--set KEY=VALUE]... [--json]   load the task: clients, split sizes, inputs, graph degree
    shn config [--defaults | CONFIG] [--markdown]   every config key: type, default, meaning (or CONFIG's values)
    shn flower simulate CONFIG [--supernodes N] [--set KEY=VALUE]...   the Flower engine (README: Running across machines with Flower)

``shn --threads N <command>`` caps torch's CPU threads (several experiments side by side: N=1
each; oversubscribed cores make torch several times slower). ``shn --allocator system`` leaves
glibc's malloc at its defaults (``SHN_ALLOCATOR=system``); by default freed memory is kept for the
next training step (:mod:`shn.allocator`: the same numbers, fewer page faults). ``shn --plugin MODULE <command>``
(repeatable) imports a module that registers methods, tasks or encoders first; installed
``shn.plugins`` entry points are always loaded (:mod:`shn.plugins`).

User errors (bad config, missing or malformed file, an unsafe or foreign checkpoint, a full disk,
a run directory in use by another process, holding a run that would be replaced, or resumed with
another config) end in one line on stderr and exit code 2; a run whose metrics go non-finite (diverged) ends in
one line and exit code 1. Printed JSON is strict (non-finite numbers as null).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from shn.federated.records import dumps_json


class UserError(Exception):
    """Raised for errors a user can fix; printed as one line, exit code 2."""


def default_run_dir(config_path: str | Path, method: str, task: str, seed: int) -> Path:
    return Path("runs") / Path(config_path).stem / f"{method}-{task}-seed{seed}"


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set server.lr=0.01 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<config>/<method>-<task>-seed<seed>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last checkpoint (same config; more rounds extend it)")
    again.add_argument("--force", action="store_true",
                       help="replace the run in --out (its checkpoints, metrics and summary are removed first)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_run(args: argparse.Namespace, pipeline: bool = False) -> int:
    from shn.config import load_config
    from shn.runner import run

    config = load_config(args.config, args.overrides)
    run_dir = Path(args.out) if args.out else default_run_dir(args.config, config.method, config.task.name, config.seed)
    if pipeline:
        from shn.pipeline import run_pipeline

        result = run_pipeline(config, run_dir=run_dir, resume=args.resume, overwrite=args.force,
                              progress=not args.no_progress)
    else:
        result = run(config, run_dir=run_dir, resume=args.resume, overwrite=args.force, progress=not args.no_progress)
    metrics = {k: round(v, 4) for k, v in result.summary["metrics"].items()
               if k.startswith(("test_", "val_")) and isinstance(v, (int, float))}
    print(dumps_json({"run_dir": str(run_dir), "method": config.method, "task": config.task.name, **metrics}))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from shn.sweep import sweep

    best = sweep(args.config, trials=args.trials, storage=args.storage, workers=args.workers, study_name=args.study,
                 overrides=args.overrides, out=args.out, pruner=args.pruner, n_startup_trials=args.n_startup_trials,
                 n_warmup_steps=args.n_warmup_steps, progress=not args.no_progress)
    print(dumps_json(best))
    if best["best_config"] is None:
        print("shn: error: no trial completed, so there is no best config (see trials.csv)", file=sys.stderr)
        return 1
    return 0


def _cmd_suite(args: argparse.Namespace) -> int:
    from shn.suite import run_suite

    result = run_suite(args.suite, out=args.out, only=args.only, progress=not args.no_progress, jobs=args.jobs,
                       extra=args.overrides)
    print(dumps_json(result.as_dict()))
    return 1 if result.failed else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from shn.paired import compare, markdown

    rows = compare(args.roots, reference=args.reference, metric=args.metric, out=args.out)
    if not rows:
        print(f"shn: error: no <setting>/<method>/seed<s>/summary.json under {', '.join(args.roots)}", file=sys.stderr)
        return 2
    print(markdown(rows, args.reference), end="")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from shn.report import build_report

    path = build_report(args.run_dirs, out=args.out, reference=args.reference, x=args.x)
    print(path)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from shn.config import load_config
    from shn.inspect import format_description, inspect_config

    desc = inspect_config(load_config(args.config, args.overrides))
    print(dumps_json(desc) if args.json else format_description(desc))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from shn.config_reference import format_markdown, format_text, reference

    if args.config is not None and args.defaults:
        raise UserError("shn config: give either --defaults or a CONFIG, not both")
    config = None
    if args.config is not None:
        from shn.config import load_config

        config = load_config(args.config, args.overrides)
    elif args.overrides:
        raise UserError("shn config: --set needs a CONFIG")
    sections = reference(config, builtin_only=args.builtin_only)
    print(format_markdown(sections) if args.markdown else format_text(sections))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shn", description="Personalized FL with sheaf hypernetworks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's, all cores); use 1 per process "
                             "when running several experiments side by side")
    parser.add_argument("--allocator", choices=("keep", "system"), default="keep",
                        help="'keep' (default): glibc's malloc keeps memory that training steps free, so the next "
                             "step does not page-fault it in again (same numbers, 1.2-1.4x faster CPU rounds; "
                             "shn/allocator.py); 'system': glibc's defaults. No effect elsewhere than glibc")
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE (a module name, or a .py file) before the command, so the methods, "
                             "tasks and encoders it registers can be used; repeatable. Installed packages' "
                             "'shn.plugins' entry points are loaded too")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one experiment from a TOML config")
    _add_run_args(p)
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("pipeline", help="three-stage SHN: pFedHN → graph → SHN")
    _add_run_args(p)
    p.set_defaults(func=lambda a: _cmd_run(a, pipeline=True))
    p = sub.add_parser("sweep", help="optuna hyperparameter sweep over the config's [sweep] table")
    p.add_argument("config")
    p.add_argument("--trials", type=int, default=20, metavar="N",
                   help="trials to ADD to the study (default 20): on a resumed study, N more; 0 runs none and "
                        "only rewrites trials.csv and best.toml")
    p.add_argument("--storage", default=None, help="sqlite:///file.db or a journal file path (default: in the out dir)")
    p.add_argument("--workers", type=int, default=1, help="worker processes sharing the study")
    p.add_argument("--study", default=None, help="study name (default: the config's stem)")
    p.add_argument("--out", default=None, help="output directory (default sweeps/<study>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pruner", choices=("median", "none"), default="median",
                   help="median: optuna MedianPruner on the per-evaluation validation metric (default)")
    p.add_argument("--n-startup-trials", type=int, default=5, help="median pruner: trials before pruning starts")
    p.add_argument("--n-warmup-steps", type=int, default=0, help="median pruner: no pruning before this round")
    p.add_argument("--no-progress", action="store_true", help="no per-trial lines on stderr")
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("suite", help="run every (method, task, seed) of a suite, skipping finished runs")
    p.add_argument("suite")
    p.add_argument("--out", default=None)
    p.add_argument("--only", action="append", default=[],
                   help="run only runs whose '<entry name>/<method>' contains this (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, after the suite's own (e.g. device=\"cuda\")")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="worker processes (one torch thread each), one (entry, seed) group of runs at a time each")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_suite)
    p = sub.add_parser("compare", help="paired comparison over seeds: mean ± std, Δ to a reference with 95 %% CI, verdict")
    p.add_argument("roots", nargs="+", help="folders of <setting>/<method>/seed<s>/ runs (a suite's out)")
    p.add_argument("--reference", default="pfedhn", help="the method every other is paired with (default pfedhn)")
    p.add_argument("--metric", default=None, help="test metric (default: the runs' primary metric)")
    p.add_argument("--out", default=None, help="write paired.md and paired.csv here")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("report", help="markdown table + plots from run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="report")
    p.add_argument("--reference", default=None, metavar="METHOD",
                   help="add the paired comparison (Δ to METHOD over seeds, 95 %% CI, verdict) for suite outputs")
    p.add_argument("--x", choices=("updates", "bytes"), default="updates",
                   help="x-axis of the learning curves: client updates (default) or cumulative bytes (accuracy vs bytes)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("inspect", help="load the config's task and describe it (clients, splits, inputs, graph) without training")
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("config", help="every config key with its type, default and meaning (--defaults), or the "
                                      "values a CONFIG resolves to")
    p.add_argument("config", nargs="?", default=None, help="a TOML config: list its task's and method's keys with "
                                                         "the values it resolves to")
    p.add_argument("--defaults", action="store_true", help="every table, every task and method, with defaults "
                                                          "(the default without CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--markdown", action="store_true", help="a markdown page (docs/config.md is this for the built-ins)")
    p.add_argument("--builtin-only", action="store_true", help="leave out plugins' tasks and methods")
    p.set_defaults(func=_cmd_config)
    from shn.flower import add_flower_parser

    add_flower_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from shn.config import ConfigError

    try:
        from tasks.datasets import DataError
    except ImportError:  # pragma: no cover
        DataError = ValueError  # type: ignore[misc,assignment]
    from shn.federated.records import CheckpointError, WriteError
    from shn.federated.simulation import DivergedError
    from shn.rundir import RunDirError

    if args.threads is not None and args.threads < 1:
        print(f"shn: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    from shn.runner import torch_threads

    import os

    os.environ["SHN_ALLOCATOR"] = args.allocator  # read by every LocalTrainer (shn/allocator.py), children too

    try:
        from shn.plugins import load_plugins

        load_plugins(args.plugins)
        with torch_threads(args.threads):  # restored after: main() also runs in-process (tests)
            return int(args.func(args) or 0)
    except (ConfigError, DataError, CheckpointError, WriteError, RunDirError, UserError, FileNotFoundError) as e:
        print(f"shn: error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"shn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shn: interrupted (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
