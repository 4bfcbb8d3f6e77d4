"""Federated tasks: datasets, partitions, target models, losses and metrics.

Importing this package registers the built-in tasks: digits, mnist, cifar10, cifar100
(classification), traffic and weather (forecasting), and the file-based tabular (a table with a
client column) and timeseries (long or wide time-series tables)."""

from tasks import classification, tabular, timeseries, traffic, weather  # noqa: F401  (registration)
from tasks.base import ClientData, Split, Task

__all__ = ["ClientData", "Split", "Task"]
