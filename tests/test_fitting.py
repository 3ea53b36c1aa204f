"""The arithmetic between passes: sampling, init, repair, convergence — order-free."""

from __future__ import annotations

import numpy as np
import torch
from conftest import blobs

from mdf_taxonomy import kernels
from mdf_taxonomy.backend import BottomK
from mdf_taxonomy.model.fitting import (
    REPAIR_EPS,
    kmeans_plus_plus,
    sample_priorities,
    update_centroids,
)


def test_sample_is_independent_of_row_order_and_batching():
    x, _ = blobs(1000, 8, 4)
    prio = sample_priorities(x, seed=3, level=1)
    chosen = set(BottomK.smallest(prio, 100).tolist())
    perm = np.random.default_rng(1).permutation(len(x))
    prio_p = sample_priorities(x[perm], seed=3, level=1)
    assert set(perm[BottomK.smallest(prio_p, 100)].tolist()) == chosen
    # merging per-batch bottom-k lists gives the global bottom-k
    parts = np.array_split(perm, 7)
    cand = np.concatenate([p[BottomK.smallest(sample_priorities(x[p], 3, 1), 100)] for p in parts])
    merged = cand[BottomK.smallest(sample_priorities(x[cand], 3, 1), 100)]
    assert set(merged.tolist()) == chosen
    assert not np.array_equal(sample_priorities(x, 4, 1), prio)


def test_kmeans_plus_plus_is_seeded():
    x, _ = blobs(500, 6, 5)
    t = torch.from_numpy(x)
    a = kmeans_plus_plus(t, 5, seed=11)
    b = kmeans_plus_plus(t, 5, seed=11)
    c = kmeans_plus_plus(t, 5, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_empty_cluster_takes_half_of_its_largest_sibling():
    x = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
    prev = np.array([[0.0, 1.0], [10.0, 10.0], [50.0, 50.0]], np.float32)
    ids = torch.tensor([0, 0, 1])
    sums, counts = kernels.partial_sums(x, ids, 3)
    parents = np.zeros(3, np.int64)
    new, repaired = update_centroids(sums, counts, prev, parents, "l2")
    assert repaired == 1
    base = np.array([0.0, 1.0])
    sign = np.array([1.0, -1.0])
    assert np.allclose(new[2], base * (1 + REPAIR_EPS * sign))
    assert np.allclose(new[0], base * (1 - REPAIR_EPS * sign))
    assert np.allclose(new[1], [10.0, 10.0])


def test_repair_stays_within_the_parent():
    x = torch.tensor([[0.0, 1.0], [0.0, 3.0], [5.0, 5.0]])
    prev = np.array([[0.0, 2.0], [9.0, 9.0], [5.0, 5.0]], np.float32)
    ids = torch.tensor([0, 0, 2])
    sums, counts = kernels.partial_sums(x, ids, 3)
    # node 1 (empty) is the only child of parent 1: nothing to split, it keeps its centroid
    new, repaired = update_centroids(sums, counts, prev, np.array([0, 1, 2]), "l2")
    assert repaired == 0 and np.allclose(new[1], [9.0, 9.0])


def test_rows_by_key_groups_every_row_once_in_order():
    from mdf_taxonomy.backend import rows_by_key

    keys = np.array([3, 1, 3, 0, 1, 3])
    got = [(k, idx.tolist()) for k, idx in rows_by_key(keys)]
    assert got == [(0, [3]), (1, [1, 4]), (3, [0, 2, 5])]
    assert list(rows_by_key(np.zeros(0, np.int64))) == []
