"""shn — personalized federated learning with (sheaf) hypernetworks.

The public API: configs (typed, frozen dataclasses), ``run`` / ``run_pipeline`` / ``load_run``,
the method, task and encoder registries, and the building blocks (``HyperNetwork``,
``SheafDiffusion``, ``ClientGraph`` and its builders, ``LocalTrainer``, ``Simulation``).
"""

from shn.config import (
    ConfigError,
    EncoderConfig,
    GraphConfig,
    HyperNetworkConfig,
    LocalConfig,
    RunConfig,
    ServerConfig,
    TaskConfig,
    ValidationConfig,
    config_from_dict,
    load_config,
)
from shn.registry import available_tasks, register_task
from shn.hypernetwork import Encoder, HyperNetwork
from shn.sheaf import SheafDiffusion
from shn.graph import (
    ClientGraph,
    LearnedGraph,
    build_graph,
    complete_graph,
    given_graph,
    knn_graph,
    threshold_graph,
)
from shn.federated.algorithm import Algorithm, GlobalModelAlgorithm, HyperNetworkAlgorithm
from shn.federated.client_method import ClientFit, ClientMethod, ClientRound, proximal_penalty
from shn.federated.local import ClientStore, LocalObjective, LocalTrainer
from shn.federated.simulation import Simulation
from shn.methods import MethodContext, available_methods, register_encoder, register_method
from tasks.base import ClientData, Task

import baselines  # noqa: E402,F401  (registers the built-in methods)
import tasks  # noqa: E402,F401  (registers the built-in tasks)
from shn.pipeline import run_pipeline  # noqa: E402
from shn.runner import RunResult, load_run, run  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ClientData",
    "ClientFit",
    "ClientGraph",
    "ClientMethod",
    "ClientRound",
    "ClientStore",
    "ConfigError",
    "Encoder",
    "EncoderConfig",
    "GlobalModelAlgorithm",
    "GraphConfig",
    "HyperNetwork",
    "HyperNetworkAlgorithm",
    "HyperNetworkConfig",
    "LearnedGraph",
    "LocalConfig",
    "LocalObjective",
    "LocalTrainer",
    "MethodContext",
    "RunConfig",
    "RunResult",
    "ServerConfig",
    "SheafDiffusion",
    "Simulation",
    "Task",
    "TaskConfig",
    "ValidationConfig",
    "available_methods",
    "available_tasks",
    "build_graph",
    "complete_graph",
    "config_from_dict",
    "given_graph",
    "knn_graph",
    "load_config",
    "load_run",
    "proximal_penalty",
    "register_encoder",
    "register_method",
    "register_task",
    "run",
    "run_pipeline",
    "threshold_graph",
]
