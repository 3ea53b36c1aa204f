"""Balanced hierarchical sampling (issue 18): the allocation against a reference written
from the issue's text, on a planted heavy-tailed (Zipf) mixture; the same rows whatever
the batch size, item order or split into workers; strategies, repeats, a too-large
target, and the MDF filter keeping exactly the rows the Parquet passes select."""

from __future__ import annotations

import inspect
import logging
import pickle
import random

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from mdf_taxonomy.curation import SamplePlan, allocate, repeats, sample_parquet
from mdf_taxonomy.curation.sampling import SAMPLE_SALT
from mdf_taxonomy.curation.sampling_passes import count_leaves, gather_candidates, select_rows
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.config import parameter_docs
from mdf_taxonomy.model.sampling import sample_priorities
from mdf_taxonomy.operators.balanced_sample_filter import BalancedSampleFilter
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.parquet_sink import ParquetSink
from mdf_taxonomy.passes.staged_output import OutputExists

DIM = 8
PARENTS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])  # 10 leaves under 4 nodes; 3 an only child


# -- the reference, straight from the text ------------------------------------------


def reference_quotas(parents: list[list[int]], leaf_sizes: list[int], target: int, m: int):
    """{(level, node): quota}: at each node the largest integer cut x with
    sum min(x, m * size_child) <= quota, each child min(x, m * size_child), the remainder
    one each to the children above the cut, in node id order."""
    sizes = {(len(parents), j): s for j, s in enumerate(leaf_sizes)}
    children: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for level in range(len(parents), 0, -1):
        for j, p in enumerate(parents[level - 1]):
            parent = (level - 1, p if level > 1 else 0)
            children.setdefault(parent, []).append((level, j))
            sizes[parent] = sizes.get(parent, 0) + sizes.get((level, j), 0)
    out = {}

    def split(node, quota):
        out[node] = quota
        kids = sorted(children.get(node, []))
        if not kids:
            return
        caps = [m * sizes.get(k, 0) for k in kids]
        x = 0
        while x < max(caps) and sum(min(x + 1, c) for c in caps) <= quota:
            x += 1
        shares = [min(x, c) for c in caps]
        left = quota - sum(shares)
        for i, c in enumerate(caps):
            if c > x and left > 0:
                shares[i] += 1
                left -= 1
        for k, share in zip(kids, shares, strict=True):
            split(k, share)

    split((0, 0), min(target, m * sum(leaf_sizes)))
    return out


# -- a planted Zipf mixture ------------------------------------------------------------------


def _tree() -> Taxonomy:
    rng = np.random.default_rng(0)
    top = rng.normal(size=(4, DIM)) * 40
    leaves = top[PARENTS] + rng.normal(size=(len(PARENTS), DIM)) * 10
    levels = [Level(top, np.zeros(4, np.int64)), Level(leaves, PARENTS)]
    cfg = TaxonomyConfig(n_levels=2, branching_factor=[4, 4], metric="l2")
    return Taxonomy(config=cfg, dim=DIM, levels=levels, state=FitState(phase="done"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Zipf leaf sizes (600 / rank^1.2), shuffled over 3 files of 150-row groups, and 3
    bad rows; the taxonomy saved in a store (so it has a snapshot)."""
    root = tmp_path_factory.mktemp("zipf")
    tax = _tree()
    TaxonomyStore(str(root / "tax")).save(tax)
    rng = np.random.default_rng(1)
    sizes = (600 / np.arange(1, len(PARENTS) + 1) ** 1.2).astype(int)[rng.permutation(10)]
    planted = np.repeat(np.arange(len(PARENTS)), sizes)
    x = (tax.levels[1].centroids[planted] + rng.normal(size=(len(planted), DIM))).astype(np.float32)
    order = rng.permutation(len(x))
    x, ids = x[order], np.arange(len(x))[order] * 7 + 3
    rows = [list(map(float, r)) for r in x] + [None, [float("nan")] * DIM, [1.0] * (DIM - 1)]
    ids = np.concatenate([ids, [-1, -2, -3]])
    table = pa.table({"id": ids, "embedding": pa.array(rows, pa.list_(pa.float32()))})
    (root / "in").mkdir()
    for f, part in enumerate(np.array_split(np.arange(len(ids)), 3)):
        pq.write_table(table.take(part), root / "in" / f"part-{f}.parquet", row_group_size=150)
    labels = tax.assign_paths(x)
    return {"root": root, "tax": tax, "x": x, "ids": ids[:-3], "labels": labels}


def _sample(data, tmp_path, name, **kw) -> tuple[dict, dict[int, int]]:
    kw.setdefault("target_size", 1000)
    summary = sample_parquet(data["tax"], str(data["root"] / "in"), str(tmp_path / name), **kw)
    return summary, _read(tmp_path / name)


def _read(path) -> dict[int, int]:
    out = ds.dataset(str(path)).to_table()
    return dict(zip(out["id"].to_pylist(), out["taxonomy_repeat"].to_pylist(), strict=True))


def _node_counts(data, chosen: dict[int, int]) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    paths = dict(zip(data["ids"].tolist(), data["labels"].paths.tolist(), strict=True))
    for i, times in chosen.items():
        for level, node in enumerate(paths[i], start=1):
            counts[(level, node)] = counts.get((level, node), 0) + times
    return counts


def _reference(data, target: int, m: int) -> dict[tuple[int, int], int]:
    tax = data["tax"]
    sizes = np.bincount(data["labels"].paths[:, -1], minlength=len(PARENTS)).tolist()
    ref = reference_quotas([lv.parents.tolist() for lv in tax.levels], sizes, target, m)
    return {k: v for k, v in ref.items() if k[0] > 0 and v > 0}


# -- tests -----------------------------------------------------------------------------------


def test_allocation_equals_the_reference_on_random_trees():
    rng = random.Random(0)
    for _ in range(200):
        n1 = rng.randint(1, 5)
        p2 = sorted(rng.randrange(n1) for _ in range(rng.randint(n1, 12)))
        p2 = sorted(set(range(n1)) | set(p2)) if len(set(p2)) < n1 else p2
        sizes = [int(1000 / rng.randint(1, 30) ** 1.5) * rng.randint(0, 1) for _ in p2]
        m, target = rng.randint(1, 4), rng.randint(1, 3 * sum(sizes) + 5)
        got = allocate([np.zeros(n1, np.int64), np.array(p2)], np.array(sizes), target, m)
        ref = reference_quotas([[0] * n1, p2], sizes, target, m)
        for level, quota in enumerate(got, start=1):
            assert quota.tolist() == [ref[(level, j)] for j in range(len(quota))]


@pytest.mark.parametrize(("target", "m"), [(40, 1), (500, 1), (1400, 1), (1000, 3), (4000, 3)])
def test_per_node_counts_equal_the_reference(data, tmp_path, target, m):
    summary, chosen = _sample(data, tmp_path, "out", target_size=target, multiplier=m)
    assert _node_counts(data, chosen) == _reference(data, target, m)
    assert summary["selected_total"] == sum(chosen.values()) == target
    assert summary["rejected"] == {"missing_embedding": 1, "non_finite": 1, "wrong_length": 1}


def test_same_rows_for_any_batch_size_item_order_and_two_workers(data, tmp_path):
    _, whole = _sample(data, tmp_path, "a", target_size=700, strategy="closest")
    _, small = _sample(data, tmp_path, "b", target_size=700, strategy="closest", batch_rows=64)
    tax, source = data["tax"], ParquetInput(str(data["root"] / "in"), batch_rows=101)
    items = source.get_file_list()
    random.Random(3).shuffle(items)
    halves = items[: len(items) // 2], items[len(items) // 2 :]
    sizes = sum(count_leaves(tax, source, h) for h in halves)  # two workers' counts
    plan = SamplePlan.build(tax, sizes, 700, strategy="closest")
    merged = gather_candidates(plan, tax, source, halves[1])
    merged.merge(gather_candidates(plan, tax, source, halves[0]))
    plan = plan.finish(merged)
    for i, half in enumerate(halves):
        sink = ParquetSink(str(tmp_path / "c" / str(i)))
        select_rows(plan, tax, source, sink, half[::-1])
        sink.close()
    split = {**_read(tmp_path / "c" / "0"), **_read(tmp_path / "c" / "1")}
    assert whole == small == split and len(whole) == 700


@pytest.mark.parametrize("strategy", ["closest", "furthest", "random"])
def test_each_leaf_takes_the_rows_its_strategy_orders_first(data, tmp_path, strategy):
    _, chosen = _sample(data, tmp_path, "out", target_size=300, strategy=strategy)
    tax, labels = data["tax"], data["labels"]
    leaf = labels.paths[:, -1]
    d = np.linalg.norm(data["x"].astype(np.float64) - tax.levels[1].centroids[leaf], axis=1)
    priority = sample_priorities(data["x"], 0, SAMPLE_SALT)  # random: the content-hash bottom-k
    quotas = _reference(data, 300, 1)
    for j in range(len(PARENTS)):
        mine = np.flatnonzero(leaf == j)
        picked = {i for i in data["ids"][mine].tolist() if i in chosen}
        assert len(picked) == quotas.get((2, j), 0)
        key = {"closest": d, "furthest": -d, "random": priority}[strategy][mine]
        order = mine[np.argsort(key, kind="stable")]
        assert picked == set(data["ids"][order[: len(picked)]].tolist())


def test_a_multiplier_repeats_rows_as_specified(data, tmp_path):
    m, target = 3, 2500
    _, chosen = _sample(data, tmp_path, "out", target_size=target, multiplier=m)
    leaf = dict(zip(data["ids"].tolist(), data["labels"].paths[:, -1].tolist(), strict=True))
    sizes = np.bincount(data["labels"].paths[:, -1])
    quotas = _reference(data, target, m)
    for j, size in enumerate(sizes):
        q = quotas.get((2, j), 0)
        got = [chosen.get(i, 0) for i, lf in leaf.items() if lf == j]
        if m * size <= q:
            assert got == [m] * size
        else:
            base = q // size
            assert sorted(set(got)) in ([base], [base, base + 1])
            assert sum(t == base + 1 for t in got) == q - base * size
    assert max(chosen.values()) == m and sum(chosen.values()) == target


def test_a_target_above_the_data_is_a_full_take_with_a_warning(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary, chosen = _sample(
            data, tmp_path, "out", target_size=10**6, multiplier=2, device="auto"
        )
    assert chosen == dict.fromkeys(data["ids"].tolist(), 2)
    assert summary["full_take"] and "taking every row 2 times" in caplog.text


def test_equal_keys_at_the_cut_off_are_left_together():
    """One leaf of 5 rows, 2 extra to take; rows 2 and 3 have equal keys (equal embeddings)
    and straddle the cut-off: both are left, so the leaf never gets more than its quota."""
    leaves = np.zeros(5, np.int64)
    scores, prios = np.zeros(5, np.float32), np.array([1, 2, 2, 3, 4], np.uint64)
    one = np.zeros(1, np.float32), np.zeros(1, np.uint64)
    plan = SamplePlan(2, 1, "random", 0, None, np.array([5]), np.array([0]), np.array([2]), *one)
    cands = plan.candidates()
    cands.offer(leaves, scores, prios)
    assert repeats(plan.finish(cands), leaves, scores, prios).tolist() == [1, 0, 0, 0, 0]


def test_plan_round_trips_and_parameters_are_checked(data, tmp_path):
    tax = data["tax"]
    sizes = np.bincount(data["labels"].paths[:, -1], minlength=len(PARENTS))
    plan = SamplePlan.build(tax, sizes, 300, 2, "furthest", 5)
    cands = plan.candidates()
    leaves, distance = data["labels"].paths[:, -1].astype(np.int64), data["labels"].distance
    cands.offer(leaves, -distance, np.arange(len(leaves), dtype=np.uint64))
    plan = plan.finish(cands)
    back = SamplePlan.load(plan.save(str(tmp_path / "p" / "plan.json")))
    assert back.to_dict() == plan.to_dict()
    for kw, name in (
        ({"strategy": "nearest"}, "strategy"),
        ({"multiplier": 0}, "multiplier"),
        ({"target_size": 0}, "target_size"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ValueError, match=name):
            _sample(data, tmp_path, "bad", **kw)
    _sample(data, tmp_path, "twice")
    with pytest.raises(OutputExists, match="overwrite"):
        _sample(data, tmp_path, "twice")
    assert _sample(data, tmp_path, "twice", overwrite=True)[1]


def test_filter_keeps_exactly_the_rows_the_passes_select(data, tmp_path):
    plan_uri = str(tmp_path / "plan.json")
    _, chosen = _sample(
        data,
        tmp_path,
        "out",
        target_size=900,
        multiplier=2,
        strategy="closest",
        plan_uri=plan_uri,
    )
    op = pickle.loads(pickle.dumps(BalancedSampleFilter(str(data["root"] / "tax"), plan_uri)))
    records = ds.dataset(str(data["root"] / "in")).to_table().to_pylist()
    random.Random(0).shuffle(records)
    kept = {}
    for start in range(0, len(records), 64):
        for rec in op.process_batch([dict(r) for r in records[start : start + 64]]):
            if rec is not None:
                kept[rec["id"]] = int(rec["taxonomy_repeat"])
    assert kept == chosen
    assert op.get_stats()["rejected"] == {
        "missing_embedding": 1,
        "non_finite": 1,
        "wrong_length": 1,
    }
    assert op.get_stats()["selected"] == {"rows": len(chosen), "repeats": 900}
    bad = [r for r in records if r["id"] < 0]
    result = op.process_batch_with_rejected(bad + [r for r in records if r["id"] >= 0][:50])
    reasons = {r["_rejection_details"]["reason"].split(":")[0] for r in result.rejected}
    assert {"missing_embedding", "non_finite", "wrong_length"} <= reasons
    assert all(rec["id"] in chosen for rec in result.passed)
    assert op.get_output_schema() == {"taxonomy_repeat": pa.int32()}


def test_filter_never_raises_and_documents_its_parameters(data, tmp_path):
    with pytest.raises(ValueError, match="plan_uri"):
        BalancedSampleFilter(str(data["root"] / "tax"), "")
    plan_uri = str(tmp_path / "plan.json")
    _sample(data, tmp_path, "out", target_size=10, plan_uri=plan_uri)
    op = BalancedSampleFilter(str(tmp_path / "no-taxonomy-here"), plan_uri)
    assert op.process_batch([{"id": 1, "embedding": [0.0] * DIM}]) == [None]
    assert op.get_stats()["rejected"] == {"operator_failed": 1}
    docs = parameter_docs(BalancedSampleFilter)
    params = list(inspect.signature(BalancedSampleFilter.__init__).parameters.values())[1:]
    assert [p.name for p in params] == list(docs)
    for p in params:
        spec = docs[p.name][0]
        if p.default is not inspect.Parameter.empty:
            assert spec.endswith(f", default={p.default!r}"), p.name


def test_engine_and_cli_sample_the_same_rows_as_the_passes(data, tmp_path, capsys):
    from mdf_taxonomy import cli
    from mdf_taxonomy.engine import TaxonomyEngine

    TaxonomyStore(str(tmp_path / "tax")).save(data["tax"])
    engine = TaxonomyEngine(storage_uri=str(tmp_path / "tax"), progress=False)
    summary = engine.sample(str(data["root"] / "in"), str(tmp_path / "engine"), 500, seed=0)
    _, want = _sample(data, tmp_path, "passes", target_size=500)
    assert _read(tmp_path / "engine") == want and summary["selected_total"] == 500
    argv = ["-q", "sample", "--input", str(data["root"] / "in"), "--storage-uri"]
    argv += [str(tmp_path / "tax"), "--output", str(tmp_path / "cli"), "--target-size", "500"]
    assert cli.main([*argv, "--seed", "0"]) == 0
    assert _read(tmp_path / "cli") == want
    assert f"sampled records: {tmp_path / 'cli'}" in capsys.readouterr().out
    assert cli.main([*argv, "--seed", "0"]) == 2  # the output holds data now: refused
    assert "exists and is not empty" in capsys.readouterr().err
