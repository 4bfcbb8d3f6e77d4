"""The server side of a round, shared by all engines: sample clients, validate what comes back,
apply the accepted updates. Nothing a client sends reaches the algorithm unchecked."""

from __future__ import annotations

import logging
import math
import statistics
from typing import Collection, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from shn.config import ValidationConfig
from shn.federated.algorithm import Algorithm
from shn.federated.validation import (
    MAX_EXAMPLES,
    Rejection,
    RejectionLog,
    check_client_ids,
    example_count,
    safe_validate_update,
)
from shn.seeding import torch_generator

log = logging.getLogger("shn.validation")

OUTLIER_FACTOR = 100  # a claimed example count this many times the round's median is logged


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
    """Validates what clients send, then applies the accepted updates.

    Args:
        algorithm: the method's server side.
        validation: ``max_norm``, ``clip_norm`` and ``max_examples``.
        clients: the ids that may send updates (the run's training clients); None: every id the
            algorithm has state for (a hypernetwork's embeddings), else any id ≥ 0.
        max_examples: the largest example count a client may claim (default
            ``validation.max_examples``, whose default is :data:`MAX_EXAMPLES` = 10**9).
    """

    def __init__(self, algorithm: Algorithm, validation: ValidationConfig, *, clients: Iterable[int] | None = None,
                 max_examples: int | None = None) -> None:
        self.algorithm = algorithm
        self.validation = validation
        self.rejections = RejectionLog()
        self.clients: Collection[int] | None = (frozenset(int(c) for c in clients) if clients is not None
                                                else _known_clients(algorithm))
        self.max_examples = int(max_examples or getattr(validation, "max_examples", MAX_EXAMPLES))

    def weights_for(self, clients: Sequence[int]) -> dict[str, Tensor]:
        return self.algorithm.weights_for(clients)

    def receive(self, round_: int, clients: Sequence[object], deltas: Sequence[Mapping[str, Tensor]],
                num_examples: Sequence[object]) -> dict[str, float]:
        """Validate each client's id and delta, then one server update from the accepted ones.

        Rejected (logged, counted, never applied): an id that is not an integer, not a training
        client, or repeated within the round; every client of a round whose lists of ids, deltas
        and counts differ in length (the pairing is ambiguous); an update that fails
        :func:`~shn.federated.validation.validate_update`. FedAvg's example weighting uses the
        claimed counts, each at most ``max_examples``; a count above ``OUTLIER_FACTOR`` times
        the round's median is logged.
        """
        clients, deltas, num_examples = list(clients), list(deltas), list(num_examples)
        if not (len(clients) == len(deltas) == len(num_examples)):
            why = (f"{len(clients)} client ids, {len(deltas)} updates and {len(num_examples)} example counts: "
                   "the pairing is ambiguous, the round's updates are all rejected")
            for c in clients:
                self.rejections.add(round_, Rejection(_shown(c), why))
            return {"accepted": 0.0, "rejected": float(self.rejections.count(round_))}
        bad_ids = check_client_ids(clients, self.clients)
        spec = self.algorithm.server_spec
        if not spec.names:  # nothing is shared (Local)
            for i, why in bad_ids.items():
                self.rejections.add(round_, Rejection(_shown(clients[i]), why))
            return {"accepted": float(len(clients) - len(bad_ids)), "rejected": float(self.rejections.count(round_))}
        dtype = torch.float32
        keep_c, keep_d, keep_n = [], [], []
        for i, (c, d, n) in enumerate(zip(clients, deltas, num_examples)):
            reason = bad_ids.get(i) or safe_validate_update(spec, d, n, self.validation.max_norm, dtype,
                                                           self.max_examples)
            if reason is not None:
                self.rejections.add(round_, Rejection(_shown(c), reason))
                continue
            keep_c.append(int(c))  # type: ignore[call-overload]
            keep_d.append(self._clip(d))
            keep_n.append(example_count(n, self.max_examples))
        metrics: dict[str, float] = {"accepted": float(len(keep_c)), "rejected": float(self.rejections.count(round_))}
        if keep_c:
            _log_outliers(round_, keep_c, keep_n)
            stacked = {k: torch.stack([d[k] for d in keep_d]) for k in spec.names}
            metrics.update(self.algorithm.apply_updates(keep_c, stacked, torch.tensor(keep_n, dtype=torch.long)))
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


def _known_clients(algorithm: Algorithm) -> frozenset[int] | None:
    n = getattr(algorithm, "num_clients", None) or getattr(getattr(algorithm, "hn", None), "num_clients", None)
    return frozenset(range(int(n))) if isinstance(n, int) else None


def _shown(client: object) -> int | str:
    """A client id for the rejection log: the int when it is one, else its repr (bounded)."""
    if isinstance(client, (int, np.integer)) and not isinstance(client, (bool, np.bool_)):
        return int(client)
    return repr(client)[:40]


def _log_outliers(round_: int, clients: Sequence[int], counts: Sequence[int]) -> None:
    if len(counts) < 3:
        return
    median = statistics.median(counts)
    for c, n in zip(clients, counts):
        if n > OUTLIER_FACTOR * median:
            log.warning("round %d: client %d claims %d examples, %.0fx the round's median %g", round_, c, n,
                        n / median, median)
