"""Host (Python) time of one plain assign call: where the gap between the CUDA-event time
and the kernel time goes (benchmarks/DECISIONS.md).

The benchmark times each call on an idle GPU, so every microsecond of Python before the
kernel launch is in the figure. Prints, for plain K=1024 (N=1M, D=1024, bf16): the event
time, the host time of the call right after a sync, and a cProfile of such calls.

Usage (GPU): python benchmarks/profile_host.py
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402
from bench_kernels import DEV, clustered, timeit  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402
from mdf_taxonomy.kernels import launch as L  # noqa: E402
from mdf_taxonomy.kernels import triton_dispatch as TD  # noqa: E402


def host_after_sync(fn, reps=30):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return 1e3 * statistics.median(ts)


def pieces(x, c) -> dict:
    """Host time of each step of a plain Gluon-served assign, median of back-to-back
    repeats while the GPU is busy (no sync in between)."""
    from mdf_taxonomy.kernels import gluon_kernels as G  # imports Gluon: CUDA only

    n = x.shape[0]
    xs, cp, cn = TD.prep(x, c, "l2")
    ids, dist, sec = TD.empty_out(n, x.device, False, filled=False)
    xn = torch.empty_like(dist)
    steps = {
        "prep (checks, cached centroids)": lambda: TD.prep(x, c, "l2"),
        "outputs (4 torch.empty)": lambda: (
            TD.empty_out(n, x.device, False, filled=False),
            torch.empty_like(dist),
        ),
        "use_ws": lambda: L.use_ws(xs, cp, "l2", 1024, L.DEFAULT_TUNING),
        "assign_ws (descriptors + launch)": lambda: G.assign_ws(
            xs, cp, cn, ids, dist, None, metric="l2", xn=xn
        ),
        "whole KR.assign": lambda: KR.assign(x, c, backend="triton"),
    }
    big = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    out = {}
    for name, fn in steps.items():
        fn()
        ts = []
        for _ in range(5):
            for _ in range(6):
                big @ big  # keep the GPU busy: launches never wait
            for _ in range(20):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            torch.cuda.synchronize()
        out[name] = 1e6 * statistics.median(ts)
        print(f"   {name:36s} {out[name]:7.1f} us", flush=True)
    return out


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    ).parse_args()
    x = clustered(1 << 20)
    c = x[torch.randperm(x.shape[0], device=DEV)[:1024]].clone()
    out = {}
    groups = torch.zeros(x.shape[0], dtype=torch.int64, device=DEV)
    offs = torch.tensor([0, 1024], device=DEV)
    cases = {
        "assign K=1024": lambda: KR.assign(x, c, backend="triton"),
        "grouped, one parent, K=1024": lambda: KR.grouped_assign(x, groups, c, offs),
        "assign K=1024 with_second": lambda: KR.assign(x, c, backend="triton", with_second=True),
    }
    for name, fn in cases.items():
        ev = 1e3 * timeit(fn)
        host = host_after_sync(fn)
        prof = cProfile.Profile()
        for _ in range(50):
            torch.cuda.synchronize()
            prof.enable()
            fn()
            prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        pstats.Stats(prof, stream=s).sort_stats("cumtime").print_stats(25)
        out[name] = dict(event_ms=ev, host_after_sync_ms=host, profile=s.getvalue())
        print(f"== {name}: event {ev:.3f} ms, host after sync {host:.3f} ms")
        print(s.getvalue())
    out["pieces_us"] = pieces(x, c)
    path = os.path.join(os.environ.get("OUT") or "results", "profile_host.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
