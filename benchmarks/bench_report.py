"""The report's cost on a huge tree: a synthetic 1M-leaf artifact (100 x 100 x 100, dim 64)
and 100k labelled rows, then `build_report` timed with its peak memory and output sizes.

    python benchmarks/bench_report.py

Prints a table and writes results/bench_report_cpu.json (or to $OUT).
"""

from __future__ import annotations

import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mdf_taxonomy import __version__
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.report import build_report

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: _results
import _results as R  # noqa: E402

BRANCHING, DIM, ROWS = [100, 100, 100], 64, 100_000


def synthetic(root: str) -> None:
    """The artifact (a stored, finished tree) and labelled Parquet drawn from its leaves."""
    rng = np.random.default_rng(0)
    cfg = TaxonomyConfig(n_levels=3, branching_factor=BRANCHING, dim=DIM, metric="cosine")
    levels, n_parents, above = [], 1, np.zeros((1, DIM), np.float32)
    for k in BRANCHING:
        parents = np.repeat(np.arange(n_parents), k)
        noise = rng.normal(size=(n_parents * k, DIM)).astype(np.float32) / (len(levels) + 1)
        levels.append(Level(above[parents] + noise, parents))
        above, n_parents = levels[-1].centroids, n_parents * k
    history = [
        {"level": lv, "phase": "lloyd", "iteration": i, "rows": ROWS, "inertia": 1e3 / (i + lv)}
        for lv in (1, 2, 3)
        for i in (1, 2, 3)
    ]
    state = FitState(level=3, phase="done", iteration=3, inertia=1.0, history=history)
    TaxonomyStore(f"{root}/tax").save(Taxonomy(cfg, DIM, levels, state, "synthetic"))
    leaf = rng.integers(0, n_parents, ROWS)
    l2 = levels[2].parents[leaf]
    l1 = levels[1].parents[l2]
    x = levels[2].centroids[leaf] + rng.normal(size=(ROWS, DIM)).astype(np.float32) * 0.1
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(ROWS)],
            "emb": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM),
            "taxonomy_l1": l1.astype(np.int32),
            "taxonomy_l2": l2.astype(np.int32),
            "taxonomy_l3": leaf.astype(np.int32),
            "taxonomy_error": [""] * ROWS,
            "label": [f"c{v // 10}" for v in l1],
        }
    )
    pq.write_table(table, f"{root}/labelled.parquet")


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        synthetic(root)
        started = time.perf_counter()
        facts = build_report(
            f"{root}/tax", f"{root}/out", data=f"{root}/labelled.parquet", labels=["label"]
        )
        seconds = time.perf_counter() - started
        sizes = {n: os.path.getsize(f"{root}/out/{n}") for n in ("report.html", "map.parquet")}
    result = {
        "leaves": int(np.prod(BRANCHING)),
        "labelled_rows": ROWS,
        "seconds": round(seconds, 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "sampled_rows": facts["data"]["sampled"],
        "nodes_drawn": len(facts["nodes"]),
        "html_mb": round(sizes["report.html"] / 2**20, 1),
    }
    info = {
        "date": R.local_date(),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": R.versions(
            mdf_taxonomy=__version__, pyarrow=pa.__version__, numpy=np.__version__
        ),
        "params": {"branching": BRANCHING, "dim": DIM, "rows": ROWS},
    }
    print("| leaves | labelled rows | s | peak RSS MB | sampled | nodes drawn | HTML MB |")
    print("|---|---|---|---|---|---|---|")
    print(
        "| "
        + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in result.values())
        + " |"
    )
    path = R.result_path("bench_report", "cpu")
    R.write_result(path, info, result, rows_key="result")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
