"""The partitions of the warp-specialised Gluon kernel (``gluon_kernels``), device code only.

A TMA producer fills a ring of shared-memory slots; two consumer warpgroups run wgmma on
them and keep a running top-2; for l2 a norm worker sums ``||x||^2`` from the same slots.
They hand slots and norms to each other through mbarriers, so the loads never wait on an
epilogue. ``gluon_kernels._ws_assign_kernel`` allocates the buffers and barriers and
starts them. Import only on CUDA.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .assign_kernels import store_rows

# triton >= 3.7 names the TMA load ``async_load`` (3.6: ``async_copy_global_to_shared``)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


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
                # MMA layout after them it would take 64 and spill)
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
    bits. Summing from the ring spares a second read of every row from global memory."""
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
