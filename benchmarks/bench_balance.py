"""Node sizes per level without and with balancing, on a heavy-tailed synthetic mixture
and on the bundled real sample.

Each data set is fitted three times with the same seed and tree: without balancing;
with `max_node_size` (default: rows / leaves of the plain tree, the leaf size a
perfectly even tree would have: a parent of S rows gets max(branching, ceil(S / cap))
children); with `balance_factor` (a parent over factor x its siblings' median gets
more children). The plain tree then labels the data with a hard bound, capped
labelling (`TaxonomyEngine.label_capped`) at capacity max(cap, the tightest its parents
allow). Per variant and level: nodes, Gini of the node sizes, max/median, max and
median size, parents split, nodes over the cap and under `min_node_size` (flagged).

Synthetic: `--top` clusters of Zipf(`--zipf`) sizes, each a mixture of `--sub` tighter
blobs (so a large cluster has structure to split along). Real: the bundled 1,030 BioCLIP 2
embeddings (mdf_taxonomy/data, 768-D, cosine). One process, torch on the CPU.

    python benchmarks/bench_balance.py [--rows 200000] [--dim 32] [--top 16] [--sub 64]
        [--zipf 1.1] [--tree 16 8] [--real-tree 8 4] [--min-node-size 10]
        [--balance-factor 2.0]

Prints the tables and writes results/bench_balance_cpu.json (or to $OUT).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: _results
import _results as R  # noqa: E402

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


def capped(tax: Any, data: pathlib.Path, store: pathlib.Path, work: pathlib.Path, cap: int):
    """Size-capped labelling of `data` with the plain tree: its leaves' sizes, the
    capacity (`cap`, raised to the tightest a parent allows), passes and seconds."""
    rows = np.bincount(tax.levels[-1].parents, weights=tax.levels[-1].sizes)
    children = np.bincount(tax.levels[-1].parents)
    capacity = max(cap, int(np.max(np.ceil(rows / children))))
    engine = TaxonomyEngine(storage_uri=str(store), progress=False)
    started = time.perf_counter()
    summary = engine.label_capped(str(data), str(work / f"{store.name}-capped"), capacity)
    seconds = time.perf_counter() - started
    leaves = pq.read_table(work / f"{store.name}-capped", columns=[f"taxonomy_l{tax.n_levels}"])
    sizes = np.bincount(leaves.column(0).to_numpy(), minlength=tax.levels[-1].n_nodes)
    return sizes, {
        "capacity": capacity,
        "passes": summary["passes"],
        "moved_rows": summary["moved_rows"],
        "seconds": round(seconds, 2),
        "rows_per_s_per_pass": round(summary["rows"] * summary["passes"] / seconds),
    }


def compare(name: str, data: pathlib.Path, work: pathlib.Path, cap: int | None, **params: Any):
    """The fits of one data set (plain, max_node_size, balance_factor) and capped
    labelling with the plain tree: per variant and level the node sizes' balance."""
    factor = params.pop("balance_factor")
    plain, plain_s = fit(data, work / f"{name}-plain", **params)
    cap = cap or max(1, int(plain.levels[-1].sizes.sum()) // plain.levels[-1].n_nodes)
    fits = {"plain": (plain, plain_s)}
    fits[f"max_node_size={cap}"] = fit(data, work / f"{name}-cap", max_node_size=cap, **params)
    fits[f"balance_factor={factor}"] = fit(
        data, work / f"{name}-factor", balance_factor=factor, **params
    )
    rows = []
    for variant, (tax, _) in fits.items():
        for i, lv in enumerate(tax.levels, start=1):
            last = [h for h in tax.state.history if h["level"] == i and "balance" in h][-1]
            rows.append(
                {
                    "variant": variant,
                    "level": i,
                    **level_balance(lv.sizes),
                    "split_parents": int(split_parents(tax, i).size),
                    "over_cap": int((lv.sizes > cap).sum()),
                    "under_min": last.get("undersized"),
                }
            )
    sizes, run = capped(plain, data, work / f"{name}-plain", work, cap)
    variant = f"plain tree, capacity={run['capacity']}"
    over = int((sizes > cap).sum())
    rows.append({"variant": variant, "level": plain.n_levels, **level_balance(sizes)})
    rows[-1].update(split_parents=0, over_cap=over, under_min=None)
    seconds = {k: round(v[1], 2) for k, v in fits.items()}
    head = {"data": name, "max_node_size": cap, "params": params, "seconds": seconds}
    return {**head, "capped_labelling": run}, rows


def table(head: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    run = head["capped_labelling"]
    print(
        f"\n{head['data']}: fit seconds {head['seconds']}; capped labelling: capacity "
        f"{run['capacity']}, {run['passes']} passes, {run['moved_rows']} rows moved, "
        f"{run['seconds']} s ({run['rows_per_s_per_pass']} rows/s per pass)"
    )
    print(
        "| variant | level | nodes | Gini | max/median | max | median | parents split "
        f"| nodes > {head['max_node_size']} | nodes < min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mm = "-" if r["max_over_median"] is None else f"{r['max_over_median']:.2f}"
        print(
            f"| {r['variant']} | {r['level']} | {r['n_nodes']} | {r['gini']:.3f} | {mm} "
            f"| {r['max']} | {r['median']} | {r['split_parents']} | {r['over_cap']} "
            f"| {r['under_min']} |"
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
    ap.add_argument("--balance-factor", type=float, default=2.0)
    ap.add_argument("--max-iter", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    common = {"max_iter": args.max_iter, "seed": args.seed, "min_node_size": args.min_node_size}
    common["balance_factor"] = args.balance_factor
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
        "date": R.local_date(),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "versions": R.versions(
            mdf_taxonomy=__version__,
            torch=torch.__version__,
            pyarrow=pa.__version__,
            numpy=np.__version__,
        ),
        "params": {**vars(args), "torch_threads": torch.get_num_threads()},
    }
    path = R.result_path("bench_balance", "cpu")
    R.write_result(path, info, results, rows_key="results")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
