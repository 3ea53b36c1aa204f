"""rust_free_fallback.cli: `run -c FILE` in a fresh process where the Executor starts Ray."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent


def test_cli_run_starts_and_stops_ray(tmp_path):
    cfg = {
        "data_loader": {
            "type": "ToyLoader",
            "num_workers": 1,
            "params": {"num_files": 3, "records_per_file": 20},
        },
        "stages": [
            {
                "name": "enrich",
                "operators": [{"name": "add_square"}, {"name": "keep_even"}],
                "worker": {"num_replicas": 1, "resources": {"cpu": 1}},
            }
        ],
        "data_writer": {
            "type": "ParquetDataWriter",
            "params": {"output_path": str(tmp_path / "out")},
        },
        "executor": {"num_cpus": 2, "metrics": {"enabled": False}},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # Toys are importable only through the driver's sys.path (no PYTHONPATH): the
    # Executor must hand that path to the Ray workers it starts.
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import ray; "
        "from rust_free_fallback.cli import main; "
        f"rc = main(['run', '-c', {str(path)!r}, '--max-samples', '50', '--batch-size', '8', "
        "'-p', 'fallback_toys:register', '--no-entry-points']); "
        "assert not ray.is_initialized(), 'Executor started Ray, shutdown must stop it'; "
        "sys.exit(rc)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Stage enrich:" in proc.stdout and "KeepEven: in=50 out=25" in proc.stdout
    ids = sorted(pq.read_table(tmp_path / "out" / "default").column("id").to_pylist())
    assert ids == list(range(0, 50, 2))
