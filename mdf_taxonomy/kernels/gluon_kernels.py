"""Warp-specialised assignment for Hopper (Gluon): loads never wait on the epilogue.

Why: the ``tl.*`` kernel drains its software pipeline and runs the top-2 epilogue with
the tensor cores idle after every centroid tile (visible in its TTGIR: a full wait per
tile), and for l2 it sums ``||x||^2`` in a pass of its own. Here a CTA owns 2 x BLOCK_M
rows and splits the work across partitions (``gluon_partitions``):

- a producer warp streams (two x chunks, one centroid chunk) through a ring of shared
  memory slots with TMA, running up to STAGES k-steps ahead of the consumers, across
  tile and row-block boundaries (persistent grid);
- two consumer warpgroups, one per BLOCK_M-row half, run wgmma on the same centroid
  chunks and keep a running top-2 in registers; a slot is refilled only when every
  user has released it;
- a 2-warp norm worker (l2; idle for cosine) sums ``||x||^2`` from the x chunks while they sit in
  the ring (no second read of x) and hands it to the consumers through shared memory.

The per-k-step traffic is that of a 2*BLOCK_M x BLOCK_N tile (as the ``tl.*`` kernel's
128 x 256); at large K that traffic, not the epilogue, is what bounds both kernels, so
hiding the epilogue pays at small K only (benchmarks/DECISIONS.md has the figures and the
designs tried).

Scores are those of the ``tl.*`` kernel bit for bit (fp32 wgmma accumulation over D in
16-wide steps, ``||c||^2 - 2 x.c``, ``||x||^2`` summed over the same 64-column chunks in
the same order; lowest id wins ties). Scope (``launch.use_ws`` decides):
bf16/fp16 on sm90 with TMA-compatible rows, K <= WS_MAX_K (a tree's single-parent first
level included); everything else uses ``assign_kernels``: fp32, large K, fp8, and grouped
levels with many parents, whose rows come through a permutation that Hopper's TMA cannot
gather. This module holds the kernel that starts the partitions and its host-side
launcher, ``assign_ws``. Import only on CUDA.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .gluon_partitions import _consumer, _norm_worker, _producer
from .launch import n_sms

CONFIG = dict(
    BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, STAGES=4, NORM_WARPS=2, REGS_CONSUMER=224, REGS_WORKERS=40
)


@gluon.jit
def _ws_assign_kernel(
    x_desc,
    c_desc,
    cn_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    xn_ptr,
    N,
    K,
    n_blocks,
    D: gl.constexpr,
    L2: gl.constexpr,
    WITH_SECOND: gl.constexpr,
    XN_IN: gl.constexpr,
    XN_OUT: gl.constexpr,
    NORM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
    NORM_WARPS: gl.constexpr,
    REGS_CONSUMER: gl.constexpr,
    REGS_WORKERS: gl.constexpr,
):
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], c_desc.layout)
    xn_bufs = gl.allocate_shared_memory(
        gl.float32,
        [4, BLOCK_M],  # 2 slots x 2 halves
        gl.SwizzledSharedLayout(1, 1, 1, [0]),
    )
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    xn_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    xn_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=3 if NORM else 2)  # + the norm worker
    for s in gl.static_range(2):
        mbarrier.init(xn_ready.index(s), count=1)
        mbarrier.init(xn_free.index(s), count=2)
    fence_async_shared()
    # (partition argument tuples are spelled out: the Gluon frontend takes them inline)
    # fmt: off
    gl.warp_specialize(
        [(_consumer, (x_bufs, c_bufs, ready, empty, xn_bufs, xn_ready, xn_free, cn_ptr,
                      ids_ptr, dist_ptr, sec_ptr, xn_ptr, n_blocks, N, K, 0, D, L2,
                      WITH_SECOND, XN_IN, XN_OUT, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
         (_consumer, (x_bufs, c_bufs, ready, empty, xn_bufs, xn_ready, xn_free, cn_ptr,
                      ids_ptr, dist_ptr, sec_ptr, xn_ptr, n_blocks, N, K, 1, D, L2,
                      WITH_SECOND, XN_IN, XN_OUT, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
         (_producer, (x_desc, c_desc, x_bufs, c_bufs, ready, empty, n_blocks, K,
                      D, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
         (_norm_worker, (x_bufs, ready, empty, xn_bufs, xn_ready, xn_free, n_blocks,
                         K, NORM, D, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, NORM_WARPS))],
        [4, 1, NORM_WARPS], [REGS_CONSUMER, REGS_WORKERS, REGS_WORKERS])
    # fmt: on


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.cache
def _smem_layout(block: tuple[int, int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPE[dtype])


def assign_ws(
    x: torch.Tensor,
    c: torch.Tensor,
    cn: torch.Tensor,
    ids: torch.Tensor,
    dist: torch.Tensor,
    sec: torch.Tensor | None,
    *,
    metric: str,
    xn: torch.Tensor | None = None,
    xn_given: bool = False,
    conf: dict | None = None,
) -> None:
    """Fill ids/dist/sec for all rows of x (inputs prepared by ``triton_dispatch``); xn
    (l2) holds the rows' ||x||^2, read (``xn_given``) or written."""
    conf = conf or CONFIG
    bm, bn, bk = conf["BLOCK_M"], conf["BLOCK_N"], conf["BLOCK_K"]
    n, d = x.shape
    x_desc = TensorDescriptor(
        x, [n, d], [x.stride(0), 1], [bm, bk], _smem_layout((bm, bk), x.dtype)
    )
    c_desc = TensorDescriptor(
        c, list(c.shape), [c.stride(0), 1], [bn, bk], _smem_layout((bn, bk), c.dtype)
    )
    n_blocks = triton.cdiv(n, 2 * bm)
    l2 = metric == "l2"
    xn_in = l2 and xn_given  # else the norm worker sums them (and XN_OUT stores them)
    _ws_assign_kernel[(min(n_blocks, n_sms(x.device)),)](
        x_desc,
        c_desc,
        cn,
        ids,
        dist,
        dist if sec is None else sec,
        dist if xn is None else xn,
        n,
        c.shape[0],
        n_blocks,
        D=d,
        L2=l2,
        WITH_SECOND=sec is not None,
        XN_IN=xn_in,
        XN_OUT=l2 and not xn_in and xn is not None,
        NORM=l2 and not xn_in,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        STAGES=conf["STAGES"],
        NORM_WARPS=conf["NORM_WARPS"],
        REGS_CONSUMER=conf["REGS_CONSUMER"],
        REGS_WORKERS=conf["REGS_WORKERS"],
        num_warps=4,
    )
