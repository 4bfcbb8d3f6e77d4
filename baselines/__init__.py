"""Federated methods, one small file each; importing this package registers them all."""

from baselines import (  # noqa: F401
    attentive, decoupled, ditto, fedavg, fedper, fedprox, fedrep, ghn, local, panacea, pfedhn, shn,
)
