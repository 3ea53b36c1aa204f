"""Records/s of a fit pass and a labelling pass through the MDF pipeline on this machine.

    .venv/bin/python benchmarks/bench_pipeline_cpu.py [--rows 100000] [--dim 768] [--k 64]

Writes benchmarks/results/pipeline_<device>_<date>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from mdf_taxonomy import __version__
from mdf_taxonomy.engine import TaxonomyEngine, ensure_ray

RESULTS = pathlib.Path(__file__).parent / "results"


def make_data(root: pathlib.Path, rows: int, dim: int, files: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, dim)).astype(np.float32) * 3
    per = rows // files
    for f in range(files):
        lab = rng.integers(0, 256, per)
        x = centres[lab] + rng.normal(size=(per, dim)).astype(np.float32)
        offsets = pa.array(np.arange(per + 1) * dim, pa.int32())
        emb = pa.ListArray.from_arrays(offsets, pa.array(x.reshape(-1), pa.float32()))
        ids = pa.array(np.arange(f * per, (f + 1) * per), pa.int64())
        pq.write_table(pa.table({"id": ids, "embedding": emb}), root / f"part-{f}.parquet",
                       row_group_size=8192)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4096)
    args = ap.parse_args()
    ensure_ray()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (
        f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "data").mkdir()
        make_data(tmp / "data", args.rows, args.dim, files=4)
        engine = TaxonomyEngine(n_levels=1, branching_factor=args.k, max_iter=3, tol=0.0,
                                storage_uri=str(tmp / "tax"), batch_size=args.batch_size,
                                num_replicas=args.replicas, progress=False)
        t0 = time.perf_counter()
        engine.fit(str(tmp / "data"))
        fit_s = time.perf_counter() - t0
        passes = engine.last_fit.pass_log
        t0 = time.perf_counter()
        engine.predict(str(tmp / "data"), output=str(tmp / "out"))
        label_s = time.perf_counter() - t0
    lloyd = [p for p in passes if p["phase"] == "lloyd"]
    result = {
        "date": datetime.date.today().isoformat(), "device": device,
        "versions": {"mdf_taxonomy": __version__, "torch": torch.__version__,
                     "ray": ray.__version__, "python": platform.python_version()},
        "rows": args.rows, "dim": args.dim, "k": args.k, "replicas": args.replicas,
        "batch_size": args.batch_size,
        "sample_pass_rows_per_s": passes[0]["rows_per_s"],
        "lloyd_pass_rows_per_s": [p["rows_per_s"] for p in lloyd],
        "fit_total_s": fit_s, "label_total_s": label_s,
        "label_rows_per_s": args.rows / label_s,
        "note": "pass rows/s are measured from Executor start to the last batch; "
                "label rows/s includes Executor start-up and Parquet writing",
    }
    RESULTS.mkdir(exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    out = RESULTS / f"pipeline_{tag}_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten {out}")
    print("| device | rows x dim | K | sample pass | Lloyd pass (median) | labelling |")
    print("|---|---|---|---|---|---|")
    print(f"| {device} | {args.rows} x {args.dim} | {args.k} | "
          f"{result['sample_pass_rows_per_s']:.0f} rows/s | "
          f"{float(np.median(result['lloyd_pass_rows_per_s'])):.0f} rows/s | "
          f"{result['label_rows_per_s']:.0f} rows/s |")


if __name__ == "__main__":
    main()
