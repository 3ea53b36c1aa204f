"""Shared fixtures: one Ray session for the whole run (2 CPUs, like CI), data makers."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mdf_taxonomy

try:  # as MDF's plugin entry point does; importing the package does not
    mdf_taxonomy.register()
except ModuleNotFoundError as e:  # a kernels-only machine (the GPU device): no Ray, no MDF
    if e.name not in ("ray", "rust_free_fallback", "mega_data_factory"):
        raise

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "mdf_taxonomy" / "data" / "treeoflife_bioclip2_1k.parquet"


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        tests_dir = str(ROOT / "tests")
        path = os.pathsep.join([str(ROOT), tests_dir, os.environ.get("PYTHONPATH", "")])
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    yield ray
    ray.shutdown()


def blobs(
    n: int, dim: int, k: int, seed: int = 0, spread: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """A clustered float32 sample and its true cluster per row."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * spread
    labels = rng.integers(0, k, n)
    x = centers[labels] + rng.normal(size=(n, dim))
    return x.astype(np.float32), labels


def write_embeddings(
    path: pathlib.Path,
    x: np.ndarray,
    ids: np.ndarray | None = None,
    extra: dict | None = None,
    row_group_size: int | None = None,
    list_type: str = "list",
) -> pathlib.Path:
    """Parquet with an `id` and an `embedding` column (list<float> by default)."""
    ids = np.arange(len(x)) if ids is None else ids
    flat = pa.array(x.reshape(-1), pa.float32())
    if list_type == "fixed":
        emb = pa.FixedSizeListArray.from_arrays(flat, x.shape[1])
    elif list_type == "large":
        offsets = pa.array(np.arange(len(x) + 1) * x.shape[1], pa.int64())
        emb = pa.LargeListArray.from_arrays(offsets, flat)
    else:
        offsets = pa.array(np.arange(len(x) + 1) * x.shape[1], pa.int32())
        emb = pa.ListArray.from_arrays(offsets, flat)
    table = pa.table({"id": pa.array(ids, pa.int64()), "embedding": emb, **(extra or {})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path
