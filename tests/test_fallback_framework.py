"""rust_free_fallback.framework: MDF surface, operators, config, DedupBackend, Executor on Ray."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from rust_free_fallback.framework import (
    CombinedOperator,
    DataWriterRegistry,
    DedupBackend,
    Executor,
    InsufficientResourcesError,
    OperatorConfig,
    OperatorRegistry,
    PipelineConfig,
)
from rust_free_fallback.writers import ParquetDataWriter

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
toys = importlib.import_module("fallback_toys")
toys.register()


@pytest.fixture(scope="session")
def fallback_ray():
    """Ray with 2 CPUs whose workers can import the package and the toy module."""
    import ray

    started = not ray.is_initialized()
    if started:
        path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    yield ray
    if started:
        ray.shutdown()


def pipeline_yaml(
    tmp_path: pathlib.Path,
    stages: list[dict],
    *,
    num_files: int = 4,
    records_per_file: int = 25,
    num_workers: int = 1,
    batch_size: int = 7,
    executor: dict | None = None,
) -> pathlib.Path:
    cfg = {
        "data_loader": {
            "type": "ToyLoader",
            "num_workers": num_workers,
            "params": {"num_files": num_files, "records_per_file": records_per_file},
        },
        "stages": stages,
        "data_writer": {
            "type": "ParquetDataWriter",
            "params": {"output_path": str(tmp_path / "out"), "table_name": "t"},
        },
        "executor": {
            "batch_size": batch_size,
            "metrics": {"enabled": True, "output_path": str(tmp_path / "metrics")},
            **(executor or {}),
        },
        "some_other_tool": {"ignored": True},  # unknown top-level keys are ignored
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(path: pathlib.Path) -> tuple[Executor, list[tuple[int, int]]]:
    executor = Executor(PipelineConfig.from_yaml(str(path)))
    try:
        batches = list(executor.execute())
    except BaseException:
        executor.shutdown()
        raise
    return executor, batches


def read_output(tmp_path: pathlib.Path, table: str = "t") -> pa.Table:
    return pq.read_table(tmp_path / "out" / table)


# -- no Ray needed -----------------------------------------------------------


def test_surface_matches_mdf():
    checker = ROOT.parent / "shared" / "tools" / "check_mdf_surface.py"  # shared/ beside the clone
    assert checker.is_file(), f"MDF surface checker not found at {checker}"
    proc = subprocess.run(
        [sys.executable, str(checker), "rust_free_fallback.framework"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 differences" in proc.stdout


def test_operators_stats_and_chaining():
    combined = CombinedOperator([toys.AddSquare(), toys.KeepEven()])
    records = [{"value": v} for v in range(10)]
    out = combined.process_batch(records)
    assert [r["value"] for r in out] == [0, 2, 4, 6, 8]
    assert all(r["square"] == r["value"] ** 2 for r in out)
    stats = combined.get_stats()
    assert stats["AddSquare"]["input_records"] == 10
    assert stats["KeepEven"]["output_records"] == 5
    assert stats["KeepEven"]["pass_rate"] == pytest.approx(50.0)
    assert set(stats["KeepEven"]) >= {
        "total_time",
        "avg_latency",
        "min_latency",
        "max_latency",
        "p50_latency",
        "p95_latency",
        "p99_latency",
        "throughput",
    }
    res = toys.KeepEven().process_batch_with_rejected([{"value": 1}, {"value": 2}])
    assert res.passed == [{"value": 2}]
    assert res.rejected[0]["_rejection_details"]["reason"] == "filtered"
    f = toys.KeepEven()
    assert f.process_batch([{"value": 1}, {"value": 2}]) == [None, {"value": 2}]
    f.reset_stats()
    assert f.get_stats()["input_records"] == 0


def test_config_errors_and_name_rule(tmp_path):
    assert OperatorConfig(name="kmeans_level_refiner").get_class_name() == "KmeansLevelRefiner"
    good = {
        "data_loader": {"type": "ToyLoader"},
        "stages": [{"name": "s", "operators": [{"name": "add_square"}]}],
        "data_writer": {"type": "ParquetDataWriter", "params": {"output_path": "x"}},
    }
    cfg = PipelineConfig.from_dict({**good, "unknown_top": 1})
    assert cfg.data_loader.num_workers == 8 and cfg.executor.batch_size == 100
    assert cfg.executor.metrics.output_path == "./output/metrics"

    bad = yaml.safe_load(yaml.safe_dump(good))
    bad["stages"][0]["worker"] = {"replicas": 2}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=r"'replicas'.*stages\[0\]\.worker"):
        PipelineConfig.from_yaml(str(path))
    with pytest.raises(ValueError, match=r"'btach_size'.*'executor'"):
        PipelineConfig.from_dict({**good, "executor": {"btach_size": 3}})
    with pytest.raises(ValueError, match=r"'typ'.*'data_loader'"):
        PipelineConfig.from_dict({**good, "data_loader": {"type": "ToyLoader", "typ": 1}})
    with pytest.raises(ValueError, match=r"Missing required key 'type'"):
        PipelineConfig.from_dict({**good, "data_writer": {"params": {}}})


def test_unknown_operator_lists_registered():
    with pytest.raises(ValueError) as info:
        OperatorRegistry.create("NoSuchOperator", {})
    assert "NoSuchOperator" in str(info.value) and "AddSquare" in str(info.value)
    assert "AddSquare" in OperatorRegistry.list_operators()
    assert isinstance(
        DataWriterRegistry.create("ParquetDataWriter", {"output_path": "memory://x"}),
        ParquetDataWriter,
    )


def test_parquet_writer_partitions_float32_and_fsspec():
    import fsspec
    import numpy as np

    writer = ParquetDataWriter("memory://fallback-writer", table_name="emb", partition_by="part")
    batch = [
        {"id": i, "part": f"p/{i % 2}", "emb": np.arange(3, dtype=np.float32)} for i in range(6)
    ]
    writer.write(batch)
    writer.write(batch[:2])
    writer.close()
    fs = fsspec.filesystem("memory")
    files = sorted(fs.find("/fallback-writer/emb"))
    assert len(files) == 4 and len(set(files)) == 4
    assert {f.split("/")[-2] for f in files} == {"part=p%2F0", "part=p%2F1"}
    table = ds.dataset(
        "/fallback-writer/emb", filesystem=fs, format="parquet", partitioning="hive"
    ).to_table()
    assert table.num_rows == 8
    assert table.schema.field("emb").type == pa.list_(pa.float32())
    assert sorted(table.column("part").to_pylist()) == ["p/0"] * 4 + ["p/1"] * 4


# -- Ray ---------------------------------------------------------------------


def test_dedup_backend_across_calls_and_reset(fallback_ray):
    backend = DedupBackend(num_buckets=3, name_prefix="test_fallback_dedup")
    try:
        keys = [f"k{i}" for i in range(20)] + ["k3", "k5"]
        first = backend.batch_mark_seen(keys)
        assert first == [True] * 20 + [False, False]
        assert backend.batch_mark_seen(["k0", "new", "k19"]) == [False, True, False]
        assert backend.mark_seen("k7") is False and backend.is_seen("new")
        again = DedupBackend(num_buckets=3, name_prefix="test_fallback_dedup")  # reuse by name
        assert again.is_seen("k11") and again.size() == 21
        clone = pickle.loads(pickle.dumps(backend))  # handles re-resolved by name
        assert clone.is_seen("k12")
        backend.reset()
        assert not backend.is_seen("k0") and backend.size() == 0
        assert backend.batch_mark_seen(["k0", "k0"]) == [True, False]
    finally:
        backend.kill()
    rep = DedupBackend(num_buckets=2, name_prefix="test_fallback_rep", track_representative=True)
    try:
        assert rep.batch_mark_seen_with_ids(["a", "b"], ["1", "2"]) == [(True, None), (True, None)]
        assert rep.batch_mark_seen_with_ids(["b", "c"], ["3", "4"]) == [(False, "2"), (True, None)]
    finally:
        rep.kill()


def test_executor_two_replicas_every_record_once(fallback_ray, tmp_path):
    path = pipeline_yaml(
        tmp_path,
        [
            {
                "name": "enrich",
                "operators": [
                    {"name": "add_square"},
                    {"name": "keep_even"},
                    {"name": "explode_on", "params": {"bad_value": -1}, "enabled": False},
                ],
                "worker": {"min_replicas": 2, "max_replicas": 2, "resources": {"cpu": 0.5}},
            }
        ],
        executor={"max_in_flight": 2},
    )
    executor, batches = run(path)
    try:
        assert sum(n for n, _ in batches) == 100 and sum(k for _, k in batches) == 50
        assert all(n <= 7 for n, _ in batches)
        stats = executor.get_operator_stats()
        assert set(stats["enrich"]) == {"AddSquare", "KeepEven"}
        assert stats["enrich"]["AddSquare"]["input_records"] == 100
        assert stats["enrich"]["KeepEven"]["output_records"] == 50
        assert stats["enrich"]["KeepEven"]["replicas"] == 2
    finally:
        executor.shutdown()
    table = read_output(tmp_path)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(0, 100, 2))  # every kept record exactly once
    assert table.column("square").to_pylist() == [i * i for i in ids]
    assert table.schema.field("emb").type == pa.list_(pa.float32())
    metrics = list((tmp_path / "metrics").glob("*.json"))
    assert len(metrics) == 1
    assert json.loads(metrics[0].read_text())["pipeline"]["output_records"] == 50
    assert executor.get_operator_stats()["enrich"]["KeepEven"]["input_records"] == 100  # cached


def test_operator_exception_drops_only_its_batch(fallback_ray, tmp_path, caplog):
    path = pipeline_yaml(
        tmp_path,
        [
            {
                "name": "boom",
                "operators": [
                    {"name": "add_square"},
                    {"name": "explode_on", "params": {"bad_value": 13}},
                ],
                "worker": {"num_replicas": 1, "resources": {"cpu": 1}},
            }
        ],
        batch_size=10,
    )
    with caplog.at_level(logging.WARNING):
        executor, batches = run(path)
    try:
        assert sorted(batches) == [(10, 0)] + [(10, 10)] * 9
        assert executor.get_pipeline_stats()["dropped_batches"] == 1
        assert executor.get_operator_stats()["boom"]["ExplodeOn"]["dropped_batches"] == 1
    finally:
        executor.shutdown()
    assert "boom on value 13" in caplog.text and "ExplodeOn" in caplog.text
    ids = sorted(read_output(tmp_path).column("id").to_pylist())
    assert ids == [i for i in range(100) if not 10 <= i < 20]


def test_dedup_stage_shared_backend_rejected_and_max_samples(fallback_ray, tmp_path):
    rejected_dir = tmp_path / "rejected"
    path = pipeline_yaml(
        tmp_path,
        [
            {
                "name": "dedup",
                "operators": [{"name": "group_dedup"}],
                "worker": {"num_replicas": 2, "resources": {"cpu": 0}},
            }
        ],
        num_workers=2,
        batch_size=5,
        executor={
            "max_samples": 41,
            "rejected_samples": {"enabled": True, "output_path": str(rejected_dir)},
        },
    )
    executor, batches = run(path)
    try:
        assert sum(n for n, _ in batches) == 41
        assert executor.get_pipeline_stats()["rejected_records"] == 41 - sum(k for _, k in batches)
    finally:
        executor.shutdown()
    out = read_output(tmp_path)
    groups = out.column("group").to_pylist()
    assert len(groups) == len(set(groups))  # one record per key across 2 replicas
    assert set(out.column("worker").to_pylist()) == {0, 1}  # both loaders contributed
    rejected = pq.read_table(rejected_dir / "default")
    assert rejected.num_rows + out.num_rows == 41
    details = json.loads(rejected.column("_rejection_details")[0].as_py())
    assert details["reason"] == "duplicate" and details["operator"] == "GroupDedup"


def test_oversubscription_raises_before_starting(fallback_ray, tmp_path):
    path = pipeline_yaml(
        tmp_path,
        [
            {
                "name": "heavy",
                "operators": [{"name": "add_square"}],
                "worker": {"num_replicas": 1, "resources": {"cpu": 1}},
            }
        ],
        num_workers=2,
    )
    executor = Executor(PipelineConfig.from_yaml(str(path)))
    try:
        with pytest.raises(InsufficientResourcesError, match=r"needs 3 CPUs.*has 2 CPUs"):
            next(executor.execute())
    finally:
        executor.shutdown()
    assert not (tmp_path / "out" / "t").exists() or not any((tmp_path / "out" / "t").iterdir())
