"""ParquetEmbeddingLoader: files, globs, Hive directories, projection, pushdown, list types,
and every column (the embedding's value type too) passed through unchanged."""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import blobs, write_embeddings

from mdf_taxonomy.operators import InputError, ParquetEmbeddingLoader


def load_all(loader: ParquetEmbeddingLoader) -> list[dict]:
    return list(loader.load_files(loader.get_file_list()))


@pytest.mark.parametrize("list_type", ["list", "large", "fixed"])
def test_float32_rows_from_every_list_type(tmp_path, list_type):
    x, _ = blobs(50, 8, 3)
    write_embeddings(tmp_path / "a.parquet", x, list_type=list_type)
    recs = load_all(ParquetEmbeddingLoader(str(tmp_path / "a.parquet")))
    assert [r["id"] for r in recs] == list(range(50))
    got = np.stack([r["embedding"] for r in recs])
    assert got.dtype == np.float32 and np.array_equal(got, x)


def test_work_is_split_by_row_group_and_glob(tmp_path):
    x, _ = blobs(300, 4, 2)
    write_embeddings(tmp_path / "p1.parquet", x[:200], ids=np.arange(200), row_group_size=50)
    write_embeddings(tmp_path / "p2.parquet", x[200:], ids=np.arange(200, 300), row_group_size=50)
    loader = ParquetEmbeddingLoader(str(tmp_path / "*.parquet"))
    items = loader.get_file_list()
    assert len(items) == 6
    ids = [r["id"] for r in load_all(loader)]
    assert sorted(ids) == list(range(300)) and len(ids) == 300
    # two halves of the work list give disjoint records
    half = [r["id"] for r in loader.load_files(items[:3])]
    assert half == list(range(150))


def test_hive_directory_projection_and_pushdown_filter(tmp_path):
    x, _ = blobs(40, 4, 2)
    for i, kingdom in enumerate(["Animalia", "Plantae"]):
        write_embeddings(
            tmp_path / f"kingdom={kingdom}" / "part.parquet",
            x[i * 20 : (i + 1) * 20],
            ids=np.arange(i * 20, (i + 1) * 20),
            extra={"note": pa.array(["n"] * 20)},
        )
    loader = ParquetEmbeddingLoader(
        str(tmp_path), columns=["id", "kingdom"], filter=[[("kingdom", "==", "Plantae")]]
    )
    recs = load_all(loader)
    assert sorted(r["id"] for r in recs) == list(range(20, 40))
    assert all(r["kingdom"] == "Plantae" and "note" not in r for r in recs)
    assert loader.count_rows() == 20


def test_nulls_and_ragged_rows_reach_the_operator(tmp_path):
    emb = pa.array([[1.0, 2.0], None, [3.0], [4.0, None]], pa.list_(pa.float64()))
    pq.write_table(pa.table({"id": [0, 1, 2, 3], "embedding": emb}), tmp_path / "r.parquet")
    recs = load_all(ParquetEmbeddingLoader(str(tmp_path / "r.parquet")))
    assert recs[1]["embedding"] is None
    assert recs[2]["embedding"].tolist() == [3.0]
    assert recs[0]["embedding"].dtype == np.float64  # the column's own type
    assert np.isnan(recs[3]["embedding"][1])


def test_unreadable_input_is_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        ParquetEmbeddingLoader(str(tmp_path / "missing.parquet")).get_file_list()
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="junk.parquet"):
        ParquetEmbeddingLoader(str(tmp_path / "junk.parquet")).get_file_list()
    x, _ = blobs(5, 3, 1)
    write_embeddings(tmp_path / "ok.parquet", x)
    with pytest.raises(InputError, match="no column 'vec'"):
        ParquetEmbeddingLoader(str(tmp_path / "ok.parquet"), embedding_field="vec").get_file_list()


LIST_TYPES = {"list": pa.list_, "large": pa.large_list, "fixed": lambda t: pa.list_(t, 3)}


@pytest.mark.parametrize("list_type", sorted(LIST_TYPES))
@pytest.mark.parametrize("value_type", ["float16", "float32", "float64", "int8", "int64"])
def test_every_column_passes_through_unchanged(tmp_path, value_type, list_type):
    values = np.arange(12).reshape(4, 3).astype(value_type)
    emb_type = LIST_TYPES[list_type](pa.from_numpy_dtype(np.dtype(value_type)))
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "embedding": pa.array([list(r) for r in values], emb_type),
            "caption": ["a", None, "c", "d"],
            "score": pa.array([0.5, 1.5, None, 2.5], pa.float64()),
            "taken": pa.array(
                [datetime.datetime(2024, 1, d) for d in (1, 2, 3, 4)], pa.timestamp("ms")
            ),
            "tags": pa.array([["x"], [], None, ["y", "z"]], pa.list_(pa.string())),
            "meta": pa.array([{"k": i} for i in range(4)], pa.struct([("k", pa.int16())])),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    recs = load_all(ParquetEmbeddingLoader(str(tmp_path / "t.parquet")))
    got = np.stack([r["embedding"] for r in recs])
    assert got.dtype == np.dtype(value_type) and np.array_equal(got, values)
    back = pa.Table.from_pylist(
        [{**r, "embedding": r["embedding"].tolist()} for r in recs], schema=table.schema
    )
    assert back.equals(table)


@pytest.mark.parametrize("spelling", ["glob_dirs", "glob_files", "glob_deep", "list", "dir"])
def test_globs_and_path_lists_keep_hive_partition_columns(tmp_path, spelling):
    x, _ = blobs(30, 4, 2)
    for i, (kingdom, year) in enumerate([("Animalia", 2020), ("Plantae", 2020), ("Plantae", 2021)]):
        write_embeddings(
            tmp_path / f"kingdom={kingdom}" / f"year={year}" / "part.parquet",
            x[i * 10 : (i + 1) * 10],
            ids=np.arange(i * 10, (i + 1) * 10),
        )
    path = {
        "glob_dirs": str(tmp_path / "kingdom=*"),
        "glob_files": str(tmp_path / "*" / "*" / "*.parquet"),
        "glob_deep": str(tmp_path / "kingdom=Plantae" / "year=*" / "part.parquet"),
        "list": [str(tmp_path / "kingdom=Animalia"), str(tmp_path / "kingdom=Plantae")],
        "dir": str(tmp_path),
    }[spelling]
    recs = load_all(ParquetEmbeddingLoader(path))
    by_id = {r["id"]: r for r in recs}
    want = {0: ("Animalia", 2020), 15: ("Plantae", 2020), 25: ("Plantae", 2021)}
    if spelling == "glob_deep":  # base kingdom=Plantae/: only the year is below it
        assert sorted(by_id) == list(range(10, 30)) and "kingdom" not in by_id[15]
        assert (by_id[15]["year"], by_id[25]["year"]) == (2020, 2021)
        return
    assert sorted(by_id) == list(range(30))
    for i, (kingdom, year) in want.items():
        assert (by_id[i]["kingdom"], by_id[i]["year"]) == (kingdom, year)
    filtered = ParquetEmbeddingLoader(
        path, filter=[[("kingdom", "==", "Plantae"), ("year", "==", 2021)]]
    )
    assert sorted(r["id"] for r in load_all(filtered)) == list(range(20, 30))
