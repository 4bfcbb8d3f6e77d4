"""An optuna objective written with shn's Python API — what ``shn sweep`` does, by hand.

    python experiments/objective.py                       # 8 trials on the digits quickstart
    python experiments/objective.py CONFIG --trials 20 --storage sqlite:///sweeps/mine.db

``make_objective(config)`` returns ``objective(trial) -> float``: it samples a few
hyperparameters, runs ``shn.run`` with them, reports the **validation** primary metric after
every evaluation (so optuna's pruner can stop bad trials early) and returns the final validation
value; test metrics are never looked at. Edit ``suggest`` to search other parameters. (``shn
sweep`` reads the search space from the config's ``[sweep]`` table instead, and its
``shn.sweep.Objective`` can be passed to ``study.optimize`` the same way.)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable

import optuna

import shn
from shn.config import RunConfig
from shn.runner import make_task, primary_metric


def suggest(trial: optuna.Trial, config: RunConfig) -> RunConfig:
    """The search space: server and client learning rates, local steps."""
    return dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, lr=trial.suggest_float("server.lr", 1e-3, 1e-1, log=True)),
        local=dataclasses.replace(
            config.local,
            lr=trial.suggest_float("local.lr", 1e-3, 5e-2, log=True),
            steps=trial.suggest_int("local.steps", 5, 25, step=5),
        ),
    )


def make_objective(config: RunConfig, run_root: str | None = None) -> tuple[Callable[[optuna.Trial], float], str]:
    """(objective, direction) for ``config``; the task is built once and shared by the trials."""
    task = make_task(config)
    name, mode = primary_metric(task)
    key = f"val_{name}"

    def objective(trial: optuna.Trial) -> float:
        cfg = suggest(trial, config)

        def on_eval(round_: int, record: dict[str, Any]) -> None:
            value = record.get(key)
            if value is None or not math.isfinite(value):
                return
            trial.report(value, round_)
            if round_ < cfg.rounds and trial.should_prune():
                raise optuna.TrialPruned()

        run_dir = None if run_root is None else f"{run_root}/trial{trial.number:04d}"
        result = shn.run(cfg, task=task, run_dir=run_dir, progress=False, on_eval=on_eval)
        value = result.metrics.get(key)
        if value is None or not math.isfinite(value):
            raise optuna.TrialPruned(f"{key} is {value!r}")  # a diverged run
        return value

    return objective, "maximize" if mode == "max" else "minimize"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="experiments/configs/quickstart.toml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--storage", default=None, help="optuna storage URL (default: in memory)")
    parser.add_argument("--set", dest="overrides", action="append",
                        default=["rounds=30", "eval_every=10", "task.num_clients=6"])
    args = parser.parse_args()
    config = shn.load_config(args.config, args.overrides)
    objective, direction = make_objective(config)
    study = optuna.create_study(study_name="objective-example", storage=args.storage, load_if_exists=True,
                                direction=direction, sampler=optuna.samplers.TPESampler(seed=config.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    study.optimize(objective, n_trials=args.trials)
    print("best", study.best_value, study.best_params)


if __name__ == "__main__":
    main()
