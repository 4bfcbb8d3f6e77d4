"""The Flower engine (``shn.flower.engine``): any registered method as a Flower ServerApp +
ClientApp, numerically equal to the in-process engine. See ``shn.flower.engine`` for the
protocol and run config, ``flower_app/`` for the Flower app and the README section "Running across machines with Flower" for deployment.

Importing this package does not import Flower; the engine's names are loaded on first use.
"""

from __future__ import annotations

from typing import Any

from shn.flower.cli import add_flower_parser

__all__ = [
    "add_flower_parser", "make_server_app", "make_client_app", "run_federation", "run_in_process", "simulate",
    "resolve_run_config", "InProcessGrid", "FlowerSimulation", "cohort_trainer", "StatePersonal",
]


def __getattr__(name: str) -> Any:
    if name == "simulate":
        from shn.flower.simulation import simulate

        return simulate
    if name == "cohort_trainer":
        from shn.federated.local import cohort_trainer

        return cohort_trainer
    if name in __all__:
        from shn.flower import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'shn.flower' has no attribute {name!r}")
