"""The Triton assignment kernel (plain, split-K, grouped and the fp8 shortlist pass) and the
one function that maps launch options onto its arguments.

Assignment is a tiled GEMM (rows x centroids, reduced over D on tensor cores) whose
epilogue keeps a running top-2 per row in registers, so the N x K distance matrix is
never written. The ranking score is ``||c||^2 - 2 x.c`` (l2) or ``-x.c`` (cosine); the
row constant ``||x||^2`` is added once at the end. bf16/fp16 inputs run on bf16/fp16
tensor cores (centroids are cast to the input dtype); fp32 inputs use 3xTF32, which is
close to fp32 accuracy. Operands are loaded with clamped pointers by default, or through
tensor descriptors (TMA, ``TMA=True``; exact, not the default).

A row's arithmetic does not depend on the other rows of its tile, so with a config fixed
by (dtype, D, K) (``launch.config``) a row's result does not depend on the batch.

Imports Triton: ``mdf_taxonomy.kernels`` loads it only when Triton is wanted.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .launch import tma_ok

# read where the kernels are decorated: Triton takes the mode from the environment then
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_k_chunk(
    desc, rows_ptr, r0, k0, kk, D: tl.constexpr, TMA: tl.constexpr, EVEN_D: tl.constexpr
):
    """One BLOCK_K-wide chunk of an operand: through its tensor descriptor (TMA: hardware
    zero fill past the edges) or through clamped row pointers (masked in D only)."""
    if TMA:
        v = desc.load([r0, k0])
    elif EVEN_D:
        v = tl.load(rows_ptr + kk[None, :])
    else:
        v = tl.load(rows_ptr + kk[None, :], mask=kk[None, :] < D, other=0.0)
    return v


@triton.jit
def _tile_dot(
    x_rows,
    x_desc,
    c_desc,
    c_ptr,
    r0,
    c0,
    c_hi,
    offs_n,
    offs_k,
    stride_c,
    D: tl.constexpr,
    EVEN_D: tl.constexpr,
    IS_FP32: tl.constexpr,
    TMA_X: tl.constexpr,
    TMA_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x_block @ c_tile^T over D on tensor cores.

    Pointer loads clamp row/column indices into range (no row/column masks: out-of-range
    lanes read a valid row, masked later at the score or the store).
    """
    cols = tl.maximum(tl.minimum(c0 + offs_n, c_hi - 1), 0)
    c_rows = c_ptr + cols.to(tl.int64)[:, None] * stride_c
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        a = _load_k_chunk(x_desc, x_rows, r0, k0, kk, D, TMA_X, EVEN_D)
        b = _load_k_chunk(c_desc, c_rows, c0, k0, kk, D, TMA_C, EVEN_D)
        if IS_FP32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _load_col(ptr, c0, c_hi, offs_n, WANT: tl.constexpr, other: tl.constexpr):
    """A per-centroid vector over one tile (||c||^2 or an fp8 scale), issued before the
    tile's D loop so its latency is hidden; a constant when not wanted."""
    cols = c0 + offs_n
    if WANT:
        v = tl.load(ptr + cols, mask=cols < c_hi, other=other)
    else:
        v = tl.full((offs_n.shape[0],), other, tl.float32)
    return v


@triton.jit
def _top2_update(
    s,
    c0,
    c_hi,
    offs_n,
    best,
    best_id,
    second,
    second_id,
    EVEN_N: tl.constexpr,
    WITH_SECOND: tl.constexpr,
    WITH_SECOND_ID: tl.constexpr,
):
    """Fold one tile's scores into the running top-2 (strict <: lowest id wins ties)."""
    if not EVEN_N:
        s = tl.where((c0 + offs_n < c_hi)[None, :], s, float("inf"))
    tmin, targ = tl.min(s, axis=1, return_indices=True)
    take = tmin < best
    if WITH_SECOND:
        s2 = tl.where(offs_n[None, :] == targ[:, None], float("inf"), s)
        if WITH_SECOND_ID:
            tsec, targ2 = tl.min(s2, axis=1, return_indices=True)
            # new second: old best (if it beats the tile's runner-up) or the runner-up
            # when the tile takes the lead; else the tile's best if it beats the second
            second_id = tl.where(
                take,
                tl.where(best <= tsec, best_id, targ2 + c0),
                tl.where(tmin < second, targ + c0, second_id),
            )
        else:
            tsec = tl.min(s2, axis=1)
        second = tl.where(take, tl.minimum(best, tsec), tl.minimum(second, tmin))
    best = tl.where(take, tmin, best)
    best_id = tl.where(take, targ + c0, best_id)
    return best, best_id, second, second_id


@triton.jit
def _row_sqnorm(x_rows, xn, D: tl.constexpr, XN_BLOCK: tl.constexpr, XN_UNROLL: tl.constexpr):
    """||x||^2 of the row block, after the main loop (its registers are free by then) or,
    for bucketed tree levels, before it (XN_FIRST: the rows then sit in L2 for the tiles'
    re-reads).

    This loop has no dot, so each load is a bare round trip: XN_UNROLL chunks are loaded
    per step so that their latencies overlap; they are summed in the same order as one at
    a time, so the result is bit-identical. Chunks stay XN_BLOCK wide: wider loads here
    give wrong norms on the GPU.
    """
    offs = tl.arange(0, XN_BLOCK)
    if XN_UNROLL > 0:  # 0 skips the pass (timing diagnostics only: no ||x||^2 added)
        for k0 in range(0, D, XN_BLOCK * XN_UNROLL):
            for j in tl.static_range(XN_UNROLL):
                kk = k0 + j * XN_BLOCK + offs
                xv = tl.load(x_rows + kk[None, :], mask=kk[None, :] < D, other=0.0)
                xv = xv.to(tl.float32)
                xn += tl.sum(xv * xv, axis=1)
    return xn


@triton.jit
def store_rows(
    ids_ptr,
    dist_ptr,
    sec_ptr,
    rows,
    row_mask,
    best,
    best_id,
    second,
    xn,
    L2: tl.constexpr,
    WITH_SECOND: tl.constexpr,
):
    """Scores -> distances (l2: + ||x||^2, clamped at 0; cosine: 1 - x.c) and the row
    stores. Shared with the Gluon kernel (it calls this too) so both finish alike."""
    if L2:
        dist = tl.maximum(best + xn, 0.0)
        second = tl.maximum(second + xn, 0.0)
    else:
        dist = best + 1.0
        second = second + 1.0
    tl.store(ids_ptr + rows, best_id.to(tl.int64), mask=row_mask)
    tl.store(dist_ptr + rows, dist, mask=row_mask)
    if WITH_SECOND:
        tl.store(sec_ptr + rows, second, mask=row_mask)


# --------------------------------------------------------------------------- assignment
@triton.jit
def _assign_kernel(
    x_ptr,
    c_ptr,
    cn_ptr,
    x_desc,
    c_desc,
    x_scale_ptr,
    c_scale_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    sec_id_ptr,
    xn_ptr,
    perm_ptr,
    item_parent_ptr,
    item_pos_ptr,
    item_end_ptr,
    child_off_ptr,
    N,
    K,
    stride_x,
    stride_c,
    tiles_per_split,
    D: tl.constexpr,
    L2: tl.constexpr,
    WITH_SECOND: tl.constexpr,
    GROUPED: tl.constexpr,
    SPLIT: tl.constexpr,
    IS_FP32: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr,
    TMA_X: tl.constexpr,
    TMA_C: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    XN_BLOCK: tl.constexpr,
    XN_UNROLL: tl.constexpr,
    XN_FIRST: tl.constexpr,
    XN_IN: tl.constexpr,
    XN_OUT: tl.constexpr,
):
    """Running top-2 of ``||c||^2 - 2 x.c`` (l2) / ``-x.c`` (cosine) per row.

    ``||x||^2`` (l2) comes from the norm pass, or from ``xn_ptr`` (XN_IN: a previous
    call's values for the same rows, e.g. the level above in a tree walk); XN_OUT stores
    the pass's values there.

    SCALED: the fp8 shortlist pass. x and c are e4m3 with per-row scales (x_scale,
    c_scale); it writes raw scores and both candidate ids (sec_id) for exact re-ranking,
    no ||x||^2.
    """
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if GROUPED:
        parent = tl.maximum(tl.load(item_parent_ptr + pid), 0)  # -1: padding item
        pos0 = tl.load(item_pos_ptr + pid)
        pos_end = tl.load(item_end_ptr + pid)
        pos = pos0 + offs_m
        row_mask = pos < pos_end
        rows = tl.load(perm_ptr + pos, mask=row_mask, other=0)  # positions -> rows
        r0 = pos0.to(tl.int32)  # descriptor offsets are 32-bit
        c_lo = tl.load(child_off_ptr + parent).to(tl.int32)
        c_hi = tl.load(child_off_ptr + parent + 1).to(tl.int32)
        c_hi = tl.where(pos0 < pos_end, c_hi, c_lo)  # empty (padding) item: no work
    else:
        r0 = pid * BLOCK_M
        rows = r0 + offs_m
        row_mask = rows < N
        rows = tl.minimum(rows, N - 1)  # loads stay in range; stores use row_mask
        c_lo = 0
        c_hi = K
        if SPLIT:
            c_lo = tl.program_id(1) * tiles_per_split * BLOCK_N
            c_hi = tl.minimum(c_lo + tiles_per_split * BLOCK_N, K)
    rows = rows.to(tl.int64)  # masked lanes hold a valid row index (clamped / perm 0)
    x_rows = x_ptr + rows[:, None] * stride_x
    if SCALED:
        x_scale = tl.load(x_scale_ptr + rows)

    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_id = tl.full((BLOCK_M,), -1, tl.int32)
    second = tl.full((BLOCK_M,), float("inf"), tl.float32)
    second_id = tl.full((BLOCK_M,), -1, tl.int32)
    xn = tl.zeros((BLOCK_M,), tl.float32)
    if L2 and XN_IN:
        xn = tl.load(xn_ptr + rows)
    elif L2 and XN_FIRST and not SCALED:  # before the tiles: x enters L2 for their re-reads
        xn = _row_sqnorm(x_rows, xn, D, XN_BLOCK, XN_UNROLL)
    for c0 in range(c_lo, c_hi, BLOCK_N):
        cn = _load_col(cn_ptr, c0, c_hi, offs_n, L2, 0.0)
        c_scale = _load_col(c_scale_ptr, c0, c_hi, offs_n, SCALED, 1.0)
        acc = _tile_dot(
            x_rows,
            x_desc,
            c_desc,
            c_ptr,
            r0,
            c0,
            c_hi,
            offs_n,
            offs_k,
            stride_c,
            D,
            EVEN_D,
            IS_FP32,
            TMA_X,
            TMA_C,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        if SCALED:
            acc = acc * x_scale[:, None] * c_scale[None, :]
        s = cn[None, :] - 2.0 * acc if L2 else -acc
        best, best_id, second, second_id = _top2_update(
            s, c0, c_hi, offs_n, best, best_id, second, second_id, EVEN_N, WITH_SECOND, SCALED
        )

    if SCALED:  # candidates only: re-ranked exactly by _rerank_kernel
        second_id = tl.where(second < float("inf"), second_id, -1)  # K == 1: no runner-up
        tl.store(ids_ptr + rows, best_id.to(tl.int64), mask=row_mask)
        tl.store(sec_id_ptr + rows, second_id.to(tl.int64), mask=row_mask)
        return
    # ||x||^2 (l2) in a separate pass after the main loop (or before it: XN_FIRST), through
    # its own loads: reusing the dot's x tile gives wrong norms on this Triton, as does
    # BLOCK_K 32/128 at the 16-bit tiles.
    if L2 and not XN_FIRST and not XN_IN:
        xn = _row_sqnorm(x_rows, xn, D, XN_BLOCK, XN_UNROLL)
    if L2 and XN_OUT:  # (split calls: every split writes the same value)
        tl.store(xn_ptr + rows, xn, mask=row_mask)
    if SPLIT:  # raw scores; merged (and finished) on the host side
        out = tl.program_id(1).to(tl.int64) * N + rows
        tl.store(ids_ptr + out, best_id.to(tl.int64), mask=row_mask)
        tl.store(dist_ptr + out, best, mask=row_mask)
        if WITH_SECOND:
            tl.store(sec_ptr + out, second, mask=row_mask)
    else:
        store_rows(
            ids_ptr, dist_ptr, sec_ptr, rows, row_mask, best, best_id, second, xn, L2, WITH_SECOND
        )


def launch_assign(
    grid,
    xs,
    c,
    cn,
    ids,
    dist,
    sec,
    conf: dict,
    *,
    metric: str,
    with_second: bool,
    k: int,
    split: bool = False,
    tiles_per_split: int = 1,
    xn=None,
    xn_given: bool = False,
    grouped=None,
    scaled=None,
):
    """One ``_assign_kernel`` launch; the single place that maps options to its arguments.

    xn: the rows' ||x||^2, read (``xn_given``) or written by the kernel; grouped = (perm,
    item_parent, item_pos, item_end, child_offsets); scaled = (x_scale, c_scale,
    second_ids) for the fp8 shortlist pass.
    """
    n, d = xs.shape
    bm, bn, bk = conf["BLOCK_M"], conf["BLOCK_N"], conf["BLOCK_K"]
    meta = dict(XN_FIRST=False)
    meta.update({key: v for key, v in conf.items() if key != "TMA"})
    use_tma = conf.get("TMA", False)
    x_desc = (
        TensorDescriptor.from_tensor(xs, [bm, bk])
        if use_tma and grouped is None and tma_ok(xs)
        else None
    )
    c_desc = TensorDescriptor.from_tensor(c, [bn, bk]) if use_tma and tma_ok(c) else None
    dummy = ids
    x_scale, c_scale, sec_id = scaled if scaled else (dummy, dummy, dummy)
    perm, ip, ipos, iend, offs = grouped if grouped else (dummy,) * 5
    _assign_kernel[grid](
        xs,
        c,
        cn,
        x_desc,
        c_desc,
        x_scale,
        c_scale,
        ids,
        dist,
        sec if with_second else dist,
        sec_id,
        dummy if xn is None else xn,
        perm,
        ip,
        ipos,
        iend,
        offs,
        n,
        k,
        xs.stride(0),
        c.stride(0),
        tiles_per_split,
        d,
        L2=metric == "l2",
        WITH_SECOND=with_second or scaled is not None,
        GROUPED=grouped is not None,
        SPLIT=split,
        IS_FP32=xs.dtype == torch.float32,
        EVEN_D=d % bk == 0,
        EVEN_N=grouped is None and k % bn == 0,
        TMA_X=x_desc is not None,
        TMA_C=c_desc is not None,
        SCALED=scaled is not None,
        XN_IN=xn is not None and xn_given,
        XN_OUT=xn is not None and not xn_given,
        **meta,
    )
