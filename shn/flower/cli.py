"""``shn flower ...``: kept apart from the engine so that ``shn --help`` does not import Flower."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_simulate(args: argparse.Namespace) -> int:
    import logging

    from shn.federated.records import dumps_json
    from shn.flower.simulation import simulate

    logging.getLogger("flwr").propagate = False  # Flower prints its own log lines; no duplicates
    result = simulate(args.config, overrides=args.overrides, supernodes=args.supernodes, run_dir=args.out,
                      cpus_per_client=args.cpus_per_client, verbose=args.flower_verbose, overwrite=args.force,
                      resume=args.resume)
    metrics = {k: round(v, 4) for k, v in result.summary["metrics"].items() if k.startswith(("test_", "val_"))}
    print(dumps_json({"run_dir": str(result.run_dir), "method": result.config.method,
                      "task": result.config.task.name, "failed_clients": result.summary["failed_clients"],
                      "rejected_updates": result.summary["rejected_updates"], **metrics}))
    return 0


def add_flower_parser(sub: Any) -> None:
    """``shn flower simulate CONFIG [--supernodes N] [--set KEY=VALUE]... [--out DIR]``.

    Deployment (SuperLink + SuperNodes, TLS, node authentication) uses ``flwr run`` on the app in
    ``flower_app/``; the commands are in the README section "Running across machines with Flower".
    """
    p = sub.add_parser("flower", help="run on Flower: simulation here; deployment via flwr run (README: Running across machines with Flower)")
    fsub = p.add_subparsers(dest="flower_command", required=True)
    s = fsub.add_parser("simulate", help="the Flower app on Flower's simulation runtime (flwr run against a "
                                         "SuperLink in simulation mode that this command starts and stops)")
    s.add_argument("config", help="TOML config file (as for shn run)")
    s.add_argument("--supernodes", type=int, default=None, help="simulated SuperNodes (default: the task's clients)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rounds=5 (repeatable)")
    s.add_argument("--out", default=None, help="run directory (default runs/flower/<method>-<task>-seed<seed>)")
    s.add_argument("--force", action="store_true", help="replace a run found in --out (else it is refused)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (same "
                                                         "numbers as an uninterrupted run; rounds may grow)")
    s.add_argument("--cpus-per-client", type=int, default=1, help="CPUs per simulated ClientApp (a whole number, default 1)")
    s.add_argument("--flower-verbose", action="store_true", help="Flower's verbose logging, and print the run's log")
    s.set_defaults(func=_cmd_simulate)
