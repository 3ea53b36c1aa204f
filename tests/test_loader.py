"""ParquetEmbeddingLoader: files, globs, Hive directories, projection, pushdown, list types."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
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
        write_embeddings(tmp_path / f"kingdom={kingdom}" / "part.parquet", x[i * 20:(i + 1) * 20],
                         ids=np.arange(i * 20, (i + 1) * 20),
                         extra={"note": pa.array(["n"] * 20)})
    loader = ParquetEmbeddingLoader(str(tmp_path), columns=["id", "kingdom"],
                                    filter=[[("kingdom", "==", "Plantae")]])
    recs = load_all(loader)
    assert sorted(r["id"] for r in recs) == list(range(20, 40))
    assert all(r["kingdom"] == "Plantae" and "note" not in r for r in recs)
    assert loader.count_rows() == 20


def test_nulls_and_ragged_rows_reach_the_operator(tmp_path):
    emb = pa.array([[1.0, 2.0], None, [3.0], [4.0, None]], pa.list_(pa.float64()))
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [0, 1, 2, 3], "embedding": emb}), tmp_path / "r.parquet")
    recs = load_all(ParquetEmbeddingLoader(str(tmp_path / "r.parquet")))
    assert recs[1]["embedding"] is None
    assert recs[2]["embedding"].tolist() == [3.0]
    assert recs[0]["embedding"].dtype == np.float32
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
