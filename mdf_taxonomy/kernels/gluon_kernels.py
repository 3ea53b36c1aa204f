"""Warp-specialised assignment for Hopper (Gluon): loads never wait on the epilogue.

Why: the ``tl.*`` kernel drains its software pipeline and runs the top-2 epilogue with
the tensor cores idle after every centroid tile (visible in its TTGIR: a full wait per
tile), and for l2 it sums ``||x||^2`` in a pass of its own; at K=1024 that is ~25% of the
time (benchmarks/DECISIONS.md). Here a CTA owns 2 x BLOCK_M rows and splits the work
across partitions:

- a producer warp streams (two x chunks, one centroid chunk) through a ring of shared
  memory slots with TMA, running up to STAGES k-steps ahead of the consumers, across
  tile and row-block boundaries (persistent grid);
- two consumer warpgroups, one per BLOCK_M-row half, run wgmma on the same centroid
  chunks and keep a running top-2 in registers; a slot is refilled only when every
  user has released it;
- a 2-warp norm worker (l2; idle for cosine) sums ``||x||^2`` from the x chunks while they sit in
  the ring (no second read of x) and hands it to the consumers through shared memory.

The per-k-step traffic is that of a 2*BLOCK_M x BLOCK_N tile (as the ``tl.*`` kernel's
128 x 256); at large K that traffic, not the epilogue, is what bounds both kernels
(33% fewer bytes per step measured +14%). Designs that measured worse (benchmarks/DECISIONS.md):
ping-pong consumers on alternate 128 x 128 tiles, 128 x 128 consumer tiles,
``||x||^2`` from global memory in the consumers or in a worker, ``||c||^2`` loaded in
the MMA layout after the tile (64 registers: spills).

Scores are those of the ``tl.*`` kernel bit for bit (fp32 wgmma accumulation over D in
16-wide steps, ``||c||^2 - 2 x.c``, ``||x||^2`` summed over the same 64-column chunks in
the same order; lowest id wins ties). Scope (``launch.use_ws`` decides):
bf16/fp16 on sm90 with TMA-compatible rows, K <= WS_MAX_K (a tree's single-parent first
level included); everything else uses ``assign_kernels``: fp32, large K, fp8, and grouped
levels with many parents, whose rows come through a permutation that Hopper's TMA cannot
gather (a cp.async gathering producer measured slower than the ``tl.*`` kernel there).
Import only on CUDA.
"""

from __future__ import annotations

import functools

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

from .assign_kernels import store_rows
from .launch import n_sms

# triton >= 3.7 names the TMA load ``async_load`` (3.6: ``async_copy_global_to_shared``)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

CONFIG = dict(
    BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, STAGES=4, NORM_WARPS=2, REGS_CONSUMER=224, REGS_WORKERS=40
)


@gluon.jit
def _producer(
    x_desc,
    c_desc,
    x_bufs,
    c_bufs,
    ready,
    empty,
    n_blocks,
    K,
    D: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Step i (row block, tile, D chunk) fills slot i % STAGES once all its users freed its
    previous use; it runs ahead across tile and row-block boundaries."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + c_desc.block_type.nbytes
    i = 0
    for rb in range(gl.program_id(0), n_blocks, gl.num_programs(0)):  # persistent
        r0 = rb * (2 * BLOCK_M)
        for t in range(gl.cdiv(K, BLOCK_N)):
            for kk in range(KSTEPS):
                s = i % STAGES
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # 1st round passes
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                _tma_load(x_desc, [r0, kk * BLOCK_K], bar, x_bufs.index(s))
                _tma_load(x_desc, [r0 + BLOCK_M, kk * BLOCK_K], bar, x_bufs.index(STAGES + s))
                _tma_load(c_desc, [t * BLOCK_N, kk * BLOCK_K], bar, c_bufs.index(s))
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
def _tile_acc(
    x_bufs,
    c_bufs,
    ready,
    empty,
    i,
    HALF: gl.constexpr,
    KSTEPS: gl.constexpr,
    STAGES: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    mma: gl.constexpr,
):
    """x_half . c_tile^T over D: async wgmma, one group in flight; each slot is released
    once the next MMA is issued."""
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    for kk in range(KSTEPS):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        acc = warpgroup_mma(
            x_bufs.index(HALF * STAGES + s), c_bufs.index(s).permute((1, 0)), acc, is_async=True
        )
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=kk > 0)
        i += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1)
    return acc, i


@gluon.jit
def _tile_scores(acc, cn, c0, K, L2: gl.constexpr, BLOCK_N: gl.constexpr, mma: gl.constexpr):
    cols = c0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    if L2:
        s_tile = gl.convert_layout(cn, gl.SliceLayout(0, mma))[None, :] - 2.0 * acc
    else:
        s_tile = -acc
    return gl.where((cols < K)[None, :], s_tile, float("inf"))


@gluon.jit
def _consumer(
    x_bufs,
    c_bufs,
    ready,
    empty,
    xn_bufs,
    xn_ready,
    xn_free,
    cn_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    xn_ptr,
    n_blocks,
    N,
    K,
    HALF: gl.constexpr,
    D: gl.constexpr,
    L2: gl.constexpr,
    WITH_SECOND: gl.constexpr,
    XN_IN: gl.constexpr,
    XN_OUT: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Rows HALF * BLOCK_M ... of each of its row blocks against all centroid tiles;
    writes its own rows. ||x||^2 comes from the norm worker, or from xn_ptr (XN_IN);
    XN_OUT stores the worker's values there."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    cn_layout: gl.constexpr = gl.BlockedLayout([BLOCK_N // 128], [32], [4], [0])
    i = 0
    j = 0
    for rb in range(gl.program_id(0), n_blocks, gl.num_programs(0)):  # persistent
        rows = rb * (2 * BLOCK_M) + HALF * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_layout)
        best = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
        second = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
        best_id = gl.full([BLOCK_M], -1, gl.int32, layout=row_layout)
        for c0 in range(0, K, BLOCK_N):
            cn = gl.zeros([BLOCK_N], gl.float32, layout=cn_layout)
            if L2:  # ||c||^2 issued before the MMAs: 2 registers while they run (in the
                # MMA layout after them it took 64 and spilled)
                cols = c0 + gl.arange(0, BLOCK_N, layout=cn_layout)
                cn = gl.load(cn_ptr + cols, mask=cols < K, other=0.0)
            acc, i = _tile_acc(
                x_bufs, c_bufs, ready, empty, i, HALF, KSTEPS, STAGES, BLOCK_M, BLOCK_N, mma
            )
            s_tile = _tile_scores(acc, cn, c0, K, L2, BLOCK_N, mma)
            best, best_id, second = _fold_top2(s_tile, c0, best, best_id, second)
        xn = gl.zeros_like(best)  # cosine: no ||x||^2
        if L2 and XN_IN:
            xn = gl.load(xn_ptr + gl.minimum(rows, N - 1))
        elif L2:
            mbarrier.wait(xn_ready.index(j % 2), (j // 2) & 1)
            xn = xn_bufs.index((j % 2) * 2 + HALF).load(row_layout)
            mbarrier.arrive(xn_free.index(j % 2), count=1)
            if XN_OUT:
                gl.store(xn_ptr + gl.minimum(rows, N - 1), xn, mask=rows < N)
        store_rows(
            ids_ptr,
            dist_ptr,
            sec_ptr,
            gl.minimum(rows, N - 1),
            rows < N,
            best,
            best_id,
            second,
            xn,
            L2,
            WITH_SECOND,
        )
        j += 1


@gluon.jit
def _chunk_sqnorm(rows_buf, layout: gl.constexpr):
    x = rows_buf.load(layout).to(gl.float32)
    return gl.sum(x * x, axis=1)


@gluon.jit
def _norm_worker(
    x_bufs,
    ready,
    empty,
    xn_bufs,
    xn_ready,
    xn_free,
    n_blocks,
    K,
    NORM: gl.constexpr,
    D: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
    WARPS: gl.constexpr,
):
    """||x||^2 of each row block, summed from the x chunks while they sit in the ring (a
    third user of every slot, so a slot is not refilled under it), into a 2-slot shared
    buffer the consumers read at their epilogue. The x chunks come again with every
    centroid tile, so the block's four row quarters are summed during tiles 0..3 (quarter
    q in tile q % n_tiles): little work per k-step, the slots are released fast. Same
    64-column chunks and sum order as the ``tl.*`` kernel's norm pass, hence the same
    bits. (Summing from global memory instead, in the consumers or in a worker, measured
    slower.)"""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    Q: gl.constexpr = BLOCK_M // 2
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    i = 0
    j = 0
    # NORM off (cosine, or norms given): nothing to do (the CTA has 12 warps either way)
    n_tiles = gl.cdiv(K, BLOCK_N)
    for _rb in range(gl.program_id(0), n_blocks if NORM else 0, gl.num_programs(0)):
        xn0 = gl.zeros([Q], gl.float32, layout=gl.SliceLayout(1, layout))
        xn1 = gl.zeros_like(xn0)
        xn2 = gl.zeros_like(xn0)
        xn3 = gl.zeros_like(xn0)
        for t in range(n_tiles):
            for _kk in range(KSTEPS):
                s = i % STAGES
                mbarrier.wait(ready.index(s), (i // STAGES) & 1)
                if t == 0:
                    xn0 += _chunk_sqnorm(x_bufs.index(s).slice(0, Q), layout)
                if t == 1 % n_tiles:
                    xn1 += _chunk_sqnorm(x_bufs.index(s).slice(Q, Q), layout)
                if t == 2 % n_tiles:
                    xn2 += _chunk_sqnorm(x_bufs.index(STAGES + s).slice(0, Q), layout)
                if t == 3 % n_tiles:
                    xn3 += _chunk_sqnorm(x_bufs.index(STAGES + s).slice(Q, Q), layout)
                mbarrier.arrive(empty.index(s), count=1)
                i += 1
        mbarrier.wait(xn_free.index(j % 2), ((j // 2) & 1) ^ 1)  # 1st round passes
        xn_bufs.index((j % 2) * 2).slice(0, Q).store(xn0)
        xn_bufs.index((j % 2) * 2).slice(Q, Q).store(xn1)
        xn_bufs.index((j % 2) * 2 + 1).slice(0, Q).store(xn2)
        xn_bufs.index((j % 2) * 2 + 1).slice(Q, Q).store(xn3)
        mbarrier.arrive(xn_ready.index(j % 2), count=1)
        j += 1


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
    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    x_bufs,
                    c_bufs,
                    ready,
                    empty,
                    xn_bufs,
                    xn_ready,
                    xn_free,
                    cn_ptr,
                    ids_ptr,
                    dist_ptr,
                    sec_ptr,
                    xn_ptr,
                    n_blocks,
                    N,
                    K,
                    0,
                    D,
                    L2,
                    WITH_SECOND,
                    XN_IN,
                    XN_OUT,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    STAGES,
                ),
            ),
            (
                _consumer,
                (
                    x_bufs,
                    c_bufs,
                    ready,
                    empty,
                    xn_bufs,
                    xn_ready,
                    xn_free,
                    cn_ptr,
                    ids_ptr,
                    dist_ptr,
                    sec_ptr,
                    xn_ptr,
                    n_blocks,
                    N,
                    K,
                    1,
                    D,
                    L2,
                    WITH_SECOND,
                    XN_IN,
                    XN_OUT,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    STAGES,
                ),
            ),
            (
                _producer,
                (
                    x_desc,
                    c_desc,
                    x_bufs,
                    c_bufs,
                    ready,
                    empty,
                    n_blocks,
                    K,
                    D,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    STAGES,
                ),
            ),
            (
                _norm_worker,
                (
                    x_bufs,
                    ready,
                    empty,
                    xn_bufs,
                    xn_ready,
                    xn_free,
                    n_blocks,
                    K,
                    NORM,
                    D,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_K,
                    STAGES,
                    NORM_WARPS,
                ),
            ),
        ],
        [4, 1, NORM_WARPS],
        [REGS_CONSUMER, REGS_WORKERS, REGS_WORKERS],
    )


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
