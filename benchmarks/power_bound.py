"""Is large-K assignment bound by the card's power cap? Clock, power and rate under load.

Runs each workload back to back for a few seconds (as the benchmark's repeats do) while
``nvidia-smi`` samples the SM clock and board power every 100 ms, then reports the
sustained rate with the mean clock and power of the second half of the window: the bf16
matmul that defines the roofline (8192^3), our assignment at K=1024 and K=16384, and
flash-kmeans's assignment at K=16384 (when installed).

Usage (GPU): python benchmarks/power_bound.py; env POWER_SECONDS (default 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402
from bench_kernels import DEV, D, clustered, gpu_state  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402

# the warp-specialised Gluon kernel (TMA loads) beyond WS_MAX_K, for comparison
GLUON_ANY_K = KR.TritonAssigner(KR.KernelTuning(ws_max_k=1 << 30))


def sustained(fn, seconds: float, flop_per_call: float) -> dict:
    """Calls ``fn`` back to back for ``seconds``; rate, clock and power over the 2nd half."""
    q = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"
    smi = subprocess.Popen(
        ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits", "-lms", "100"],
        stdout=subprocess.PIPE,
        text=True,
    )
    fn()
    torch.cuda.synchronize()
    t0 = time.time()
    marks = []
    while time.time() - t0 < seconds:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        fn()
        marks.append((time.time(), e))
        if len(marks) % 8 == 0:
            torch.cuda.synchronize()  # keep the queue short: wall time follows the GPU
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    torch.cuda.synchronize()
    smi.terminate()
    samples = [line.split(", ") for line in smi.communicate()[0].strip().splitlines()]
    half = len(marks) // 2
    gpu_ms = marks[half][1].elapsed_time(end)
    calls = len(marks) - half
    late = samples[len(samples) // 2 :]
    clocks = [float(s[1]) for s in late if len(s) > 3]
    power = [float(s[2]) for s in late if len(s) > 3]
    reasons = sorted({s[3] for s in late if len(s) > 3})
    return dict(
        tflops=flop_per_call * calls / (gpu_ms / 1e3) / 1e12,
        ms_per_call=gpu_ms / calls,
        calls=calls,
        sm_clock_mhz=sum(clocks) / max(1, len(clocks)),
        power_w=sum(power) / max(1, len(power)),
        throttle_reasons=reasons,
    )


def gluon(x, c):
    """The warp-specialised Gluon kernel (TMA loads) beyond WS_MAX_K, for comparison."""
    return GLUON_ANY_K.assign(x, c)


def main() -> None:
    secs = float(os.environ.get("POWER_SECONDS", "4"))
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    x = clustered(1 << 20)
    c1k = x[torch.randperm(x.shape[0], device=DEV)[:1024]].clone()
    c16k = x[torch.randperm(x.shape[0], device=DEV)[:16384]].clone()
    n = x.shape[0]
    work = {
        "bf16 matmul 8192^3 (roofline)": (lambda: a @ a, 2 * 8192**3),
        "ours assign K=1024": (lambda: KR.assign(x, c1k), 2 * n * 1024 * D),
        "ours assign K=16384": (lambda: KR.assign(x, c16k), 2 * n * 16384 * D),
        "ours assign K=16384, Gluon kernel": (lambda: gluon(x, c16k), 2 * n * 16384 * D),
    }
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton

        x16, c16 = x.half()[None], c16k.half()[None]
        xsq, csq = x16.float().pow(2).sum(-1), c16.float().pow(2).sum(-1)
        out = torch.empty((1, n), dtype=torch.int32, device=DEV)
        work["flash-kmeans assign K=16384"] = (
            lambda: euclid_assign_triton(x16, c16, xsq, out=out, c_sq=csq),
            2 * n * 16384 * D,
        )
    except ImportError:
        pass
    res = dict(device=torch.cuda.get_device_name(), gpu_start=gpu_state(), seconds=secs)
    print(
        "| workload | TFLOP/s (sustained) | ms per call | SM clock MHz | power W | "
        "throttle reasons |"
    )
    print("|---|---|---|---|---|---|")
    for name, (fn, flop) in work.items():
        r = sustained(fn, secs, flop)
        res[name] = r
        print(
            f"| {name} | {r['tflops']:.0f} | {r['ms_per_call']:.3f} | "
            f"{r['sm_clock_mhz']:.0f} | {r['power_w']:.0f} | "
            f"{' '.join(r['throttle_reasons'])} |",
            flush=True,
        )
    path = os.path.join(os.environ.get("OUT") or "results", "power_bound.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
