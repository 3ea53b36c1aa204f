"""What a labelling run writes: the embedding column found without a flag, margin and field
prefix, and output partitioned by node that pyarrow reads back with pushdown."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE, blobs, write_embeddings

from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig
from mdf_taxonomy.operators import TaxonomyPathRefiner
from mdf_taxonomy.operators.writers import PartitionedParquetWriter
from mdf_taxonomy.passes.parquet_input import InputError, ParquetInput
from mdf_taxonomy.passes.parquet_sink import ParquetSink
from mdf_taxonomy.passes.records import find_embedding_field, find_record_embedding_field


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """The bundled sample as emb-explorer lays it out: column `emb`, Hive folders by kingdom."""
    root = tmp_path_factory.mktemp("crawl")
    table = pq.read_table(SAMPLE)
    ds.write_dataset(
        table,
        root,
        format="parquet",
        partitioning=["kingdom"],
        partitioning_flavor="hive",
        max_rows_per_group=200,
    )
    dim = len(table.column("emb")[0])
    return root, table, dim


def test_seed_api_fits_emb_explorer_data_without_naming_the_column(ray_session, crawl, tmp_path):
    root, table, dim = crawl
    engine = TaxonomyEngine(2, [4, 3], dim, str(tmp_path / "tax"))
    tax = engine.fit(input=str(root), output=str(tmp_path / "out"))
    assert tax.state.complete and tax.dim == dim
    out = ds.dataset(tmp_path / "out", partitioning="hive").to_table()
    assert sorted(out["uuid"].to_pylist()) == sorted(table["uuid"].to_pylist())
    assert set(out.column_names) >= {*table.column_names, "taxonomy_path", "taxonomy_margin"}
    assert set(out["taxonomy_error"].to_pylist()) == {""}
    kingdom = dict(zip(table["uuid"].to_pylist(), table["kingdom"].to_pylist(), strict=True))
    pairs = zip(out["uuid"].to_pylist(), out["kingdom"].to_pylist(), strict=True)
    assert all(kingdom[u] == k for u, k in pairs)


def test_embedding_field_found_or_the_candidates_listed(tmp_path):
    x, _ = blobs(20, 4, 2)
    one = write_embeddings(tmp_path / "one" / "a.parquet", x, extra={"t": pa.array(["a"] * 20)})
    assert ParquetInput(str(one)).embedding_field == "embedding"
    two = write_embeddings(
        tmp_path / "two" / "a.parquet",
        x,
        extra={"clip": pa.array(x.tolist(), pa.list_(pa.float64()))},
    )
    with pytest.raises(InputError, match=r"several columns.*embedding: list.*clip: list"):
        ParquetInput(str(two)).get_file_list()
    pq.write_table(pa.table({"id": [1, 2], "tokens": [[1, 2], [3]]}), tmp_path / "none.parquet")
    with pytest.raises(
        InputError, match=r"no column holds embeddings.*tokens: list<element: int64>"
    ):
        ParquetInput(str(tmp_path / "none.parquet")).get_file_list()
    # records: the same rule, on the values' Arrow types
    records = [{"id": 1, "v": np.ones(4, np.float32), "name": "a"}, {"id": 2, "v": None}]
    assert find_record_embedding_field(records) == "v"
    schema = pa.schema([("a", pa.binary(16)), ("b", pa.string())])
    assert find_embedding_field(schema) == "a"  # packed float32


def _tree(metric: str = "l2") -> Taxonomy:
    g = torch.Generator().manual_seed(0)
    levels = [
        Level(torch.randn(3, 8, generator=g).numpy(), np.zeros(3, np.int64)),
        Level(torch.randn(7, 8, generator=g).numpy(), np.array([0, 0, 0, 1, 1, 2, 2])),
    ]
    if metric == "cosine":  # a cosine fit's centroids have unit norm
        for lv in levels:
            lv.centroids /= np.linalg.norm(lv.centroids, axis=1, keepdims=True)
    cfg = TaxonomyConfig(n_levels=2, branching_factor=[3, 3], metric=metric)
    return Taxonomy(config=cfg, dim=8, levels=levels, state=FitState(phase="done"))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_margin_is_the_runner_up_sibling_minus_the_best(metric):
    tax = _tree(metric)
    x = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    labels = tax.assign_paths(x)
    rows = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    for i, (top, leaf) in enumerate(labels.paths):
        siblings = np.flatnonzero(tax.levels[1].parents == top)
        c = tax.levels[1].centroids[siblings]
        if metric == "l2":
            d = np.linalg.norm(c - rows[i], axis=1)
        else:
            d = 1 - c @ rows[i]
        d = np.sort(d)
        assert leaf in siblings
        assert labels.distance[i] == pytest.approx(d[0], abs=1e-4)
        assert labels.margin[i] == pytest.approx(d[1] - d[0], abs=1e-4)


def test_path_refiner_writes_margin_and_prefixed_fields(tmp_path):
    from mdf_taxonomy.model import TaxonomyStore

    tax = _tree()
    TaxonomyStore(str(tmp_path / "t")).save(tax)
    op = TaxonomyPathRefiner(str(tmp_path / "t"), field_prefix="crawl_")
    assert set(op.get_output_schema()) == {
        "crawl_path",
        "crawl_l1",
        "crawl_l2",
        "crawl_distance",
        "crawl_margin",
        "crawl_error",
    }
    records = [{"id": 0, "vec": np.ones(8, np.float32)}, {"id": 1, "vec": None}]
    op.refine_batch(records)
    assert records[0]["crawl_error"] == "" and records[0]["crawl_margin"] >= 0
    assert (
        records[1]["crawl_error"].startswith("missing_embedding") and records[1]["crawl_l1"] == -1
    )
    with pytest.raises(ValueError, match="field_prefix"):
        TaxonomyPathRefiner(str(tmp_path / "t"), field_prefix="a/b")


def test_sink_bounds_files_per_partition_and_drops_no_column(tmp_path):
    sink = ParquetSink(str(tmp_path / "o"), ["node"], max_rows_per_file=25)
    for i in range(10):  # 10 batches of 10 rows over 3 nodes
        sink.write(pa.table({"id": np.arange(10) + 10 * i, "node": np.arange(10) % 3}))
    sink.write(pa.table({"id": [100], "node": [None], "note": ["x"]}))
    files = sink.close()
    by_node = {}
    for f in files:
        by_node.setdefault(f.split("/")[-2], []).append(f)
    # 34, 33 and 33 rows per node, at most 25 per file: 2 files each, not 10
    assert {k: len(v) for k, v in by_node.items()} == {
        "node=0": 2,
        "node=1": 2,
        "node=2": 2,
        "node=__HIVE_DEFAULT_PARTITION__": 1,
    }
    back = ds.dataset(tmp_path / "o", partitioning="hive").to_table()
    assert sorted(back["id"].to_pylist()) == list(range(101))
    assert pq.read_table(by_node["node=0"][0]).column_names == ["id"]  # the folder holds node


@pytest.mark.parametrize("columnar", [True, False])
def test_output_partitioned_by_top_node_reads_one_node_by_pushdown(
    ray_session, crawl, tmp_path, columnar
):
    root, table, dim = crawl
    engine = TaxonomyEngine(
        2,
        [4, 3],
        dim,
        str(tmp_path / "tax"),
        partition_by=["taxonomy_l1"],
        columnar=columnar,
        batch_size=128,
        max_iter=1,  # the output's layout is what is checked, not the fit
        progress=False,
    )
    engine.fit(input=str(root), output=str(tmp_path / "out"))
    dataset = ds.dataset(tmp_path / "out", format="parquet", partitioning="hive")
    everything = dataset.to_table()
    assert everything.num_rows == table.num_rows
    for node in range(4):
        where = ds.field("taxonomy_l1") == node
        files = [f.path for f in dataset.get_fragments(filter=where)]
        assert files and all(f"/taxonomy_l1={node}/" in f for f in files)
        got = dataset.to_table(filter=where)
        want = everything.filter(where)
        assert sorted(got["uuid"].to_pylist()) == sorted(want["uuid"].to_pylist())
        assert got.num_rows > 0
    if not columnar:  # one writer: one file per node (from 9 batches of 128 rows)
        assert len(dataset.files) == 4


def test_partitioned_writer_is_refused_a_record_without_the_column(tmp_path):
    writer = PartitionedParquetWriter(str(tmp_path / "o"), partition_by="taxonomy_l1")
    with pytest.raises(KeyError, match="taxonomy_l1"):
        writer.write([{"id": 1}])
