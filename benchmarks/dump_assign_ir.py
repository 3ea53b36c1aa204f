"""Compile the bf16 assignment kernel (l2 and cosine, K=1024) and dump its TTGIR/PTX to
$OUT with a resource summary (registers, spills, shared memory, layout conversions,
wgmma ops and waits): the compiler's view, at no timing cost."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402
from mdf_taxonomy.kernels import assign_kernels as AK  # noqa: E402


def compiled_kernels(fn):
    for entry in fn.device_caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        yield from cache.values()


def main() -> int:
    out = os.environ.get("OUT", "/tmp")
    x = torch.randn(1 << 16, 1024, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    for metric in ("l2", "cosine"):
        KR.assign(x, c, metric=metric)
    torch.cuda.synchronize()
    for i, k in enumerate(compiled_kernels(AK._assign_kernel)):
        ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
        for ext, text in (("ttgir", ttgir), ("ptx", ptx)):
            with open(os.path.join(out, f"assign_{i}.{ext}"), "w") as f:
                f.write(text)
        print(
            i,
            dict(
                regs=k.n_regs,
                spills=k.n_spills,
                smem=k.metadata.shared,
                convert_layout=ttgir.count("convert_layout"),
                local_alloc=ttgir.count("local_alloc"),
                wgmma=ttgir.count("warp_group_dot "),
                wgmma_wait=ttgir.count("warp_group_dot_wait"),
                ptx_wgmma=ptx.count("wgmma.mma_async"),
                ptx_bar=ptx.count("bar.sync"),
                cp_async=ptx.count("cp.async.cg"),
            ),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
