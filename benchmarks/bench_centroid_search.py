"""Centroid search for huge levels on one device: the exact kernels against the coarse-to-fine
search (`kernels.coarse_search.CoarseSearchAssigner`) at K = 262144 and 1048576, D = 1024.

Exact: `TritonAssigner` on CUDA, `TorchAssigner` on CPU (where the torch reference would cast
all K centroids to fp64 at once, 8 GiB at K = 2**20, it runs over blocks of 2**18 centroids
and keeps the lowest (distance, id): the same flops and the same ids). Coarse: the same
kernels under the coarse search, at each --probe; its index (about sqrt(K) cells) is built
once per K and timed apart, as labelling builds it once per level (a fit pass builds one).

Data: K centroids in K/--per-super super-clusters (centres N(0, 4 I), centroids their
centre + N(0, I)), fp32 as a tree stores them; N rows, each a random centroid +
N(0, --noise^2 I), in --dtype. Figures: rows/s (wall clock, median of --reps after a warm-up
on CUDA; one timed call on CPU), speed-up, recall@1 against the exact ids, relative inertia
difference (sum of coarse distances / sum of exact ones - 1), index build seconds, cells.
On CPU the exact search is timed on the first --exact-rows rows only (2 GFLOP a row at
K = 2**20), and recall and inertia are taken on those; the coarse search runs on all
--rows, a batch large enough that its per-cell calls are not all overhead.

Imports torch and `mdf_taxonomy.kernels` only (plus Triton on CUDA), so it runs on a GPU
machine that has torch, Triton and this checkout.

Usage: python benchmarks/bench_centroid_search.py [--device cpu|cuda] [--ks K ...] [--dim D]
       [--rows N] [--exact-rows M] [--probe P ...] [--dtype float32|bfloat16|float16]
       [--per-super S] [--noise SIGMA] [--reps R] [--threads T]
Writes results/bench_centroid_search_<device>.json (or to $OUT) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _results

import _results as R  # noqa: E402

from mdf_taxonomy.kernels import (  # noqa: E402
    Assignment,
    CoarseSearchAssigner,
    TorchAssigner,
    TritonAssigner,
)
from mdf_taxonomy.kernels import coarse_search as cs  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_EXACT_BLOCK = 1 << 18


def data(k: int, d: int, n: int, per_super: int, noise: float, device: str, dtype):
    """Clustered centroids (fp32) and rows near them, made in blocks (K x D fp32 at K = 2**20
    is 4 GiB: no full-size temporaries)."""
    g = torch.Generator(device=device).manual_seed(k)
    sup = 2.0 * torch.randn(max(1, k // per_super), d, generator=g, device=device)
    c = torch.empty((k, d), device=device)
    for a in range(0, k, 1 << 16):
        b = min(k, a + (1 << 16))
        which = torch.randint(0, sup.shape[0], (b - a,), generator=g, device=device)
        c[a:b] = sup[which] + torch.randn(b - a, d, generator=g, device=device)
    own = torch.randint(0, k, (n,), generator=g, device=device)
    x = c[own] + noise * torch.randn(n, d, generator=g, device=device)
    return c, x.to(dtype)


def exact_search(exact, x: torch.Tensor, c: torch.Tensor, cuda: bool) -> Assignment:
    """The exact assignment; on CPU over blocks of centroids (see the module docstring)."""
    if cuda:
        return exact.assign(x, c)
    best = None
    for a in range(0, c.shape[0], CPU_EXACT_BLOCK):
        r = exact.assign(x, c[a : a + CPU_EXACT_BLOCK])
        ids = r.ids + a
        if best is None:
            best = Assignment(ids, r.distance, None)
            continue
        take = r.distance < best.distance  # an earlier block has the lower ids on ties
        best = Assignment(
            torch.where(take, ids, best.ids), torch.where(take, r.distance, best.distance), None
        )
    return best


def timed(fn, cuda: bool, reps: int):
    """(median seconds, last result): a warm-up and `reps` calls on CUDA, one call on CPU."""
    if cuda:
        fn()
        torch.cuda.synchronize()
    times, out = [], None
    for _ in range(reps if cuda else 1):
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(k: int, args, cuda: bool) -> list[dict]:
    exact = TritonAssigner() if cuda else TorchAssigner()
    c, x = data(k, args.dim, args.rows, args.per_super, args.noise, args.device, args.dtype)
    xe = x[: args.exact_rows]
    t_exact, e = timed(lambda: exact_search(exact, xe, c, cuda), cuda, args.reps)
    out = []
    for i, p in enumerate(args.probe):
        coarse = CoarseSearchAssigner(exact, n_probe=p, min_centroids=1)
        if i == 0:
            t0 = time.perf_counter()
            index = coarse.index(c)
            if cuda:
                torch.cuda.synchronize()
            build = time.perf_counter() - t0
            sizes = index.offsets.diff().float()
            probed = sizes[cs.probe_cells(xe, index.coarse, 1, "l2")].mean()  # per probe
        t_coarse, a = timed(lambda coarse=coarse: coarse.assign(x, c), cuda, args.reps)
        a = a._replace(ids=a.ids[: len(xe)], distance=a.distance[: len(xe)])
        row = {
            "K": k,
            "D": args.dim,
            "N": args.rows,
            "N_exact": len(xe),
            "probe": p,
            "cells": int(index.coarse.shape[0]),
            "cell_size_mean": float(sizes.mean()),
            "cell_size_max": int(sizes.max()),
            "index_build_s": build,
            "exact_rows_per_s": len(xe) / t_exact,
            "coarse_rows_per_s": args.rows / t_coarse,
            "speedup": (args.rows / t_coarse) / (len(xe) / t_exact),
            "recall_at_1": float((a.ids == e.ids).double().mean()),
            "inertia_rel_diff": float(a.distance.double().sum() / e.distance.double().sum() - 1),
            "flops_per_row_exact": 2 * k * args.dim,
            # members met per row: p cells of the nearest cell's size (big cells draw rows)
            "flops_per_row_coarse": 2 * args.dim * (len(index.coarse) + p * float(probed)),
        }
        out.append(row)
        print(line(row), flush=True)
    return out


HEADER = (
    "| K | D | N | probe | cells (mean / max size) | index build s | exact rows/s "
    "| coarse rows/s | speed-up | recall@1 | inertia diff |\n|" + "---|" * 11
)


def line(r: dict) -> str:
    return (
        f"| {r['K']} | {r['D']} | {r['N']} | {r['probe']} | {r['cells']} "
        f"({r['cell_size_mean']:.0f} / {r['cell_size_max']}) | {r['index_build_s']:.2f} "
        f"| {r['exact_rows_per_s']:,.0f} | {r['coarse_rows_per_s']:,.0f} | {r['speedup']:.1f}x "
        f"| {r['recall_at_1']:.4f} | {r['inertia_rel_diff']:+.2e} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ks", type=int, nargs="+", default=[262144, 1048576])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rows", type=int, help="default: 8192 on CPU, 262144 on CUDA")
    ap.add_argument("--exact-rows", type=int, help="default: 1024 on CPU, all on CUDA")
    ap.add_argument("--probe", type=int, nargs="+", help="default: 4 8 on CPU, 4 8 16 on CUDA")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on CPU, bf16 on CUDA")
    ap.add_argument("--per-super", type=int, default=1024)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.threads or not cuda:  # one thread: steady figures on a shared machine
        torch.set_num_threads(args.threads or 1)
    args.rows = args.rows or (262144 if cuda else 8192)
    args.exact_rows = min(args.rows, args.exact_rows or (args.rows if cuda else 1024))
    args.probe = args.probe or ([4, 8, 16] if cuda else [4, 8])
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    args.dtype = DTYPES[dtype_name]
    if cuda:
        import triton

        extra_versions = {"triton": triton.__version__}
        exact_name = "TritonAssigner (fused Triton kernels)"
    else:
        extra_versions = {}
        exact_name = f"TorchAssigner (over blocks of {CPU_EXACT_BLOCK} centroids)"
    info = R.run_info(
        args.device,
        extra_versions=extra_versions,
        torch_threads=torch.get_num_threads(),
        exact=exact_name,
        coarse="CoarseSearchAssigner on the same kernels (index timed apart)",
        dtype=dtype_name,
        centroids="float32",
        data=f"K/{args.per_super} super-clusters, centroid = centre N(0,4I) + N(0,I), "
        f"row = random centroid + N(0,{args.noise}^2 I)",
        timing=f"median of {args.reps} after a warm-up" if cuda else "one call",
    )
    device_name = info["device"]
    path = R.result_path("bench_centroid_search", R.device_slug(device_name if cuda else None))
    print(f"{device_name}; exact: {exact_name}; rows {dtype_name}; {info['timing']}")
    print(HEADER, flush=True)
    rows: list[dict] = []
    for k in args.ks:
        rows += measure(k, args, cuda)
        if cuda:
            torch.cuda.empty_cache()
        info["load_average_after"] = os.getloadavg()
        R.write_result(path, info, rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
