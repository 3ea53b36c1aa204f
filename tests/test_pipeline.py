"""The operators inside MDF pipelines on the fallback Executor (Ray): fit, label, errors."""

from __future__ import annotations

import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, blobs, write_embeddings

from mdf_taxonomy import cli
from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.model import TaxonomyStore


def read_output(path) -> pa.Table:
    return ds.dataset(str(path), format="parquet", partitioning="hive").to_table()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """600 clustered rows in 3 files of 2 row groups, plus 4 bad records in a 4th file."""
    root = tmp_path_factory.mktemp("data")
    x, labels = blobs(600, 16, 6, seed=1)
    for i in range(3):
        sl = slice(i * 200, (i + 1) * 200)
        write_embeddings(
            root / f"part-{i}.parquet", x[sl], ids=np.arange(600)[sl], row_group_size=100
        )
    bad = pa.array([None, [1.0] * 15, [float("nan")] * 16, [0.5] * 16], pa.list_(pa.float32()))
    pq.write_table(
        pa.table({"id": pa.array([600, 601, 602, 603], pa.int64()), "embedding": bad}),
        root / "part-3.parquet",
    )
    return root, x, labels


def test_fit_labels_every_record_exactly_once(ray_session, dataset, tmp_path):
    root, x, _ = dataset
    engine = TaxonomyEngine(
        n_levels=2,
        branching_factor=[3, 2],
        storage_uri=str(tmp_path / "t"),
        max_iter=4,
        batch_size=128,
        progress=False,
    )
    tax = engine.fit(str(root), output=str(tmp_path / "out"))
    assert tax.state.complete and [lv.n_nodes for lv in tax.levels] == [3, 6]
    out = read_output(tmp_path / "out")
    ids = out["id"].to_pylist()
    assert sorted(ids) == list(range(604)) and len(ids) == 604
    rows = {r["id"]: r for r in out.to_pylist()}
    good = [rows[i] for i in [*range(600), 603]]  # 603 is a valid [0.5]*16 row
    assert all(r["taxonomy_error"] == "" for r in good)
    assert all(r["taxonomy_path"] == f"{r['taxonomy_l1']}/{r['taxonomy_l2']}" for r in good)
    assert rows[600]["taxonomy_error"].startswith("missing_embedding")
    assert rows[601]["taxonomy_error"].startswith("wrong_length")
    assert "15 values, expected 16" in rows[601]["taxonomy_error"]
    assert rows[602]["taxonomy_error"].startswith("non_finite")
    assert rows[602]["taxonomy_l1"] == -1 and rows[602]["taxonomy_path"] == ""
    assert out.schema.field("taxonomy_l1").type == pa.int32()
    assert out.schema.field("taxonomy_distance").type == pa.float32()
    # the stored tree labels the same rows the same way in memory
    paths = engine.predict(x[:50])
    assert np.array_equal(paths[:, 0], [rows[i]["taxonomy_l1"] for i in range(50)])
    assert np.array_equal(paths[:, 1], [rows[i]["taxonomy_l2"] for i in range(50)])
    # the rejections were counted in the fit, not dropped
    hist = TaxonomyStore(str(tmp_path / "t")).load().state.history
    assert all(h["rows"] == 601 for h in hist)


def test_same_seed_same_centroids_whatever_the_batch_size(ray_session, dataset, tmp_path):
    root, _, _ = dataset
    cents = []
    for i, batch in enumerate([100, 257]):
        engine = TaxonomyEngine(
            n_levels=1,
            branching_factor=6,
            seed=7,
            max_iter=3,
            storage_uri=str(tmp_path / f"t{i}"),
            batch_size=batch,
            progress=False,
        )
        cents.append(engine.fit(str(root)).levels[0].centroids)
    assert cents[0].tobytes() == cents[1].tobytes()


def test_inertia_within_one_percent_of_sklearn(ray_session, tmp_path):
    from sklearn.cluster import KMeans

    x, _ = blobs(1500, 12, 8, seed=5, spread=3.0)
    write_embeddings(tmp_path / "d.parquet", x)
    iters = 5
    engine = TaxonomyEngine(
        n_levels=1,
        branching_factor=8,
        max_iter=iters,
        tol=0.0,
        init_iters=0,
        storage_uri=str(tmp_path / "t"),
        progress=False,
    )
    tax = engine.fit(str(tmp_path / "d.parquet"))
    store = TaxonomyStore(str(tmp_path / "t"))
    first = next(
        v
        for v in (f"{i:06d}" for i in range(10))
        if store.load(v).state.phase == "lloyd" and store.load(v).state.iteration == 0
    )
    init = store.load(first).levels[0].centroids
    ours_c = tax.levels[0].centroids.astype(np.float64)
    ours = ((x[:, None, :] - ours_c[None]) ** 2).sum(-1).min(1).sum()
    ref = KMeans(8, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
    assert abs(ours - ref.inertia_) / ref.inertia_ < 0.01
    assert len([h for h in tax.state.history if h["phase"] == "lloyd"]) == iters


def _write_yaml(path, data_dir, storage, out, replicas=2, extra_ops=None):
    cfg = {
        "data_loader": {
            "type": "ParquetEmbeddingLoader",
            "params": {"path": str(data_dir)},
            "num_workers": 1,
        },
        "stages": [
            {
                "name": "taxonomy",
                "operators": [
                    {
                        "name": "kmeans_level_refiner",
                        "params": {
                            "storage_uri": str(storage),
                            "n_levels": 1,
                            "branching_factor": 4,
                            "max_iter": 3,
                        },
                    },
                    {"name": "taxonomy_path_refiner", "params": {"storage_uri": str(storage)}},
                    *(extra_ops or []),
                ],
                "worker": {
                    "min_replicas": replicas,
                    "max_replicas": replicas,
                    "resources": {"cpu": 0.5, "gpu": 0},
                },
            }
        ],
        "data_writer": {"type": "ParquetDataWriter", "params": {"output_path": str(out)}},
        "executor": {"batch_size": 64, "metrics": {"enabled": False}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_yaml_pipeline_with_two_replicas(ray_session, dataset, tmp_path, capsys):
    root, _, _ = dataset
    config = _write_yaml(tmp_path / "p.yaml", root, tmp_path / "t", tmp_path / "out")
    assert cli.main(["-q", "run", "-c", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "labelled records:" in printed and "taxonomy artifact:" in printed
    out = read_output(tmp_path / "out")
    assert sorted(out["id"].to_pylist()) == list(range(604))
    stats_line = next(ln for ln in printed.splitlines() if ln.startswith("operator stats"))
    assert '"replicas": 2' in stats_line


def test_bad_config_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent("""
        data_loader: {type: ParquetEmbeddingLoader, params: {path: x}, num_wokers: 2}
        stages: []
        data_writer: {type: ParquetDataWriter, params: {output_path: y}}
        executor: {}
    """)
    )
    assert cli.main(["run", "-c", str(bad)]) == 2
    assert "num_wokers" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("stages: [unclosed")
    assert cli.main(["run", "-c", str(tmp_path / "broken.yaml")]) == 2
    assert "broken.yaml" in capsys.readouterr().err


def test_unknown_operator_lists_the_registered_ones(tmp_path, capsys, dataset):
    root, _, _ = dataset
    config = _write_yaml(
        tmp_path / "p.yaml",
        root,
        tmp_path / "t",
        tmp_path / "out",
        extra_ops=[{"name": "kmeans_leval_refiner", "params": {}}],
    )
    assert cli.main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "kmeans_leval_refiner" in err and "KmeansLevelRefiner" in err


def test_unreadable_input_is_a_clear_error(ray_session, tmp_path, capsys):
    rc = cli.main(
        [
            "-q",
            "fit",
            "--input",
            str(tmp_path / "nope.parquet"),
            "--storage-uri",
            str(tmp_path / "t"),
        ]
    )
    assert rc == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_demo_config_is_valid():
    from mdf_taxonomy import _mdf

    cfg = _mdf.PipelineConfig.from_yaml(str(ROOT / "configs" / "demo.yaml"))
    assert cfg.stages[0].operators[0].get_class_name() == "KmeansLevelRefiner"
    assert "KmeansLevelRefiner" in _mdf.OperatorRegistry.list_operators()


def test_worker_combiner_sends_fewer_flushes_and_changes_nothing(ray_session, dataset, tmp_path):
    root, _, _ = dataset
    trees, logs = [], []
    for flush_rows in (0, 10_000):
        engine = TaxonomyEngine(
            n_levels=1,
            branching_factor=5,
            max_iter=1,  # the flushes compared are the first Lloyd pass's
            batch_size=50,
            flush_rows=flush_rows,
            columnar=False,
            storage_uri=str(tmp_path / f"t{flush_rows}"),
            progress=False,
        )
        trees.append(engine.fit(str(root)).levels[0].centroids)
        logs.append([p for p in engine.last_fit.pass_log if p["phase"] == "lloyd"])
    assert trees[0].tobytes() == trees[1].tobytes()
    per_batch, combined = logs[0][0], logs[1][0]
    assert per_batch["flushes"] >= 13  # 604 rows in batches of 50, one flush each
    assert combined["flushes"] <= 2  # one per replica at the end of the stream
    assert combined["flush_bytes"] < per_batch["flush_bytes"]


def test_unreachable_taxonomy_labels_records_instead_of_dropping(tmp_path):
    from mdf_taxonomy.operators import TaxonomyPathRefiner

    op = TaxonomyPathRefiner(str(tmp_path / "no-such-taxonomy"), n_levels=2)
    records = [{"id": i, "embedding": np.ones(4, np.float32)} for i in range(3)]
    out = op.process_batch(records)
    assert [r["id"] for r in out] == [0, 1, 2]
    assert all(r["taxonomy_error"].startswith("operator_failed") for r in out)
    assert all("no taxonomy at" in r["taxonomy_error"] for r in out)
    assert all(r["taxonomy_l2"] == -1 and r["taxonomy_path"] == "" for r in out)
    assert op.get_stats()["rejected"] == {"operator_failed": 3}


def test_sample_pass_prunes_rows_yet_keeps_the_global_bottom_k(ray_session, tmp_path):
    from mdf_taxonomy.backend import BottomK
    from mdf_taxonomy.model import Taxonomy, TaxonomyConfig
    from mdf_taxonomy.model.fitting import sample_priorities
    from mdf_taxonomy.operators import KMeansLevelRefiner

    x, _ = blobs(2000, 8, 3, seed=4)
    cfg = TaxonomyConfig(n_levels=1, branching_factor=2, dim=8, sample_per_child=5)
    store = TaxonomyStore(str(tmp_path / "t"))
    version = store.save(Taxonomy(config=cfg, dim=8))
    op = KMeansLevelRefiner(
        str(tmp_path / "t"),
        snapshot=version,
        branching_factor=2,
        dim=8,
        sample_per_child=5,
        backend_name="prune_test",
        device="cpu",
    )
    op.backend.start_pass(version, 0, 8)
    sent = []
    real_offer = op.backend.offer_samples

    def counting_offer(*args):
        sent.append(len(args[2]))
        return real_offer(*args)

    op.backend.offer_samples = counting_offer
    for start in range(0, 2000, 100):
        op.process_batch([{"embedding": row} for row in x[start : start + 100]])
    got = op.backend.collect(0, 8)
    want = x[BottomK.smallest(sample_priorities(x, cfg.seed, 1), 10)]
    assert np.array_equal(got["samples"][0], want)
    assert got["parent_rows"] == {0: 2000}
    assert sum(sent) < 20 * 10 / 2  # later batches send (almost) nothing
    op.backend.shutdown()
