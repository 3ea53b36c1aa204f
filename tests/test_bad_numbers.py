"""Bad numbers are named, never silently wrong: records, inferred dim, fixed-point range,
degenerate data, config values."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
import pytest
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.backend import PartialsCombiner
from mdf_taxonomy.model import Level, Taxonomy, TaxonomyConfig
from mdf_taxonomy.model import config as config_mod
from mdf_taxonomy.model.fitting import (
    FIXED_SUM_LIMIT,
    INERTIA_FIXED_POINT_BITS,
    MAX_ABS_VALUE,
    MAX_ROWS_PER_SUM,
    SUM_OVERFLOWED,
    LloydResult,
    SampleResult,
    add_fixed_sums,
    finish_pass,
    inertia_to_fixed,
    kmeans_plus_plus,
    node_seed,
    sample_priorities,
    start_level,
    update_centroids,
)
from mdf_taxonomy.passes.records import infer_dim, parse_embeddings

NAN, INF = float("nan"), float("inf")


# -- 1. parse_embeddings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, metric, reason",
    [
        ([1.0, 2.0, 3.0], "l2", None),
        ([1, 2, 3], "l2", None),  # ints are cast
        (np.array([1, 2, 3], np.int64), "cosine", None),
        (np.array([1, 2, 3], np.float64), "l2", None),
        ((1.0, 2.0, 3.0), "l2", None),
        ([MAX_ABS_VALUE, -MAX_ABS_VALUE, 0.0], "l2", None),  # the bound itself is in range
        ([0.0, 0.0, 0.0], "l2", None),  # a zero vector is a point under l2
        ([1e-30, 0.0, 0.0], "l2", None),
        (None, "l2", "missing_embedding: field 'emb' is absent or null"),
        ([], "l2", "wrong_length: field 'emb' has 0 values, expected 3"),
        ([1.0, 2.0], "l2", "wrong_length: field 'emb' has 2 values, expected 3"),
        ("1.0, 2.0, 3.0", "l2", "bad_embedding"),
        ("1.5", "l2", "bad_embedding"),
        (["1", "2", "3"], "l2", "bad_embedding"),
        (b"\x00\x00\x80?\x00\x00\x80?\x00\x00\x80?", "l2", "bad_embedding"),
        (bytearray(b"abc"), "l2", "bad_embedding"),
        ({"x": 1.0}, "l2", "bad_embedding"),
        (5.0, "l2", "bad_embedding"),
        ([True, False, True], "l2", "bad_embedding"),
        ([1.0, None, 3.0], "l2", "bad_embedding"),
        ([[1.0, 2.0, 3.0]], "l2", "bad_embedding: field 'emb' is nested (shape (1, 3))"),
        ([[1.0], [2.0, 3.0]], "l2", "bad_embedding"),
        ([1.0, NAN, 3.0], "l2", "non_finite: field 'emb' contains NaN or inf"),
        ([1.0, -INF, 3.0], "cosine", "non_finite"),
        (
            [1e12, 0.0, 0.0],
            "l2",
            "out_of_range: field 'emb' has |value| up to 1e+12, the fit's range is "
            f"±{MAX_ABS_VALUE:g}",
        ),
        ([0.0, -1e30, 0.0], "cosine", "out_of_range: field 'emb' has |value| up to 1e+30"),
        ([1e39, 0.0, 0.0], "l2", "out_of_range: field 'emb' has |value| up to 1e+39"),  # > float32
        ([MAX_ABS_VALUE * 1.001, 0.0, 0.0], "l2", "out_of_range"),
        ([0.0, 0.0, 0.0], "cosine", "zero_vector: field 'emb' has norm 0 (cosine is undefined)"),
        ([1e-30, 0.0, 0.0], "cosine", "zero_vector: field 'emb' has norm 1e-30"),  # underflows
        ([0.0, -0.0, 0.0], "cosine", "zero_vector"),
    ],
)
def test_each_value_is_valid_or_named(value, metric, reason):
    records = [{"emb": [1.0, 1.0, 1.0]}, {"emb": value}, {"other": 1}]
    parsed = parse_embeddings(records, "emb", 3, metric=metric)  # never raises
    assert parsed.x.dtype == np.float32 and parsed.x.flags.c_contiguous
    assert parsed.errors[2].startswith("missing_embedding")
    if reason is None:
        assert parsed.valid.tolist() == [0, 1] and 1 not in parsed.errors
        assert np.array_equal(parsed.x[1], np.asarray(value, dtype=np.float32))
    else:
        assert parsed.valid.tolist() == [0] and parsed.x.shape == (1, 3)
        assert parsed.errors[1].startswith(reason), parsed.errors[1]
        kind = reason.split(":")[0]
        assert parsed.reasons()[kind] == 1 + (kind == "missing_embedding")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_batch_of_only_bad_rows_parses_to_an_empty_matrix(metric):
    bad = [None, [], "x", {"a": 1}, [NAN, 1.0], [1e20, 1.0], b"ab", [[1.0]]]
    parsed = parse_embeddings([{"emb": v} for v in bad], "emb", 2, metric=metric)
    assert parsed.x.shape == (0, 2) and len(parsed.errors) == len(bad)
    unknown = parse_embeddings([{"emb": v} for v in bad[:5]], "emb", None, metric=metric)
    assert unknown.x.shape[0] == 0 and len(unknown.errors) == 5


def test_existing_callers_default_to_l2():
    parsed = parse_embeddings([{"emb": [0.0, 0.0]}], "emb", 2)
    assert parsed.valid.tolist() == [0]


# -- 2. infer_dim ----------------------------------------------------------------------------


def _rows(*runs: tuple[object, int]) -> list[dict]:
    """Records from (value or length, count) runs, in order."""
    out = []
    for v, n in runs:
        out += [{"emb": list(np.ones(v)) if isinstance(v, int) else v} for _ in range(n)]
    return out


@pytest.mark.parametrize(
    "records, dim, others",
    [
        (_rows((768, 5)), 768, {}),
        (_rows((767, 1), (768, 1020), (770, 9)), 768, {767: 1, 770: 9}),  # the short first row
        (_rows(([], 3), (None, 2), (4, 10)), 4, {}),  # empty and null first rows do not count
        (_rows(([NAN] * 3, 50), ("abc", 50), ([[1.0] * 3], 50), (2, 1)), 2, {}),
        (_rows((3, 2), (5, 2)), 5, {3: 2}),  # a tie goes to the longer length
        (_rows((2, 10_000), (9, 50_000)), 2, {}),  # only the first max_rows rows are read
    ],
)
def test_infer_dim_takes_the_majority_of_valid_rows(records, dim, others):
    assert infer_dim(iter(records), "emb") == (dim, others)


@pytest.mark.parametrize(
    "records",
    [[], _rows(([], 5)), _rows((None, 3), ("x", 1)), _rows(([NAN, 1.0], 4)), [{"other": [1.0]}]],
)
def test_infer_dim_without_a_valid_row_names_the_field(records):
    with pytest.raises(ValueError, match="'emb'.*cannot infer dim"):
        infer_dim(records, "emb")


def test_infer_dim_stops_reading_at_max_rows():
    stream = iter(_rows((3, 100)))
    assert infer_dim(stream, "emb", max_rows=10) == (3, {})
    assert len(list(stream)) == 90


def test_parse_without_dim_uses_the_majority_length():
    parsed = parse_embeddings(_rows((2, 1), (3, 4)), "emb", None)
    assert parsed.valid.tolist() == [1, 2, 3, 4]
    assert parsed.errors[0].startswith("wrong_length: field 'emb' has 2 values, expected 3")


# -- 3. fixed point: exact or refused --------------------------------------------------------

L = FIXED_SUM_LIMIT


@pytest.mark.parametrize(
    "a, b, want",
    [
        (1, 2, 3),
        (L - 1, 0, L - 1),
        (L // 2, L // 2 - 1, L - 1),
        (-(L - 1), -0, -(L - 1)),
        (L // 2, L // 2, SUM_OVERFLOWED),  # reaches the limit
        (-(L // 2), -(L // 2), SUM_OVERFLOWED),
        (L - 1, L - 1, SUM_OVERFLOWED),  # would be 2**63 - 2: still no wrap seen as in range
        (SUM_OVERFLOWED, 5, SUM_OVERFLOWED),
        (SUM_OVERFLOWED, -5, SUM_OVERFLOWED),  # wraps to +2**63 - 5 without the guard
        (SUM_OVERFLOWED, SUM_OVERFLOWED, SUM_OVERFLOWED),  # wraps to 0 without the guard
        (7, SUM_OVERFLOWED, SUM_OVERFLOWED),
    ],
)
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_fixed_sums_add_exactly_or_are_marked(a, b, want, lib):
    if lib == "numpy":
        total, part = np.array([[a, 1]], np.int64), np.array([[b, 1]], np.int64)
    else:
        total, part = torch.tensor([[a, 1]]), torch.tensor([[b, 1]])
    add_fixed_sums(total, part)
    assert [int(v) for v in total[0]] == [want, 2]


def test_values_at_the_bound_sum_exactly():
    x = torch.full((1000, 4), MAX_ABS_VALUE)
    x[:, 1] = -MAX_ABS_VALUE
    sums, counts = kernels.partial_sums(x, torch.zeros(1000, dtype=torch.int64), 1)
    assert int(sums[0, 0]) == 1000 * int(MAX_ABS_VALUE) * 2**kernels.FIXED_POINT_BITS
    new, _ = update_centroids(sums, counts, np.zeros((1, 4), np.float32), np.zeros(1), "l2")
    assert new[0].tolist() == [MAX_ABS_VALUE, -MAX_ABS_VALUE, MAX_ABS_VALUE, MAX_ABS_VALUE]


def test_the_bounds_fit_together():
    q = int(MAX_ABS_VALUE) * 2**kernels.FIXED_POINT_BITS + 1  # a row's largest fixed point
    assert MAX_ROWS_PER_SUM * q < L and (MAX_ROWS_PER_SUM + 1) * q >= L
    assert 2 * (L - 1) < 2**63  # two in-range sums never wrap
    assert config_mod.MAX_SAMPLE <= MAX_ROWS_PER_SUM  # in-memory sample sums are exact
    assert MAX_ABS_VALUE < float(torch.finfo(torch.float16).max)


class _Backend:
    def __init__(self):
        self.sent = []

    def add_partials(self, pass_id, flush_id, nodes, sums, counts, totals, rejected):
        self.sent.append((nodes.tolist(), sums.copy(), counts.tolist()))


def _batch(values: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(values, dtype=torch.int64)[:, None], torch.tensor(counts)


M = MAX_ROWS_PER_SUM
TOP = M * (int(MAX_ABS_VALUE) * 2**kernels.FIXED_POINT_BITS)  # M rows at the bound


@pytest.mark.parametrize(
    "batches, want",
    [
        # (per batch: node sums, node counts, rows), flushed sums
        ([([5, -3], [1, 1], 2), ([7, 0], [1, 0], 1)], [12, -3]),
        ([([L // 2, 1], [M // 2, 1], M), ([L // 2, 1], [M // 2, 1], M)], [SUM_OVERFLOWED, 2]),
        # the running sum crosses the limit, then comes back under it: still refused
        (
            [([L // 2, 0], [M, 1], M), ([L // 2, 0], [M, 1], M), ([-(L // 2), 0], [M, 1], M)],
            [SUM_OVERFLOWED, 0],
        ),
        # 4 x M rows at the bound sum to ~2**64, which wraps to ~0 unless checked every M rows
        ([([TOP, 0], [M, 0], M)] * 4, [SUM_OVERFLOWED, 0]),
        # a batch with more rows in a node than M may have wrapped in the kernel: refused
        ([([123, 4], [M + 1, 1], M + 2)], [SUM_OVERFLOWED, 4]),
    ],
)
def test_the_combiner_never_sends_a_wrapped_sum(batches, want):
    comb = PartialsCombiner("p", n_nodes=2, dim=1, device=torch.device("cpu"))
    for i, (values, counts, rows) in enumerate(batches):
        sums, cnt = _batch(values, counts)
        comb.add(f"f{i}", sums, cnt, {"rows": rows}, {})
    backend = _Backend()
    comb.flush(backend)
    ((nodes, sums, _),) = backend.sent
    got = dict(zip(nodes, sums[:, 0].tolist(), strict=True))
    assert [got.get(n, 0) for n in range(2)] == want


def test_the_bucket_never_wraps(ray_session):
    from mdf_taxonomy.backend import FitBackend

    backend = FitBackend(num_buckets=2, name_prefix="bad_numbers_fit")
    try:
        backend.start_pass("p", 4, 1)
        nodes = np.arange(4)
        for i, v in enumerate([[L // 2, 3, SUM_OVERFLOWED, -1], [L // 2, 4, -9, -(L - 2)]]):
            backend.add_partials(
                "p",
                f"f{i}",
                nodes,
                np.array(v, np.int64)[:, None],
                np.ones(4, np.int64),
                {"rows": 4},
                {},
            )
        got = backend.collect(4, 1)
    finally:
        backend.shutdown()
    assert got["sums"][:, 0].tolist() == [SUM_OVERFLOWED, 7, SUM_OVERFLOWED, -(L - 1)]


@pytest.mark.parametrize("bad", [SUM_OVERFLOWED, L, -L, 2**63 - 1])
def test_the_driver_refuses_an_overflowed_sum(bad):
    cfg = TaxonomyConfig(n_levels=1, branching_factor=2, dim=2)
    tax = Taxonomy(config=cfg, dim=2, levels=[Level(np.zeros((2, 2)), np.zeros(2))])
    tax.state.phase = "lloyd"
    sums = torch.tensor([[3, 4], [5, bad]], dtype=torch.int64)
    result = LloydResult(sums=sums, counts=torch.tensor([1, 1]), inertia_fixed=0, rows=2)
    with pytest.raises(OverflowError, match=r"1 node\(s\) \(first \[1\]\).*2\*\*62"):
        finish_pass(tax, result)


@pytest.mark.parametrize(
    "distance",
    [
        [0.0, 0.5, 1.25, 2.0],
        [1e6] * 1000,
        [3e14, 3e14, 1.0],  # each row < 2**63 in fixed point, their sum is not
        [1e30, 1.5e30, 2.0],  # one row past int64 on its own
    ],
)
def test_inertia_is_exact_for_any_finite_distance(distance):
    d = torch.tensor(distance, dtype=torch.float32)
    scaled = d.double() * 2**INERTIA_FIXED_POINT_BITS
    want = sum(int(v) for v in torch.round(scaled).tolist())
    assert inertia_to_fixed(d) == want
    if max(distance) < 1e9:  # the int64 path gives today's bits
        assert inertia_to_fixed(d) == int(torch.round(scaled).to(torch.int64).sum())


def test_kmeans_plus_plus_refuses_overflowing_rows_clearly():
    x = torch.tensor([[1e30, 0.0], [-1e30, 0.0], [0.0, 1e30]])
    with pytest.raises(OverflowError, match="MAX_ABS_VALUE"):
        kmeans_plus_plus(x, 3, seed=0)


# -- 4. degenerate data: capped children, reported -------------------------------------------


def _identical(n, dim=3):
    return np.tile(np.array([[1.0, 2.0, 3.0]], np.float32)[:, :dim], (n, 1))


def _few_distinct(n, distinct, dim=3):
    pts = np.random.default_rng(0).normal(size=(distinct, dim)).astype(np.float32)
    return pts[np.arange(n) % distinct]


def _normal(n, dim=3):
    return np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize(
    "level1, b, samples, rows, nodes, expect",
    [
        # all-identical rows: one child, not 8 copies of one point
        (
            None,
            8,
            {0: _identical(500)},
            {0: 500},
            [1],
            dict(distinct_rows=1, capped_parents=1, capped_children=7, few_distinct=1, few_rows=0),
        ),
        # -0.0 and 0.0 are one point
        (
            None,
            4,
            {0: np.array([[0.0, 0.0, 1.0], [-0.0, 0.0, 1.0]] * 5, np.float32)},
            {0: 10},
            [1],
            dict(distinct_rows=1, capped_parents=1, capped_children=3, few_distinct=1),
        ),
        # fewer distinct rows than children
        (
            None,
            8,
            {0: _few_distinct(300, 3)},
            {0: 300},
            [3],
            dict(distinct_rows=3, capped_parents=1, capped_children=5, few_distinct=1),
        ),
        # a branching factor larger than the rows
        (
            None,
            100,
            {0: _normal(5)},
            {0: 5},
            [5],
            dict(distinct_rows=5, capped_parents=1, capped_children=95, few_rows=1, few_distinct=0),
        ),
        # level 2: a normal parent, one with fewer rows than b, one without rows
        (
            3,
            4,
            {0: _normal(40), 1: _normal(2)},
            {0: 40, 1: 2},
            [4, 2, 1],
            dict(
                distinct_rows=42, capped_parents=2, capped_children=5, few_rows=1, empty_parents=1
            ),
        ),
        # nothing degenerate: nothing capped, nothing logged
        (
            None,
            4,
            {0: _normal(200)},
            {0: 200},
            [4],
            dict(
                distinct_rows=200,
                capped_parents=0,
                capped_children=0,
                few_rows=0,
                few_distinct=0,
                empty_parents=0,
            ),
        ),
    ],
)
def test_capped_children_are_recorded_and_logged_once(
    level1, b, samples, rows, nodes, expect, caplog
):
    n_levels = 1 if level1 is None else 2
    bf = b if level1 is None else [level1, b]
    tax = Taxonomy(config=TaxonomyConfig(n_levels=n_levels, branching_factor=bf, dim=3), dim=3)
    if level1 is not None:
        tax.levels = [Level(np.arange(9, dtype=np.float32).reshape(3, 3), np.zeros(3))]
        tax.state.level = 2
    with caplog.at_level(logging.WARNING, logger="mdf_taxonomy.model.fitting"):
        nxt = start_level(tax, SampleResult(rows=rows, samples=samples))
    lv = nxt.levels[-1]
    assert np.bincount(lv.parents).tolist() == nodes
    for p in range(len(nodes)):  # no two children of a parent share a point
        block = lv.centroids[lv.parents == p]
        assert len(np.unique(block, axis=0)) == len(block)
    entry = nxt.state.history[-1]
    assert {k: entry[k] for k in expect} == expect
    warnings = [r for r in caplog.records if "fewer than" in r.getMessage()]
    if expect["capped_children"]:
        assert len(warnings) == 1
        msg = warnings[0].getMessage()
        n_parents = 1 if level1 is None else level1
        assert msg.startswith(
            f"level {n_levels}: {expect['capped_parents']} of {n_parents} "
            f"parents got fewer than {b} children"
        )
        assert msg.endswith(f"; {expect['capped_children']} children not made")
    else:
        assert warnings == []


def test_identical_rows_fit_to_one_child_and_stay_there():
    cfg = TaxonomyConfig(n_levels=1, branching_factor=8, dim=3, init_iters=2)
    tax = start_level(
        Taxonomy(config=cfg, dim=3), SampleResult(rows={0: 64}, samples={0: _identical(64)})
    )
    x = torch.from_numpy(_identical(64))
    a = kernels.assign(x, torch.from_numpy(tax.levels[0].centroids))
    sums, counts = kernels.partial_sums(x, a.ids, 1)
    nxt = finish_pass(tax, LloydResult(sums, counts, inertia_to_fixed(a.distance), 64))
    assert nxt.levels[0].centroids.tolist() == [[1.0, 2.0, 3.0]]
    assert nxt.state.history[-1]["repaired"] == 0 and nxt.state.history[-1]["empty"] == 0


# -- 5. config validated when built ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": -1}, "seed=-1: must be an integer in [0, 2**63)"),
        ({"seed": 2**63}, "seed"),
        ({"seed": True}, "seed=True"),  # bools are not ints
        ({"seed": 1.0}, "seed=1.0"),
        ({"n_levels": 0}, "n_levels=0: must be an integer in [1, 64]"),
        ({"n_levels": 65}, "n_levels"),
        ({"n_levels": True}, "n_levels"),
        (
            {"branching_factor": 2**24 + 1},
            "branching_factor=16777217: must be an integer in [1, 2**24]",
        ),
        ({"branching_factor": 0}, "branching_factor"),
        ({"branching_factor": False}, "branching_factor"),
        ({"branching_factor": [2, True], "n_levels": 2}, "branching_factor"),
        ({"branching_factor": [2, 2**30], "n_levels": 2}, "branching_factor"),
        ({"branching_factor": [2, 3]}, "one entry per level (1)"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 10**6 + 1}, "max_iter=1000001: must be an integer in [1, 1000000]"),
        ({"tol": NAN}, "tol=nan: must be a finite number >= 0"),
        ({"tol": -1e-9}, "tol"),
        ({"tol": INF}, "tol"),
        ({"tol": True}, "tol"),
        ({"tol": "0.1"}, "tol"),
        ({"sample_per_child": 0}, "sample_per_child"),
        ({"sample_per_child": -5}, "sample_per_child"),
        ({"max_sample_per_node": 0}, "max_sample_per_node"),
        ({"max_sample_per_node": 2**20 + 1}, "max_sample_per_node"),
        ({"init_iters": -1}, "init_iters=-1: must be an integer in [0, 1000000]"),
        ({"dim": 0}, "dim"),
        ({"dim": 3.0}, "dim"),
        ({"metric": "dot"}, "metric='dot': must be one of ('l2', 'cosine')"),
        ({"embedding_field": ""}, "embedding_field='': must be a non-empty string"),
        ({"embedding_field": 3}, "embedding_field=3: must be a non-empty string, or null"),
    ],
)
def test_config_refuses_bad_values_naming_the_parameter_and_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        TaxonomyConfig(**kwargs)
    assert str(err.value).startswith("TaxonomyConfig.")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"n_levels": 64, "branching_factor": 2},
        {"branching_factor": 2**24},
        {"tol": 0},
        {"tol": 0.5},
        {"max_iter": 10**6},
        {"init_iters": 0},
        {"max_sample_per_node": 2**20},
        {"dim": None},
        {"dim": 1},
        {"n_levels": 2, "branching_factor": [3, 1]},
    ],
)
def test_config_accepts_the_edges_of_each_range(kwargs):
    TaxonomyConfig(**kwargs)


def test_every_parameter_has_exactly_one_constraint():
    names = {f.name for f in dataclasses.fields(TaxonomyConfig)} - {"extra"}
    assert set(config_mod.PARAMETER_CONSTRAINTS) == names


@pytest.mark.parametrize("seed, level", list(itertools.product([0, 2**62, 2**63 - 1], [1, 64])))
def test_every_valid_seed_runs(seed, level):
    assert 0 <= node_seed(seed, level, 10**6) < 2**63
    prio = sample_priorities(np.ones((2, 3), np.float32), seed, level)
    assert prio.dtype == np.uint64
    kmeans_plus_plus(torch.from_numpy(_normal(10)), 2, node_seed(seed, level, 0))
