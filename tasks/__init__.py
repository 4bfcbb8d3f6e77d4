"""Federated tasks: datasets, partitions, target models, losses and metrics.

Importing this package registers the built-in tasks: digits, mnist, cifar10, cifar100
(classification), traffic and weather (forecasting)."""

from tasks import classification, traffic, weather  # noqa: F401  (registration)
from tasks.base import ClientData, Split, Task

__all__ = ["ClientData", "Split", "Task"]
