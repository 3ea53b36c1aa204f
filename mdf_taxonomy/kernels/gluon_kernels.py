"""Warp-specialised assignment for Hopper (Gluon): loads never wait on the epilogue.

Why: the ``tl.*`` kernel drains its software pipeline and runs the top-2 epilogue with
the tensor cores idle after every centroid tile (visible in its TTGIR: a full wait per
tile); at K=1024 that is ~20% of the time (benchmarks/NOTES_kernels.md). Here a CTA owns
2 x BLOCK_M rows and splits the work across three partitions:

- a producer warp streams (two x chunks, one centroid chunk) through a ring of shared
  memory slots with TMA, running up to STAGES k-steps ahead of the consumers, across
  tile boundaries;
- two consumer warpgroups, one per BLOCK_M-row half, run wgmma on the same centroid
  chunks and keep a running top-2 in registers. Each slot is freed only when both have
  used it, so one may run up to STAGES k-steps behind the other: the second consumer
  starts late (it sums ``||x||^2`` first, the first one does so last), and while one
  runs its tile epilogue the other's MMAs keep the tensor cores busy.

The per-k-step traffic is that of a 2*BLOCK_M x BLOCK_N tile (as the ``tl.*`` kernel's
128 x 256). A first design (commit "Gluon warp-specialised assignment", NOTES v11) gave the
two consumers alternate 128 x 128 tiles of the same rows (ping-pong): correct, but it
moves 33% more bytes per flop and measured slower than the ``tl.*`` kernel.

Scores are those of the ``tl.*`` kernel (fp32 wgmma accumulation over D in 16-wide steps,
``||c||^2 - 2 x.c``; lowest id wins ties). Scope (``triton_kernels._use_ws`` decides): bf16/fp16
on sm90 with TMA-compatible rows; everything else, and the grouped and fp8 paths, use
``triton_kernels``. Import only on CUDA.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .triton_kernels import _n_sms, _store_rows

CONFIG = dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, STAGES=4, XN_UNROLL=4,
              REGS_CONSUMER=224, REGS_PRODUCER=24)


@gluon.jit
def _producer(x_desc, c_desc, x_bufs, c_bufs, ready, empty, n_blocks, n_tiles,
              D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Step i (row block, tile, D chunk) fills slot i % STAGES once both consumers freed
    its previous use; it runs ahead across tile and row-block boundaries."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + c_desc.block_type.nbytes
    i = 0
    for rb in range(gl.program_id(0), n_blocks, gl.num_programs(0)):  # persistent
        r0 = rb * (2 * BLOCK_M)
        for t in range(n_tiles):
            for kk in range(KSTEPS):
                s = i % STAGES
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # 1st round passes
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(x_desc, [r0, kk * BLOCK_K], bar,
                                                x_bufs.index(s))
                tma.async_copy_global_to_shared(x_desc, [r0 + BLOCK_M, kk * BLOCK_K], bar,
                                                x_bufs.index(STAGES + s))
                tma.async_copy_global_to_shared(c_desc, [t * BLOCK_N, kk * BLOCK_K], bar,
                                                c_bufs.index(s))
                i += 1


@gluon.jit
def _argmin_combine(v1, i1, v2, i2):
    take2 = (v2 < v1) | ((v2 == v1) & (i2 < i1))
    return gl.where(take2, v2, v1), gl.where(take2, i2, i1)


@gluon.jit
def _fold_top2(s, c0, best, best_id, second):
    """Fold one tile into the running top-2 (tiles come in increasing id order and the
    compare is strict, so the lowest id wins ties)."""
    offs = gl.arange(0, s.shape[1], layout=gl.SliceLayout(0, s.type.layout))
    idx = gl.full(s.shape, 0, gl.int32, layout=s.type.layout) + offs[None, :]
    tmin, targ = gl.reduce((s, idx), 1, _argmin_combine)
    tsec = gl.min(gl.where(idx == targ[:, None], float("inf"), s), axis=1)
    take = tmin < best
    second = gl.where(take, gl.minimum(best, tsec), gl.minimum(second, tmin))
    best_id = gl.where(take, targ + c0, best_id)
    best = gl.where(take, tmin, best)
    return best, best_id, second


@gluon.jit
def _row_sqnorm(x_ptr, stride_x, rows, D: gl.constexpr, BLOCK_M: gl.constexpr,
                XN_UNROLL: gl.constexpr):
    """||x||^2 of a row block from global memory: 64-column chunks, XN_UNROLL loads in
    flight per step (alone, each is a bare round trip), fp32 sums in column order.
    (Summing it from the x chunks already in shared memory, inside the MMA loop, spilled
    700+ bytes per thread: the accumulator holds 128 of the consumer's registers.)"""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = gl.convert_layout(rows, gl.SliceLayout(1, layout))
    offs = gl.arange(0, 64, layout=gl.SliceLayout(0, layout))
    x_rows = x_ptr + rows.to(gl.int64)[:, None] * stride_x
    xn = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, layout))
    for k0 in range(0, D, 64 * XN_UNROLL):
        for j in gl.static_range(XN_UNROLL):
            kk = k0 + j * 64 + offs
            xv = gl.load(x_rows + kk[None, :], mask=(kk < D)[None, :], other=0.0)
            xv = xv.to(gl.float32)
            xn += gl.sum(xv * xv, axis=1)
    return xn


@gluon.jit
def _tile_acc(x_bufs, c_bufs, ready, empty, i, HALF: gl.constexpr,
              KSTEPS: gl.constexpr, STAGES: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, mma: gl.constexpr):
    """x_half . c_tile^T over D: async wgmma, one group in flight; each slot is released
    (count 2: both halves) once the next MMA is issued."""
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    for kk in range(KSTEPS):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        acc = warpgroup_mma(x_bufs.index(HALF * STAGES + s),
                            c_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=kk > 0)
        i += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
    return acc, i


@gluon.jit
def _tile_scores(acc, cn_ptr, t, K, L2: gl.constexpr, BLOCK_N: gl.constexpr,
                 mma: gl.constexpr):
    """Scores of one tile; ||c||^2 is loaded only now (held across the D loop it would
    cost registers)."""
    cols = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    if L2:
        cn = gl.load(cn_ptr + cols, mask=cols < K, other=0.0)
        s_tile = cn[None, :] - 2.0 * acc
    else:
        s_tile = -acc
    return gl.where((cols < K)[None, :], s_tile, float("inf"))


@gluon.jit
def _consumer(x_bufs, c_bufs, ready, empty, x_ptr, stride_x, cn_ptr, ids_ptr,
              dist_ptr, sec_ptr, n_blocks, N, K, n_tiles, HALF: gl.constexpr,
              D: gl.constexpr, L2: gl.constexpr, WITH_SECOND: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
              STAGES: gl.constexpr, XN_UNROLL: gl.constexpr):
    """Rows HALF * BLOCK_M ... of each of its row blocks against all centroid tiles;
    writes its own rows."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    i = 0
    for rb in range(gl.program_id(0), n_blocks, gl.num_programs(0)):  # persistent
        rows = rb * (2 * BLOCK_M) + HALF * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_layout)
        row_mask = rows < N
        rows = gl.minimum(rows, N - 1)
        if L2 and HALF == 1:  # first: this half starts late, the other one runs alone
            xn = _row_sqnorm(x_ptr, stride_x, rows, D, BLOCK_M, XN_UNROLL)
        best = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
        second = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
        best_id = gl.full([BLOCK_M], -1, gl.int32, layout=row_layout)
        for t in range(n_tiles):
            acc, i = _tile_acc(x_bufs, c_bufs, ready, empty, i, HALF, KSTEPS, STAGES,
                               BLOCK_M, BLOCK_N, mma)
            s_tile = _tile_scores(acc, cn_ptr, t, K, L2, BLOCK_N, mma)
            best, best_id, second = _fold_top2(s_tile, t * BLOCK_N, best, best_id, second)
        if L2:
            if HALF == 0:  # last: overlaps the other half's final steps
                xn = _row_sqnorm(x_ptr, stride_x, rows, D, BLOCK_M, XN_UNROLL)
            xn = gl.convert_layout(xn, row_layout)
        else:
            xn = gl.zeros_like(best)  # cosine: no ||x||^2
        _store_rows(ids_ptr, dist_ptr, sec_ptr, rows, row_mask, best, best_id, second, xn,
                    L2, WITH_SECOND)


@gluon.jit
def _ws_assign_kernel(x_desc, c_desc, x_ptr, stride_x, cn_ptr, ids_ptr, dist_ptr, sec_ptr,
                      N, K, D: gl.constexpr, L2: gl.constexpr, WITH_SECOND: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr, XN_UNROLL: gl.constexpr,
                      REGS_CONSUMER: gl.constexpr, REGS_PRODUCER: gl.constexpr):
    n_blocks = gl.cdiv(N, 2 * BLOCK_M)
    n_tiles = gl.cdiv(K, BLOCK_N)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, BLOCK_M, BLOCK_K],
                                       x_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [STAGES, BLOCK_N, BLOCK_K],
                                       c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    fence_async_shared()
    gl.warp_specialize(
        [(_consumer, (x_bufs, c_bufs, ready, empty, x_ptr, stride_x, cn_ptr,
                      ids_ptr, dist_ptr, sec_ptr, n_blocks, N, K, n_tiles, 0, D, L2,
                      WITH_SECOND, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, XN_UNROLL)),
         (_consumer, (x_bufs, c_bufs, ready, empty, x_ptr, stride_x, cn_ptr,
                      ids_ptr, dist_ptr, sec_ptr, n_blocks, N, K, n_tiles, 1, D, L2,
                      WITH_SECOND, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, XN_UNROLL)),
         (_producer, (x_desc, c_desc, x_bufs, c_bufs, ready, empty, n_blocks, n_tiles, D,
                      BLOCK_M, BLOCK_N, BLOCK_K, STAGES))],
        [4, 1], [REGS_CONSUMER, REGS_PRODUCER])


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def assign_ws(x: torch.Tensor, c: torch.Tensor, cn: torch.Tensor, ids: torch.Tensor,
              dist: torch.Tensor, sec: torch.Tensor | None, *, metric: str,
              conf: dict | None = None) -> None:
    """Fill ids/dist/sec for all rows of x (prepared inputs, as ``_assign_prepared``)."""
    conf = conf or CONFIG
    bm, bn, bk = conf["BLOCK_M"], conf["BLOCK_N"], conf["BLOCK_K"]
    n, d = x.shape
    dt = _GL_DTYPE[x.dtype]
    x_desc = TensorDescriptor(x, [n, d], [x.stride(0), 1], [bm, bk],
                              gl.NVMMASharedLayout.get_default_for([bm, bk], dt))
    c_desc = TensorDescriptor(c, list(c.shape), [c.stride(0), 1], [bn, bk],
                              gl.NVMMASharedLayout.get_default_for([bn, bk], dt))
    _ws_assign_kernel[(min(triton.cdiv(n, 2 * bm), _n_sms(x.device)),)](
        x_desc, c_desc, x, x.stride(0), cn, ids, dist, dist if sec is None else sec, n,
        c.shape[0], D=d, L2=metric == "l2", WITH_SECOND=sec is not None, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_K=bk, STAGES=conf["STAGES"],
        XN_UNROLL=conf["XN_UNROLL"], REGS_CONSUMER=conf["REGS_CONSUMER"],
        REGS_PRODUCER=conf["REGS_PRODUCER"], num_warps=4)
