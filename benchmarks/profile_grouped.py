"""Where a grouped tree level's time goes on one GPU: kernels, gaps, bucketing.

Builds bench_kernels.py's 3-level tree (1024 children per node, N=1M, D=1024), then
prints the CUDA-event time of each level and, from torch.profiler, the kernel time and
launch count inside it, plus the item statistics of the multi-parent levels.

Usage (GPU): python benchmarks/profile_grouped.py
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402
from bench_kernels import DEV, clustered, label_three_levels, three_level_tree, timeit  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402
from mdf_taxonomy.kernels import triton_dispatch as TD  # noqa: E402


def kernel_table(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in p.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            t = getattr(e, "device_time_total", None) or e.cuda_time_total
            rows.append((t / reps / 1e3, e.count // reps, e.key[:70]))
    rows.sort(reverse=True)
    return rows


def host_ms(fn, reps=10):
    """Median host time of one call while the GPU is busy (launch overhead, no waiting)."""
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        for _ in range(4):
            a @ a
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    return 1e3 * sorted(ts)[reps // 2]


def main():
    n = 1 << 20
    x = clustered(n)
    torch.manual_seed(0)
    g1, lv1, off1, lv2, _, off2 = tree = three_level_tree(x)
    a1 = KR.grouped_assign(x, g1, lv1, off1).ids
    a2 = KR.grouped_assign(x, a1, lv2, off2).ids % 1024
    out = {}
    cases = {
        "plain_assign_k1024": lambda: KR.assign(x, lv1),
        "level1_single_parent": lambda: KR.grouped_assign(x, g1, lv1, off1),
        "level2_unsorted": lambda: KR.grouped_assign(x, a1, lv2, off2),
        "level3_unsorted": lambda: KR.grouped_assign(x, a2, lv2, off2),
        "work_items_only": lambda: TD.work_items(a1, 1024, 128),
    }
    cases["three_levels"] = lambda: label_three_levels(x, tree)  # bench_kernels' figure
    cases["three_levels_own_norms"] = lambda: label_three_levels(x, tree, reuse_norms=False)
    srt, perm = torch.sort(a1)
    xs = x[perm].contiguous()
    cases["level2_presorted_x"] = lambda: KR.grouped_assign(xs, srt, lv2, off2)
    for name, fn in cases.items():
        ms = 1e3 * timeit(fn)
        ks = kernel_table(fn)
        ksum = sum(r[0] for r in ks)
        host = host_ms(fn) if name in ("plain_assign_k1024", "level1_single_parent") else None
        out[name] = dict(
            ms=ms,
            kernel_ms=ksum,
            launches=sum(r[1] for r in ks),
            host_ms=host,
            rows_per_s=n / ms * 1e3,
            top=[(round(a, 3), b, c) for a, b, c in ks[:6]],
        )
        print(
            f"{name:24s} {ms:7.3f} ms  kernels {ksum:7.3f} ms  launches {out[name]['launches']}"
            f"  {n / ms / 1e3:7.1f} M rows/s" + (f"  host {host:.3f} ms" if host else "")
        )
        for a, b, c in ks[:6]:
            print(f"      {a:7.3f} ms x{b:3d} {c}")
    for name, g in (("level2", a1), ("level3", a2)):
        cnt = torch.bincount(g, minlength=1024)
        items = int(((cnt + 127) // 128).sum())
        out[name + "_items"] = dict(
            items=items,
            ideal=n // 128,
            parents_lt128=int((cnt < 128).sum()),
            empty=int((cnt == 0).sum()),
            max=int(cnt.max()),
        )
        print(name, out[name + "_items"])
    path = os.path.join(os.environ.get("OUT") or "results", "profile_grouped.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
