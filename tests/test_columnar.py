"""The columnar pass: decoded rows kept across passes, every column layout, output
column-wise and partitioned, workers balanced by rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import blobs, write_embeddings
from taxonomy_toys import assert_same_tree

from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.passes.columnar import split_items

N, DIM = 300, 8
PARAMS = dict(n_levels=2, branching_factor=[3, 2], seed=5, max_iter=3, tol=0.0, progress=False)


@pytest.fixture(scope="module")
def rows():
    x, _ = blobs(N, DIM, 6, seed=9)
    return x


def _fit(tmp_path, data, name, **kw):
    engine = TaxonomyEngine(storage_uri=str(tmp_path / f"{name}-tax"), **{**PARAMS, **kw})
    tax = engine.fit(str(data))
    return engine, tax


def test_later_passes_read_the_cache_and_streaming_gives_the_same_tree(rows, tmp_path):
    data = write_embeddings(tmp_path / "d" / "a.parquet", rows, row_group_size=64)
    cached, tax = _fit(tmp_path, data, "cached")
    passes = cached.last_fit.pass_log
    assert passes[0]["cached_rows"] == N  # the first pass decoded and kept every row group
    assert all(p["cached_rows"] == N for p in passes)
    streamed, tax_streamed = _fit(tmp_path, data, "streamed", cache_bytes=0)
    assert all(p["cached_rows"] == 0 for p in streamed.last_fit.pass_log)
    assert_same_tree(tax_streamed, tax)
    assert tax_streamed.state.history == tax.state.history


def test_every_column_layout_gives_the_same_tree(rows, tmp_path):
    trees = {}
    for layout in ("list", "large", "fixed"):
        data = write_embeddings(
            tmp_path / layout / "a.parquet", rows, list_type=layout, row_group_size=100
        )
        trees[layout] = _fit(tmp_path, data, layout)[1]
    raw = pa.array([r.tobytes() for r in rows], pa.binary(4 * DIM))
    path = tmp_path / "binary" / "a.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": np.arange(N), "embedding": raw}), path, row_group_size=100)
    trees["binary"] = _fit(tmp_path, path, "binary")[1]
    for tax in trees.values():
        assert_same_tree(tax, trees["list"])


def test_labelled_output_is_partitioned_by_the_top_level(rows, tmp_path):
    data = write_embeddings(tmp_path / "d" / "a.parquet", rows, row_group_size=128)
    engine = TaxonomyEngine(
        storage_uri=str(tmp_path / "tax"), partition_by=["taxonomy_l1"], **PARAMS
    )
    engine.fit(str(data), output=str(tmp_path / "out"))
    table = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table()
    assert sorted(table["id"].to_pylist()) == list(range(N))
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == [f"taxonomy_l1={i}" for i in range(3)]
    top = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table(
        filter=ds.field("taxonomy_l1") == 1
    )
    assert top.num_rows and set(top["taxonomy_path"].to_pylist()) <= {"1/2", "1/3"}


def test_row_groups_are_dealt_to_workers_by_rows():
    items = [f"f::rg={i}" for i in range(6)]
    shares = split_items(items, [100, 10, 10, 90, 5, 5], 2)
    assert sorted(sum(shares, [])) == sorted(items)
    loads = [
        sum({"0": 100, "1": 10, "2": 10, "3": 90, "4": 5, "5": 5}[i[-1]] for i in s) for s in shares
    ]
    assert max(loads) - min(loads) <= 10
    assert all(share == sorted(share, key=items.index) for share in shares)
