"""Semantic dedup within nodes: the exact search against brute force, planted near-duplicates
(within nodes and split across a boundary), the same output for any split, order, block
size or dtype, eps chosen afterwards, and the MDF filter that drops the marked rows."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from mdf_taxonomy.curation import semdedup
from mdf_taxonomy.curation.semdedup import (
    canonical_dot,
    is_duplicate,
    node_max_similarity,
    rank_keys,
    similarity_tolerance,
    unit_rows,
)
from mdf_taxonomy.curation.semdedup_boundary import runner_up
from mdf_taxonomy.curation.semdedup_parquet import DEDUP_FIELDS, dedup_parquet
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig
from mdf_taxonomy.model.config import parameter_docs
from mdf_taxonomy.operators.semantic_dedup_filter import SemanticDedupFilter
from mdf_taxonomy.passes.parquet_sink import ParquetSink

DIM = 16
EPS = 0.02
CROSS = 0.1


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force(x, ids, keys):
    """Each row's max canonical similarity to an earlier (key, id) row, smallest id on ties."""
    order = np.lexsort((ids, keys))
    u = unit_rows(torch.as_tensor(x[order]))
    val, eid = np.full(len(x), -np.inf, np.float32), np.full(len(x), -1, np.int64)
    for i in range(1, len(x)):
        s = canonical_dot(u[i].expand(i, -1), u[:i]).float().numpy()
        val[order[i]] = s.max()
        eid[order[i]] = ids[order][:i][s == s.max()].min()
    return val, eid


def test_node_search_is_exact_for_any_block_size_dtype_and_row_order(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(120, 24)).astype(np.float32)
    x = np.concatenate([base, base[:30] + 0.02 * rng.normal(size=(30, 24)).astype(np.float32)])
    x = np.concatenate([x, x[:3]])  # exact copies: equal similarities, ties go by id
    ids = rng.permutation(len(x)).astype(np.int64) * 5 + 2
    keys = rng.normal(size=len(x))
    want = _brute_force(x, ids, keys)
    assert (want[0] >= 0.999).sum() >= 30
    cases = [("float32", 16), ("float32", 64), ("float32", 4096), ("bfloat16", 13)]
    cases += [("bfloat16", 4096), ("float16", 13)]
    for dtype, block_rows in cases:
        got = node_max_similarity(x, ids, keys, block_rows=block_rows, compute_dtype=dtype)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    with monkeypatch.context() as m:  # several passes over the columns per row block
        m.setattr(semdedup, "_G_ELEMENTS", {"cpu": 128, "cuda": 128})
        got = node_max_similarity(x, ids, keys, block_rows=16, compute_dtype="bfloat16")
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    perm = rng.permutation(len(x))
    got = node_max_similarity(x[perm], ids[perm], keys[perm], block_rows=16)
    assert np.array_equal(got[0], want[0][perm]) and np.array_equal(got[1], want[1][perm])
    first = np.lexsort((ids, keys))[0]
    assert want[0][first] == -np.inf and want[1][first] == -1


def test_the_tolerance_bounds_the_low_precision_error():
    rng = np.random.default_rng(1)
    u = unit_rows(torch.as_tensor(rng.normal(size=(400, 256)), dtype=torch.float32))
    exact = u.double() @ u.double().T
    for dtype in (torch.bfloat16, torch.float16):
        low = u.to(dtype).float() @ u.to(dtype).float().T
        err = (low.to(dtype).double() - exact).abs().max().item()  # output rounded too
        assert err <= similarity_tolerance(dtype, 256)
    assert similarity_tolerance(torch.bfloat16, 1024) == pytest.approx(0.0119, abs=1e-4)


def _tree() -> Taxonomy:
    g = np.random.default_rng(7)
    top = _unit(g.normal(size=(2, DIM)))
    parents = np.array([0, 0, 0, 1, 1])
    leaves = _unit(top[parents] + 0.8 * _unit(g.normal(size=(5, DIM))))
    cfg = TaxonomyConfig(n_levels=2, branching_factor=[2, 3], metric="cosine")
    levels = [Level(top, np.zeros(2, np.int64)), Level(leaves, parents)]
    return Taxonomy(config=cfg, dim=DIM, levels=levels, state=FitState(phase="done"))


@pytest.fixture(scope="module")
def planted():
    """Labelled rows: 150 base rows, 30 near-copies (similarity ~0.9998), and pairs split
    across sibling leaves (similarity ~0.998, each row on its side of the boundary)."""
    tax = _tree()
    g = np.random.default_rng(3)
    c = tax.levels[1].centroids
    base = _unit(c[g.integers(0, 5, 150)] + 0.6 * g.normal(size=(150, DIM)) / DIM**0.5)
    copies = _unit(base[:30] + 0.02 * g.normal(size=(30, DIM)) / DIM**0.5)
    split = []
    for a, b in ((0, 1), (1, 2), (3, 4)):
        mid, diff = _unit(c[a] + c[b]), _unit(c[a] - c[b])
        for _ in range(4):
            side = 0.3 * g.normal(size=DIM) / DIM**0.5
            side -= (side @ diff) * diff  # along the boundary, not across it
            split += [_unit(mid + 0.035 * diff + side), _unit(mid - 0.025 * diff + side)]
    x = np.concatenate([base, copies, np.array(split)]).astype(np.float32)
    labels = tax.assign_paths(x)
    ids = g.permutation(len(x)).astype(np.int64) * 7 + 3
    first = 180 + 2 * np.arange(len(split) // 2)
    crossing = labels.paths[first, 1] != labels.paths[first + 1, 1]
    table = pa.table(
        {
            "id": ids,
            "embedding": pa.array(list(x), pa.list_(pa.float32())),
            "text": [f"row {i}" for i in range(len(x))],
            "taxonomy_l1": pa.array(labels.paths[:, 0], pa.int32()),
            "taxonomy_l2": pa.array(labels.paths[:, 1], pa.int32()),
            "taxonomy_margin": labels.margin,
        }
    )
    return tax, table, int(crossing.sum())


def _write(table: pa.Table, path, how: str) -> str:
    if how == "partitioned":
        sink = ParquetSink(str(path), ["taxonomy_l1"])
        sink.write(table)
        sink.close()
    else:  # shuffled, in small row groups over three files
        table = table.take(np.random.default_rng(5).permutation(table.num_rows))
        path.mkdir(parents=True)
        for i, part in enumerate(np.array_split(np.arange(table.num_rows), 3)):
            pq.write_table(table.take(part), path / f"f{i}.parquet", row_group_size=13)
    return str(path)


def _read(path) -> pa.Table:
    out = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    return out.take(pa.compute.sort_indices(out, [("id", "ascending")]))


def _reference(tax: Taxonomy, table: pa.Table, cross: float | None):
    """The rule by brute force in float64: (max similarity, id) per row, by id."""
    table = table.take(pa.compute.sort_indices(table, [("id", "ascending")]))
    x = _unit(np.array(table["embedding"].to_pylist(), np.float64))
    ids, leaf = table["id"].to_numpy(), table["taxonomy_l2"].to_numpy().astype(np.int64)
    c = _unit(tax.levels[1].centroids.astype(np.float64))
    key = -(1 - (x * c[leaf]).sum(1))  # hard: furthest first
    d = 1 - x @ c.T
    parents = tax.levels[1].parents
    sibling = parents[None, :] == parents[leaf][:, None]
    sibling[np.arange(len(x)), leaf] = False
    d_other = np.where(sibling, d, np.inf)
    runner = np.argmin(d_other, 1)
    near = d_other[np.arange(len(x)), runner] - d[np.arange(len(x)), leaf] < (cross or -1)
    allowed = leaf[:, None] == leaf[None, :]
    allowed |= near[:, None] & (leaf[None, :] == runner[:, None])
    allowed |= near[None, :] & (leaf[:, None] == runner[None, :])
    earlier = (key[None, :] < key[:, None]) | (
        (key[None, :] == key[:, None]) & (ids < ids[:, None])
    )
    s = np.where(allowed & earlier, x @ x.T, -np.inf)
    return ids, s.max(1), ids[np.argmax(s, 1)], leaf


def _pairs(got: pa.Table) -> list[tuple[int, int]]:
    """(row id, id of the earlier row it duplicates) for every flagged row."""
    cols = [got[c].to_numpy() for c in ("id", "dedup_duplicate_of", "is_duplicate")]
    return [(int(i), int(j)) for i, j, dup in zip(*cols, strict=True) if dup]


def _check_against_reference(got: pa.Table, ref) -> int:
    """Precision and recall of duplicate pairs == 1 (ties within 1e-6 of the threshold
    aside, counted and returned)."""
    ids, best, best_id, _ = ref
    assert got["id"].to_numpy().tolist() == ids.tolist()
    sim = got["dedup_max_similarity"].to_numpy()
    ties = np.abs(best - (1 - EPS)) < 1e-6
    want = {(i, j) for i, j, b in zip(ids, best_id, best, strict=True) if b >= 1 - EPS}
    found = set(_pairs(got))
    untied = set(ids[~ties].tolist())
    want, found = {p for p in want if p[0] in untied}, {p for p in found if p[0] in untied}
    assert len(found & want) == len(found) == len(want)  # precision = recall = 1.0
    finite = np.isfinite(best)
    assert np.allclose(sim[finite], best[finite], atol=1e-6)
    assert (sim[~finite] == -np.inf).all()
    return int(ties.sum())


def test_duplicates_within_nodes_are_those_of_brute_force(planted, tmp_path):
    tax, table, n_split = planted
    src = _write(table, tmp_path / "in", "partitioned")
    summary = dedup_parquet(tax, src, str(tmp_path / "out"), EPS)
    got = _read(tmp_path / "out")
    assert _check_against_reference(got, _reference(tax, table, None)) == 0
    assert summary["duplicates"] == int(got["is_duplicate"].to_numpy().sum()) >= 30
    assert summary["duplicates_across_nodes"] == 0 and n_split >= 6  # split pairs: unseen
    assert set(got.column_names) >= {*table.column_names, "dedup_duplicate_of"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "taxonomy_l1=0",
        "taxonomy_l1=1",
    ]


def test_the_boundary_option_finds_the_split_pairs(planted, tmp_path):
    tax, table, n_split = planted
    src = _write(table, tmp_path / "in", "partitioned")
    summary = dedup_parquet(tax, src, str(tmp_path / "out"), EPS, cross_boundary_margin=CROSS)
    got = _read(tmp_path / "out")
    ref = _reference(tax, table, CROSS)
    assert _check_against_reference(got, ref) == 0
    assert summary["duplicates_across_nodes"] == n_split
    leaf_of = dict(zip(ref[0].tolist(), ref[3].tolist(), strict=True))
    assert sum(leaf_of[i] != leaf_of[j] for i, j in _pairs(got)) == n_split


@pytest.mark.parametrize(("cross", "ranking"), [(None, "hard"), (CROSS, "random"), (CROSS, "easy")])
def test_the_same_output_for_any_split_order_block_size_and_dtype(
    planted, tmp_path, cross, ranking
):
    tax, table, _ = planted
    runs = []
    cases = [
        ("partitioned", 4096, "float32"),
        ("shuffled", 8, "float32"),
        ("shuffled", 16, "bfloat16"),
    ]
    for i, (how, block_rows, dtype) in enumerate(cases):
        out = tmp_path / f"out{i}"
        dedup_parquet(
            tax,
            _write(table, tmp_path / f"in{i}", how),
            str(out),
            EPS,
            cross_boundary_margin=cross,
            ranking=ranking,
            block_rows=block_rows,
            compute_dtype=dtype,
            partition_by=[],
        )
        runs.append(_read(out).select(["id", *DEDUP_FIELDS]))
    assert runs[0].equals(runs[1]) and runs[0].equals(runs[2])


def test_eps_chosen_afterwards_is_a_fresh_run_with_that_eps(planted, tmp_path):
    tax, table, _ = planted
    src = _write(table, tmp_path / "in", "partitioned")
    dedup_parquet(tax, src, str(tmp_path / "a"), EPS)
    dedup_parquet(tax, src, str(tmp_path / "b"), 0.3)
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    again = is_duplicate(a["dedup_max_similarity"].to_numpy(), 0.3)
    assert np.array_equal(again, b["is_duplicate"].to_numpy())
    assert b["is_duplicate"].to_numpy().sum() > a["is_duplicate"].to_numpy().sum()


def test_the_runner_up_is_the_nearest_other_sibling_in_the_trees_metric():
    tax = _tree()
    tax.config = TaxonomyConfig(n_levels=2, branching_factor=[2, 3], metric="l2")
    x = np.random.default_rng(4).normal(size=(40, DIM)).astype(np.float32)
    other, margin = runner_up(tax, 2, 1, unit_rows(torch.as_tensor(x)), x)
    x64, c64 = x.astype(np.float64), tax.levels[1].centroids.astype(np.float64)
    d = np.linalg.norm(x64[:, None, :] - c64[None, :3], axis=2)  # leaves 0-2 share a parent
    d[:, 1] = np.inf
    assert np.array_equal(other, np.argmin(d, 1))
    own = np.linalg.norm(x64 - c64[1], axis=1)
    assert np.allclose(margin, d.min(1) - own, atol=1e-9)
    only = runner_up(_tree(), 1, 0, unit_rows(torch.as_tensor(x)), None)
    assert (only[0] == 1).all()  # two top nodes: the other one
    tax.levels[0] = Level(tax.levels[0].centroids[:1], np.zeros(1, np.int64))
    tax.levels[1] = Level(tax.levels[1].centroids[:1], np.zeros(1, np.int64))
    other, margin = runner_up(tax, 2, 0, unit_rows(torch.as_tensor(x)), x)
    assert (other == -1).all() and np.isinf(margin).all()  # an only child


def test_rankings_order_the_rows_as_documented():
    tax = _tree()
    g = np.random.default_rng(2)
    x = (tax.levels[1].centroids[0] + 0.5 * g.normal(size=(50, DIM))).astype(np.float32)
    unit = unit_rows(torch.as_tensor(x))
    cos = (_unit(x.astype(np.float64)) * _unit(tax.levels[1].centroids[0])).sum(1)
    hard = rank_keys(unit, tax.levels[1].centroids[0], "hard")
    easy = rank_keys(unit, tax.levels[1].centroids[0], "easy")
    assert np.argsort(hard)[0] == np.argmin(cos) and np.argsort(easy)[0] == np.argmax(cos)
    r0, r1 = (rank_keys(unit, None, "random", raw=x, seed=s) for s in (0, 1))
    assert r0.dtype == np.uint64 and not np.array_equal(np.argsort(r0), np.argsort(r1))
    assert np.array_equal(r0, rank_keys(unit, None, "random", raw=x[::-1].copy(), seed=0)[::-1])


def test_bad_rows_are_written_uncompared_and_counted(planted, tmp_path):
    tax, table, _ = planted
    n = table.num_rows
    emb = table["embedding"].to_pylist()
    emb[0], emb[1] = None, [0.0] * DIM  # missing, zero norm
    ids = table["id"].to_numpy().copy()
    leaf = table["taxonomy_l2"].to_numpy().copy()
    twin = 6 + int(np.flatnonzero(leaf[6:] == leaf[3])[0])
    ids[3] = ids[twin]  # an id repeated within a node: one of the two is compared
    leaf[5] = -1
    bad = table.set_column(1, "embedding", pa.array(emb, pa.list_(pa.float32())))
    bad = bad.set_column(0, "id", pa.array(ids)).set_column(4, "taxonomy_l2", pa.array(leaf))
    bad = bad.append_column("note", pa.array(["x"] * n))
    summary = dedup_parquet(
        tax, _write(bad, tmp_path / "in", "partitioned"), str(tmp_path / "o"), EPS
    )
    assert summary["rows"] == n and summary["compared"] == n - 4
    assert summary["skipped"] == {
        "missing_embedding": 1,
        "zero_vector": 1,
        "unlabelled": 1,
        "duplicate_id": 1,
    }
    got = ds.dataset(str(tmp_path / "o"), partitioning="hive").to_table()
    assert got.num_rows == n and np.isnan(got["dedup_max_similarity"].to_numpy()).sum() == 4
    assert (
        not got["is_duplicate"].to_numpy()[np.isnan(got["dedup_max_similarity"].to_numpy())].any()
    )


def test_the_filter_drops_exactly_the_marked_rows(planted, tmp_path):
    tax, table, _ = planted
    dedup_parquet(tax, _write(table, tmp_path / "in", "partitioned"), str(tmp_path / "o"), EPS)
    records = _read(tmp_path / "o").to_pylist()
    kept = SemanticDedupFilter().process_batch(records)
    assert [r is None for r in kept] == [r["is_duplicate"] for r in records]
    loose = SemanticDedupFilter(eps=0.3)
    kept = loose.process_batch(records)
    want = is_duplicate(np.array([r["dedup_max_similarity"] for r in records]), 0.3)
    assert [r is None for r in kept] == want.tolist()
    odd = [{"id": 1}, {"dedup_max_similarity": float("nan")}, {"is_duplicate": "yes"}, None]
    assert loose.process_batch(odd[:3]) == odd[:3]
    assert loose.should_keep_batch([None]) == [True]
    stats = loose.get_stats()
    assert stats["dropped"] == int(want.sum())
    assert stats["kept_undecided"] == {
        "missing_is_duplicate": 1,
        "not_compared": 1,
        "bad_is_duplicate": 1,
        "not_a_record": 1,
    }
    with pytest.raises(ValueError, match="eps"):
        SemanticDedupFilter(eps=-1)


def test_the_filter_documents_every_parameter():
    docs = parameter_docs(SemanticDedupFilter)
    assert set(docs) == {"eps", "similarity_field", "duplicate_field"}
    assert all(spec and meaning for spec, meaning in docs.values())


# The search on the fused assignment kernels (semdedup_kernels): the same bits as the torch
# search. Without CUDA the Triton kernels run under the CPU interpreter, which must be
# chosen before Triton decorates them (tests/test_kernels_triton.py does the same).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _kernel_device() -> str:
    """Where the kernel search can run here ("cuda", or "cpu" interpreted), else skip."""
    pytest.importorskip("triton")
    from mdf_taxonomy.kernels import assign_kernels

    if assign_kernels.INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels compiled without the interpreter and no CUDA")


def _both_searches(x, ids, keys, device, **kw):
    """(torch search, kernel search, the kernel search's stats) on `device`."""
    t = torch.as_tensor(x, device=device)
    want = node_max_similarity(t, ids, keys, kernels=False, **kw)
    stats: dict = {}
    got = node_max_similarity(t, ids, keys, kernels=True, stats=stats, **kw)
    return want, got, stats


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")  # interpreter
def test_the_kernel_search_gives_the_torch_searchs_bits():
    """fp32/fp16/bf16, nodes over several blocks, near-copies and exact copies (ties by
    id): (max_sim, earlier_id) bit-identical to the torch search and to brute force."""
    device = _kernel_device()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(120, 24)).astype(np.float32)
    x = np.concatenate([base, base[:30] + 0.02 * rng.normal(size=(30, 24)).astype(np.float32)])
    x = np.concatenate([x, x[:3], x[:3], x[140:142]])  # exact copies: ties go by id
    ids = rng.permutation(len(x)).astype(np.int64) * 5 + 2
    keys = rng.normal(size=len(x))
    brute = _brute_force(x, ids, keys)
    cases = [("float32", 16), ("float32", 50), ("float32", 4096), ("float16", 37)]
    cases += [("bfloat16", 64)]
    for dtype, block_rows in cases:
        want, got, stats = _both_searches(
            x, ids, keys, device, block_rows=block_rows, compute_dtype=dtype
        )
        for a, b in ((got, want), (got, brute)):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), (dtype, block_rows)
        assert stats["kernel_calls"] == 1  # the whole lower triangle in one launch
        assert 0 < stats["uncertain_rows"] < len(x)  # both ways of settling a row were taken
    first = np.lexsort((ids, keys))[0]
    assert got[0][first] == -np.inf and got[1][first] == -1


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")  # interpreter
def test_the_kernel_search_settles_ties_among_many_copies_by_id():
    """Each of 6 rows copied 9 times across blocks: every later copy's maximum is 1 or
    the largest value, and the earlier row is the smallest id among the equal ones."""
    device = _kernel_device()
    rng = np.random.default_rng(5)
    x = np.repeat(rng.normal(size=(6, 16)).astype(np.float32), 9, axis=0)
    x[::7] += 0.001 * rng.normal(size=x[::7].shape).astype(np.float32)
    ids = rng.permutation(10 * len(x))[: len(x)].astype(np.int64)
    keys = rng.integers(0, 4, size=len(x)).astype(np.float64)  # ranking ties: by id
    want, got, stats = _both_searches(x, ids, keys, device, block_rows=8)
    brute = _brute_force(x, ids, keys)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.array_equal(got[0], brute[0]) and np.array_equal(got[1], brute[1])
    assert stats["uncertain_rows"] > len(x) // 2


def test_the_row_tolerances_bound_the_kernels_error():
    """|16-bit score - exact| <= the row's bound for every pair, products exact and summed
    in float32 (as on tensor cores), and the bound is tighter than the worst case."""
    from mdf_taxonomy.curation.semdedup_kernels import kernel_tolerance, row_tolerances

    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 256))
    x[:20] *= rng.uniform(1e-3, 1, size=(20, 256))  # uneven entries: subnormals, wide range
    u = unit_rows(torch.as_tensor(x, dtype=torch.float32))
    exact = u.double() @ u.double().T
    for dtype in (torch.bfloat16, torch.float16):
        low = u.to(dtype).float()
        tol = row_tolerances(u, low, dtype)
        err = ((low @ low.T).double() - exact).abs()
        assert bool((err <= tol[:, None]).all())
        assert float(tol.max()) < kernel_tolerance(dtype, 256)
    tol = row_tolerances(u, u, torch.float32)
    assert float(tol.min()) == float(tol.max()) == kernel_tolerance(torch.float32, 256)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")  # interpreter
def test_the_kernel_searchs_second_pass_in_chunks_and_its_timing(monkeypatch):
    from mdf_taxonomy.curation import semdedup_kernels as SK

    device = _kernel_device()
    rng = np.random.default_rng(6)
    x = np.repeat(rng.normal(size=(30, 12)).astype(np.float32), 3, axis=0)
    ids, keys = rng.permutation(len(x)).astype(np.int64), rng.normal(size=len(x))
    monkeypatch.setattr(SK, "_FALLBACK_ELEMENTS", 100)  # a few rows per dense GEMM
    monkeypatch.setattr(SK, "_PAIR_ELEMENTS", 24)  # two pairs per canonical_dot call
    for listed, dense in ((64, False), (1, True)):  # 1: every uncertain row has more
        monkeypatch.setattr(SK, "_CANDIDATES", listed)
        want, got, stats = _both_searches(x, ids, keys, device, block_rows=32)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert stats["uncertain_rows"] > 0
        assert stats["dense_rows"] == (stats["uncertain_rows"] if dense else 0)
    stats = {"timing": True}
    t = torch.as_tensor(x, device=device)
    node_max_similarity(t, ids, keys, block_rows=32, kernels=True, stats=stats)
    want = {"prepare_s", "tolerances_s", "kernel_s", "canonical_s", "second_pass_s", "results_s"}
    assert want <= set(stats)


def test_the_kernel_search_is_chosen_on_cuda_only_and_checks_its_arguments():
    from mdf_taxonomy.curation import semdedup_kernels as SK

    x = np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32)
    ids, keys = np.arange(20), np.zeros(20)
    stats: dict = {}
    node_max_similarity(x, ids, keys, stats=stats)  # CPU: the torch search
    assert "candidate_groups" in stats and "kernel_calls" not in stats
    assert not SK.kernel_available("cpu")
    assert SK.kernel_tolerance(torch.float32, 1024) > similarity_tolerance(torch.float16, 1024)
    u = unit_rows(torch.as_tensor(x))
    with pytest.raises(ValueError, match="compute_dtype"):
        SK.assigner_max_similarity(u, ids, compute_dtype="int8")
    val, eid = SK.assigner_max_similarity(u[:1], ids[:1])
    assert val.tolist() == [-np.inf] and eid.tolist() == [-1]
