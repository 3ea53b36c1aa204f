"""Warp-specialised assignment for Hopper (Gluon): the top-2 epilogue overlaps the MMAs.

Why: the ``tl.*`` kernel drains its software pipeline and runs the top-2 epilogue with
the tensor cores idle after every centroid tile (visible in its TTGIR: a full wait per
tile); at K=1024 that is ~20% of the time (benchmarks/NOTES_kernels.md). Here one CTA
owns a 128-row block of x and splits the work across three partitions:

- a producer warp streams (x chunk, centroid chunk) pairs through a ring of shared-memory
  stages with TMA, in tile order;
- two consumer warpgroups take alternate centroid tiles (ping-pong): while one runs its
  tile's top-2 epilogue in registers, the other's wgmmas keep the tensor cores busy;
- the first consumer also sums ``||x||^2`` from the x chunks of its first tile, already in
  shared memory (no second read of x).

The two consumers' running top-2 are merged at the end with the lowest id winning ties,
so the result is the one of a sequential scan over the tiles. Same score arithmetic as
the ``tl.*`` kernel (fp32 wgmma accumulation over D in 16-wide steps, ``||c||^2 - 2 x.c``).

Scope: bf16/fp16 on sm90 with TMA-compatible rows (D % 8 == 0); everything else, the
grouped and fp8 paths, uses ``triton_kernels``. Import only on CUDA.
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

CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=3, REGS_CONSUMER=224,
              REGS_PRODUCER=24)


@gluon.jit
def _producer(x_desc, c_desc, x_bufs, c_bufs, ready, empty, r0, n_tiles,
              D: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
              STAGES: gl.constexpr):
    """Tile t goes to ring t % 2 (its consumer's), in tile order. Step i of a ring uses
    slot i % STAGES and waits until the slot's previous use was released."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    nbytes: gl.constexpr = x_desc.block_type.nbytes + c_desc.block_type.nbytes
    for t in range(n_tiles):
        base = (t % 2) * STAGES
        i = (t // 2) * KSTEPS
        for kk in range(KSTEPS):
            slot = base + i % STAGES
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)  # 1st round passes
            mbarrier.expect(ready.index(slot), nbytes)
            tma.async_copy_global_to_shared(x_desc, [r0, kk * BLOCK_K], ready.index(slot),
                                            x_bufs.index(slot))
            tma.async_copy_global_to_shared(c_desc, [t * BLOCK_N, kk * BLOCK_K],
                                            ready.index(slot), c_bufs.index(slot))
            i += 1


@gluon.jit
def _tile_scores(x_bufs, c_bufs, ready, empty, cn_ptr, t, K,
                 D: gl.constexpr, L2: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                 mma: gl.constexpr):
    """One centroid tile: async wgmma over the D chunks (one in flight, each stage freed
    once the next MMA is issued), then the scores."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    # this consumer's ring: slots base .. base + STAGES - 1; only it waits on them, and
    # never more than one phase ahead (a shared ring would alias mbarrier parities)
    base = (t % 2) * STAGES
    i = (t // 2) * KSTEPS
    for kk in range(KSTEPS):
        slot = base + i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        acc = warpgroup_mma(x_bufs.index(slot), c_bufs.index(slot).permute((1, 0)), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # the previous step's MMA is done: its slot goes back to the producer
        mbarrier.arrive(empty.index(base + (i + STAGES - 1) % STAGES), count=1, pred=kk > 0)
        i += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index(base + (i + STAGES - 1) % STAGES), count=1)
    # ||c||^2 loaded only now: held across the loop it would cost registers; its latency
    # is covered by the other consumer's MMAs
    cols = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    if L2:
        cn = gl.load(cn_ptr + cols, mask=cols < K, other=0.0)
        s_tile = cn[None, :] - 2.0 * acc
    else:
        s_tile = -acc
    s_tile = gl.where((cols < K)[None, :], s_tile, float("inf"))
    return s_tile, t * BLOCK_N


@gluon.jit
def _argmin_combine(v1, i1, v2, i2):
    take2 = (v2 < v1) | ((v2 == v1) & (i2 < i1))
    return gl.where(take2, v2, v1), gl.where(take2, i2, i1)


@gluon.jit
def _fold_top2(s, c0, best, best_id, second):
    """Fold one tile into the running top-2 (strict <: within a consumer, tiles come in
    increasing id order, so the lowest id wins ties)."""
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
def _row_sqnorm(x_ptr, stride_x, r0, N, D: gl.constexpr, BLOCK_M: gl.constexpr):
    """||x||^2 of the row block from global memory (64-column chunks, fp32 sums)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = gl.minimum(r0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout)), N - 1)
    offs = gl.arange(0, 64, layout=gl.SliceLayout(0, layout))
    x_rows = x_ptr + rows.to(gl.int64)[:, None] * stride_x
    xn = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, layout))
    for k0 in range(0, D, 64):
        kk = k0 + offs
        xv = gl.load(x_rows + kk[None, :], mask=(kk < D)[None, :], other=0.0)
        xv = xv.to(gl.float32)
        xn += gl.sum(xv * xv, axis=1)
    return xn


@gluon.jit
def _consume(x_bufs, c_bufs, ready, empty, cn_ptr, n_tiles, K, FIRST: gl.constexpr,
             D: gl.constexpr, L2: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Tiles FIRST, FIRST + 2, ...: this consumer's running top-2."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    best = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
    second = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
    best_id = gl.full([BLOCK_M], -1, gl.int32, layout=row_layout)
    for t in range(FIRST, n_tiles, 2):
        s, c0 = _tile_scores(x_bufs, c_bufs, ready, empty, cn_ptr, t, K, D, L2, BLOCK_M,
                             BLOCK_N, BLOCK_K, STAGES, mma)
        best, best_id, second = _fold_top2(s, c0, best, best_id, second)
    return best, best_id, second


@gluon.jit
def _consumer_main(x_bufs, c_bufs, ready, empty, cn_ptr, n_tiles, K, x_ptr, stride_x, r0,
                   N, m_best, m_id, m_sec, m_xn, D: gl.constexpr, L2: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   STAGES: gl.constexpr):
    return _consume(x_bufs, c_bufs, ready, empty, cn_ptr, n_tiles, K, 0, D, L2, BLOCK_M,
                    BLOCK_N, BLOCK_K, STAGES)


@gluon.jit
def _consumer_other(x_bufs, c_bufs, ready, empty, cn_ptr, n_tiles, K, x_ptr, stride_x, r0,
                    N, m_best, m_id, m_sec, m_xn, D: gl.constexpr, L2: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                    STAGES: gl.constexpr):
    """Odd tiles. Its first tile (tile 1) cannot start before tile 0 has streamed through
    the ring, so it sums ||x||^2 first: that time is free, the other consumer's MMAs run."""
    if L2:
        m_xn.store(_row_sqnorm(x_ptr, stride_x, r0, N, D, BLOCK_M))
    best, best_id, second = _consume(x_bufs, c_bufs, ready, empty, cn_ptr, n_tiles, K, 1,
                                     D, L2, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
    m_best.store(best)
    m_id.store(best_id)
    m_sec.store(second)


@gluon.jit
def _ws_assign_kernel(x_desc, c_desc, x_ptr, stride_x, cn_ptr, ids_ptr, dist_ptr, sec_ptr, N, K,
                      D: gl.constexpr, L2: gl.constexpr, WITH_SECOND: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr, REGS_CONSUMER: gl.constexpr,
                      REGS_PRODUCER: gl.constexpr):
    r0 = gl.program_id(0) * BLOCK_M
    n_tiles = gl.cdiv(K, BLOCK_N)
    # two rings of STAGES slots, one per consumer
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, BLOCK_M, BLOCK_K],
                                       x_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2 * STAGES, BLOCK_N, BLOCK_K],
                                       c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2 * STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(2 * STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    m_best = gl.allocate_shared_memory(gl.float32, [BLOCK_M], flat)
    m_id = gl.allocate_shared_memory(gl.int32, [BLOCK_M], flat)
    m_sec = gl.allocate_shared_memory(gl.float32, [BLOCK_M], flat)
    m_xn = gl.allocate_shared_memory(gl.float32, [BLOCK_M], flat)
    fence_async_shared()

    best, best_id, second = gl.warp_specialize(
        [(_consumer_main, (x_bufs, c_bufs, ready, empty, cn_ptr, n_tiles, K, x_ptr, stride_x,
                           r0, N, m_best, m_id, m_sec, m_xn, D, L2, BLOCK_M, BLOCK_N,
                           BLOCK_K, STAGES)),
         (_consumer_other, (x_bufs, c_bufs, ready, empty, cn_ptr, n_tiles, K, x_ptr,
                            stride_x, r0, N, m_best, m_id, m_sec, m_xn, D, L2, BLOCK_M,
                            BLOCK_N, BLOCK_K, STAGES)),
         (_producer, (x_desc, c_desc, x_bufs, c_bufs, ready, empty, r0, n_tiles, D,
                      BLOCK_N, BLOCK_K, STAGES))],
        [4, 1], [REGS_CONSUMER, REGS_PRODUCER])

    # merge the second consumer's top-2 (odd tiles): ties go to the lower id
    layout: gl.constexpr = best.type.layout
    ob = m_best.load(layout)
    oid = m_id.load(layout)
    osec = m_sec.load(layout)
    take = (ob < best) | ((ob == best) & (oid < best_id) & (oid >= 0))
    second = gl.minimum(gl.minimum(second, osec), gl.maximum(best, ob))
    best_id = gl.where(take, oid, best_id)
    best = gl.where(take, ob, best)

    rows = r0 + gl.arange(0, BLOCK_M, layout=layout)
    row_mask = rows < N
    if L2:
        xn = m_xn.load(layout)
        dist = gl.maximum(best + xn, 0.0)
        second = gl.maximum(second + xn, 0.0)
    else:
        dist = best + 1.0
        second = second + 1.0
    gl.store(ids_ptr + rows, best_id.to(gl.int64), mask=row_mask)
    gl.store(dist_ptr + rows, dist, mask=row_mask)
    if WITH_SECOND:
        gl.store(sec_ptr + rows, second, mask=row_mask)


_GL_DTYPE = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def supported(x: torch.Tensor, c: torch.Tensor) -> bool:
    """Where this kernel applies: 16-bit inputs on sm90 with TMA-compatible rows."""
    return (x.is_cuda and x.dtype in _GL_DTYPE and c.dtype == x.dtype
            and torch.cuda.get_device_capability(x.device) == (9, 0)
            and x.shape[1] % 8 == 0 and x.stride(1) == 1 and c.is_contiguous()
            and x.data_ptr() % 16 == 0 and (x.stride(0) * 2) % 16 == 0)


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
    _ws_assign_kernel[(triton.cdiv(n, bm),)](
        x_desc, c_desc, x, x.stride(0), cn, ids, dist, dist if sec is None else sec, n, c.shape[0],
        D=d, L2=metric == "l2", WITH_SECOND=sec is not None, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, STAGES=conf["STAGES"], REGS_CONSUMER=conf["REGS_CONSUMER"],
        REGS_PRODUCER=conf["REGS_PRODUCER"], num_warps=4)
