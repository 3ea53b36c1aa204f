"""Size-capped assignment (model/capacity.py) against deferred acceptance run row by row
as the module doc states it: the same node for every row, never more than `capacity`
rows in a node, the same result for any batching or row order, plain labelling where
the capacity does not bind, and a clear error where a parent cannot be capped."""

from __future__ import annotations

import heapq

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_embeddings

from mdf_taxonomy import cli
from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.model import Level, Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.capacity import (
    CAPACITY_SALT,
    CapacityPlan,
    capped_labels,
    keys_at,
)
from mdf_taxonomy.model.sampling import sample_priorities

CHILDREN = (4, 3, 5)  # children of the three level-1 nodes


def skewed_tree(metric: str = "l2", dim: int = 6, seed: int = 0) -> Taxonomy:
    rng = np.random.default_rng(seed)
    top = rng.normal(size=(len(CHILDREN), dim)).astype(np.float32) * 10
    leaves = np.concatenate(
        [
            t + rng.normal(size=(k, dim)).astype(np.float32) * 2
            for t, k in zip(top, CHILDREN, strict=True)
        ]
    )
    parents = np.repeat(np.arange(len(CHILDREN)), CHILDREN)
    cfg = TaxonomyConfig(n_levels=2, branching_factor=[3, 5], metric=metric)
    return Taxonomy(config=cfg, dim=dim, levels=[Level(top, np.zeros(3)), Level(leaves, parents)])


def skewed_rows(tax: Taxonomy, n: int = 900, seed: int = 1) -> np.ndarray:
    """Rows around a few leaves only, so their nearest leaves overflow."""
    rng = np.random.default_rng(seed)
    leaves = tax.levels[1].centroids
    hot = rng.choice(len(leaves), size=n, p=np.array([6, 1, 1, 1, 5, 1, 1, 3, 1, 1, 1, 1]) / 23)
    return (leaves[hot] + rng.normal(size=(n, tax.dim)) * 1.5).astype(np.float32)


def reference(tax: Taxonomy, x: np.ndarray, capacity: int) -> np.ndarray:
    """Deferred acceptance, one proposal at a time, at the leaves."""
    labels = tax.assign_paths(x)
    parent, first = labels.paths[:, 0], labels.paths[:, 1].astype(np.int64)
    offsets = tax.levels[1].child_offsets(len(CHILDREN))
    c64 = torch.from_numpy(tax.levels[1].centroids).double()
    prepared = tax.prepare(x)
    tie = (sample_priorities(x, 0, CAPACITY_SALT) >> np.uint64(32)).astype(np.int64)
    prefs = []
    for r in range(len(x)):
        kids = np.arange(offsets[parent[r]], offsets[parent[r] + 1])
        k = keys_at(prepared[[r] * len(kids)], c64, torch.from_numpy(kids), "l2", tie[[r]])
        others = [
            c for _, c in sorted(zip(k.tolist(), kids.tolist(), strict=True)) if c != first[r]
        ]
        prefs.append([(int(k[kids == c][0]), int(c)) for c in [first[r], *others]])
    held: dict[int, list] = {}
    nxt = [0] * len(x)
    free = list(range(len(x)))
    while free:
        r = free.pop()
        key, node = prefs[r][nxt[r]]
        nxt[r] += 1
        heap = held.setdefault(node, [])
        heapq.heappush(heap, (-key, r))
        if len(heap) > capacity:
            free.append(heapq.heappop(heap)[1])  # the largest key goes on
    out = np.full(len(x), -1)
    for node, heap in held.items():
        for _, r in heap:
            out[r] = node
    return out


def run(tax, x, capacity, level=None, chunks=1, order=None):
    order = np.arange(len(x)) if order is None else order
    parts = np.array_split(order, chunks)
    plan, labels = capped_labels(tax, lambda: (x[p] for p in parts), capacity, level)
    paths = np.zeros((len(x), tax.n_levels), np.int32)
    paths[order] = np.concatenate([lab.paths for lab in labels])
    return plan, paths


def test_capped_leaves_equal_deferred_acceptance_and_hold_the_bound():
    tax, x = skewed_tree(), skewed_rows(skewed_tree())
    plain = tax.assign_paths(x).paths[:, 1]
    sizes = np.bincount(plain, minlength=12)
    parent_rows = np.bincount(tax.assign_paths(x).paths[:, 0], minlength=3)
    capacity = int(max(-(-parent_rows // np.array(CHILDREN))))  # the tightest feasible
    assert sizes.max() > capacity  # the bound binds
    plan, paths = run(tax, x, capacity)
    assert paths[:, 1].tolist() == reference(tax, x, capacity).tolist()
    assert np.bincount(paths[:, 1], minlength=12).max() <= capacity
    assert (paths[:, 0] == tax.assign_paths(x).paths[:, 0]).all()  # the path above stays
    assert plan.passes > 2 and plan.cut > 0


def test_any_batching_or_row_order_gives_the_same_nodes():
    tax = skewed_tree()
    x = skewed_rows(tax)
    _, once = run(tax, x, 100)
    for chunks, seed in ((7, 0), (31, 1)):
        _, other = run(
            tax, x, 100, chunks=chunks, order=np.random.default_rng(seed).permutation(len(x))
        )
        assert (other == once).all()


def test_a_capacity_that_does_not_bind_is_plain_labelling():
    tax = skewed_tree()
    x = skewed_rows(tax)
    plain = tax.assign_paths(x)
    plan, labels = capped_labels(tax, lambda: [x], len(x))
    (capped,) = labels
    assert (capped.paths == plain.paths).all() and plan.passes == 1 and plan.cut == 0
    assert np.array_equal(capped.distance, plain.distance)
    assert np.array_equal(capped.margin, plain.margin, equal_nan=True)


def test_capping_an_inner_level_walks_the_levels_below_from_the_new_node():
    tax = skewed_tree()
    x = skewed_rows(tax)
    plan, paths = run(tax, x, 320, level=1)
    assert np.bincount(paths[:, 0], minlength=3).max() <= 320
    moved = paths[:, 0] != tax.assign_paths(x).paths[:, 0]
    assert moved.any()
    parents = tax.levels[1].parents
    assert (parents[paths[:, 1]] == paths[:, 0]).all()  # each leaf is under its new node


def test_a_parent_over_capacity_times_its_children_is_named():
    tax = skewed_tree()
    x = skewed_rows(tax)
    with pytest.raises(ValueError, match=r"capacity=20 cannot hold level 2: .*node 0 of level 1"):
        capped_labels(tax, lambda: [x], 20)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="capacity"):
            CapacityPlan(tax, bad, None)
    with pytest.raises(ValueError, match=r"level=3"):
        CapacityPlan(tax, 10, 3)


def test_the_engine_and_cli_label_parquet_within_the_capacity(tmp_path):
    tax = skewed_tree()
    tax.state.phase = "done"
    TaxonomyStore(str(tmp_path / "store")).save(tax)
    x = skewed_rows(tax)
    bad = x.copy()
    bad[5, 2] = np.nan  # rejected, counted, written with its reason
    write_embeddings(tmp_path / "in" / "a.parquet", bad[:500], np.arange(500), row_group_size=97)
    write_embeddings(tmp_path / "in" / "b.parquet", bad[500:], np.arange(500, 900))
    engine = TaxonomyEngine(storage_uri=str(tmp_path / "store"), progress=False)
    summary = engine.label_capped(str(tmp_path / "in"), str(tmp_path / "out"), 100)
    out = pq.read_table(tmp_path / "out").sort_by("id")
    valid = np.ones(len(x), bool)
    valid[5] = False
    _, want = run(tax, x[valid], 100)
    assert out["taxonomy_l2"].to_numpy()[valid].tolist() == want[:, 1].tolist()
    assert out["taxonomy_l2"][5].as_py() == -1 and "NaN" in out["taxonomy_error"][5].as_py()
    assert (
        summary["rejected"] and summary["max_node_rows"] <= 100 < summary["max_node_rows_nearest"]
    )
    assert summary["over_capacity"] == 0 and summary["moved_rows"] > 0
    assert (engine.label_capped(x[valid], None, 100) == want).all()  # the array face
    assert (engine.label_capped(x[valid].astype(np.float64), None, 100) == want).all()
    unusable = r"row\(s\) \[5\] \(1 in all\) are not usable, row 5: non_finite"
    with pytest.raises(ValueError, match=unusable):
        engine.label_capped(bad, None, 100)
    rc = cli.main(
        [
            "label-capped",
            "--input",
            str(tmp_path / "in"),
            "--storage-uri",
            str(tmp_path / "store"),
            "--output",
            str(tmp_path / "cli"),
            "--capacity",
            "100",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert pq.read_table(tmp_path / "cli").sort_by("id")["taxonomy_path"] == out["taxonomy_path"]


def test_a_saved_plan_labels_an_mdf_pipeline_as_the_capped_run(tmp_path):
    from mdf_taxonomy.operators import TaxonomyPathRefiner

    tax = skewed_tree()
    tax.state.phase = "done"
    store = str(tmp_path / "store")
    TaxonomyStore(store).save(tax)
    x = skewed_rows(tax)
    plan_uri = str(tmp_path / "plans" / "cap100.json")
    engine = TaxonomyEngine(storage_uri=store, progress=False)
    want = engine.label_capped(x, None, 100, plan_uri=plan_uri)
    op = TaxonomyPathRefiner(storage_uri=store, capacity_plan=plan_uri, device="cpu")
    records = [{"id": i, "embedding": row.tolist()} for i, row in enumerate(x)]
    records[3]["embedding"] = records[3]["embedding"][:-1]  # wrong length: flagged, kept
    out = [
        rec
        for start in range(0, len(x), 128)
        for rec in op.process_batch(records[start : start + 128])
    ]
    assert len(out) == len(x) and out[3]["taxonomy_error"]
    got = np.array([rec["taxonomy_l2"] for rec in out])
    keep = np.arange(len(x)) != 3
    assert (got[keep] == want[keep, 1]).all()
    assert np.bincount(got[keep], minlength=12).max() <= 100
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"junk\.json: not a capacity plan"):
        TaxonomyPathRefiner(storage_uri=store, capacity_plan=str(tmp_path / "junk.json"))
    (tmp_path / "foreign.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"foreign\.json: not a capacity plan"):
        TaxonomyPathRefiner(storage_uri=store, capacity_plan=str(tmp_path / "foreign.json"))
