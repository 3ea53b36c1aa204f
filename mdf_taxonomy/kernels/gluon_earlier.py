"""SemDeDup's lower-triangle search (``Assigner.assign_earlier``) as a warp-specialised
Gluon kernel for Hopper: the causal variant of ``gluon_kernels``.

Why: the ``tl.*`` kernel (``earlier_kernels``) drains its pipeline and runs the top-2
epilogue with the tensor cores idle after every 128 x 256 tile. Here, as in the
assignment kernel, a TMA producer warp streams (two 64-row x chunks, one 256-row column
chunk) of the same matrix through a ring of shared-memory slots, across tile and work-item
boundaries, while two consumer warpgroups run wgmma and fold each tile into a running
top-2 (``gluon_partitions._tile_acc``, ``_fold_top2``).

Work: a persistent grid over work items (row block of 128 rows, column chunk), each
CTA's items listed by the host in longest-first snake order (``_plan``), so small nodes
fill the GPU and the short items fill the tail. A row block split into several column
chunks stores raw scores per chunk; one merge launch (``_merge_kernel``) folds them by
the exact top-2 merge in chunk order (lowest id on ties), so splitting never changes a
bit. Scores are the ``tl.*`` kernel's bit for bit (fp32 wgmma accumulation over D in
16-wide steps, ``-x_i.x_j``; columns j >= i masked to +inf). Import only on CUDA.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .assign_kernels import store_rows
from .gluon_kernels import _smem_layout
from .gluon_partitions import _fold_top2, _tile_acc, _tma_load
from .launch import n_sms

CONFIG = dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, STAGES=4, REGS_CONSUMER=232, REGS_PRODUCER=40)
MAX_CHUNKS_PER_CTA = 8  # the finest split tried (items per CTA)


@gluon.jit
def _item(plan_ptr, n_ctas, w):
    """Work item w: (row block, first column, column end, chunk slot)."""
    base = plan_ptr + n_ctas + 1 + 4 * w
    return gl.load(base), gl.load(base + 1), gl.load(base + 2), gl.load(base + 3)


@gluon.jit
def _causal_producer(
    x_desc,
    c_desc,
    x_bufs,
    c_bufs,
    ready,
    empty,
    plan_ptr,
    D: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Step i (item, column tile, D chunk) fills slot i % STAGES once both consumers freed
    its previous use; it runs ahead across tiles and items."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + c_desc.block_type.nbytes
    n_ctas = gl.num_programs(0)
    pid = gl.program_id(0)
    i = 0
    for w in range(gl.load(plan_ptr + pid), gl.load(plan_ptr + pid + 1)):
        rb, c_lo, c_hi, _slot = _item(plan_ptr, n_ctas, w)
        r0 = rb * (2 * BLOCK_M)
        for c0 in range(c_lo, c_hi, BLOCK_N):
            for kk in range(KSTEPS):
                s = i % STAGES
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # 1st round passes
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                _tma_load(x_desc, [r0, kk * BLOCK_K], bar, x_bufs.index(s))
                _tma_load(x_desc, [r0 + BLOCK_M, kk * BLOCK_K], bar, x_bufs.index(STAGES + s))
                _tma_load(c_desc, [c0, kk * BLOCK_K], bar, c_bufs.index(s))
                i += 1


@gluon.jit
def _causal_consumer(
    x_bufs,
    c_bufs,
    ready,
    empty,
    plan_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    N,
    HALF: gl.constexpr,
    SPLIT: gl.constexpr,
    D: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Rows HALF * BLOCK_M ... of each item's row block against its column tiles; columns
    j >= row (and past the chunk) are masked on the tiles that reach them only. SPLIT: raw
    scores at row slot * N + i, for the merge; else the finished rows."""
    KSTEPS: gl.constexpr = (D + BLOCK_K - 1) // BLOCK_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    row_layout: gl.constexpr = gl.SliceLayout(1, mma)
    n_ctas = gl.num_programs(0)
    pid = gl.program_id(0)
    i = 0
    for w in range(gl.load(plan_ptr + pid), gl.load(plan_ptr + pid + 1)):
        rb, c_lo, c_hi, slot = _item(plan_ptr, n_ctas, w)
        first = rb * (2 * BLOCK_M) + HALF * BLOCK_M
        rows = first + gl.arange(0, BLOCK_M, layout=row_layout)
        best = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
        second = gl.full([BLOCK_M], float("inf"), gl.float32, layout=row_layout)
        best_id = gl.full([BLOCK_M], -1, gl.int32, layout=row_layout)
        clear = gl.minimum(first, c_hi)  # columns below it are valid for every row here
        for c0 in range(c_lo, c_hi, BLOCK_N):
            acc, i = _tile_acc(
                x_bufs, c_bufs, ready, empty, i, HALF, KSTEPS, STAGES, BLOCK_M, BLOCK_N, mma
            )
            s_tile = -acc
            if c0 + BLOCK_N > clear:
                cols = c0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
                keep = (cols[None, :] < rows[:, None]) & (cols < c_hi)[None, :]
                s_tile = gl.where(keep, s_tile, float("inf"))
            best, best_id, second = _fold_top2(s_tile, c0, best, best_id, second)
        live = rows < N
        at = gl.minimum(rows, N - 1)
        if SPLIT:
            out = slot.to(gl.int64) * N + at
            gl.store(ids_ptr + out, best_id, mask=live)
            gl.store(dist_ptr + out, best, mask=live)
            gl.store(sec_ptr + out, second, mask=live)
        else:
            store_rows(
                ids_ptr, dist_ptr, sec_ptr, at, live, best, best_id, second, best, False, True
            )


@gluon.jit
def _ws_earlier_kernel(
    x_desc,
    c_desc,
    plan_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    N,
    SPLIT: gl.constexpr,
    D: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    STAGES: gl.constexpr,
    REGS_CONSUMER: gl.constexpr,
    REGS_PRODUCER: gl.constexpr,
):
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    fence_async_shared()
    # fmt: off
    gl.warp_specialize(
        [(_causal_consumer, (x_bufs, c_bufs, ready, empty, plan_ptr, ids_ptr, dist_ptr,
                             sec_ptr, N, 0, SPLIT, D, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
         (_causal_consumer, (x_bufs, c_bufs, ready, empty, plan_ptr, ids_ptr, dist_ptr,
                             sec_ptr, N, 1, SPLIT, D, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
         (_causal_producer, (x_desc, c_desc, x_bufs, c_bufs, ready, empty, plan_ptr, D,
                             BLOCK_M, BLOCK_N, BLOCK_K, STAGES))],
        [4, 1], [REGS_CONSUMER, REGS_PRODUCER])
    # fmt: on


@triton.jit
def _merge_kernel(
    pids_ptr,
    pbest_ptr,
    psec_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    N,
    chunk_cols,
    max_chunks,
    ROW_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Fold each row's per-chunk top-2 in chunk order (strict <: the lowest id on ties),
    then finish as ``store_rows`` does (cosine: score + 1)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = rows < N
    rows = tl.minimum(rows, N - 1)
    n_chunks = tl.cdiv(tl.minimum((rows // ROW_BLOCK + 1) * ROW_BLOCK, N), chunk_cols)
    best = tl.full((BLOCK,), float("inf"), tl.float32)
    second = tl.full((BLOCK,), float("inf"), tl.float32)
    best_id = tl.full((BLOCK,), -1, tl.int32)
    for s in range(0, max_chunks):
        m = s < n_chunks
        at = s.to(tl.int64) * N + rows
        b = tl.load(pbest_ptr + at, mask=m, other=float("inf"))
        sc = tl.load(psec_ptr + at, mask=m, other=float("inf"))
        bid = tl.load(pids_ptr + at, mask=m, other=-1)
        take = b < best
        second = tl.where(take, tl.minimum(best, sc), tl.minimum(second, b))
        best_id = tl.where(take, bid, best_id)
        best = tl.where(take, b, best)
    store_rows(ids_ptr, dist_ptr, sec_ptr, rows, live, best, best_id, second, best, False, True)


def _items(n: int, chunk_cols: int, row_block: int, block_n: int):
    """Every (row block, c_lo, c_hi, slot) with its tile count, longest first."""
    ends = np.minimum(np.arange(1, triton.cdiv(n, row_block) + 1) * row_block, n)
    n_chunks = -(-ends // chunk_cols)
    rb = np.repeat(np.arange(len(ends)), n_chunks)
    slot = np.arange(len(rb)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    c_lo = slot * chunk_cols
    c_hi = np.minimum(c_lo + chunk_cols, ends[rb])
    tiles = -(-(c_hi - c_lo) // block_n)
    order = np.argsort(-tiles, kind="stable")
    return np.stack([rb, c_lo, c_hi, slot], axis=1)[order], tiles[order]


def _snake(n_items: int, sms: int):
    """The CTA of each item (sorted longest first): dealt 0..P-1, P-1..0, ..."""
    p = min(sms, n_items)
    pos = np.arange(n_items)
    lane = pos % p
    return np.where((pos // p) % 2 == 0, lane, p - 1 - lane), p


@functools.lru_cache(maxsize=256)
def chunk_cols_for(n: int, sms: int, row_block: int, block_n: int) -> int:
    """Columns per chunk: of the chunk sizes that give each CTA about 1..MAX_CHUNKS_PER_CTA
    items, the largest whose busiest CTA has the fewest tiles (fewer chunks, fewer partial
    scores to merge)."""
    whole = triton.cdiv(n, block_n)
    total = _items(n, whole * block_n, row_block, block_n)[1].sum()
    per_cta = max(1, int(total) // sms)
    best = None
    for k in range(1, MAX_CHUNKS_PER_CTA + 1):
        t = whole if k == 1 else max(1, per_cta // k)
        tiles = _items(n, t * block_n, row_block, block_n)[1]
        cta, p = _snake(len(tiles), sms)
        span = np.bincount(cta, weights=tiles, minlength=p).max()
        if best is None or span < best[0] or (span == best[0] and t > best[1]):
            best = (span, t)
    return int(best[1]) * block_n


@functools.lru_cache(maxsize=64)
def _plan(n: int, chunk_cols: int, sms: int, row_block: int, block_n: int, device):
    """The work items of every CTA, longest first, dealt in snake order (``_snake``): int32
    [P + 1 offsets, items...] on the device, and P."""
    items, _ = _items(n, chunk_cols, row_block, block_n)
    cta, p = _snake(len(items), sms)
    order = np.lexsort((np.arange(len(items)), cta))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(cta, minlength=p))])
    flat = np.concatenate([offsets, items[order].reshape(-1)]).astype(np.int32)
    return torch.from_numpy(flat).to(device), p


def assign_earlier_ws(
    x: torch.Tensor, *, split_cols: int | None = None, conf: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, dist, second) of every row of x (16-bit unit rows, TMA-compatible, n >= 2;
    ``earlier_kernels`` checks): one persistent launch, plus one merge launch where the
    row blocks are split into column chunks (``split_cols``; None: ``chunk_cols_for``)."""
    conf = conf or CONFIG
    bm, bn, bk = conf["BLOCK_M"], conf["BLOCK_N"], conf["BLOCK_K"]
    n, d = x.shape
    dev = x.device
    sms = n_sms(dev)
    if split_cols is None:
        chunk = chunk_cols_for(n, sms, 2 * bm, bn)
    else:
        chunk = triton.cdiv(max(1, split_cols), bn) * bn
    max_chunks = triton.cdiv(n, chunk)
    plan, p = _plan(n, chunk, sms, 2 * bm, bn, dev)
    x_desc = TensorDescriptor(
        x, [n, d], [x.stride(0), 1], [bm, bk], _smem_layout((bm, bk), x.dtype)
    )
    c_desc = TensorDescriptor(
        x, [n, d], [x.stride(0), 1], [bn, bk], _smem_layout((bn, bk), x.dtype)
    )
    ids = torch.empty(n, dtype=torch.int64, device=dev)
    dist = torch.empty(n, dtype=torch.float32, device=dev)
    sec = torch.empty(n, dtype=torch.float32, device=dev)
    split = bool(max_chunks > 1)
    if split:
        outs = (
            torch.empty((max_chunks, n), dtype=torch.int32, device=dev),
            torch.empty((max_chunks, n), dtype=torch.float32, device=dev),
            torch.empty((max_chunks, n), dtype=torch.float32, device=dev),
        )
    else:
        outs = (ids, dist, sec)
    _ws_earlier_kernel[(p,)](
        x_desc,
        c_desc,
        plan,
        *outs,
        n,
        SPLIT=split,
        D=d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        STAGES=conf["STAGES"],
        REGS_CONSUMER=conf["REGS_CONSUMER"],
        REGS_PRODUCER=conf["REGS_PRODUCER"],
        num_warps=4,
    )
    if split:
        block = 1024
        _merge_kernel[(triton.cdiv(n, block),)](
            *outs, ids, dist, sec, n, chunk, max_chunks, ROW_BLOCK=2 * bm, BLOCK=block,
            num_warps=4,
        )  # fmt: skip
    return ids, dist, sec
