"""Host (Python) time of one plain assign call: where the gap between the CUDA-event time
and the kernel time goes (NOTES v14).

The benchmark times each call on an idle GPU, so every microsecond of Python before the
kernel launch is in the figure. Prints, for plain K=1024 (N=1M, D=1024, bf16): the event
time, the host time of the call right after a sync, and a cProfile of such calls.

Usage (GPU): python benchmarks/profile_host.py
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import statistics
import time

import _kernels_only  # noqa: F401 - must precede the mdf_taxonomy imports
import torch
from bench_kernels import DEV, clustered, timeit

from mdf_taxonomy import kernels as KR


def host_after_sync(fn, reps=30):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return 1e3 * statistics.median(ts)


def main() -> None:
    x = clustered(1 << 20)
    c = x[torch.randperm(x.shape[0], device=DEV)[:1024]].clone()
    out = {}
    cases = {"assign K=1024": lambda: KR.assign(x, c, backend="triton"),
             "assign K=1024 with_second": lambda: KR.assign(x, c, backend="triton",
                                                             with_second=True)}
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
        out[name] = dict(event_ms=ev, host_after_sync_ms=host, profile=s.getvalue())
        print(f"== {name}: event {ev:.3f} ms, host after sync {host:.3f} ms")
        print(s.getvalue())
    path = os.path.join(os.environ.get("OUT") or "results", "profile_host.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
