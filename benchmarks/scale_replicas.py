"""Scaling of a fit pass and a labelling pass over stage replicas (issue 5).

Each replica is one Ray actor of the taxonomy stage (`gpu: 1` each with --gpu);
rows are generated inside the loader actors (SyntheticEmbeddingLoader) and
streamed in batches, never held at once. For every replica count it runs
  - one Lloyd pass of level 1 (K centroids) through KMeansLevelRefiner + FitBackend,
  - one labelling pass of a 3-level tree through TaxonomyPathRefiner,
and reports rows/s, efficiency vs 1 replica, where the operator's time went
(parse / assign / flush, summed over replicas) and the backend flush traffic.

    python benchmarks/scale_replicas.py --replicas 1,2 --rows 200000 --dim 256 --k 1024
    python benchmarks/scale_replicas.py --gpu --replicas 1,2,4,8 --rows 100000000 --k 16384 \
        --label-tree 1024,1024,1024 --compute-dtype bfloat16

Writes benchmarks/results/scale_replicas_<cpu|gpu>.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
import ray
import torch

from mdf_taxonomy import _mdf
from mdf_taxonomy.backend import FitBackend
from mdf_taxonomy.engine import ensure_ray, run_pipeline
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.operators import SyntheticEmbeddingLoader

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: _results
import _results as R  # noqa: E402


def tree_around(centres: np.ndarray, branching: list[int], seed: int) -> list[Level]:
    """A tree whose nodes sit near the data: children = parent + shrinking noise."""
    rng = np.random.default_rng(seed)
    levels, parent_c = [], np.zeros((1, centres.shape[1]), np.float32)
    for depth, b in enumerate(branching):
        if depth == 0:
            c = centres[rng.integers(0, len(centres), b)]
        else:
            c = np.repeat(parent_c, b, axis=0)
        c = c + rng.standard_normal(c.shape, dtype=np.float32) * (0.05 / (depth + 1))
        levels.append(Level(c.astype(np.float32), np.repeat(np.arange(len(parent_c)), b)))
        parent_c = c
    return levels


def stage_config(
    loader: dict, op: dict, replicas: int, gpu: bool, batch: int, loaders: int
) -> object:
    cpus = ray.cluster_resources().get("CPU", 1)
    per = 1.0 if gpu else max(0.1, min(1.0, (cpus - loaders) / replicas))
    return _mdf.PipelineConfig(
        data_loader=_mdf.DataLoaderConfig(
            type="SyntheticEmbeddingLoader", params=loader, num_workers=loaders
        ),
        stages=[
            _mdf.StageConfig(
                name="taxonomy",
                operators=[_mdf.OperatorConfig(**op)],
                worker=_mdf.StageWorkerConfig(
                    resources={"cpu": per, "gpu": 1 if gpu else 0},
                    min_replicas=replicas,
                    max_replicas=replicas,
                ),
            )
        ],
        data_writer=_mdf.DataWriterConfig(type="DiscardWriter", params={}),
        executor=_mdf.ExecutorConfig(
            batch_size=batch,
            max_in_flight=2 * max(replicas, loaders),
            metrics=_mdf.MetricsConfig(enabled=False),
        ),
    )


def op_stats(stats: dict, name: str) -> dict:
    for stage in stats.values():
        if name in stage:
            return stage[name]
    return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicas", default="1,2")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--label-tree", default="64,8,8")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--loaders", type=int, default=1)
    ap.add_argument("--compute-dtype", default="float32")
    ap.add_argument("--rows-per-item", type=int, default=65536)
    args = ap.parse_args()
    ensure_ray()
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = gpu_name or f"cpu {platform.machine()} x{os.cpu_count()}"
    loader = {
        "rows": args.rows,
        "dim": args.dim,
        "n_centres": 4096,
        "seed": 0,
        "rows_per_item": args.rows_per_item,
    }
    centres = SyntheticEmbeddingLoader(**loader).centres()
    common = {
        "embedding_field": "embedding",
        "device": "cuda" if args.gpu else "cpu",
        "compute_dtype": args.compute_dtype,
    }
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        fit_uri, label_uri = f"{tmp}/fit", f"{tmp}/label"
        cfg = TaxonomyConfig(n_levels=1, branching_factor=args.k, dim=args.dim)
        fit_tax = Taxonomy(
            cfg, args.dim, tree_around(centres, [args.k], 1), FitState(level=1, phase="lloyd")
        )
        fit_version = TaxonomyStore(fit_uri).save(fit_tax)
        shape = [int(b) for b in args.label_tree.split(",")]
        label_tax = Taxonomy(
            TaxonomyConfig(n_levels=len(shape), branching_factor=shape, dim=args.dim),
            args.dim,
            tree_around(centres, shape, 2),
            FitState(phase="done"),
        )
        label_version = TaxonomyStore(label_uri).save(label_tax)
        backend = FitBackend(4, "scale_fit")
        for replicas in [int(r) for r in args.replicas.split(",")]:
            backend.start_pass(fit_version, args.k, args.dim)
            fit_op = {
                "name": "kmeans_level_refiner",
                "params": {
                    **common,
                    "storage_uri": fit_uri,
                    "snapshot": fit_version,
                    "n_levels": 1,
                    "branching_factor": args.k,
                    "backend_buckets": 4,
                    "backend_name": "scale_fit",
                },
            }
            t0 = time.perf_counter()
            fit = run_pipeline(
                stage_config(loader, fit_op, replicas, args.gpu, args.batch_size, args.loaders),
                progress=False,
            )
            fit_s = time.perf_counter() - t0
            totals = backend.collect(args.k, args.dim)["totals"]
            label_op = {
                "name": "taxonomy_path_refiner",
                "params": {**common, "storage_uri": label_uri, "snapshot": label_version},
            }
            t0 = time.perf_counter()
            lab = run_pipeline(
                stage_config(loader, label_op, replicas, args.gpu, args.batch_size, args.loaders),
                progress=False,
            )
            label_s = time.perf_counter() - t0
            runs.append(
                {
                    "replicas": replicas,
                    "fit_rows_per_s": fit["rows_in"] / fit_s,
                    "label_rows_per_s": lab["rows_in"] / label_s,
                    "fit_s": fit_s,
                    "label_s": label_s,
                    "rows_accounted": totals.get("rows", 0),
                    "flushes": totals.get("flushes", 0),
                    "flush_bytes": totals.get("flush_bytes", 0),
                    "fit_timings": op_stats(fit["stats"], "KMeansLevelRefiner").get("timings"),
                    "label_timings": op_stats(lab["stats"], "TaxonomyPathRefiner").get("timings"),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
        backend.shutdown()
    base = runs[0]
    for r in runs:
        scale = r["replicas"] / base["replicas"]
        r["fit_efficiency"] = r["fit_rows_per_s"] / (base["fit_rows_per_s"] * scale)
        r["label_efficiency"] = r["label_rows_per_s"] / (base["label_rows_per_s"] * scale)
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "versions": R.versions(torch=torch.__version__, ray=ray.__version__),
        "args": vars(args),
        "runs": runs,
    }
    out = R.result_path("scale_replicas", "gpu" if args.gpu else "cpu")
    R.write_json(out, result)
    print(
        f"\nwritten {out}\n\n{device}: {args.rows} rows x {args.dim}, K={args.k}, "
        f"label tree {shape}, batch {args.batch_size}, {args.loaders} loader(s)"
    )
    print(
        "| replicas | fit pass rows/s | eff. | label rows/s | eff. | fit parse/assign/flush s "
        "| flush MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        t = r["fit_timings"] or {}
        print(
            f"| {r['replicas']} | {r['fit_rows_per_s']:.0f} | {r['fit_efficiency']:.0%} | "
            f"{r['label_rows_per_s']:.0f} | {r['label_efficiency']:.0%} | "
            f"{t.get('parse_s', 0):.1f}/{t.get('assign_s', 0):.1f}/{t.get('flush_s', 0):.1f} | "
            f"{r['flush_bytes'] / 1e6:.0f} |"
        )


if __name__ == "__main__":
    main()
