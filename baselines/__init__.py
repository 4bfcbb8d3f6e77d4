"""Federated methods, one small file each; importing this package registers them all."""

from baselines import attentive, decoupled, fedavg, fedper, ghn, local, panacea, pfedhn, shn  # noqa: F401
