"""Host side of the Triton assignment: input preparation, the centroid cache, out-of-memory
retry, the split-K top-2 merge and the bucketing of a tree level's rows by parent.

Determinism: the launch config depends on (dtype, D, K) only (``launch``), never on N.
Splitting the centroid axis across programs (for small N) is merged by an exact top-2 merge
with lowest-index tie-break, so it changes nothing. Nothing here waits for the GPU before a
launch: validation reads its verdict after the kernel is enqueued (``read_later``).

Imports Triton: ``mdf_taxonomy.kernels`` loads it only when Triton is wanted.
"""

from __future__ import annotations

import functools
import weakref

import torch
import triton

from .assign_kernels import INTERPRET, launch_assign
from .launch import DEFAULT_TUNING, KernelTuning, n_sms, use_ws
from .metrics import check_metric, finish_distance


def prep(x: torch.Tensor, centroids: torch.Tensor, metric: str):
    """(x as the kernel reads it, centroids cast to its dtype, their fp32 ||c||^2)."""
    check_metric(metric)
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"bad shapes x={tuple(x.shape)} centroids={tuple(centroids.shape)}")
    x = kernel_input(x)
    c, cn = _prepared_centroids(centroids, x.dtype, x.device, metric == "l2")
    return x, c, cn


def kernel_input(x: torch.Tensor) -> torch.Tensor:
    """Rows as the kernels read them: fp32, bf16 or fp16 with unit stride along D."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (
        INTERPRET and x.dtype == torch.bfloat16  # the interpreter mis-handles bf16
    ):
        x = x.float()
    return x if x.stride(1) == 1 else x.contiguous()


def clear_caches() -> None:
    """Forget every prepared centroid set and level summary (tests; freeing memory)."""
    _CENTROID_CACHE.clear()


def cache_size() -> int:
    """Entries in the centroid cache (at most ``CACHE_SIZE``)."""
    return len(_CENTROID_CACHE)


# (id(tensor), what...) -> (weakref to the tensor, its version, prepared value)
_CENTROID_CACHE: dict = {}
CACHE_MIN_ELEMS = 1 << 24  # off CUDA only large sets (a tree level) are worth caching
CACHE_SIZE = 8  # a 3-level tree's centroids and child offsets, with room to spare


def cached_for(centroids: torch.Tensor, what: tuple, build, always: bool = False):
    """``build()`` for these centroids (or a level's child offsets: ``always``), cached per
    tensor.

    A grouped level can hold ~1M centroids: casting and norming them on every call would
    cost as much as the kernel. On CUDA every set is cached: even small sets' norm
    launches stall the GPU. The cache is keyed on the tensor's identity (weakref) and its
    in-place version counter, so any change to the tensor through torch (any view)
    rebuilds; writes that bypass the counter (``.data``, DLPack) are not seen. It holds at
    most ``CACHE_SIZE`` entries.
    """
    key = (id(centroids), *what)
    hit = _CENTROID_CACHE.get(key)
    if hit is not None and hit[0]() is centroids and hit[1] == centroids._version:
        return hit[2]
    value = build()
    if always or centroids.is_cuda or centroids.numel() >= CACHE_MIN_ELEMS:
        for k in [k for k, v in _CENTROID_CACHE.items() if v[0]() is None]:
            del _CENTROID_CACHE[k]
        while len(_CENTROID_CACHE) >= CACHE_SIZE:
            del _CENTROID_CACHE[next(iter(_CENTROID_CACHE))]
        _CENTROID_CACHE[key] = (weakref.ref(centroids), centroids._version, value)
    return value


def offsets_info(child_offsets: torch.Tensor) -> tuple[int, int, int, int]:
    """(parents, widest children block, first block's [lo, hi)) of a level, worked out once
    per offsets tensor (one read-back on CUDA, cached like centroids): the launch config
    needs the widest block, and labelling a level must not wait for the GPU."""

    def build():
        o = child_offsets.to(torch.int64)
        if o.dim() != 1 or o.numel() < 2:
            raise ValueError(f"child_offsets must be 1-D with >= 2 entries, got {tuple(o.shape)}")
        return tuple(torch.stack([(o[1:] - o[:-1]).max(), o[0], o[1]]).tolist())

    widest, lo, hi = cached_for(child_offsets, ("offsets",), build, always=True)
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

    c, cn = cached_for(centroids, (dtype, str(device), l2), build)
    return (centroids if c is None else c), cn


def empty_out(n: int, device, with_second: bool, filled: bool = True):
    """Output buffers; ``filled`` with (-1, +inf, +inf) where the kernel may skip rows."""
    if not filled:
        new = functools.partial(torch.empty, n, device=device)
        return (
            new(dtype=torch.int64),
            new(dtype=torch.float32),
            new(dtype=torch.float32) if with_second else None,
        )
    ids = torch.full((n,), -1, dtype=torch.int64, device=device)
    dist = torch.full((n,), float("inf"), dtype=torch.float32, device=device)
    sec = (
        torch.full((n,), float("inf"), dtype=torch.float32, device=device) if with_second else None
    )
    return ids, dist, sec


def read_later(t: torch.Tensor):
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


def with_oom_retry(fn, x: torch.Tensor, *rest_rowwise):
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
        a = with_oom_retry(fn, x[:h], *[None if r is None else r[:h] for r in rest_rowwise])
        b = with_oom_retry(fn, x[h:], *[None if r is None else r[h:] for r in rest_rowwise])
        return tuple(None if u is None else torch.cat([u, v]) for u, v in zip(a, b, strict=True))


def _assign_prepared(
    x: torch.Tensor,
    c: torch.Tensor,
    cn: torch.Tensor,
    metric: str,
    with_second: bool,
    cfg: dict | None = None,
    x_sqnorm: torch.Tensor | None = None,
    tuning: KernelTuning = DEFAULT_TUNING,
):
    """Assignment on prepared inputs (x as the kernel reads it, c cast, cn its norms):
    (ids, dist, sec, ||x||^2 or None).

    ``cfg`` fixes the launch config (grouped single-parent calls pass the level's config
    so a row's arithmetic is the one of the grouped kernel); else from ``tuning``.
    Where the Gluon kernel serves the call, its bits are this kernel's for any config.
    ``x_sqnorm`` (l2): the rows' ||x||^2 from an earlier call, read instead of computed.
    """
    l2 = metric == "l2"

    def run(xs: torch.Tensor, xg: torch.Tensor | None):
        n, d = xs.shape
        k = c.shape[0]
        ids, dist, sec = empty_out(n, xs.device, with_second, filled=k == 0)
        if n == 0 or k == 0:
            return ids, dist, sec, xg
        xn = _sqnorm_buffer(xg, dist, l2)
        conf = cfg or tuning.assign_config(xs.dtype, d, k, xs.device)
        bm, bn = conf["BLOCK_M"], conf["BLOCK_N"]
        row_blocks = triton.cdiv(n, bm)
        c_tiles = triton.cdiv(k, bn)
        # too few row blocks to fill the GPU: split the centroid axis too
        splits = max(1, min(c_tiles, (2 * n_sms(xs.device)) // row_blocks))
        tps = triton.cdiv(c_tiles, splits)
        splits = triton.cdiv(c_tiles, tps)
        opts = dict(metric=metric, with_second=with_second, k=k, xn=xn, xn_given=xg is not None)
        if splits == 1 and use_ws(xs, c, metric, k, tuning):  # same bits as the tl kernel
            from . import gluon_kernels

            gluon_kernels.assign_ws(
                xs, c, cn, ids, dist, sec, metric=metric, xn=xn, xn_given=xg is not None
            )
            return ids, dist, sec, xn
        if splits == 1:
            launch_assign((row_blocks,), xs, c, cn, ids, dist, sec, conf, **opts)
            return ids, dist, sec, xn
        pids = torch.empty((splits, n), dtype=torch.int64, device=xs.device)
        pbest = torch.empty((splits, n), dtype=torch.float32, device=xs.device)
        psec = (
            torch.empty((splits, n), dtype=torch.float32, device=xs.device) if with_second else None
        )
        launch_assign(
            (row_blocks, splits),
            xs,
            c,
            cn,
            pids,
            pbest,
            psec,
            conf,
            split=True,
            tiles_per_split=tps,
            **opts,
        )
        # exact top-2 merge over splits (lowest split = lowest ids win ties)
        b, arg = pbest.min(dim=0)
        ids = pids.gather(0, arg[None])[0]
        if with_second:
            others = pbest.scatter(0, arg[None], float("inf")).min(dim=0).values
            sec = torch.minimum(psec.gather(0, arg[None])[0], others)
        dist = finish_distance(b, xn, metric)  # the fp32 ops of the kernel's epilogue
        if with_second:
            sec = finish_distance(sec, xn, metric)
        return ids, dist, sec, xn

    return with_oom_retry(run, x, sqnorm_in(x_sqnorm, x, metric))


def sqnorm_in(x_sqnorm: torch.Tensor | None, x: torch.Tensor, metric: str) -> torch.Tensor | None:
    """The caller's ||x||^2 for these rows, validated; None where there is nothing to read
    (none given, or cosine, which has no ||x||^2)."""
    if x_sqnorm is None or metric != "l2":
        return None
    if (
        x_sqnorm.shape != (x.shape[0],)
        or x_sqnorm.dtype != torch.float32
        or x_sqnorm.device != x.device
    ):
        raise ValueError(
            f"x_sqnorm must be float32 of shape ({x.shape[0]},) on {x.device} (a previous "
            f"call's Assignment.x_sqnorm for these rows), got {x_sqnorm.dtype} "
            f"{tuple(x_sqnorm.shape)} on {x_sqnorm.device}"
        )
    return x_sqnorm


def _sqnorm_buffer(given: torch.Tensor | None, dist: torch.Tensor, l2: bool) -> torch.Tensor | None:
    """Where an l2 kernel reads ||x||^2 (``given``) or writes the values it computes."""
    if not l2:
        return None
    return given if given is not None else torch.empty_like(dist)


def assign_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    metric: str = "l2",
    with_second: bool = False,
    x_sqnorm: torch.Tensor | None = None,
    tuning: KernelTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Fused nearest-centroid search (``assign_kernels``). Returns (ids, dist, second,
    ||x||^2 (l2) or None)."""
    x, c, cn = prep(x, centroids, metric)
    return _assign_prepared(
        x, c, cn, metric, with_second, x_sqnorm=x_sqnorm, tuning=tuning or DEFAULT_TUNING
    )


def work_items(keys: torch.Tensor, n_keys: int, block: int):
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
    tuning: KernelTuning | None = None,
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
    tuning = tuning or DEFAULT_TUNING
    x, c, cn = prep(x, centroids, metric)
    n_parents, widest, lo, hi = offsets_info(child_offsets)
    groups = groups.to(device=x.device, dtype=torch.int64)
    n, d = x.shape
    if n == 0 or c.shape[0] == 0:
        return *empty_out(n, x.device, with_second), x_sqnorm
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    group_range = read_later(torch.stack(torch.aminmax(groups)))
    # a row meets at most `widest` centroids: that is the K that the config is tuned for
    cfg = tuning.assign_config(x.dtype, d, widest, x.device)
    if n_parents == 1:
        ids, dist, sec, xn = _assign_prepared(
            x,
            c[lo:hi],
            cn[lo:hi] if metric == "l2" else cn,
            metric,
            with_second,
            cfg,
            x_sqnorm=x_sqnorm,
            tuning=tuning,
        )
        if lo and hi > lo:
            ids += lo
    else:
        offs = child_offsets.to(device=x.device, dtype=torch.int64)
        # many parents: children blocks come from HBM rather than L2; a deeper pipeline
        # hides the HBM latency, and the ||x||^2 pass goes first so the rows are still in
        # L2 for the tiles' re-reads. The arithmetic is unchanged, so the paths stay
        # bit-identical.
        bucket_cfg = (
            dict(cfg, num_stages=4, XN_FIRST=True) if x.is_cuda and tuning.assign is None else cfg
        )

        def run(xs: torch.Tensor, gs: torch.Tensor, xg: torch.Tensor | None):
            ids, dist, sec = empty_out(xs.shape[0], xs.device, with_second)
            xn = _sqnorm_buffer(xg, dist, metric == "l2")  # every row is in a work item
            perm, ip, ipos, iend, _ = work_items(gs, n_parents, cfg["BLOCK_M"])
            launch_assign(
                (ip.numel(),),
                xs,
                c,
                cn,
                ids,
                dist,
                sec,
                bucket_cfg,
                metric=metric,
                with_second=with_second,
                k=c.shape[0],
                xn=xn,
                xn_given=xg is not None,
                grouped=(perm, ip, ipos, iend, offs),
            )
            return ids, dist, sec, xn

        ids, dist, sec, xn = with_oom_retry(run, x, groups, sqnorm_in(x_sqnorm, x, metric))
    gmin, gmax = group_range()
    if gmin < 0 or gmax >= n_parents:
        raise ValueError(f"group ids must lie in [0, {n_parents}), got [{gmin}, {gmax}]")
    return ids, dist, sec, xn
