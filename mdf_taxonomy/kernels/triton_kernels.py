"""Triton kernels: fused assignment (plain and grouped) and exact partial sums.

Assignment is a tiled GEMM (rows x centroids, reduced over D on tensor cores) whose
epilogue keeps a running top-2 per row in registers, so the N x K distance matrix is
never written. The ranking score is ``||c||^2 - 2 x.c`` (l2) or ``-x.c`` (cosine); the
row constant ``||x||^2`` is added once at the end. bf16/fp16 inputs run on bf16/fp16
tensor cores (centroids are cast to the input dtype); fp32 inputs use 3xTF32, which is
close to fp32 accuracy. Operands are loaded with clamped pointers by default, or through
tensor descriptors (TMA, ``TMA=True``; validated, no faster for bf16 on H100).

The fp8 shortlist runs the same kernel on e4m3 copies (per-row scales) keeping the two
best ids, then ``_rerank_kernel`` decides between them with exact distances from the
original inputs.

Determinism: the launch configuration depends on (dtype, D, K) only, never on N, and a
row's arithmetic does not depend on the other rows of its tile, so a row's result does
not depend on the batch. Splitting the centroid axis across programs (for small N) is
merged by an exact top-2 merge with lowest-index tie-break, so it changes nothing.
Partial sums quantise to int64 fixed point and reduce with integer adds (exact,
order-free).

Import this module only when Triton is wanted; ``mdf_taxonomy.kernels`` does it lazily.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .reference import FIXED_POINT_BITS

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_k_chunk(desc, rows_ptr, r0, k0, kk, D: tl.constexpr, TMA: tl.constexpr,
                  EVEN_D: tl.constexpr):
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
def _tile_dot(x_rows, x_desc, c_desc, c_ptr, r0, c0, c_hi, offs_n, offs_k, stride_c,
              D: tl.constexpr, EVEN_D: tl.constexpr, IS_FP32: tl.constexpr,
              TMA_X: tl.constexpr, TMA_C: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
def _top2_update(s, c0, c_hi, offs_n, best, best_id, second, second_id,
                 EVEN_N: tl.constexpr, WITH_SECOND: tl.constexpr,
                 WITH_SECOND_ID: tl.constexpr):
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
                take, tl.where(best <= tsec, best_id, targ2 + c0),
                tl.where(tmin < second, targ + c0, second_id))
        else:
            tsec = tl.min(s2, axis=1)
        second = tl.where(take, tl.minimum(best, tsec), tl.minimum(second, tmin))
    best = tl.where(take, tmin, best)
    best_id = tl.where(take, targ + c0, best_id)
    return best, best_id, second, second_id


@triton.jit
def _row_sqnorm(x_rows, xn, D: tl.constexpr, XN_BLOCK: tl.constexpr,
                XN_UNROLL: tl.constexpr):
    """||x||^2 of the row block, after the main loop (its registers are free by then) or,
    for bucketed tree levels, before it (XN_FIRST: the rows then sit in L2 for the tiles'
    re-reads, which measured 3% faster there).

    This loop has no dot, so each load is a bare round trip: with one 64-column chunk per
    step it cost ~12% of the kernel at K=1024 (against cosine, which has no norm pass).
    XN_UNROLL chunks are loaded per step so that their latencies overlap; they are summed
    in the same order as one at a time, so the result is bit-identical. Chunks stay
    XN_BLOCK wide: wider loads here gave wrong norms on the GPU (sweep gates).
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
def _store_rows(ids_ptr, dist_ptr, sec_ptr, rows, row_mask, best, best_id, second, xn,
                L2: tl.constexpr, WITH_SECOND: tl.constexpr):
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
    x_ptr, c_ptr, cn_ptr, x_desc, c_desc, x_scale_ptr, c_scale_ptr,
    ids_ptr, dist_ptr, sec_ptr, sec_id_ptr, xn_ptr,
    perm_ptr, item_parent_ptr, item_pos_ptr, item_end_ptr, child_off_ptr,
    N, K, stride_x, stride_c, tiles_per_split, D: tl.constexpr,
    L2: tl.constexpr, WITH_SECOND: tl.constexpr, GROUPED: tl.constexpr,
    SPLIT: tl.constexpr, IS_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr, TMA_X: tl.constexpr, TMA_C: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    XN_BLOCK: tl.constexpr, XN_UNROLL: tl.constexpr, XN_FIRST: tl.constexpr,
    XN_IN: tl.constexpr, XN_OUT: tl.constexpr,
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
        acc = _tile_dot(x_rows, x_desc, c_desc, c_ptr, r0, c0, c_hi, offs_n, offs_k,
                        stride_c, D, EVEN_D, IS_FP32, TMA_X, TMA_C,
                        BLOCK_M, BLOCK_N, BLOCK_K)
        if SCALED:
            acc = acc * x_scale[:, None] * c_scale[None, :]
        s = cn[None, :] - 2.0 * acc if L2 else -acc
        best, best_id, second, second_id = _top2_update(
            s, c0, c_hi, offs_n, best, best_id, second, second_id, EVEN_N,
            WITH_SECOND, SCALED)

    if SCALED:  # candidates only: re-ranked exactly by _rerank_kernel
        second_id = tl.where(second < float("inf"), second_id, -1)  # K == 1: no runner-up
        tl.store(ids_ptr + rows, best_id.to(tl.int64), mask=row_mask)
        tl.store(sec_id_ptr + rows, second_id.to(tl.int64), mask=row_mask)
        return
    # ||x||^2 (l2) in a separate pass after the main loop (or before it: XN_FIRST), through
    # its own loads: reusing the dot's x tile for it was fast but gave wrong results on H100
    # with triton 3.6 (benchmarks/DECISIONS.md), as did BLOCK_K 32/128 at the 16-bit tiles.
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
        _store_rows(ids_ptr, dist_ptr, sec_ptr, rows, row_mask, best, best_id, second, xn,
                    L2, WITH_SECOND)


@triton.jit
def _rerank_kernel(x_ptr, c_ptr, cn_ptr, cand_ptr, cand2_ptr, ids_ptr, dist_ptr, sec_ptr,
                   N, stride_x, stride_c, D: tl.constexpr, L2: tl.constexpr,
                   WITH_SECOND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Exact distances to a row's two shortlisted candidates; the nearer one wins (the
    lower id on a tie). Memory-bound: x and two centroid rows per row, fp32 sums."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1).to(tl.int64)
    i0 = tl.load(cand_ptr + rows)
    i1 = tl.load(cand2_ptr + rows)
    c0_rows = c_ptr + tl.maximum(i0, 0)[:, None] * stride_c
    c1_rows = c_ptr + tl.maximum(i1, 0)[:, None] * stride_c
    x_rows = x_ptr + rows[:, None] * stride_x
    dot0 = tl.zeros((BLOCK_M,), tl.float32)
    dot1 = tl.zeros((BLOCK_M,), tl.float32)
    xn = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk[None, :] < D
        xv = tl.load(x_rows + kk[None, :], mask=km, other=0.0).to(tl.float32)
        a = tl.load(c0_rows + kk[None, :], mask=km, other=0.0).to(tl.float32)
        b = tl.load(c1_rows + kk[None, :], mask=km, other=0.0).to(tl.float32)
        dot0 += tl.sum(xv * a, axis=1)
        dot1 += tl.sum(xv * b, axis=1)
        xn += tl.sum(xv * xv, axis=1)
    if L2:
        d0 = tl.maximum(tl.load(cn_ptr + tl.maximum(i0, 0)) - 2.0 * dot0 + xn, 0.0)
        d1 = tl.maximum(tl.load(cn_ptr + tl.maximum(i1, 0)) - 2.0 * dot1 + xn, 0.0)
    else:
        d0 = 1.0 - dot0
        d1 = 1.0 - dot1
    d0 = tl.where(i0 >= 0, d0, float("inf"))
    d1 = tl.where(i1 >= 0, d1, float("inf"))
    first = (d0 < d1) | ((d0 == d1) & (i0 <= i1))
    tl.store(ids_ptr + rows, tl.where(first, i0, i1), mask=row_mask)
    tl.store(dist_ptr + rows, tl.where(first, d0, d1), mask=row_mask)
    if WITH_SECOND:
        tl.store(sec_ptr + rows, tl.where(first, d1, d0), mask=row_mask)


def _config(dtype: torch.dtype, d: int, k: int, device: torch.device) -> dict:
    """Launch config from (dtype, D, K, device type) only: never from N (determinism)."""
    if device.type != "cuda":  # interpreter: tiny tiles keep it quick
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1,
                    TMA=False, XN_BLOCK=16, XN_UNROLL=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3,
                    TMA=False, XN_BLOCK=32, XN_UNROLL=1)
    if dtype == torch.float8_e4m3fn:  # the shortlist pass: same bytes per k-step as bf16
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=3,
                    TMA=True, XN_BLOCK=128, XN_UNROLL=1)
    # swept on H100 (benchmarks/DECISIONS.md). The ||x||^2 pass is only right on the GPU
    # with 64-column chunks (BLOCK_K or XN_BLOCK 32/128/256 gave wrong norms: sweep
    # gates); two chunks per step measured +3-8% at K=1024 (ab_norm_pass.py, bit-identical).
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3,
                TMA=False, XN_BLOCK=64, XN_UNROLL=2)


_OVERRIDE: dict | None = None  # benchmarks set this to sweep configs

# The warp-specialised Gluon kernel (gluon_kernels.py) serves K <= WS_MAX_K, where it
# measured faster (benchmarks/DECISIONS.md); its results are bit-identical to this
# kernel's, so the choice never changes a result. Checked on the H100 with these Tritons.
USE_WS = True  # benchmarks switch it off for A/B runs
WS_TRITON = ("3.6.",)
# measured (N=1M, D=1024): l2 +9-17% at K=1024, +11% at 2048, +4% at 4096, +1% at 8192,
# -1% at 16384; cosine +8-13% at 1024, +1-8% at 2048, parity at 4096 and 8192
WS_MAX_K = 4096


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, asked once (it is on every launch's path)."""
    return torch.cuda.get_device_capability(device)


def _tma_ok(t: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need Hopper (or the interpreter), unit inner stride and
    16-byte aligned rows."""
    if t.device.type == "cuda" and _capability(t.device)[0] < 9:
        return False
    es = t.element_size()
    return (t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0
            and t.shape[1] * es >= 16)


def _use_ws(xs: torch.Tensor, c: torch.Tensor, metric: str, k: int) -> bool:
    """Whether the Gluon kernel serves this call (see USE_WS): 16-bit inputs with TMA
    rows on sm90 (it uses wgmma), small K, a validated Triton."""
    return (USE_WS and k <= WS_MAX_K and _OVERRIDE is None
            and xs.is_cuda and xs.dtype in (torch.bfloat16, torch.float16)
            and c.dtype == xs.dtype and triton.__version__.startswith(WS_TRITON)
            and _capability(xs.device) == (9, 0)
            and _tma_ok(xs) and _tma_ok(c))


def _launch_assign(grid, xs, c, cn, ids, dist, sec, conf: dict, *, metric: str,
                   with_second: bool, k: int, split: bool = False, tiles_per_split: int = 1,
                   xn=None, xn_given: bool = False, grouped=None, scaled=None):
    """One _assign_kernel launch; the single place that maps options to its arguments.

    xn: the rows' ||x||^2, read (``xn_given``) or written by the kernel; grouped = (perm,
    item_parent, item_pos, item_end, child_offsets); scaled = (x_scale, c_scale,
    second_ids) for the fp8 shortlist pass.
    """
    n, d = xs.shape
    bm, bn, bk = conf["BLOCK_M"], conf["BLOCK_N"], conf["BLOCK_K"]
    meta = dict(XN_FIRST=False)
    meta.update({key: v for key, v in conf.items() if key != "TMA"})
    use_tma = conf.get("TMA", False)
    x_desc = TensorDescriptor.from_tensor(xs, [bm, bk]) \
        if use_tma and grouped is None and _tma_ok(xs) else None
    c_desc = TensorDescriptor.from_tensor(c, [bn, bk]) if use_tma and _tma_ok(c) else None
    dummy = ids
    x_scale, c_scale, sec_id = scaled if scaled else (dummy, dummy, dummy)
    perm, ip, ipos, iend, offs = grouped if grouped else (dummy,) * 5
    _assign_kernel[grid](
        xs, c, cn, x_desc, c_desc, x_scale, c_scale,
        ids, dist, sec if with_second else dist, sec_id, dummy if xn is None else xn,
        perm, ip, ipos, iend, offs,
        n, k, xs.stride(0), c.stride(0), tiles_per_split, d,
        L2=metric == "l2", WITH_SECOND=with_second or scaled is not None,
        GROUPED=grouped is not None, SPLIT=split, IS_FP32=xs.dtype == torch.float32,
        EVEN_D=d % bk == 0, EVEN_N=grouped is None and k % bn == 0,
        TMA_X=x_desc is not None, TMA_C=c_desc is not None, SCALED=scaled is not None,
        XN_IN=xn is not None and xn_given, XN_OUT=xn is not None and not xn_given, **meta)


def _prep(x: torch.Tensor, centroids: torch.Tensor, metric: str):
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"bad shapes x={tuple(x.shape)} centroids={tuple(centroids.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (
        _INTERPRET and x.dtype == torch.bfloat16  # the interpreter mis-handles bf16
    ):
        x = x.float()
    if x.stride(1) != 1:
        x = x.contiguous()
    c, cn = _prepared_centroids(centroids, x.dtype, x.device, metric == "l2")
    return x, c, cn


# (id(tensor), what...) -> (weakref to the tensor, its version, prepared value)
_CENTROID_CACHE: dict = {}
_CACHE_MIN_ELEMS = 1 << 24  # off CUDA only large sets (a tree level) are worth caching
_CACHE_SIZE = 8  # a 3-level tree's centroids and child offsets, with room to spare


def _cached_for(centroids: torch.Tensor, what: tuple, build, always: bool = False):
    """``build()`` for these centroids (or a level's child offsets: ``always``), cached per
    tensor.

    A grouped level can hold ~1M centroids: casting and norming them on every call cost
    more than the kernel (measured 7 ms of 13 ms per level). On CUDA every set is cached:
    even 1024 centroids' norms cost ~0.1 ms of launches per call, paid while the GPU
    waits. The cache is keyed on the tensor's identity (weakref) and its
    in-place version counter, so any change to the tensor through torch (any view)
    rebuilds; writes that bypass the counter (``.data``, DLPack) are not seen. It holds at
    most ``_CACHE_SIZE`` entries.
    """
    key = (id(centroids), *what)
    hit = _CENTROID_CACHE.get(key)
    if hit is not None and hit[0]() is centroids and hit[1] == centroids._version:
        return hit[2]
    value = build()
    if always or centroids.is_cuda or centroids.numel() >= _CACHE_MIN_ELEMS:
        for k in [k for k, v in _CENTROID_CACHE.items() if v[0]() is None]:
            del _CENTROID_CACHE[k]
        while len(_CENTROID_CACHE) >= _CACHE_SIZE:
            del _CENTROID_CACHE[next(iter(_CENTROID_CACHE))]
        _CENTROID_CACHE[key] = (weakref.ref(centroids), centroids._version, value)
    return value


def _offsets_info(child_offsets: torch.Tensor) -> tuple[int, int, int, int]:
    """(parents, widest children block, first block's [lo, hi)) of a level, worked out once
    per offsets tensor (one read-back on CUDA, cached like centroids): the launch config
    needs the widest block, and labelling a level must not wait for the GPU."""

    def build():
        o = child_offsets.to(torch.int64)
        if o.dim() != 1 or o.numel() < 2:
            raise ValueError(f"child_offsets must be 1-D with >= 2 entries, got {tuple(o.shape)}")
        return tuple(torch.stack([(o[1:] - o[:-1]).max(), o[0], o[1]]).tolist())

    widest, lo, hi = _cached_for(child_offsets, ("offsets",), build, always=True)
    return child_offsets.numel() - 1, widest, lo, hi


def _prepared_centroids(centroids: torch.Tensor, dtype, device, l2: bool):
    """Centroids cast to the input dtype and their fp32 squared norms (cached)."""

    def build():
        c = centroids.to(device=device, dtype=dtype).contiguous()
        if l2:
            cn = torch.empty(c.shape[0], dtype=torch.float32, device=device)
            for i in range(0, c.shape[0], 1 << 16):  # bounded fp32 temporaries
                cn[i : i + (1 << 16)] = c[i : i + (1 << 16)].float().pow(2).sum(1)
        else:
            cn = c.new_empty(1, dtype=torch.float32)
        # no cast needed: keep no second reference, or the cache would keep them alive
        return (None if c.data_ptr() == centroids.data_ptr() else c), cn

    c, cn = _cached_for(centroids, (dtype, str(device), l2), build)
    return (centroids if c is None else c), cn


def _empty_out(n: int, device, with_second: bool, filled: bool = True):
    """Output buffers; ``filled`` with (-1, +inf, +inf) where the kernel may skip rows."""
    if not filled:
        new = functools.partial(torch.empty, n, device=device)
        return new(dtype=torch.int64), new(dtype=torch.float32), \
            new(dtype=torch.float32) if with_second else None
    ids = torch.full((n,), -1, dtype=torch.int64, device=device)
    dist = torch.full((n,), float("inf"), dtype=torch.float32, device=device)
    sec = torch.full((n,), float("inf"), dtype=torch.float32, device=device) if with_second \
        else None
    return ids, dist, sec


@functools.cache
def _n_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _read_later(t: torch.Tensor):
    """Start copying a small tensor to the host; the returned function waits for that copy
    only, not for the work enqueued after it, and gives the values (``tolist``).

    Validation reads its verdict this way after the kernel is enqueued: the host then never
    stalls the GPU (the next call's launches overlap this call's kernel)."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list:
        copied.synchronize()
        return host.tolist()

    return read


def _with_oom_retry(fn, x: torch.Tensor, *rest_rowwise):
    """Run ``fn`` on all rows; on CUDA OOM, run it on halves (recursively). ``fn`` returns
    a tuple of per-row tensors (or None); ``rest_rowwise`` are per-row tensors (or None)."""
    try:
        return fn(x, *rest_rowwise)
    except torch.OutOfMemoryError:
        n = x.shape[0]
        if n <= 1:
            raise
        torch.cuda.empty_cache()
        h = n // 2
        a = _with_oom_retry(fn, x[:h], *[None if r is None else r[:h] for r in rest_rowwise])
        b = _with_oom_retry(fn, x[h:], *[None if r is None else r[h:] for r in rest_rowwise])
        return tuple(None if u is None else torch.cat([u, v]) for u, v in zip(a, b, strict=True))


def _assign_prepared(x: torch.Tensor, c: torch.Tensor, cn: torch.Tensor, metric: str,
                     with_second: bool, cfg: dict | None = None,
                     x_sqnorm: torch.Tensor | None = None):
    """Assignment on prepared inputs (x as the kernel reads it, c cast, cn its norms):
    (ids, dist, sec, ||x||^2 or None).

    ``cfg`` fixes the launch config (grouped single-parent calls pass the level's config
    so a row's arithmetic is the one of the grouped kernel); else it comes from _config.
    Where the Gluon kernel serves the call, its bits are this kernel's for any config.
    ``x_sqnorm`` (l2): the rows' ||x||^2 from an earlier call, read instead of computed.
    """
    l2 = metric == "l2"

    def run(xs: torch.Tensor, xg: torch.Tensor | None):
        n, d = xs.shape
        k = c.shape[0]
        ids, dist, sec = _empty_out(n, xs.device, with_second, filled=k == 0)
        if n == 0 or k == 0:
            return ids, dist, sec, xg
        xn = _sqnorm_buffer(xg, dist, l2)
        conf = cfg or _OVERRIDE or _config(xs.dtype, d, k, xs.device)
        bm, bn = conf["BLOCK_M"], conf["BLOCK_N"]
        row_blocks = triton.cdiv(n, bm)
        c_tiles = triton.cdiv(k, bn)
        # too few row blocks to fill the GPU: split the centroid axis too
        splits = max(1, min(c_tiles, (2 * _n_sms(xs.device)) // row_blocks))
        tps = triton.cdiv(c_tiles, splits)
        splits = triton.cdiv(c_tiles, tps)
        opts = dict(metric=metric, with_second=with_second, k=k, xn=xn,
                    xn_given=xg is not None)
        if splits == 1 and _use_ws(xs, c, metric, k):  # same bits as the tl kernel
            from . import gluon_kernels

            gluon_kernels.assign_ws(xs, c, cn, ids, dist, sec, metric=metric, xn=xn,
                                    xn_given=xg is not None)
            return ids, dist, sec, xn
        if splits == 1:
            _launch_assign((row_blocks,), xs, c, cn, ids, dist, sec, conf, **opts)
            return ids, dist, sec, xn
        pids = torch.empty((splits, n), dtype=torch.int64, device=xs.device)
        pbest = torch.empty((splits, n), dtype=torch.float32, device=xs.device)
        psec = torch.empty((splits, n), dtype=torch.float32, device=xs.device) \
            if with_second else None
        _launch_assign((row_blocks, splits), xs, c, cn, pids, pbest, psec, conf, split=True,
                       tiles_per_split=tps, **opts)
        # exact top-2 merge over splits (lowest split = lowest ids win ties)
        b, arg = pbest.min(dim=0)
        ids = pids.gather(0, arg[None])[0]
        if with_second:
            others = pbest.scatter(0, arg[None], float("inf")).min(dim=0).values
            sec = torch.minimum(psec.gather(0, arg[None])[0], others)
        if l2:  # same fp32 add as the kernel's epilogue
            dist = (b + xn).clamp_min_(0.0)
            if with_second:
                sec = (sec + xn).clamp_min_(0.0)
        else:
            dist = b + 1.0
            if with_second:
                sec = sec + 1.0
        return ids, dist, sec, xn

    return _with_oom_retry(run, x, _sqnorm_in(x_sqnorm, x, metric))


def _sqnorm_in(x_sqnorm: torch.Tensor | None, x: torch.Tensor, metric: str
               ) -> torch.Tensor | None:
    """The caller's ||x||^2 for these rows, validated; None where there is nothing to read
    (none given, or cosine, which has no ||x||^2)."""
    if x_sqnorm is None or metric != "l2":
        return None
    if x_sqnorm.shape != (x.shape[0],) or x_sqnorm.dtype != torch.float32 \
            or x_sqnorm.device != x.device:
        raise ValueError(
            f"x_sqnorm must be float32 of shape ({x.shape[0]},) on {x.device} (a previous "
            f"call's Assignment.x_sqnorm for these rows), got {x_sqnorm.dtype} "
            f"{tuple(x_sqnorm.shape)} on {x_sqnorm.device}")
    return x_sqnorm


def _sqnorm_buffer(given: torch.Tensor | None, dist: torch.Tensor, l2: bool
                   ) -> torch.Tensor | None:
    """Where an l2 kernel reads ||x||^2 (``given``) or writes the values it computes."""
    if not l2:
        return None
    return given if given is not None else torch.empty_like(dist)


def assign_triton(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2", with_second: bool = False,
    x_sqnorm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fused nearest-centroid search; see module docstring. Returns (ids, dist, second,
    ||x||^2 (l2) or None)."""
    x, c, cn = _prep(x, centroids, metric)
    return _assign_prepared(x, c, cn, metric, with_second, x_sqnorm=x_sqnorm)


FP8_MAX = 448.0  # largest finite float8 e4m3fn value (literal in the kernel below)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, N, stride_x, D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One read of x, e4m3 out: scale = max|row| / 448 and q = x / scale, both IEEE
    round-to-nearest divisions so the result equals the torch reference bit for bit."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)
    v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
    v = v.to(tl.float32)
    sc = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=1), 1e-30), 448.0)
    q = tl.math.div_rn(v, sc[:, None]).to(tl.float8e4nv)
    tl.store(q_ptr + rows64[:, None] * D + cols[None, :], q, mask=m)
    tl.store(scale_ptr + rows, sc, mask=rows < N)


def _to_fp8_rows(t: torch.Tensor, chunk: int = 1 << 16):
    """Rows quantised to e4m3 with a per-row scale (row max |value| -> 448): (q, scale),
    t ~= q * scale[:, None]. The Triton kernel on CUDA (one pass); torch elsewhere, which
    is the reference (the interpreter's fp8 cast rounds wrongly across binades)."""
    n, d = t.shape
    q = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
    scale = torch.empty(n, dtype=torch.float32, device=t.device)
    if t.device.type == "cuda" and n and d <= 8192:
        bd = triton.next_power_of_2(d)
        bm = max(1, 4096 // bd)
        _quantize_rows_kernel[(triton.cdiv(n, bm),)](
            t, q, scale, n, t.stride(0), d, BLOCK_M=bm, BLOCK_D=bd, num_warps=4)
        return q, scale
    for i in range(0, n, chunk):  # bounded fp32 temporaries
        v = t[i : i + chunk].float()
        sc = v.abs().amax(1).clamp_min(1e-30) / FP8_MAX
        q[i : i + chunk] = (v / sc[:, None]).to(torch.float8_e4m3fn)
        scale[i : i + chunk] = sc
    return q, scale


def _fp8_centroids(centroids: torch.Tensor, c: torch.Tensor):
    """The cast centroids quantised to e4m3 with their scales (cached like the cast)."""
    return _cached_for(centroids, ("fp8", str(c.device)), lambda: _to_fp8_rows(c))


def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores: compute capability >= 8.9 (the interpreter emulates them)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _INTERPRET
    return _capability(device) >= (8, 9)


def assign_shortlist_triton(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2", with_second: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp8 (e4m3) top-2 shortlist over all centroids, then exact re-ranking of the two
    candidates in the input precision.

    Labels equal the exact kernel's except where fp8 rounding pushes the true nearest
    centroid out of the top two (near-ties at fp8 resolution); distances are exact for
    the returned ids; ``second`` is the exact distance of the runner-up candidate (an
    upper bound of the true second-best). Never splits the centroid axis, so a row's
    result does not depend on the batch.
    """
    if not fp8_supported(x.device):
        warnings.warn("fp8_shortlist needs fp8 tensor cores (compute capability >= 8.9); "
                      "running the exact kernel instead", RuntimeWarning, stacklevel=3)
        return assign_triton(x, centroids, metric=metric, with_second=with_second)
    x, c, cn = _prep(x, centroids, metric)
    c8, c_scale = _fp8_centroids(centroids, c)
    k, d = c.shape

    def run(xs: torch.Tensor):
        n = xs.shape[0]
        ids, dist, sec = _empty_out(n, xs.device, with_second)
        if n == 0 or k == 0:
            return ids, dist, sec
        x8, x_scale = _to_fp8_rows(xs)
        cand2 = torch.empty_like(ids)
        conf = _OVERRIDE_FP8 or _config(torch.float8_e4m3fn, d, k, xs.device)
        _launch_assign((triton.cdiv(n, conf["BLOCK_M"]),), x8, c8, cn, ids, dist, None, conf,
                       metric=metric, with_second=False, k=k,
                       scaled=(x_scale, c_scale, cand2))
        bm = 16 if xs.device.type == "cuda" else 4
        _rerank_kernel[(triton.cdiv(n, bm),)](
            xs, c, cn, ids, cand2, ids, dist, sec if with_second else dist,
            n, xs.stride(0), c.stride(0), d, L2=metric == "l2", WITH_SECOND=with_second,
            BLOCK_M=bm, BLOCK_D=min(triton.next_power_of_2(d), 256), num_warps=4)
        return ids, dist, sec

    return _with_oom_retry(run, x)


_OVERRIDE_FP8: dict | None = None  # benchmarks set this to sweep the shortlist pass


def _work_items(keys: torch.Tensor, n_keys: int, block: int):
    """Bucket rows by key: (perm, item_key, item_pos, item_end, counts), no host sync.

    Items of <= ``block`` rows; those of one key cover consecutive positions of the
    key-sorted order ``perm``. The item count is the bound n // block + min(n_keys, n) so
    that nothing is read back to the host; items past the real count have key -1 and
    pos == end (empty).
    One sort of 32-bit keys; segment bounds by binary search in the sorted keys (no
    bincount, which syncs on CUDA, and no atomics).
    """
    n = keys.numel()
    dev = keys.device
    sk, perm = torch.sort(keys.to(torch.int32) if n_keys < 2**31 else keys)
    bounds = torch.searchsorted(sk, torch.arange(n_keys + 1, device=dev, dtype=sk.dtype))
    seg_start, seg_end = bounds[:-1], bounds[1:]
    counts = seg_end - seg_start
    nb = (counts + block - 1) // block
    item_cum = nb.cumsum(0)
    total = n // block + min(n_keys, n)  # >= sum(ceil(count / block))
    j = torch.arange(total, device=dev)
    item_key = torch.searchsorted(item_cum, j, right=True).clamp_max_(max(n_keys - 1, 0))
    first = item_cum[item_key] - nb[item_key]
    item_end = seg_end[item_key]
    valid = j < item_cum[-1]
    item_pos = torch.where(valid, seg_start[item_key] + (j - first) * block, item_end)
    item_key = torch.where(valid, item_key, -1)
    return perm, item_key, item_pos, item_end, counts


def grouped_assign_triton(
    x: torch.Tensor,
    groups: torch.Tensor,
    centroids: torch.Tensor,
    child_offsets: torch.Tensor,
    *,
    metric: str = "l2",
    with_second: bool = False,
    x_sqnorm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One launch labels a whole tree level: each row vs its parent's children block.

    A single parent (a tree's first level): the plain kernel on its children block.
    Otherwise one 32-bit key sort buckets the rows by parent and the kernel reads x rows
    through the permutation (no copy of x). Every path runs the same per-row arithmetic.
    Nothing here waits for the GPU before the launch: the offsets are summarised on the host
    once per tensor and the group ids are validated after the kernel is enqueued (rows of an
    out-of-range group belong to no work item, so the kernel never touches them).
    ``x_sqnorm`` / the 4th result: the rows' ||x||^2 (l2), as for ``assign_triton``.
    """
    x, c, cn = _prep(x, centroids, metric)
    n_parents, widest, lo, hi = _offsets_info(child_offsets)
    groups = groups.to(device=x.device, dtype=torch.int64)
    n, d = x.shape
    if n == 0 or c.shape[0] == 0:
        return *_empty_out(n, x.device, with_second), x_sqnorm
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    group_range = _read_later(torch.stack(torch.aminmax(groups)))
    # a row meets at most `widest` centroids: that is the K that the config is tuned for
    cfg = _OVERRIDE or _config(x.dtype, d, widest, x.device)
    if n_parents == 1:
        ids, dist, sec, xn = _assign_prepared(
            x, c[lo:hi], cn[lo:hi] if metric == "l2" else cn, metric, with_second, cfg,
            x_sqnorm=x_sqnorm)
        if lo and hi > lo:
            ids += lo
    else:
        offs = child_offsets.to(device=x.device, dtype=torch.int64)
        # many parents: children blocks come from HBM rather than L2; a deeper pipeline
        # measured 4-5% faster (benchmarks/DECISIONS.md) and the ||x||^2 pass before the
        # tiles 3% (the rows stay in L2 for the tiles' re-reads; after them they had
        # been evicted). The arithmetic is unchanged, so the paths stay bit-identical.
        bucket_cfg = dict(cfg, num_stages=4, XN_FIRST=True) \
            if x.is_cuda and not _OVERRIDE else cfg

        def run(xs: torch.Tensor, gs: torch.Tensor, xg: torch.Tensor | None):
            ids, dist, sec = _empty_out(xs.shape[0], xs.device, with_second)
            xn = _sqnorm_buffer(xg, dist, metric == "l2")  # every row is in a work item
            perm, ip, ipos, iend, _ = _work_items(gs, n_parents, cfg["BLOCK_M"])
            _launch_assign((ip.numel(),), xs, c, cn, ids, dist, sec, bucket_cfg,
                           metric=metric, with_second=with_second, k=c.shape[0],
                           xn=xn, xn_given=xg is not None,
                           grouped=(perm, ip, ipos, iend, offs))
            return ids, dist, sec, xn

        ids, dist, sec, xn = _with_oom_retry(run, x, groups, _sqnorm_in(x_sqnorm, x, metric))
    gmin, gmax = group_range()
    if gmin < 0 or gmax >= n_parents:
        raise ValueError(f"group ids must lie in [0, {n_parents}), got [{gmin}, {gmax}]")
    return ids, dist, sec, xn


# --------------------------------------------------------------------------- partial sums
@triton.jit
def _partial_sums_kernel(
    x_ptr, perm_ptr, item_key_ptr, item_pos_ptr, item_end_ptr, sums_ptr,
    D, stride_x, SCALE,
    CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """One (cluster, chunk of <= CHUNK sorted rows, column block): int64 sum + atomic add.

    BLOCK_D spans up to 1024 columns so the warps split the columns and the row
    reduction stays inside each thread (no shared-memory reduction per step).
    """
    pid = tl.program_id(0)
    key = tl.load(item_key_ptr + pid) - 1  # key 0 = skipped rows (id < 0)
    if key >= 0:
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        pos0 = tl.load(item_pos_ptr + pid)
        pos_end = tl.minimum(tl.load(item_end_ptr + pid), pos0 + CHUNK)
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.int64)
        for p in tl.range(pos0, pos_end, BLOCK_R, num_stages=NUM_STAGES):
            pos = p + tl.arange(0, BLOCK_R)
            pm = pos < pos_end
            rows = tl.load(perm_ptr + pos, mask=pm, other=0).to(tl.int64)
            v = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                        mask=pm[:, None] & col_mask[None, :], other=0.0)
            # floor(y + 0.5) with y = v * 2**B, exactly, in fp32: y, floor(y) and
            # y - floor(y) are all exact, so this equals the reference's fp64 rounding.
            y = v.to(tl.float32) * SCALE
            f = tl.floor(y)
            acc += f.to(tl.int64) + ((y - f) >= 0.5).to(tl.int64)
        tl.atomic_add(sums_ptr + key.to(tl.int64) * D + cols, tl.sum(acc, axis=0),
                      mask=col_mask)


def partial_sums_triton(
    x: torch.Tensor, ids: torch.Tensor, n_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by id; per (cluster, chunk of rows) int64 sums merged by int64 atomics."""
    n, d = x.shape
    dev = x.device
    if x.stride(1) != 1:
        x = x.contiguous()
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (
        _INTERPRET and x.dtype == torch.bfloat16  # the interpreter mis-handles bf16
    ):
        x = x.float()
    ids = ids.to(device=dev, dtype=torch.int64)
    sums = torch.zeros((n_clusters, d), dtype=torch.int64, device=dev)
    if n == 0 or n_clusters == 0:
        return sums, torch.zeros((n_clusters,), dtype=torch.int64, device=dev)
    id_max = _read_later(ids.max())  # checked once everything is enqueued (below)
    keys = ids.clamp_min(-1) + 1  # key 0 = skipped rows
    cuda = dev.type == "cuda"
    if not cuda:
        ps = dict(CHUNK=32, BLOCK_R=8, NUM_STAGES=1, num_warps=1)
    elif n_clusters <= 4096:  # swept on H100; the sums are exact whatever this is
        ps = dict(CHUNK=1024, BLOCK_R=8, NUM_STAGES=3, num_warps=4)
    else:
        ps = dict(CHUNK=1024, BLOCK_R=2, NUM_STAGES=4, num_warps=4)
    ps.update(_PS_OVERRIDE or {})
    # ids >= n_clusters fall past the last segment bound: never summed, so validating
    # after the launch is safe, and the host never stalls the GPU before the work
    perm, ik, ipos, iend, counts = _work_items(keys, n_clusters + 1, ps["CHUNK"])
    block_d = min(triton.next_power_of_2(d), 1024) if cuda else 32
    _partial_sums_kernel[(ik.numel(), triton.cdiv(d, block_d))](
        x, perm, ik, ipos, iend, sums, d, x.stride(0), float(2**FIXED_POINT_BITS),
        BLOCK_D=block_d, **ps)
    if id_max() >= n_clusters:
        raise ValueError("ids must be < n_clusters")
    return sums, counts[1:]


_PS_OVERRIDE: dict | None = None  # benchmarks set this to sweep partial-sum configs
