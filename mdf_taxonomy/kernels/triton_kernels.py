"""Triton kernels: fused assignment (plain and grouped) and exact partial sums.

Assignment is a tiled GEMM (rows x centroids, reduced over D on tensor cores) whose
epilogue keeps a running top-2 per row in registers, so the N x K distance matrix is
never written. The ranking score is ``||c||^2 - 2 x.c`` (l2) or ``-x.c`` (cosine); the
row constant ``||x||^2`` is added once at the end. bf16/fp16 inputs run on bf16/fp16
tensor cores (centroids are cast to the input dtype); fp32 inputs use 3xTF32, which is
close to fp32 accuracy.

Determinism: the launch configuration depends on (dtype, D, K) only, never on N, and a
row's arithmetic does not depend on the other rows of its tile, so a row's result does
not depend on the batch. Splitting the centroid axis across programs (for small N) is
merged by an exact top-2 merge with lowest-index tie-break, so it changes nothing.
Partial sums quantise to int64 fixed point and reduce with integer adds (exact,
order-free).

Import this module only when Triton is wanted; ``mdf_taxonomy.kernels`` does it lazily.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from .reference import FIXED_POINT_BITS

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tile_dot(x_rows, c_ptr, c0, c_hi, offs_n, offs_k, xn, stride_c,
              D: tl.constexpr, EVEN_D: tl.constexpr,
              IS_FP32: tl.constexpr, WANT_XN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x_block @ c_tile^T over D on tensor cores (+ ||x||^2 when WANT_XN).

    Row and column indices are clamped into range by the caller / here, so loads need
    no row/column masks (out-of-range lanes read a valid row; their results are masked
    at the score or the store).
    """
    cols = tl.maximum(tl.minimum(c0 + offs_n, c_hi - 1), 0)
    c_rows = c_ptr + cols.to(tl.int64)[:, None] * stride_c
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        if EVEN_D:
            a = tl.load(x_rows + kk[None, :])
            b = tl.load(c_rows + kk[None, :])
        else:
            a = tl.load(x_rows + kk[None, :], mask=kk[None, :] < D, other=0.0)
            b = tl.load(c_rows + kk[None, :], mask=kk[None, :] < D, other=0.0)
        if WANT_XN:  # a separate load: reusing `a` miscompiled (see _assign_kernel)
            if EVEN_D:
                xv = tl.load(x_rows + kk[None, :])
            else:
                xv = tl.load(x_rows + kk[None, :], mask=kk[None, :] < D, other=0.0)
            xv = xv.to(tl.float32)
            xn += tl.sum(xv * xv, axis=1)
        if IS_FP32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc, xn


@triton.jit
def _load_cn(cn_ptr, c0, c_hi, offs_n, L2: tl.constexpr):
    """||c||^2 of one centroid tile (l2 only; issued early so its latency is hidden)."""
    if L2:
        cols = c0 + offs_n
        cn = tl.load(cn_ptr + cols, mask=cols < c_hi, other=0.0)
    else:
        cn = tl.zeros_like(offs_n).to(tl.float32)
    return cn


@triton.jit
def _top2_update(acc, cn, c0, c_hi, offs_n, best, best_id, second,
                 L2: tl.constexpr, EVEN_N: tl.constexpr, WITH_SECOND: tl.constexpr):
    """Fold one tile's scores into the running top-2 (strict <: lowest id wins ties)."""
    cols = c0 + offs_n
    col_mask = cols < c_hi
    if L2:
        s = cn[None, :] - 2.0 * acc
    else:
        s = -acc
    if not EVEN_N:
        s = tl.where(col_mask[None, :], s, float("inf"))
    tmin, targ = tl.min(s, axis=1, return_indices=True)
    take = tmin < best
    if WITH_SECOND:
        s2 = tl.where(offs_n[None, :] == targ[:, None], float("inf"), s)
        tsec = tl.min(s2, axis=1)
        second = tl.where(take, tl.minimum(best, tsec), tl.minimum(second, tmin))
    best = tl.where(take, tmin, best)
    best_id = tl.where(take, targ + c0, best_id)
    return best, best_id, second


# --------------------------------------------------------------------------- assignment
@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, cn_ptr,
    ids_ptr, dist_ptr, sec_ptr, xn_ptr,
    perm_ptr, item_parent_ptr, item_pos_ptr, item_end_ptr, child_off_ptr,
    N, K, stride_x, stride_c, tiles_per_split, D: tl.constexpr,
    L2: tl.constexpr, WITH_SECOND: tl.constexpr, GROUPED: tl.constexpr,
    SPLIT: tl.constexpr, IS_FP32: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr, PERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLATTEN: tl.constexpr, WS: tl.constexpr, XN_MODE: tl.constexpr, FLAT: tl.constexpr,
):
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
        if PERM:
            rows = tl.load(perm_ptr + pos, mask=row_mask, other=0)
        else:  # rows already sorted by parent: positions are rows
            rows = tl.minimum(pos, N - 1)
        c_lo = tl.load(child_off_ptr + parent).to(tl.int32)
        c_hi = tl.load(child_off_ptr + parent + 1).to(tl.int32)
        c_hi = tl.where(pos0 < pos_end, c_hi, c_lo)  # empty (padding) item: no work
    else:
        rows = pid * BLOCK_M + offs_m
        row_mask = rows < N
        rows = tl.minimum(rows, N - 1)  # loads stay in range; stores use row_mask
        c_lo = 0
        c_hi = K
        if SPLIT:
            c_lo = tl.program_id(1) * tiles_per_split * BLOCK_N
            c_hi = tl.minimum(c_lo + tiles_per_split * BLOCK_N, K)
    rows = rows.to(tl.int64)  # masked lanes hold a valid row index (clamped / perm 0)
    x_rows = x_ptr + rows[:, None] * stride_x

    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_id = tl.full((BLOCK_M,), -1, tl.int32)
    second = tl.full((BLOCK_M,), float("inf"), tl.float32)
    # ||x||^2 (L2 only). XN_MODE 0: a separate pass after the main loop (default,
    # validated); 2: first centroid tile peeled and x re-loaded there for the norm;
    # 3: a pass before the main loop. Reusing the dot's own x tile for the norm (tried as
    # mode 1) was fast but gave wrong results on H100 with triton 3.6: not used.
    xn = tl.zeros((BLOCK_M,), tl.float32)
    start = c_lo
    if L2 and XN_MODE == 3:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            xv = tl.load(x_rows + kk[None, :], mask=kk[None, :] < D, other=0.0).to(tl.float32)
            xn += tl.sum(xv * xv, axis=1)
    if FLAT:
        # One loop over (centroid tile x D chunk): the software pipeline keeps loading the
        # next tile's operands while a tile's top-2 epilogue runs, instead of draining and
        # refilling at every tile (needs D % BLOCK_K == 0; the host ensures it).
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        n_it = tl.cdiv(c_hi - c_lo, BLOCK_N) * (D // BLOCK_K)
        for t in tl.range(0, n_it):
            kq = t % (D // BLOCK_K)
            c0 = c_lo + (t // (D // BLOCK_K)) * BLOCK_N
            cols = tl.maximum(tl.minimum(c0 + offs_n, c_hi - 1), 0)
            kk = kq * BLOCK_K + offs_k
            a = tl.load(x_rows + kk[None, :])
            b = tl.load(c_ptr + cols.to(tl.int64)[:, None] * stride_c + kk[None, :])
            cn = _load_cn(cn_ptr, c0, c_hi, offs_n, L2)
            if IS_FP32:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32x3")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
            if kq == D // BLOCK_K - 1:
                best, best_id, second = _top2_update(acc, cn, c0, c_hi, offs_n, best,
                                                     best_id, second, L2, EVEN_N,
                                                     WITH_SECOND)
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    else:
        if XN_MODE == 2:
            cn = _load_cn(cn_ptr, c_lo, c_hi, offs_n, L2)
            acc, xn = _tile_dot(x_rows, c_ptr, c_lo, c_hi, offs_n, offs_k, xn,
                                stride_c, D, EVEN_D, IS_FP32, L2,
                                BLOCK_M, BLOCK_N, BLOCK_K)
            best, best_id, second = _top2_update(acc, cn, c_lo, c_hi, offs_n, best,
                                                 best_id, second, L2, EVEN_N, WITH_SECOND)
            start = c_lo + BLOCK_N
        for c0 in tl.range(start, c_hi, BLOCK_N, flatten=FLATTEN, warp_specialize=WS):
            cn = _load_cn(cn_ptr, c0, c_hi, offs_n, L2)  # before the D loop: latency hidden
            acc, xn = _tile_dot(x_rows, c_ptr, c0, c_hi, offs_n, offs_k, xn, stride_c,
                                D, EVEN_D, IS_FP32, False,
                                BLOCK_M, BLOCK_N, BLOCK_K)
            best, best_id, second = _top2_update(acc, cn, c0, c_hi, offs_n, best, best_id,
                                                 second, L2, EVEN_N, WITH_SECOND)
    if L2 and XN_MODE == 0:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            xv = tl.load(x_rows + kk[None, :], mask=kk[None, :] < D, other=0.0).to(tl.float32)
            xn += tl.sum(xv * xv, axis=1)

    if SPLIT:  # raw scores; merged (and finished) on the host side
        out = tl.program_id(1).to(tl.int64) * N + rows
        tl.store(ids_ptr + out, best_id.to(tl.int64), mask=row_mask)
        tl.store(dist_ptr + out, best, mask=row_mask)
        if WITH_SECOND:
            tl.store(sec_ptr + out, second, mask=row_mask)
        if L2:
            tl.store(xn_ptr + rows, xn, mask=row_mask)  # every split writes the same value
    else:
        if L2:
            dist = tl.maximum(best + xn, 0.0)
            if WITH_SECOND:
                second = tl.maximum(second + xn, 0.0)
        else:
            dist = best + 1.0
            if WITH_SECOND:
                second = second + 1.0
        tl.store(ids_ptr + rows, best_id.to(tl.int64), mask=row_mask)
        tl.store(dist_ptr + rows, dist, mask=row_mask)
        if WITH_SECOND:
            tl.store(sec_ptr + rows, second, mask=row_mask)


def _config(dtype: torch.dtype, d: int, k: int, device: torch.device) -> dict:
    """Launch config from (dtype, D, K, device type) only: never from N (determinism)."""
    if device.type != "cuda":  # interpreter: tiny tiles keep it quick
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1,
                    FLATTEN=False, WS=False, XN_MODE=0, FLAT=False)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3,
                    FLATTEN=False, WS=False, XN_MODE=0, FLAT=False)
    # swept on H100 (benchmarks/NOTES_kernels.md). FLAT (one loop over tile x D chunk) is
    # validated but measured 5-8 points slower (v8); BLOCK_K 32/128 at these tile shapes
    # gave wrong ||x||^2 on the GPU (sweep gate): keep BLOCK_K=64 here.
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3,
                FLATTEN=False, WS=False, XN_MODE=0, FLAT=False)


def _launch_cfg(cfg: dict, d: int) -> dict:
    """Kernel meta-parameters: FLAT needs D % BLOCK_K == 0 and computes ||x||^2 in mode 0
    or 3 only."""
    cfg = dict(cfg)
    cfg.setdefault("FLAT", False)
    if d % cfg["BLOCK_K"]:
        cfg["FLAT"] = False
    if cfg["FLAT"] and cfg.get("XN_MODE", 0) == 2:
        cfg["XN_MODE"] = 0
    return cfg


_OVERRIDE: dict | None = None  # benchmarks set this to sweep configs


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


# (id(centroids), dtype, device, l2) -> (weakref, version, cast copy or None, ||c||^2)
_CENTROID_CACHE: dict = {}
_CACHE_MIN_ELEMS = 1 << 24  # only large centroid sets (a tree level) are worth caching


def _prepared_centroids(centroids: torch.Tensor, dtype, device, l2: bool):
    """Centroids cast to the input dtype and their fp32 squared norms, cached per tensor.

    A grouped level can hold ~1M centroids: casting and norming them on every call cost
    more than the kernel (measured 7 ms of 13 ms per level). The cache is keyed on the
    tensor's identity (weakref) and its in-place version counter, so any change to the
    centroids (through any view) recomputes.
    """
    key = (id(centroids), dtype, str(device), l2)
    hit = _CENTROID_CACHE.get(key)
    if hit is not None and hit[0]() is centroids and hit[1] == centroids._version:
        return (centroids if hit[2] is None else hit[2]), hit[3]
    c = centroids.to(device=device, dtype=dtype).contiguous()
    if l2:
        cn = torch.empty(c.shape[0], dtype=torch.float32, device=device)
        for i in range(0, c.shape[0], 1 << 16):  # bounded fp32 temporaries
            cn[i : i + (1 << 16)] = c[i : i + (1 << 16)].float().pow(2).sum(1)
    else:
        cn = c.new_empty(1, dtype=torch.float32)
    if centroids.numel() >= _CACHE_MIN_ELEMS:
        for k in [k for k, v in _CENTROID_CACHE.items() if v[0]() is None]:
            del _CENTROID_CACHE[k]
        while len(_CENTROID_CACHE) >= 4:
            del _CENTROID_CACHE[next(iter(_CENTROID_CACHE))]
        copy = None if c.data_ptr() == centroids.data_ptr() else c
        _CENTROID_CACHE[key] = (weakref.ref(centroids), centroids._version, copy, cn)
    return c, cn


def _empty_out(n: int, device, with_second: bool):
    ids = torch.full((n,), -1, dtype=torch.int64, device=device)
    dist = torch.full((n,), float("inf"), dtype=torch.float32, device=device)
    sec = torch.full((n,), float("inf"), dtype=torch.float32, device=device) if with_second \
        else None
    return ids, dist, sec


def _n_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _with_oom_retry(fn, x: torch.Tensor, *rest_rowwise, with_second: bool):
    """Run ``fn`` on all rows; on CUDA OOM, run it on halves (recursively)."""
    try:
        return fn(x, *rest_rowwise)
    except torch.OutOfMemoryError:
        n = x.shape[0]
        if n <= 1:
            raise
        torch.cuda.empty_cache()
        h = n // 2
        a = _with_oom_retry(fn, x[:h], *[r[:h] for r in rest_rowwise], with_second=with_second)
        b = _with_oom_retry(fn, x[h:], *[r[h:] for r in rest_rowwise], with_second=with_second)
        return (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]),
                torch.cat([a[2], b[2]]) if with_second else None)


def _assign_prepared(x: torch.Tensor, c: torch.Tensor, cn: torch.Tensor, metric: str,
                     with_second: bool, cfg: dict | None = None):
    """Assignment on prepared inputs (x as the kernel reads it, c cast, cn its norms).

    ``cfg`` fixes the launch config (grouped single-parent calls pass the level's config
    so a row's arithmetic is the one of the grouped kernel); else it comes from _config.
    """

    def run(xs: torch.Tensor):
        n, d = xs.shape
        k = c.shape[0]
        ids, dist, sec = _empty_out(n, xs.device, with_second)
        if n == 0 or k == 0:
            return ids, dist, sec
        conf = _launch_cfg(cfg or _OVERRIDE or _config(xs.dtype, d, k, xs.device), d)
        bm, bn = conf["BLOCK_M"], conf["BLOCK_N"]
        row_blocks = triton.cdiv(n, bm)
        c_tiles = triton.cdiv(k, bn)
        # too few row blocks to fill the GPU: split the centroid axis too
        splits = max(1, min(c_tiles, (2 * _n_sms(xs.device)) // row_blocks))
        tps = triton.cdiv(c_tiles, splits)
        splits = triton.cdiv(c_tiles, tps)
        dummy = ids
        common = dict(
            L2=metric == "l2", WITH_SECOND=with_second, GROUPED=False, PERM=False,
            IS_FP32=xs.dtype == torch.float32, EVEN_D=d % conf["BLOCK_K"] == 0,
            EVEN_N=k % bn == 0, **conf)
        if splits == 1:
            _assign_kernel[(row_blocks,)](
                xs, c, cn, ids, dist, sec if with_second else dist, dist,
                dummy, dummy, dummy, dummy, dummy,
                n, k, xs.stride(0), c.stride(0), tps, d, SPLIT=False, **common)
            return ids, dist, sec
        pids = torch.empty((splits, n), dtype=torch.int64, device=xs.device)
        pbest = torch.empty((splits, n), dtype=torch.float32, device=xs.device)
        psec = torch.empty((splits, n), dtype=torch.float32, device=xs.device) \
            if with_second else pbest
        xn = torch.zeros(n, dtype=torch.float32, device=xs.device)
        _assign_kernel[(row_blocks, splits)](
            xs, c, cn, pids, pbest, psec, xn, dummy, dummy, dummy, dummy, dummy,
            n, k, xs.stride(0), c.stride(0), tps, d, SPLIT=True, **common)
        # exact top-2 merge over splits (lowest split = lowest ids win ties)
        b, arg = pbest.min(dim=0)
        ids = pids.gather(0, arg[None])[0]
        if with_second:
            others = pbest.scatter(0, arg[None], float("inf")).min(dim=0).values
            sec = torch.minimum(psec.gather(0, arg[None])[0], others)
        if metric == "l2":  # same fp32 add as the kernel's epilogue
            dist = (b + xn).clamp_min_(0.0)
            if with_second:
                sec = (sec + xn).clamp_min_(0.0)
        else:
            dist = b + 1.0
            if with_second:
                sec = sec + 1.0
        return ids, dist, sec

    return _with_oom_retry(run, x, with_second=with_second)


def assign_triton(
    x: torch.Tensor, centroids: torch.Tensor, *, metric: str = "l2", with_second: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused nearest-centroid search; see module docstring."""
    x, c, cn = _prep(x, centroids, metric)
    return _assign_prepared(x, c, cn, metric, with_second)


def _work_items(keys: torch.Tensor, n_keys: int, block: int, presorted: bool = False):
    """Bucket rows by key: (perm, item_key, item_pos, item_end, counts), no host sync.

    Items of <= ``block`` rows; those of one key cover consecutive positions of the
    key-sorted order (``perm``; None when ``presorted``: keys already ascending, positions
    are rows). The item count is the bound n // block + min(n_keys, n) so that nothing is
    read back to the host; items past the real count have key -1 and pos == end (empty).
    One sort of 32-bit keys; segment bounds by binary search in the sorted keys (no
    bincount, which syncs on CUDA, and no atomics).
    """
    n = keys.numel()
    dev = keys.device
    if presorted:
        perm, sk = None, keys
    else:
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One launch labels a whole tree level: each row vs its parent's children block.

    All rows under one parent (a tree's first level): the plain kernel on that children
    block, no bucketing. Rows already ascending by parent: no sort (positions are rows).
    Otherwise one 32-bit key sort; x rows are gathered through the permutation inside the
    kernel (no copy of x). Every path runs the same per-row arithmetic (same config).
    """
    x, c, cn = _prep(x, centroids, metric)
    offs = child_offsets.to(device=x.device, dtype=torch.int64).contiguous()
    n_parents = offs.numel() - 1
    groups = groups.to(device=x.device, dtype=torch.int64)
    n, d = x.shape
    if n == 0 or c.shape[0] == 0:
        return _empty_out(n, x.device, with_second)
    cfg = _launch_cfg(_OVERRIDE or _config(x.dtype, d, c.shape[0], x.device), d)
    # The bucketing is enqueued before the one host sync (validation, single-parent and
    # sortedness tests together): its ~20 small launches then overlap the GPU work queued
    # before this call (the previous tree level) instead of running on an idle GPU.
    srt = (groups[1:] >= groups[:-1]).all() if n > 1 else torch.ones((), dtype=torch.bool,
                                                                       device=x.device)
    stats = torch.stack([groups.min(), groups.max(), srt.long()])
    items = _work_items(groups, n_parents, cfg["BLOCK_M"]) if n_parents > 1 else None
    gmin, gmax, presorted = stats.tolist()
    if gmin < 0 or gmax >= n_parents:
        raise ValueError(f"group ids must lie in [0, {n_parents})")
    if gmin == gmax:
        lo, hi = offs[gmin : gmin + 2].tolist()
        ids, dist, sec = _assign_prepared(x, c[lo:hi], cn[lo:hi] if metric == "l2" else cn,
                                          metric, with_second, cfg)
        if hi > lo:
            ids += lo
        return ids, dist, sec

    def run(xs: torch.Tensor, gs: torch.Tensor):
        ids, dist, sec = _empty_out(xs.shape[0], xs.device, with_second)
        perm, ip, ipos, iend, _ = items if gs is groups else \
            _work_items(gs, n_parents, cfg["BLOCK_M"])  # an OOM retry's half
        # rows already ascending by parent: sorted positions are the rows themselves, so
        # the kernel reads x contiguously without the permutation
        _assign_kernel[(ip.numel(),)](
            xs, c, cn, ids, dist, sec if with_second else dist, dist,
            ids if presorted else perm, ip, ipos, iend, offs,
            xs.shape[0], c.shape[0], xs.stride(0), c.stride(0), 1, d,
            L2=metric == "l2", WITH_SECOND=with_second, GROUPED=True, SPLIT=False,
            PERM=not presorted, IS_FP32=xs.dtype == torch.float32,
            EVEN_D=d % cfg["BLOCK_K"] == 0, EVEN_N=False, **cfg)
        return ids, dist, sec

    return _with_oom_retry(run, x, groups, with_second=with_second)


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
    id_max = ids.max()  # read back only after everything is enqueued (below)
    keys = ids.clamp_min(-1) + 1  # key 0 = skipped rows
    cuda = dev.type == "cuda"
    if not cuda:
        ps = dict(CHUNK=32, BLOCK_R=8, NUM_STAGES=1, num_warps=1)
    elif n_clusters <= 4096:  # swept on H100 (NOTES v8); the sums are exact whatever this is
        ps = dict(CHUNK=1024, BLOCK_R=8, NUM_STAGES=3, num_warps=4)
    else:
        ps = dict(CHUNK=1024, BLOCK_R=2, NUM_STAGES=4, num_warps=4)
    ps.update(_PS_OVERRIDE or {})
    # ids >= n_clusters fall past the last segment bound: never summed, so validating
    # after the launch is safe, and the sync no longer stalls the GPU before the work
    perm, ik, ipos, iend, counts = _work_items(keys, n_clusters + 1, ps["CHUNK"])
    block_d = min(triton.next_power_of_2(d), 1024) if cuda else 32
    _partial_sums_kernel[(ik.numel(), triton.cdiv(d, block_d))](
        x, perm, ik, ipos, iend, sums, d, x.stride(0), float(2**FIXED_POINT_BITS),
        BLOCK_D=block_d, **ps)
    if int(id_max) >= n_clusters:
        raise ValueError("ids must be < n_clusters")
    return sums, counts[1:]


_PS_OVERRIDE: dict | None = None  # benchmarks set this to sweep partial-sum configs
