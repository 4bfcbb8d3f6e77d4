"""Simulated malicious clients (``[attack]``), for robustness studies.

The malicious clients are a seeded choice of ``round(fraction · N)`` of the task's N clients
(:func:`malicious_clients`), the same in every engine and every method run with that seed.

* Update attacks (``scale``, ``sign_flip``, ``random``) act on the client side, in
  :meth:`shn.federated.client.ClientRuntime.fit`, which both the in-process and the Flower engine
  run: a malicious client trains honestly (its personal tensors too) and then sends
  ``scale·Δ``, ``−scale·Δ`` or Gaussian noise instead of its delta Δ. The noise comes from a
  generator derived from the round's local-training seed and the client id, so it is identical in
  both engines and on resume.
* ``label_flip`` acts on the data: the malicious clients' *train* split gets its labels mapped
  through a seeded derangement of the classes (:func:`poison_data`, applied when the run's
  ``ClientStore`` is built); their val/test splits keep the true labels. The task is untouched.

Everything the server receives still goes through ``Server.receive``'s validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from shn.config import AttackConfig, ConfigError
from shn.seeding import torch_generator
from tasks.base import ClientData

UPDATE_ATTACKS = ("scale", "sign_flip", "random")


def malicious_clients(config: AttackConfig, seed: int, num_clients: int) -> tuple[int, ...]:
    """The sorted ids of the malicious clients: ``round(fraction · num_clients)`` of them (at
    least one when ``fraction > 0``), drawn from the run seed; none when ``kind = "none"``."""
    if config.kind == "none" or config.fraction <= 0 or num_clients <= 0:
        return ()
    count = min(num_clients, max(1, math.floor(config.fraction * num_clients + 0.5)))
    order = torch.randperm(num_clients, generator=torch_generator(seed, "malicious-clients"))
    return tuple(sorted(int(c) for c in order[:count]))


def label_permutation(seed: int, num_classes: int) -> Tensor:
    """A seeded derangement of ``range(num_classes)`` (no class keeps its label)."""
    if num_classes < 2:
        raise ConfigError(f"attack.kind = 'label_flip' needs at least 2 classes, the task has {num_classes}")
    g = torch_generator(seed, "label-flip")
    while True:
        perm = torch.randperm(num_classes, generator=g)
        if bool((perm != torch.arange(num_classes)).all()):
            return perm


@dataclass(frozen=True)
class ClientAttack:
    """The attack a run's malicious clients carry out (see the module docstring)."""

    config: AttackConfig
    malicious: frozenset[int]

    @classmethod
    def from_config(cls, config: AttackConfig, seed: int, num_clients: int) -> "ClientAttack | None":
        chosen = malicious_clients(config, seed, num_clients)
        return cls(config, frozenset(chosen)) if chosen else None

    @property
    def kind(self) -> str:
        return self.config.kind

    def corrupt(self, clients: Sequence[int], deltas: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """The deltas ``{name: [C, *shape]}`` the round's clients send: the malicious rows replaced
        as the attack says, the honest rows unchanged. ``generator`` is the round's local-training
        generator; only its seed is used (nothing is drawn from it)."""
        rows = [i for i, c in enumerate(clients) if int(c) in self.malicious]
        if not rows or self.kind not in UPDATE_ATTACKS:
            return dict(deltas)
        out = {k: v.clone() for k, v in deltas.items()}
        cfg = self.config
        for i in rows:
            if self.kind == "random":
                g = torch_generator(generator.initial_seed(), "attack-random", int(clients[i]))
                for k in sorted(out):
                    noise = torch.randn(out[k].shape[1:], generator=g, dtype=torch.float64) * cfg.noise_std
                    out[k][i] = noise.to(out[k].dtype).to(out[k].device)
            else:
                factor = cfg.scale if self.kind == "scale" else -cfg.scale
                for k in out:
                    out[k][i] = out[k][i] * factor
        return out

    def poison(self, data: Mapping[int, ClientData], seed: int, num_classes: int | None) -> dict[int, ClientData]:
        """``label_flip``: the malicious clients' train labels permuted; other data untouched."""
        data = dict(data)
        if self.kind != "label_flip":
            return data
        if num_classes is None:
            raise ConfigError("attack.kind = 'label_flip' needs a classification task (one with num_classes)")
        perm = label_permutation(seed, int(num_classes))
        for c in sorted(self.malicious):
            if c not in data:
                continue
            d = data[c]
            x, y, *rest = d.train
            data[c] = ClientData((x, perm.to(y.device)[y], *rest), d.val, d.test)
        return data
