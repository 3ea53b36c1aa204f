"""A/B of the lower-triangle search (fp16/bf16, D=1024): the warp-specialised Gluon kernel
(`gluon_earlier`, the default on sm90) against the tl kernel it replaced
(`KernelTuning(warp_specialized=False)`), side by side in one run and checked bit for bit;
beside cuBLAS's GEMM of the same node (x @ x.T, n x n x D, 2 n^2 D flops: what the search
would run at with a free epilogue and no triangle); optionally both sustained for S
seconds with the SM clock and power read mid-run (`--sustained S`: a 700 W part clocks
down under a long tensor-core load), the tl kernel's launch configs (`--sweep`) and a
profile of the whole dedup call (`--profile N`). CUDA only; prints, writes nothing.

Usage: python benchmarks/ab_earlier.py [--sizes N ...] [--dtypes float16 bfloat16]
       [--chunks C ...] [--sustained S] [--sweep] [--profile N]
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdf_taxonomy import kernels as K  # noqa: E402
from mdf_taxonomy.curation import semdedup as SD  # noqa: E402, N812
from mdf_taxonomy.kernels import earlier_kernels as EK  # noqa: E402

PEAK = 989e12
CONFIGS = {  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    "128x256x64 w8 s3": (128, 256, 64, 8, 3),
    "128x256x64 w8 s4": (128, 256, 64, 8, 4),
    "128x128x64 w4 s4": (128, 128, 64, 4, 4),
    "128x128x64 w8 s4": (128, 128, 64, 8, 4),
    "256x128x64 w8 s3": (256, 128, 64, 8, 3),
    "128x256x32 w8 s5": (128, 256, 32, 8, 5),
}
TL = K.KernelTuning(warp_specialized=False)


def bench(fn) -> float:
    """Median seconds (do_bench: events, L2 flushed between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def line(n: int, label: str, t: float, same, flops: float | None = None) -> str:
    flops = flops or float(n) * n * 1024
    return (f"| {n} | {label} | {t * 1e3:.3f} | {flops / t / 1e12:.0f} | "
            f"{100 * flops / t / PEAK:.1f}% | {same} |")  # fmt: skip


def ws_vs_tl(x: torch.Tensor, dtype_name: str, chunks: list[int]) -> list[str]:
    """The tl kernel (its automatic column split), the Gluon kernel (its automatic plan,
    then each forced chunk width), each checked bit for bit against the tl kernel."""
    n = x.shape[0]
    tl_out = EK.assign_earlier_triton(x, with_second=True, tuning=TL)
    out = [line(n, f"{dtype_name} tl", bench(lambda: EK.assign_earlier_triton(
        x, with_second=True, tuning=TL)), "-")]  # fmt: skip
    for c in [None, *chunks]:

        def run(c=c):
            return EK.assign_earlier_triton(x, with_second=True, split_cols=c)

        same = all(torch.equal(a, b) for a, b in zip(run(), tl_out, strict=True))
        label = f"{dtype_name} ws" + ("" if c is None else f" chunk={c}")
        out.append(line(n, label, bench(run), same))
    return out


def gemm_line(x: torch.Tensor, dtype_name: str) -> str:
    n = x.shape[0]
    return line(n, f"{dtype_name} cuBLAS x @ x.T", bench(lambda: x @ x.T), "-", 2.0 * n * n * 1024)


def sustained(x: torch.Tensor, dtype_name: str, seconds: float) -> list[str]:
    """The WS search and cuBLAS's GEMM each run back to back for `seconds`, the SM clock
    and power read by nvidia-smi half way through."""
    n, out = x.shape[0], []
    fns = {
        "ws": (lambda: EK.assign_earlier_triton(x, with_second=True), float(n) * n * 1024),
        "cuBLAS x @ x.T": (lambda: x @ x.T, 2.0 * n * n * 1024),
    }
    for label, (fn, flops) in fns.items():
        fn()
        torch.cuda.synchronize()
        per_call = bench(fn)
        calls = max(1, int(seconds / per_call))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        time.sleep(seconds / 2)
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        end.synchronize()
        t = start.elapsed_time(end) * 1e-3 / calls
        out.append(
            line(n, f"{dtype_name} {label}, {seconds:.0f} s sustained ({smi})", t, "-", flops)
        )
    return out


def sweep(x: torch.Tensor, dtype_name: str) -> list[str]:
    """The tl kernel's launch configs, each with its automatic split and none."""
    n, out, ref = x.shape[0], [], None
    for name, c in CONFIGS.items():
        conf = dict(
            zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), c, strict=True)
        )
        conf.update(TMA=False, XN_BLOCK=64, XN_UNROLL=1)
        tuning = K.KernelTuning(assign=conf)
        for split in (None, n):

            def run(tuning=tuning, split=split):
                return EK.assign_earlier_triton(
                    x, with_second=True, tuning=tuning, split_cols=split
                )

            try:
                got, t = run(), bench(run)
            except Exception as e:  # noqa: BLE001
                out.append(f"n={n} {name} split={split}: {type(e).__name__} {e}"[:200])
                continue
            same = ref is None or all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
            ref = ref or got
            tag = "auto" if split is None else "none"
            out.append(line(n, f"{dtype_name} tl {name} split={tag}", t, same))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--chunks", type=int, nargs="*", default=[], help="forced WS chunk widths")
    ap.add_argument("--sustained", type=float, default=0.0, help="seconds of back-to-back calls")
    ap.add_argument("--sweep", action="store_true", help="the tl kernel's configs too")
    ap.add_argument("--profile", type=int, default=0, help="rows of a profiled dedup call")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print("| n | kernel | ms | TFLOP/s | of 989 | == tl |\n|---|---|---|---|---|---|")
    for n in args.sizes:
        unit = torch.nn.functional.normalize(
            torch.randn(n, 1024, device="cuda", generator=g), dim=1
        )
        for dtype_name in args.dtypes:
            x = unit.to(SD.DTYPES[dtype_name])
            rows = ws_vs_tl(x, dtype_name, args.chunks) + [gemm_line(x, dtype_name)]
            rows += sustained(x, dtype_name, args.sustained) if args.sustained else []
            rows += sweep(x, dtype_name) if args.sweep else []
            print("\n".join(rows), flush=True)
        del unit, x
    n = args.profile
    if not n:
        return
    x = torch.randn(n, 1024, device="cuda", generator=g)
    ids, keys = np.arange(n), np.arange(n, dtype=np.float64)
    for _ in range(2):
        SD.node_max_similarity(x, ids, keys, compute_dtype="float16")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        SD.node_max_similarity(x, ids, keys, compute_dtype="float16")
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
