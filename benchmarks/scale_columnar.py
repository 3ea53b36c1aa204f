"""Scaling of the columnar pass over workers of one host (one Ray worker per GPU, or per
CPU share): a streamed Lloyd pass, a labelling pass and a GPU-resident fit per worker
count, beside the host's decode ceiling measured in the same run.

For each worker count W it runs, through `TaxonomyEngine` with `columnar=True`:
  - one Lloyd pass of a flat level (K centroids; the store is seeded in phase "lloyd", so
    the fit resumes into exactly one pass and skips the init),
  - one labelling pass of a 3-level tree (b children per node) to Parquet,
  - a fit of --resident-iters passes whose decoded rows stay cached on the workers (the
    later passes' rate is the GPU-resident one),
and reports rows/s, scaling efficiency against W=1 (rate_W / (W * rate_1)), where the
workers' time went (the labelling pass's read wait, columns, write wait) and the backend
traffic (flushes, bytes) per pass. The data is list<float32> Parquet generated on the
machine one row group at a time (never held at once), reused when it matches.

    python benchmarks/scale_columnar.py --workers 1,2 --rows 400000 --dim 256 --k 1024
    python benchmarks/scale_columnar.py --device cuda --workers 1,2,4,8 --rows 100000000 \
        --dim 1024 --k 16384 --tree 1024,1024,1024

Writes benchmarks/results/scale_columnar_<cpu|device>.json (or to $OUT); prints the table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench_pipeline, _results
import _results as R  # noqa: E402
import bench_pipeline as BP  # noqa: E402, N812

from mdf_taxonomy import __version__, register  # noqa: E402
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig, TaxonomyStore  # noqa: E402


def engine(ctx: dict, tag: str, workers: int, **kw):
    a = ctx["args"]
    cuda = a.device == "cuda"
    return BP.engine(
        ctx,
        f"{tag}-w{workers}",
        dim=a.dim,
        device=a.device,
        num_replicas=workers,
        gpus_per_replica=int(cuda),
        cpus_per_replica=None if cuda else max(1.0, (os.cpu_count() or 1) / workers - 0.5),
        batch_size=a.batch,
        compute_dtype="bfloat16" if cuda else "float32",
        columnar=True,
        **kw,
    )


def decode_ceiling(data: pathlib.Path, threads: int) -> float:
    """Rows/s of pyarrow decoding the embedding column to float32, `threads` threads."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(len(m) for m in pool.map(BP.read_rg, BP.row_groups(data)))
    return n / (time.perf_counter() - t0)


def lloyd_pass(ctx: dict, data: pathlib.Path, workers: int) -> dict:
    a = ctx["args"]
    eng = engine(ctx, "lloyd", workers, n_levels=1, branching_factor=a.k, max_iter=1, cache_bytes=0)
    BP._seed_lloyd(ctx, eng, data, a.k)
    eng.fit(input=str(data))
    p = [q for q in eng.last_fit.pass_log if q["phase"] == "lloyd"][-1]
    return {"rows": p["rows"], "rows_per_s": p["rows_per_s"], "seconds": p["seconds"],
            "flushes": p["flushes"], "flush_bytes": p["flush_bytes"]}  # fmt: skip


def store_tree(ctx: dict, eng, data: pathlib.Path) -> None:
    """A tree whose nodes sit near the data (children = parent + noise), stored done."""
    a = ctx["args"]
    rng = np.random.default_rng(a.seed)
    first = BP.read_rg(BP.row_groups(data)[0])
    cents = first[rng.choice(len(first), a.tree[0], replace=len(first) < a.tree[0])]
    levels = [Level(cents, np.zeros(len(cents), np.int64))]
    for b in a.tree[1:]:
        parents = np.repeat(np.arange(len(cents)), b)
        cents = cents[parents] + 0.5 * rng.standard_normal((len(parents), a.dim), np.float32)
        levels.append(Level(cents, parents))
    cfg = TaxonomyConfig(**{**eng.fit_params, "dim": a.dim})
    TaxonomyStore(eng.storage_uri).save(Taxonomy(cfg, a.dim, levels, FitState(len(levels), "done")))


def label_pass(ctx: dict, data: pathlib.Path, workers: int) -> dict:
    a = ctx["args"]
    eng = engine(ctx, "label", workers, n_levels=len(a.tree), branching_factor=list(a.tree))
    store_tree(ctx, eng, data)
    if a.device == "cuda":  # the kernels' one-off compilation, into Triton's disk cache
        warm = eng.load()
        first = torch.from_numpy(BP.read_rg(BP.row_groups(data)[0])[:4096]).cuda()
        warm.assign_paths(first.to(torch.bfloat16), prepared=True)
    t0 = time.perf_counter()
    eng.predict(input=str(data), output=str(ctx["root"] / f"out-w{workers}"), overwrite=True)
    seconds = time.perf_counter() - t0
    n = ctx["rows"]
    timings = eng.last_summary.get("label", {}).get("timings", {})
    return {"rows": n, "rows_per_s": n / seconds, "seconds": seconds, "timings": timings}


def resident_fit(ctx: dict, data: pathlib.Path, workers: int) -> dict:
    a = ctx["args"]
    eng = engine(ctx, "resident", workers, n_levels=1, branching_factor=a.k,
                 max_iter=a.resident_iters)  # fmt: skip
    BP._seed_lloyd(ctx, eng, data, a.k)
    eng.fit(input=str(data))
    passes = [q for q in eng.last_fit.pass_log if q["phase"] == "lloyd"]
    later = [q["rows_per_s"] for q in passes[1:]] or [passes[0]["rows_per_s"]]
    return {"first_rows_per_s": passes[0]["rows_per_s"], "rows_per_s": float(np.median(later)),
            "cached_rows": passes[-1].get("cached_rows"), "passes": len(passes)}  # fmt: skip


def table(rows: list[dict]) -> list[str]:
    head = ["workers", "Lloyd rows/s", "eff.", "label rows/s", "eff.", "resident rows/s", "eff.",
            "flushes/pass", "flush MB/pass"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["workers"])]
        for key in ("lloyd", "label", "resident"):
            cells += [f"{r[key]['rows_per_s']:,.0f}", f"{100 * r[key + '_efficiency']:.0f}%"]
        cells += [str(r["lloyd"]["flushes"]), f"{r['lloyd']['flush_bytes'] / 1e6:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--workers", type=ints, default=[1, 2])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--tree", type=ints, default=[16, 16, 16])
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--resident-iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", help="where the Parquet goes (kept and reused)")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    if cuda and max(a.workers) > torch.cuda.device_count():
        ap.error(f"--workers {max(a.workers)} > the {torch.cuda.device_count()} GPUs here")
    register()  # the loader _seed_lloyd builds
    # bench_pipeline's helpers read these names
    a.gpu_dim, a.gpu_rows = a.dim, a.rows
    with tempfile.TemporaryDirectory(prefix="scale_columnar_") as tmp:
        root = pathlib.Path(a.data_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        ctx = {"args": a, "root": root, "data": {}, "gen": {}}
        dirs, gen_s, reused = BP.gen_dataset(root / "data", a.rows, a.dim, ["list"], a.seed,
                                             a.threads)  # fmt: skip
        data, ctx["rows"] = dirs["list"], a.rows
        ceiling = decode_ceiling(data, a.threads)
        made = "reused" if reused else f"{gen_s:.0f} s"
        print(f"data: {a.rows:,} x {a.dim} list<float32> ({made}); decode ceiling "
              f"{ceiling:,.0f} rows/s on {a.threads} threads", flush=True)  # fmt: skip
        lloyd_pass(ctx, data, a.workers[0])  # the kernels' one-off compilation, kept out
        rows = []
        for w in a.workers:
            r = {"workers": w, "lloyd": lloyd_pass(ctx, data, w)}
            r["label"] = label_pass(ctx, data, w)
            r["resident"] = resident_fit(ctx, data, w)
            rows.append(r)
            base = rows[0]
            for key in ("lloyd", "label", "resident"):
                r[key + "_efficiency"] = r[key]["rows_per_s"] / (
                    w / base["workers"] * base[key]["rows_per_s"]
                )
            print("\n".join(table([r])[2:]), flush=True)
    result = {
        "date": R.local_date(),
        "device": BP.device_description(cuda),
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cpu_count": os.cpu_count(),
        "versions": R.versions(mdf_taxonomy=__version__, torch=torch.__version__),
        "params": {k: v for k, v in vars(a).items() if not k.startswith("gpu_")},
        "decode_ceiling_rows_per_s": ceiling,
        "efficiency": "rate_W / (W * rate_1)",
        "rows": rows,
    }
    slug = R.device_slug(torch.cuda.get_device_name() if cuda else None)
    path = R.result_path("scale_columnar", slug)
    R.write_json(path, result, default=str)
    print(f"\n{result['device']}; decode ceiling {ceiling:,.0f} rows/s")
    print("\n".join(table(rows)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
