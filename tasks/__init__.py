"""Federated tasks: datasets, partitions, target models, losses and metrics.

Importing this package registers the built-in tasks (digits, mnist, cifar10, cifar100,
traffic, weather)."""

from tasks import classification  # noqa: F401
from tasks.base import ClientData, Split, Task

try:  # forecasting tasks register themselves when their module is present
    from tasks import forecasting  # noqa: F401
except ImportError as e:  # pragma: no cover - only while the module is being written
    if "tasks.forecasting" not in str(e) and "forecasting" not in str(e):
        raise

__all__ = ["ClientData", "Split", "Task"]
