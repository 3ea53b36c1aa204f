"""The ||x||^2 pass order in the tl kernel, on a bucketed tree level and at large K.

A grouped level with many parents is bound by DRAM/L2 traffic (benchmarks/DECISIONS.md): each
128-row item re-reads its x rows once per centroid tile while the parents' children stream through
L2. Doing the ||x||^2 pass before the tile loop (XN_FIRST) brings the rows into L2 for
those re-reads; both orders must be bit-identical. (L2 eviction hints on the x and
centroid loads, and one program per (item, centroid tiles) with an exact merge, were
measured with this script too and gave nothing beyond noise; those knobs were removed:
benchmarks/DECISIONS.md; results: results/ab_grouped_hints.json.)
Interleaved rounds, CUDA events.
Usage (GPU): python benchmarks/ab_grouped_hints.py; env AB_ROUNDS the rounds (3).
"""

from __future__ import annotations

import json
import os
import statistics

import _kernels_only  # noqa: F401 - must precede the mdf_taxonomy imports
import torch
from bench_kernels import DEV, D, clustered, three_level_tree, timeit

from mdf_taxonomy.kernels import triton_kernels as T

VARIANTS = {"xn after the tiles": dict(XN_FIRST=False), "xn first": dict(XN_FIRST=True),
            "xn skipped (diag)": dict(XN_FIRST=True, XN_UNROLL=0)}


def main() -> None:
    x = clustered(1 << 20)
    n = x.shape[0]
    _, lv1, _, lv2, _, off2 = three_level_tree(x)
    a1 = T.assign_triton(x, lv1, metric="l2")[0]
    c16k = x[torch.randperm(n, device=DEV)[:16384]].clone()
    c64k = x[torch.randperm(n, device=DEV)[:65536]].clone()
    xq = x[: 1 << 18]
    base = dict(T._config(x.dtype, D, 1024, x.device), num_stages=4)  # the bucketed config
    plain = T._config(x.dtype, D, 16384, x.device)
    cases = {"level 2 (grouped)": (base, lambda: T.grouped_assign_triton(
                 x, a1, lv2, off2, with_second=True)),
             "plain K=16384, N=256k": (plain, lambda: T.assign_triton(
                 xq, c16k, with_second=True)),
             "plain K=65536, N=256k": (plain, lambda: T.assign_triton(
                 xq, c64k, with_second=True))}
    rounds = int(os.environ.get("AB_ROUNDS", "3"))
    out = []
    for case, (cfg, fn) in cases.items():
        variants = VARIANTS
        T._OVERRIDE = cfg
        ref = fn()
        times = {v: [] for v in variants}
        same = {}
        for v, extra in variants.items():
            T._OVERRIDE = dict(cfg, **extra)
            got = fn()
            same[v] = all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
        for _ in range(rounds):
            for v, extra in variants.items():
                T._OVERRIDE = dict(cfg, **extra)
                times[v].append(timeit(fn, max_reps=8, budget_s=0.5))
        T._OVERRIDE = None
        for v in variants:
            ms = 1e3 * statistics.median(times[v])
            out.append(dict(case=case, variant=v, ms=ms, bit_identical=same[v]))
            print(f"| {case} | {v} | {ms:.3f} ms | bit-identical {same[v]} |", flush=True)
    path = os.path.join(os.environ.get("OUT") or "results", "ab_grouped_hints.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
