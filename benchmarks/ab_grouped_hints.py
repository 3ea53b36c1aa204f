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
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402
from bench_kernels import DEV, D, clustered, three_level_tree, timeit  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402
from mdf_taxonomy.kernels import launch as L  # noqa: E402

VARIANTS = {
    "xn after the tiles": dict(XN_FIRST=False),
    "xn first": dict(XN_FIRST=True),
    "xn skipped (diag)": dict(XN_FIRST=True, XN_UNROLL=0),
}


def main() -> None:
    x = clustered(1 << 20)
    n = x.shape[0]
    _, lv1, _, lv2, _, off2 = three_level_tree(x)
    a1 = KR.TritonAssigner().assign(x, lv1).ids
    c16k = x[torch.randperm(n, device=DEV)[:16384]].clone()
    c64k = x[torch.randperm(n, device=DEV)[:65536]].clone()
    xq = x[: 1 << 18]
    base = dict(L.config(x.dtype, D, 1024, x.device), num_stages=4)  # the bucketed config
    plain = L.config(x.dtype, D, 16384, x.device)
    cases = {
        "level 2 (grouped)": (base, lambda a: a.grouped_assign(x, a1, lv2, off2, with_second=True)),
        "plain K=16384, N=256k": (plain, lambda a: a.assign(xq, c16k, with_second=True)),
        "plain K=65536, N=256k": (plain, lambda a: a.assign(xq, c64k, with_second=True)),
    }
    rounds = int(os.environ.get("AB_ROUNDS", "3"))
    out = []
    for case, (cfg, fn) in cases.items():
        variants = {
            v: KR.TritonAssigner(KR.KernelTuning(assign=dict(cfg, **extra)))
            for v, extra in VARIANTS.items()
        }
        ref = fn(KR.TritonAssigner(KR.KernelTuning(assign=cfg)))
        times = {v: [] for v in variants}
        same = {}
        for v, tuned in variants.items():
            got = fn(tuned)
            same[v] = all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
        for _ in range(rounds):
            for v, tuned in variants.items():
                times[v].append(timeit(lambda fn=fn, a=tuned: fn(a), max_reps=8, budget_s=0.5))
        for v in variants:
            ms = 1e3 * statistics.median(times[v])
            out.append(dict(case=case, variant=v, ms=ms, bit_identical=same[v]))
            print(f"| {case} | {v} | {ms:.3f} ms | bit-identical {same[v]} |", flush=True)
    path = os.path.join(os.environ.get("OUT") or "results", "ab_grouped_hints.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
