"""Balanced sampling's passes against a labelling pass over the same Parquet, side by side.

Each sampling pass is a labelling pass (read, parse, walk the tree) plus a little per-row
work, so its rate should match labelling's. Synthetic data: clustered rows, a two-level
tree built from them, Parquet in row groups; one process, torch on the CPU (or --device).

    python benchmarks/bench_curation.py [--rows 400000] [--dim 128] [--device cpu]

Prints a table and writes results/bench_curation_<device>.json (or to $OUT).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mdf_taxonomy import __version__
from mdf_taxonomy.curation import SamplePlan
from mdf_taxonomy.curation.sampling_passes import count_leaves, gather_candidates, select_rows
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.parquet_sink import ParquetSink
from mdf_taxonomy.passes.records import parse_arrow

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: _results
import _results as R  # noqa: E402


def synthetic(rows: int, dim: int, root: pathlib.Path, tree: tuple[int, int]) -> Taxonomy:
    """Clustered rows in Parquet (64k-row groups) and a tree whose centroids are rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(tree[0] * tree[1], dim)).astype(np.float32) * 4
    x = centres[rng.integers(0, len(centres), rows)] + rng.normal(size=(rows, dim))
    x = x.astype(np.float32)
    flat = pa.array(x.reshape(-1))
    emb = pa.FixedSizeListArray.from_arrays(flat, dim)
    table = pa.table({"id": np.arange(rows), "embedding": emb})
    pq.write_table(table, root / "data.parquet", row_group_size=65536)
    top = centres.reshape(tree[0], tree[1], dim).mean(1)
    levels = [
        Level(top, np.zeros(tree[0], np.int64)),
        Level(centres, np.repeat(np.arange(tree[0]), tree[1])),
    ]
    cfg = TaxonomyConfig(n_levels=2, branching_factor=list(tree))
    return Taxonomy(config=cfg, dim=dim, levels=levels, state=FitState(phase="done"))


def label_pass(tax: Taxonomy, source: ParquetInput, assigner, device: str) -> int:
    """What a labelling pass does per row group: parse, prepare, walk the tree."""
    n = 0
    for _, batches in source.read_items(source.get_file_list()):
        for batch in batches:
            parsed = parse_arrow(batch.column("embedding"), "embedding", tax.dim)
            tax.assign_paths(parsed.x, assigner=assigner, device=device)
            n += batch.num_rows
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--target", type=int, default=50_000)
    args = ap.parse_args()
    tree = (32, 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        tax = synthetic(args.rows, args.dim, root, tree)
        source = ParquetInput(str(root / "data.parquet"), embedding_field="embedding")
        assigner = make_assigner("auto")
        timings: dict[str, float] = {}

        def timed(name, fn):
            started = time.perf_counter()
            out = fn()
            timings[name] = time.perf_counter() - started
            return out

        label_pass(tax, source, assigner, args.device)  # warm-up: page cache, kernels
        timed("label", lambda: label_pass(tax, source, assigner, args.device))
        rows = []
        for strategy in ("random", "closest"):
            sizes = timed(
                f"count ({strategy})",
                lambda: count_leaves(tax, source, assigner=assigner, device=args.device),
            )
            plan = SamplePlan.build(tax, sizes, args.target, 1, strategy, 0)
            cands = timed(
                f"candidates ({strategy})",
                lambda plan=plan: gather_candidates(
                    plan, tax, source, assigner=assigner, device=args.device
                ),
            )
            plan = plan.finish(cands)
            sink = ParquetSink(str(root / f"out-{strategy}"))
            timed(
                f"select + write ({strategy})",
                lambda plan=plan, sink=sink: select_rows(
                    plan,
                    tax,
                    source,
                    sink,
                    assigner=assigner,
                    device=args.device,
                    rejected=Counter(),
                ),
            )
            sink.close()
        for name, seconds in timings.items():
            rate = args.rows / seconds
            rows.append(
                {
                    "pass": name,
                    "seconds": round(seconds, 3),
                    "rows_per_s": round(rate),
                    "vs_label": round(timings["label"] / seconds, 2),
                }
            )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    info = {
        "date": R.local_date(),
        "device": f"{device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores)",
        "versions": R.versions(
            mdf_taxonomy=__version__,
            torch=torch.__version__,
            pyarrow=pa.__version__,
            numpy=np.__version__,
        ),
        "params": {**vars(args), "tree": list(tree), "torch_threads": torch.get_num_threads()},
    }
    print(f"{info['device']}; {args.rows} rows x {args.dim}, tree {tree}, target {args.target}")
    print("| pass | s | rows/s | label's time / this pass's |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['pass']} | {r['seconds']} | {r['rows_per_s']:,} | {r['vs_label']} |")
    path = R.result_path("bench_curation", R.device_slug(None if device == "cpu" else device))
    R.write_result(path, info, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
