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


# -- tol: a level stops after the first Lloyd pass whose relative inertia drop is below tol ----


def _pass_after(prev_inertia, inertia, tol, iteration=1, max_iter=20):
    """finish_pass on a 2-node level, 2-D, whose previous pass measured `prev_inertia`."""
    from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig
    from mdf_taxonomy.model.fitting import INERTIA_FIXED_POINT_BITS, LloydResult, finish_pass

    cfg = TaxonomyConfig(n_levels=1, branching_factor=2, dim=2, tol=tol, max_iter=max_iter)
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0], [5.0, 5.0]])
    sums, counts = kernels.partial_sums(x, torch.tensor([0, 0, 1, 1]), 2)
    level = Level(np.array([[0.0, 0.0], [5.0, 5.0]], np.float32), np.zeros(2, np.int64))
    state = FitState(level=1, phase="lloyd", iteration=iteration, inertia=prev_inertia)
    tax = Taxonomy(config=cfg, dim=2, levels=[level], state=state)
    fixed = int(inertia * 2**INERTIA_FIXED_POINT_BITS)
    return finish_pass(tax, LloydResult(sums, counts, fixed, rows=4)).state


def test_tol_stops_on_a_relative_inertia_drop_strictly_below_it():
    # 64 -> 63 is a drop of exactly 1/64 (binary fractions: no rounding anywhere)
    assert _pass_after(64.0, 63.0, tol=1 / 64).phase == "lloyd"  # not below: one more pass
    done = _pass_after(64.0, 63.0, tol=float(np.nextafter(1 / 64, 1.0)))
    assert (done.phase, done.iteration, done.inertia) == ("done", 2, 63.0)
    # the first pass has nothing to compare with; a zero inertia gives no relative drop
    assert _pass_after(None, 63.0, tol=1e9, iteration=0).phase == "lloyd"
    assert _pass_after(0.0, 0.0, tol=1e9).phase == "lloyd"
    # tol=0 never stops on a pass that did not raise the inertia, even one that kept it
    assert _pass_after(63.0, 63.0, tol=0.0).phase == "lloyd"
    assert _pass_after(63.0, 64.0, tol=0.0).phase == "done"  # a rise is a negative drop
    # max_iter ends the level whatever tol says
    last = _pass_after(64.0, 63.0, tol=0.0, iteration=19)
    assert (last.phase, last.iteration) == ("done", 20)


def _lloyd_inertias(tax):
    return [h["inertia"] for h in tax.state.history if h["phase"] == "lloyd"]


def _expected_passes(inertias, tol, max_iter):
    """Passes the rule runs, given the inertias each pass measures (pass 1 has no drop)."""
    for i in range(1, max_iter):
        if inertias[i - 1] > 0 and (inertias[i - 1] - inertias[i]) / inertias[i - 1] < tol:
            return i + 1
    return max_iter


def test_tol_ends_the_fit_after_the_passes_the_rule_gives(tmp_path):
    from conftest import write_embeddings

    from mdf_taxonomy.engine import TaxonomyEngine

    # unclustered rows: Lloyd keeps moving the 8 centroids for many passes
    x = np.random.default_rng(3).normal(size=(400, 4)).astype(np.float32)
    max_iter = 10

    def fit(tol, row_group_size=100):
        data = write_embeddings(
            tmp_path / f"d{row_group_size}" / "a.parquet", x, row_group_size=row_group_size
        )
        engine = TaxonomyEngine(
            storage_uri=str(tmp_path / f"t-{tol}-{row_group_size}"),
            n_levels=1,
            branching_factor=8,
            max_iter=max_iter,
            tol=tol,
            init_iters=0,
            progress=False,
        )
        return engine.fit(str(data))

    full = fit(0.0)
    inertias = _lloyd_inertias(full)
    drops = [(a - b) / a for a, b in zip(inertias, inertias[1:], strict=False)]
    # tol=0 runs every pass on data that keeps moving
    assert len(inertias) == max_iter and all(d > 0 for d in drops)
    assert (full.state.phase, full.state.iteration) == ("done", max_iter)

    pass5_drop = drops[3]
    # the rule on these inertias: drops 0.11, 0.029, 0.017, 0.0085, 0.0050, ... at passes 2..
    stops = {0.01: 5, pass5_drop: 6, 2.0: 2}  # equal to pass 5's drop is not below it
    assert {t: _expected_passes(inertias, t, max_iter) for t in stops} == stops
    for tol, want in stops.items():
        for row_group_size in (100, 400):  # 4 row groups or 1: the same passes
            tax = fit(tol, row_group_size)
            got = _lloyd_inertias(tax)
            assert got == inertias[:want], (tol, row_group_size)
            assert (tax.state.phase, tax.state.iteration) == ("done", want)
