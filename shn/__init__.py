"""shn — personalized federated learning with (sheaf) hypernetworks."""

from shn.config import (ConfigError, EncoderConfig, GraphConfig, HyperNetworkConfig, LocalConfig, RunConfig,
                        ServerConfig, TaskConfig, ValidationConfig, config_from_dict, load_config)
from shn.registry import METHODS, TASKS

import baselines  # noqa: E402,F401  (registers the methods)
import tasks  # noqa: E402,F401  (registers the tasks)
from shn.runner import RunResult, load_run, run  # noqa: E402

__version__ = "0.1.0"
