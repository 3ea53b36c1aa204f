"""Torch reference kernels: the oracle for tests and the CPU production path.

Why a reference at all: every fast kernel is checked against these functions, and on
machines without a GPU these *are* the kernels. They are memory-bounded (the temporary
distance block stays under ``BLOCK_BUDGET_BYTES``) and never build the full N x K matrix.

Per-row determinism: the centroid axis is always cut into the same fixed chunks of
``CENTROID_CHUNK`` rows, whatever N is, and the running top-2 merge is done in the same
order. The scores are computed in float64 and rounded to float32 only at the end: BLAS
picks its reduction order by matrix shape (a 1-row batch goes through gemv), which moved
fp32 distances by an ulp between batch sizes; in float64 that perturbation (~1e-16
relative) changes the rounded float32 result or the argmin only for exact or ~1e-16
near-ties (duplicated centroids), which is the residual caveat.
"""

from __future__ import annotations

import torch

FIXED_POINT_BITS: int = 24
_SCALE = float(2**FIXED_POINT_BITS)

#: Centroids per chunk; fixed so per-row results do not depend on N.
CENTROID_CHUNK: int = 4096
#: Upper bound for the temporary fp64 score block (and the int64 quantised block).
BLOCK_BUDGET_BYTES: int = 256 * 2**20

_INF = float("inf")


def _rows_per_chunk(n_cols: int, bytes_per_elem: int, copies: int = 3) -> int:
    return max(1, BLOCK_BUDGET_BYTES // max(1, n_cols * bytes_per_elem * copies))


def _check_metric(metric: str) -> None:
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")


def _top2_block(
    xf: torch.Tensor,
    xn: torch.Tensor | None,
    cf: torch.Tensor,
    cn: torch.Tensor | None,
    metric: str,
    with_second: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-1 (+ second) of the ranking score over all centroids of ``cf`` for rows ``xf``.

    The score is ``||c||^2 - 2 x.c`` (l2) or ``-x.c`` (cosine): the row constant is added
    at the end, as the Triton kernel does, so both rank the same numbers.
    """
    n = xf.shape[0]
    k = cf.shape[0]
    dev = xf.device
    best = torch.full((n,), _INF, dtype=torch.float64, device=dev)
    best_id = torch.full((n,), -1, dtype=torch.int64, device=dev)
    second = torch.full((n,), _INF, dtype=torch.float64, device=dev) if with_second else None
    for c0 in range(0, k, CENTROID_CHUNK):
        cc = cf[c0 : c0 + CENTROID_CHUNK]
        if metric == "l2":
            s = torch.addmm(cn[c0 : c0 + CENTROID_CHUNK][None, :], xf, cc.T, alpha=-2.0)
        else:
            s = torch.mm(xf, cc.T).neg_()
        tmin, targ = s.min(dim=1)  # first occurrence on ties
        if with_second:
            s.scatter_(1, targ[:, None], _INF)
            tsec = s.min(dim=1).values
            take = tmin < best
            second = torch.where(take, torch.minimum(best, tsec), torch.minimum(second, tmin))
        else:
            take = tmin < best
        best = torch.where(take, tmin, best)
        best_id = torch.where(take, targ + c0, best_id)
    return best, best_id, second


def _finish(
    best: torch.Tensor, xn: torch.Tensor | None, metric: str
) -> torch.Tensor:
    if metric == "l2":
        return (best + xn).clamp_min_(0.0).to(torch.float32)
    return (best + 1.0).to(torch.float32)


def assign_torch(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    metric: str = "l2",
    with_second: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest centroid per row (fp64 scores, fp32 output), chunked over rows and centroids."""
    _check_metric(metric)
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"bad shapes x={tuple(x.shape)} centroids={tuple(centroids.shape)}")
    n = x.shape[0]
    dev = x.device
    ids = torch.full((n,), -1, dtype=torch.int64, device=dev)
    dist = torch.full((n,), _INF, dtype=torch.float32, device=dev)
    sec = torch.full((n,), _INF, dtype=torch.float32, device=dev) if with_second else None
    k = centroids.shape[0]
    if n == 0 or k == 0:
        return ids, dist, sec
    cf = centroids.to(device=dev, dtype=torch.float64)
    cn = (cf * cf).sum(1) if metric == "l2" else None
    rows = _rows_per_chunk(min(k, CENTROID_CHUNK), 8)
    r0 = 0
    while r0 < n:
        try:
            xf = x[r0 : r0 + rows].to(torch.float64)
            xn = (xf * xf).sum(1) if metric == "l2" else None
            b, bi, s2 = _top2_block(xf, xn, cf, cn, metric, with_second)
        except torch.OutOfMemoryError:  # shrink the chunk rather than fail
            if rows == 1:
                raise
            rows = max(1, rows // 2)
            continue
        m = b.shape[0]
        ids[r0 : r0 + m] = bi
        dist[r0 : r0 + m] = _finish(b, xn, metric)
        if with_second:
            sec[r0 : r0 + m] = _finish(s2, xn, metric)
        r0 += m
    return ids, dist, sec


def grouped_assign_torch(
    x: torch.Tensor,
    groups: torch.Tensor,
    centroids: torch.Tensor,
    child_offsets: torch.Tensor,
    *,
    metric: str = "l2",
    with_second: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row against its parent's children block only; one ``assign_torch`` per parent.

    Rows are bucketed by parent (a stable sort); the per-row result equals
    ``assign_torch`` of that row against ``centroids[off[p]:off[p+1]]`` shifted by off[p].
    """
    _check_metric(metric)
    n = x.shape[0]
    dev = x.device
    ids = torch.full((n,), -1, dtype=torch.int64, device=dev)
    dist = torch.full((n,), _INF, dtype=torch.float32, device=dev)
    sec = torch.full((n,), _INF, dtype=torch.float32, device=dev) if with_second else None
    if n == 0:
        return ids, dist, sec
    groups = groups.to(device=dev, dtype=torch.int64)
    offs = child_offsets.to(dtype=torch.int64).cpu()
    n_parents = offs.numel() - 1
    if groups.shape != (n,):
        raise ValueError("groups must have shape (N,)")
    gmin, gmax = int(groups.min()), int(groups.max())
    if gmin < 0 or gmax >= n_parents:
        raise ValueError(f"group ids must lie in [0, {n_parents}), got [{gmin}, {gmax}]")
    order = torch.argsort(groups, stable=True)
    uniq, counts = torch.unique_consecutive(groups[order], return_counts=True)
    start = 0
    for p, cnt in zip(uniq.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + cnt]
        start += cnt
        a, b = int(offs[p]), int(offs[p + 1])
        if b <= a:
            continue  # no children: -1 / inf
        i, d, s = assign_torch(x[rows], centroids[a:b], metric=metric, with_second=with_second)
        ids[rows] = i + a
        dist[rows] = d
        if with_second:
            sec[rows] = s
    return ids, dist, sec


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Fixed point: floor(x * 2**FIXED_POINT_BITS + 0.5) in fp64 (exact for |x| < 2**28)."""
    return torch.floor(x.to(torch.float64) * _SCALE + 0.5).to(torch.int64)


def partial_sums_torch(
    x: torch.Tensor, ids: torch.Tensor, n_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Int64 fixed-point sums and counts per id; exact, so independent of row order."""
    n, d = x.shape
    dev = x.device
    sums = torch.zeros((n_clusters, d), dtype=torch.int64, device=dev)
    ids = ids.to(device=dev, dtype=torch.int64)
    keep = ids >= 0
    if n and int(ids.max()) >= n_clusters:
        raise ValueError("ids must be < n_clusters")
    counts = torch.bincount(ids[keep], minlength=n_clusters)[:n_clusters].to(torch.int64)
    rows = _rows_per_chunk(d, 8, copies=2)
    for r0 in range(0, n, rows):
        k = keep[r0 : r0 + rows]
        sums.index_add_(0, ids[r0 : r0 + rows][k], quantize(x[r0 : r0 + rows][k]))
    return sums, counts


def from_fixed_point(sums: torch.Tensor) -> torch.Tensor:
    """Int64 fixed-point sums back to float64."""
    return sums.to(torch.float64) / _SCALE
