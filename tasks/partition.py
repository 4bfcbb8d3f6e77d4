"""Label-skew partitions of a labelled dataset over federated clients.

Every partitioner takes the labels of the three global splits (train, val, test), decides once
*which* classes each client holds and *what share* of each class it gets, and applies that same
decision to all three splits — as pFedHN does — so a client's validation and test data follow its
training distribution. Pure numpy; every random choice comes from the ``numpy.random.Generator``
passed in, so a seed reproduces the partition exactly.

Indices returned are positions in the corresponding split's label array, sorted ascending.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Partition",
    "pathological_partition",
    "dirichlet_partition",
    "clustered_partition",
    "iid_partition",
]

# pFedHN draws each client's share of a class from U(0.4, 0.6) before normalising.
_LOW_SHARE, _HIGH_SHARE = 0.4, 0.6


@dataclass(frozen=True)
class Partition:
    """Per-client sample indices into the global train / val / test splits.

    ``label_sets[i]`` is the set of classes client ``i`` was assigned (for Dirichlet and IID, the
    classes present in its train indices). ``groups[i]`` is the cluster of client ``i`` for the
    clustered partition, ``None`` otherwise.
    """

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]
    label_sets: list[frozenset[int]]
    groups: list[int] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.train)


# -- checks -------------------------------------------------------------------------------------

def _as_labels(labels: np.ndarray, split: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels_{split} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels_{split} must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"labels_{split} must be non-negative class ids, found {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _prepare(labels_train, labels_val, labels_test, num_clients: int, num_classes: int | None):
    splits = (_as_labels(labels_train, "train"), _as_labels(labels_val, "val"), _as_labels(labels_test, "test"))
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if splits[0].size == 0:
        raise ValueError("labels_train is empty: nothing to partition")
    seen = max(int(s.max()) + 1 for s in splits if s.size)
    if num_classes is None:
        num_classes = seen
    elif num_classes < seen:
        raise ValueError(f"num_classes={num_classes} but the labels contain class {seen - 1}")
    return splits, int(num_clients), int(num_classes)


def _check_classes_per_client(classes_per_client: int, num_classes: int) -> None:
    if not isinstance(classes_per_client, (int, np.integer)) or not 1 <= classes_per_client <= num_classes:
        raise ValueError(
            f"classes_per_client must be an integer in [1, {num_classes}] (the number of classes), "
            f"got {classes_per_client!r}"
        )


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")


def _require_nonempty_train(train: list[np.ndarray], hint: str) -> None:
    empty = [i for i, idx in enumerate(train) if idx.size == 0]
    if empty:
        raise ValueError(f"clients {empty[:10]}{'...' if len(empty) > 10 else ''} got no training samples; {hint}")


# -- shared machinery ---------------------------------------------------------------------------

def _balanced_class_sets(num_holders: int, classes_per_holder: int, num_classes: int, rng) -> list[list[int]]:
    """Give each holder ``classes_per_holder`` distinct classes, every class used equally often
    (counts differ by at most one when ``num_holders * classes_per_holder`` is not a multiple of
    ``num_classes``).

    pFedHN's rule: each class starts with a quota of uses; a holder takes the classes with the
    largest remaining quota, ties broken at random. Taking the top ``k`` *distinct* classes keeps
    the quotas feasible (no class needs more holders than remain), so no client gets a class twice.
    """
    total = num_holders * classes_per_holder
    quota = np.full(num_classes, total // num_classes, dtype=np.int64)
    quota[rng.permutation(num_classes)[: total % num_classes]] += 1
    sets = []
    for _ in range(num_holders):
        tie_break = rng.random(num_classes)
        order = np.lexsort((tie_break, -quota))  # largest quota first, random among equals
        chosen = np.sort(order[:classes_per_holder])
        quota[chosen] -= 1
        sets.append([int(c) for c in chosen])
    return sets


def _holder_shares(class_sets: list[list[int]], num_classes: int, rng) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each class: (holders, shares), shares ~ U(0.4, 0.6) normalised to sum to one."""
    holders: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for client, classes in enumerate(class_sets):
        for c in classes:
            holders[c].append(client)
    out = {}
    for c in range(num_classes):
        if holders[c]:
            raw = rng.uniform(_LOW_SHARE, _HIGH_SHARE, size=len(holders[c]))
            out[c] = (np.asarray(holders[c], dtype=np.int64), raw / raw.sum())
    return out


def _split_by_shares(labels: np.ndarray, shares: dict[int, tuple[np.ndarray, np.ndarray]], num_clients: int, rng):
    """Cut each class of one split among its holders by the given shares (all samples used)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, (holders, props) in shares.items():
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            continue
        idx = idx[rng.permutation(idx.size)]
        bounds = np.round(np.cumsum(props) * idx.size).astype(np.int64)
        bounds[-1] = idx.size
        for client, piece in zip(holders, np.split(idx, bounds[:-1])):
            parts[int(client)].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts]


def _apply(splits, shares, num_clients: int, rng):
    return [_split_by_shares(labels, shares, num_clients, rng) for labels in splits]


# -- partitioners -------------------------------------------------------------------------------

def pathological_partition(
    labels_train: np.ndarray,
    labels_val: np.ndarray,
    labels_test: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    rng: np.random.Generator,
    *,
    num_classes: int | None = None,
) -> Partition:
    """pFedHN's pathological split (``experiments/dataset.py``: ``gen_classes_per_node`` +
    ``gen_data_split``).

    Each client gets ``classes_per_client`` distinct classes with every class used (about) equally
    often; each class is divided among the clients holding it with shares drawn U(0.4, 0.6) then
    normalised. The same classes and shares are applied to train, val and test.

    Unlike pFedHN, ``num_clients * classes_per_client`` need not be a multiple of the number of
    classes (class usage then differs by at most one), a client never gets the same class twice,
    and rounding remainders go to the last holder instead of being dropped.

    Args:
        labels_train, labels_val, labels_test: ``[N_split]`` integer class ids.
        num_classes: defaults to ``max label + 1``.
    """
    _check_rng(rng)
    splits, num_clients, num_classes = _prepare(labels_train, labels_val, labels_test, num_clients, num_classes)
    _check_classes_per_client(classes_per_client, num_classes)
    class_sets = _balanced_class_sets(num_clients, int(classes_per_client), num_classes, rng)
    return _label_skew_partition(splits, class_sets, None, num_classes, num_clients, rng)


def _label_skew_partition(splits, class_sets, groups, num_classes: int, num_clients: int, rng) -> "Partition":
    """Each class's samples shared among the clients holding it (U(0.4, 0.6) proportions),
    the same shares in train, val and test."""
    shares = _holder_shares(class_sets, num_classes, rng)
    train, val, test = _apply(splits, shares, num_clients, rng)
    _require_nonempty_train(train, "too few training samples per class for this many clients (or a class has none)")
    return Partition(train, val, test, [frozenset(s) for s in class_sets], groups)


def clustered_partition(
    labels_train: np.ndarray,
    labels_val: np.ndarray,
    labels_test: np.ndarray,
    num_clients: int,
    num_groups: int,
    classes_per_client: int,
    rng: np.random.Generator,
    *,
    num_classes: int | None = None,
) -> Partition:
    """Clients in ``num_groups`` equal groups; all clients of a group share the group's class set.

    Client ``i`` belongs to group ``i // (num_clients // num_groups)``. Group class sets are
    disjoint when ``num_groups * classes_per_client <= num_classes``, otherwise classes are reused
    as evenly as possible (pFedHN's balanced rule applied to groups). Each class is divided among
    all clients holding it with U(0.4, 0.6) shares, so within a group the split is pathological.
    A ground-truth cluster structure for testing graph learners.
    """
    _check_rng(rng)
    splits, num_clients, num_classes = _prepare(labels_train, labels_val, labels_test, num_clients, num_classes)
    _check_classes_per_client(classes_per_client, num_classes)
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
    if num_clients % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_clients={num_clients} (groups are equal-sized)")
    cpc, per_group = int(classes_per_client), num_clients // int(num_groups)
    if num_groups * cpc <= num_classes:
        perm = rng.permutation(num_classes)
        group_sets = [sorted(int(c) for c in perm[g * cpc:(g + 1) * cpc]) for g in range(num_groups)]
    else:
        group_sets = _balanced_class_sets(int(num_groups), cpc, num_classes, rng)
    groups = [i // per_group for i in range(num_clients)]
    class_sets = [group_sets[g] for g in groups]
    return _label_skew_partition(splits, class_sets, groups, num_classes, num_clients, rng)


def dirichlet_partition(
    labels_train: np.ndarray,
    labels_val: np.ndarray,
    labels_test: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 10,
    max_tries: int = 1000,
    num_classes: int | None = None,
) -> Partition:
    """Per-class Dirichlet(``alpha``) shares over clients (the "complex non-IID" split).

    For each class, shares ``p ~ Dir(alpha * 1_num_clients)`` are drawn and the class is cut by
    them in all three splits. Shares are redrawn (all classes) until every client has at least
    ``min_size`` training samples; after ``max_tries`` draws a ValueError suggests a fix. Small
    ``alpha`` → strong label skew. ``label_sets[i]`` = classes present in client ``i``'s train data
    (val / test labels are a subset up to rounding, as they use the same shares).
    """
    _check_rng(rng)
    splits, num_clients, num_classes = _prepare(labels_train, labels_val, labels_test, num_clients, num_classes)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size!r}")
    if num_clients * min_size > splits[0].size:
        raise ValueError(
            f"min_size={min_size} x num_clients={num_clients} exceeds the {splits[0].size} training samples"
        )
    class_counts = np.bincount(splits[0], minlength=num_classes)
    present = [c for c in range(num_classes) if class_counts[c] > 0 or np.any(splits[1] == c) or np.any(splits[2] == c)]
    everyone = np.arange(num_clients, dtype=np.int64)
    for _ in range(max_tries):
        props = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(present))
        # Train sizes implied by these shares, computed exactly as _split_by_shares will cut.
        bounds = np.round(np.cumsum(props, axis=1) * class_counts[present][:, None]).astype(np.int64)
        bounds[:, -1] = class_counts[present]
        sizes = np.diff(bounds, axis=1, prepend=0).sum(axis=0)
        if sizes.min() >= min_size:
            break
    else:
        raise ValueError(
            f"dirichlet_partition: after {max_tries} draws some client still had fewer than min_size={min_size} "
            f"training samples (alpha={alpha}, num_clients={num_clients}); raise alpha or lower min_size / num_clients"
        )
    shares = {c: (everyone, props[k]) for k, c in enumerate(present)}
    train, val, test = _apply(splits, shares, num_clients, rng)
    label_sets = [frozenset(int(c) for c in np.unique(splits[0][idx])) for idx in train]
    return Partition(train, val, test, label_sets, None)


def iid_partition(
    labels_train: np.ndarray,
    labels_val: np.ndarray,
    labels_test: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    num_classes: int | None = None,
) -> Partition:
    """Uniformly random, equal-sized (±1) shards of each split; no label skew."""
    _check_rng(rng)
    splits, num_clients, num_classes = _prepare(labels_train, labels_val, labels_test, num_clients, num_classes)
    if num_clients > splits[0].size:
        raise ValueError(f"num_clients={num_clients} exceeds the {splits[0].size} training samples")
    train, val, test = (
        [np.sort(part) for part in np.array_split(rng.permutation(labels.size), num_clients)] for labels in splits
    )
    label_sets = [frozenset(int(c) for c in np.unique(splits[0][idx])) for idx in train]
    return Partition(list(train), list(val), list(test), label_sets, None)
