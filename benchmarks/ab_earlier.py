"""A/B of the lower-triangle search kernel's launch configs and column splits (fp16/bf16,
D=1024), and a profile of the whole dedup call: which config `launch.config` should give
`assign_earlier`, and where a node's time goes. CUDA only; prints, writes nothing.

Usage: python benchmarks/ab_earlier.py [--sizes N ...] [--profile N]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

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


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60) * 1e-3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--profile", type=int, default=65536, help="0: none")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in args.sizes:
        x = torch.nn.functional.normalize(
            torch.randn(n, 1024, device="cuda", generator=g), dim=1
        ).half()
        flops = float(n) * n * 1024
        ref = None
        for name, c in CONFIGS.items():
            conf = dict(
                zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), c, strict=True)
            )
            conf.update(TMA=False, XN_BLOCK=64, XN_UNROLL=1)
            tuning = K.KernelTuning(assign=conf)
            for split in (None, n):
                try:

                    def run(x=x, tuning=tuning, split=split):
                        return EK.assign_earlier_triton(
                            x, with_second=True, tuning=tuning, split_cols=split
                        )

                    out = run()
                    t = bench(run)
                except Exception as e:  # noqa: BLE001
                    print(f"n={n} {name} split={split}: {type(e).__name__} {e}"[:200])
                    continue
                same = ref is None or all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
                ref = ref or out
                tag = "auto" if split is None else "none"
                print(f"n={n} {name} split={tag}: {t * 1e3:.3f} ms {flops / t / 1e12:.0f} "
                      f"TFLOP/s {100 * flops / t / PEAK:.0f}% same={same}", flush=True)  # fmt: skip
        del x
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
