"""Node sizes per level before and after balancing (`max_node_size`), on a heavy-tailed
synthetic mixture and on the bundled real sample.

Each data set is fitted twice with the same seed and tree: without balancing, and with
`max_node_size` set (default: rows / leaves of the plain tree, the leaf size a perfectly
even tree would have), so that a parent of S rows gets max(branching, ceil(S / cap))
children at the next level. Per level: nodes, Gini of the node sizes, max/median, max
and median size; for the balanced fit also the parents split, the leaves still over the
cap (flagged, a leaf cannot be split) and the nodes under `min_node_size` (flagged).

Synthetic: `--top` clusters of Zipf(`--zipf`) sizes, each a mixture of `--sub` tighter
blobs (so a large cluster has structure to split along). Real: the bundled 1,030 BioCLIP 2
embeddings (mdf_taxonomy/data, 768-D, cosine). One process, torch on the CPU.

    python benchmarks/bench_balance.py [--rows 200000] [--dim 32] [--top 16] [--sub 64]
        [--zipf 1.1] [--tree 16 8] [--real-tree 8 4] [--min-node-size 10]

Prints the tables and writes results/bench_balance_cpu.json (or to $OUT).
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
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mdf_taxonomy import __version__
from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.model.balance import level_balance, split_parents

ROOT = pathlib.Path(__file__).resolve().parents[1]
REAL = ROOT / "mdf_taxonomy" / "data" / "treeoflife_bioclip2_1k.parquet"


def zipf_mixture(rows: int, dim: int, top: int, sub: int, a: float, seed: int = 0) -> np.ndarray:
    """`top` clusters of sizes proportional to 1 / rank**a, each `sub` blobs; shuffled."""
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, top + 1) ** a
    sizes = np.floor(rows * w / w.sum()).astype(np.int64)
    parts = []
    for centre, size in zip(rng.normal(size=(top, dim)) * 40, sizes, strict=True):
        blobs = centre + rng.normal(size=(sub, dim)) * 6
        parts.append(blobs[rng.integers(0, sub, size)] + rng.normal(size=(size, dim)))
    x = np.concatenate(parts).astype(np.float32)
    return x[rng.permutation(len(x))]


def write(x: np.ndarray, path: pathlib.Path) -> pathlib.Path:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    pq.write_table(pa.table({"id": np.arange(len(x)), "embedding": emb}), path, 65536)
    return path


def fit(data: pathlib.Path, store: pathlib.Path, **params: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    tax = TaxonomyEngine(storage_uri=str(store), progress=False, **params).fit(str(data))
    return tax, time.perf_counter() - started


def compare(name: str, data: pathlib.Path, work: pathlib.Path, cap: int | None, **params: Any):
    """Both fits of one data set: their per-level rows and the cap used."""
    plain, plain_s = fit(data, work / f"{name}-plain", **params)
    cap = cap or max(1, int(plain.levels[-1].sizes.sum()) // plain.levels[-1].n_nodes)
    balanced, balanced_s = fit(data, work / f"{name}-balanced", max_node_size=cap, **params)
    rows = []
    for i, (a, b) in enumerate(zip(plain.levels, balanced.levels, strict=True), start=1):
        before, after = level_balance(a.sizes), level_balance(b.sizes)
        last = [h for h in balanced.state.history if h["level"] == i and "balance" in h][-1]
        rows.append(
            {
                "level": i,
                "nodes": [before["n_nodes"], after["n_nodes"]],
                "gini": [before["gini"], after["gini"]],
                "max_over_median": [before["max_over_median"], after["max_over_median"]],
                "max": [before["max"], after["max"]],
                "median": [before["median"], after["median"]],
                "split_parents": int(split_parents(balanced, i).size),
                "over_cap": last.get("oversized"),
                "under_min": last.get("undersized"),
            }
        )
    seconds = {"plain": round(plain_s, 2), "balanced": round(balanced_s, 2)}
    return {"data": name, "max_node_size": cap, "params": params, "seconds": seconds}, rows


def table(head: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{head['data']}: max_node_size={head['max_node_size']}, "
        f"fit s plain/balanced {head['seconds']['plain']}/{head['seconds']['balanced']}"
    )
    print(
        "| level | nodes | Gini | max/median | max | median | parents split "
        "| nodes > cap | nodes < min |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pair = {k: f"{r[k][0]} -> {r[k][1]}" for k in ("nodes", "gini", "max", "median")}
        mm = "{} -> {}".format(*(f"{v:.2f}" if v else "-" for v in r["max_over_median"]))
        print(
            f"| {r['level']} | {pair['nodes']} | {pair['gini']} | {mm} | {pair['max']} "
            f"| {pair['median']} | {r['split_parents']} | {r['over_cap']} | {r['under_min']} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--sub", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--tree", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--real-tree", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--max-node-size", type=int, default=None, help="default: rows / leaves")
    ap.add_argument("--min-node-size", type=int, default=10)
    ap.add_argument("--max-iter", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    common = {"max_iter": args.max_iter, "seed": args.seed, "min_node_size": args.min_node_size}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        x = zipf_mixture(args.rows, args.dim, args.top, args.sub, args.zipf, args.seed)
        synthetic = write(x, work / "zipf.parquet")
        for name, data, tree, extra in (
            (f"zipf a={args.zipf}, {args.rows} x {args.dim}", synthetic, args.tree, {}),
            (
                "bundled BioCLIP 2 sample, 1030 x 768",
                REAL,
                args.real_tree,
                {"metric": "cosine", "embedding_field": "emb"},
            ),
        ):
            params = {"n_levels": len(tree), "branching_factor": tree, **common, **extra}
            head, rows = compare(name, data, work, args.max_node_size, **params)
            results.append({**head, "levels": rows})
            table(head, rows)
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "versions": {
            "mdf_taxonomy": __version__,
            "torch": torch.__version__,
            "pyarrow": pa.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "params": {**vars(args), "torch_threads": torch.get_num_threads()},
    }
    out_dir = pathlib.Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    path = out_dir / "bench_balance_cpu.json"
    path.write_text(json.dumps({"info": info, "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
