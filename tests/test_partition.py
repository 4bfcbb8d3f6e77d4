"""Invariants of the label-skew partitions in tasks.partition."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.partition import (
    Partition,
    clustered_partition,
    dirichlet_partition,
    iid_partition,
    pathological_partition,
)

NUM_CLASSES = 10


def _labels(per_class: int, seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(NUM_CLASSES), per_class)
    return np.random.default_rng(seed).permutation(y)


@pytest.fixture(scope="module")
def splits():
    return _labels(120, 1), _labels(12, 2), _labels(40, 3)


def _check_disjoint_cover(part: Partition, splits, *, full: bool) -> None:
    for name, labels in zip(("train", "val", "test"), splits):
        idx = getattr(part, name)
        allidx = np.concatenate(idx)
        assert np.unique(allidx).size == allidx.size, f"{name}: a sample is in two clients"
        assert allidx.min() >= 0 and allidx.max() < labels.size
        if full:
            assert allidx.size == labels.size, f"{name}: samples left unassigned"
        for i in idx:
            assert i.dtype.kind == "i" and np.all(np.diff(i) > 0)
    assert all(t.size > 0 for t in part.train)


def _classes(labels: np.ndarray, idx: np.ndarray) -> frozenset[int]:
    return frozenset(int(c) for c in np.unique(labels[idx]))


@pytest.mark.parametrize("num_clients,cpc", [(10, 2), (5, 2), (7, 3), (20, 2), (3, 10), (50, 1)])
def test_pathological_invariants(splits, num_clients, cpc):
    part = pathological_partition(*splits, num_clients, cpc, np.random.default_rng(0))
    assert part.num_clients == num_clients and part.groups is None
    _check_disjoint_cover(part, splits, full=True)
    for i in range(num_clients):
        assert len(part.label_sets[i]) == cpc
        for name, labels in zip(("train", "val", "test"), splits):
            assert _classes(labels, getattr(part, name)[i]) <= part.label_sets[i]
        assert _classes(splits[0], part.train[i]) == part.label_sets[i]
    # every class used equally often (±1)
    usage = np.bincount([c for s in part.label_sets for c in s], minlength=NUM_CLASSES)
    assert usage.max() - usage.min() <= 1 and usage.sum() == num_clients * cpc


def test_pathological_shares_match_across_splits(splits):
    """Each client's share of a class is the same in train, val and test (U(0.4,0.6), normalised)."""
    part = pathological_partition(*splits, 10, 2, np.random.default_rng(3))
    for c in range(NUM_CLASSES):
        holders = [i for i in range(10) if c in part.label_sets[i]]
        assert len(holders) == 2
        for name, labels in zip(("train", "val", "test"), splits):
            counts = np.array([np.sum(labels[getattr(part, name)[i]] == c) for i in holders])
            shares = counts / np.sum(labels == c)
            # U(0.4, 0.6) for two holders normalises to shares in [0.4, 0.6]; rounding slack.
            slack = 1.0 / np.sum(labels == c)
            assert np.all(shares >= 0.4 - slack) and np.all(shares <= 0.6 + slack), (name, c, shares)
        train_share = np.array([np.sum(splits[0][part.train[i]] == c) for i in holders]) / 120
        test_share = np.array([np.sum(splits[2][part.test[i]] == c) for i in holders]) / 40
        assert np.allclose(train_share, test_share, atol=1 / 40)


@pytest.mark.parametrize(
    "make",
    [
        lambda s, r: pathological_partition(*s, 10, 2, r),
        lambda s, r: clustered_partition(*s, 10, 5, 2, r),
        lambda s, r: dirichlet_partition(*s, 10, 0.5, r),
        lambda s, r: iid_partition(*s, 10, r),
    ],
)
def test_reproducible_for_same_seed(splits, make):
    a, b = make(splits, np.random.default_rng(7)), make(splits, np.random.default_rng(7))
    c = make(splits, np.random.default_rng(8))
    for name in ("train", "val", "test"):
        assert all(np.array_equal(x, y) for x, y in zip(getattr(a, name), getattr(b, name)))
    assert a.label_sets == b.label_sets and a.groups == b.groups
    assert not all(np.array_equal(x, y) for x, y in zip(a.train, c.train))


@pytest.mark.parametrize("num_clients,groups,cpc", [(10, 5, 2), (12, 4, 3), (6, 3, 3), (8, 2, 5)])
def test_clustered_groups_share_classes(splits, num_clients, groups, cpc):
    part = clustered_partition(*splits, num_clients, groups, cpc, np.random.default_rng(1))
    _check_disjoint_cover(part, splits, full=groups * cpc >= NUM_CLASSES)  # else some classes go unused
    per_group = num_clients // groups
    assert part.groups == [i // per_group for i in range(num_clients)]
    for i in range(num_clients):
        assert len(part.label_sets[i]) == cpc
        assert part.label_sets[i] == part.label_sets[part.groups[i] * per_group]
        for name, labels in zip(("train", "val", "test"), splits):
            assert _classes(labels, getattr(part, name)[i]) <= part.label_sets[i]
    group_sets = [part.label_sets[g * per_group] for g in range(groups)]
    if groups * cpc <= NUM_CLASSES:  # disjoint
        assert len(frozenset().union(*group_sets)) == groups * cpc


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_invariants(splits, alpha):
    part = dirichlet_partition(*splits, 10, alpha, np.random.default_rng(2), min_size=10)
    _check_disjoint_cover(part, splits, full=True)
    assert min(t.size for t in part.train) >= 10
    for i in range(10):
        assert _classes(splits[0], part.train[i]) == part.label_sets[i]
    if alpha == 100.0:  # near-uniform shares → every client sees almost every class
        assert np.mean([len(s) for s in part.label_sets]) > 9


def test_dirichlet_small_alpha_is_skewed(splits):
    part = dirichlet_partition(*splits, 10, 0.1, np.random.default_rng(4))
    dominant = [np.bincount(splits[0][t], minlength=NUM_CLASSES).max() / t.size for t in part.train]
    assert np.mean(dominant) > 0.4


def test_iid_sizes(splits):
    part = iid_partition(*splits, 7, np.random.default_rng(0))
    _check_disjoint_cover(part, splits, full=True)
    sizes = [t.size for t in part.train]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, r: pathological_partition(*s, 10, 11, r), "classes_per_client"),
        (lambda s, r: pathological_partition(*s, 10, 0, r), "classes_per_client"),
        (lambda s, r: pathological_partition(*s, 0, 2, r), "num_clients"),
        (lambda s, r: clustered_partition(*s, 10, 3, 2, r), "divide"),
        (lambda s, r: clustered_partition(*s, 10, 0, 2, r), "num_groups"),
        (lambda s, r: dirichlet_partition(*s, 10, 0.0, r), "alpha"),
        (lambda s, r: dirichlet_partition(*s, 10, -1.0, r), "alpha"),
        (lambda s, r: dirichlet_partition(*s, 200, 0.5, r, min_size=10), "min_size"),
        (lambda s, r: dirichlet_partition(*s, 100, 0.01, r, min_size=10, max_tries=5), "min_size"),
        (lambda s, r: iid_partition(*s, 5000, r), "num_clients"),
        (lambda s, r: pathological_partition(*s, 1000, 1, r), "no training samples"),
        (lambda s, r: pathological_partition(s[0].astype(float), s[1], s[2], 10, 2, r), "integers"),
        (lambda s, r: pathological_partition(s[0], s[1], s[2], 10, 2, r, num_classes=5), "num_classes"),
    ],
)
def test_impossible_settings_raise(splits, call, match):
    with pytest.raises(ValueError, match=match):
        call(splits, np.random.default_rng(0))


def test_rng_must_be_generator(splits):
    with pytest.raises(TypeError, match="Generator"):
        pathological_partition(*splits, 10, 2, 0)
