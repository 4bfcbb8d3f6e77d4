"""Federated methods, one small file each; importing this package registers them all."""

from baselines import fedavg, local, pfedhn, shn  # noqa: F401
