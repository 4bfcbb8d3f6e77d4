"""The server side of a round, shared by all engines: sample clients, validate what comes back,
apply the accepted updates. Nothing a client sends reaches the algorithm unchecked."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

from shn.config import ValidationConfig
from shn.federated.algorithm import Algorithm
from shn.federated.validation import Rejection, RejectionLog, safe_validate_update
from shn.seeding import torch_generator


class ClientSampler:
    """The seeded client-sampling stream: round r's clients depend only on (seed, r, pool, k),
    so every method run with the same seed sees the same clients, and resume is exact."""

    def __init__(self, seed: int, pool: Sequence[int], per_round: int) -> None:
        if not pool:
            raise ValueError("no clients to sample from")
        self.seed = seed
        self.pool = [int(c) for c in pool]
        self.per_round = min(per_round, len(self.pool))

    def clients(self, round_: int) -> list[int]:
        g = torch_generator(self.seed, "client-sampling", round_)
        order = torch.randperm(len(self.pool), generator=g)[: self.per_round]
        return sorted(self.pool[i] for i in order.tolist())


class Server:
    def __init__(self, algorithm: Algorithm, validation: ValidationConfig) -> None:
        self.algorithm = algorithm
        self.validation = validation
        self.rejections = RejectionLog()

    def weights_for(self, clients: Sequence[int]) -> dict[str, Tensor]:
        return self.algorithm.weights_for(clients)

    def receive(self, round_: int, clients: Sequence[int], deltas: Sequence[Mapping[str, Tensor]],
                num_examples: Sequence[object]) -> dict[str, float]:
        """Validate each client's delta, then one server update from the accepted ones."""
        spec = self.algorithm.server_spec
        if not spec.names:  # nothing is shared (Local)
            return {"accepted": float(len(clients)), "rejected": 0.0}
        dtype = torch.float32
        keep_c, keep_d, keep_n = [], [], []
        for c, d, n in zip(clients, deltas, num_examples):
            reason = safe_validate_update(spec, d, n, self.validation.max_norm, dtype)
            if reason is not None:
                self.rejections.add(round_, Rejection(int(c), reason))
                continue
            keep_c.append(int(c))
            keep_d.append(self._clip(d))
            keep_n.append(int(n))
        metrics: dict[str, float] = {"accepted": float(len(keep_c)), "rejected": float(self.rejections.count(round_))}
        if keep_c:
            stacked = {k: torch.stack([d[k] for d in keep_d]) for k in spec.names}
            metrics.update(self.algorithm.apply_updates(keep_c, stacked, torch.tensor(keep_n)))
        return metrics

    def _clip(self, delta: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        bound = self.validation.clip_norm
        if bound <= 0:
            return delta
        norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))
        if norm <= bound:
            return delta
        return {k: t * (bound / norm) for k, t in delta.items()}


def unstack(stacked: Mapping[str, Tensor], count: int) -> list[dict[str, Tensor]]:
    return [{k: v[i] for k, v in stacked.items()} for i in range(count)]
