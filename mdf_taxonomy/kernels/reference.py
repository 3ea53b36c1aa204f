"""Torch reference kernels: the oracle for tests and the CPU production path.

Why a reference at all: every fast kernel is checked against these functions, and on
machines without a GPU these *are* the kernels. They are memory-bounded (the temporary
distance block stays under ``BLOCK_BUDGET_BYTES``) and never build the full N x K matrix.

Per-row determinism: BLAS picks its reduction order by matrix shape (a 1-row batch goes
through gemv), so a score computed by a matrix product can move by an ulp between batch
sizes. The ids therefore come from a rule whose outcome does not depend on those ulps: the
ranking scores are computed in float32 by BLAS over fixed ``CENTROID_CHUNK`` chunks, and a
rigorous per-row bound on their rounding error (``_score_bound``) decides whether the
fp32 argmin is provably the exact one; the rows where it is not (margin between best and
second <= twice the bound) are re-ranked against all centroids in float64. Either way the id
is the exact argmin (lowest id on ties): fp64 scores within the GEMM's own rounding bound
of the best (duplicated centroids, say) are settled row-wise (``rowwise.settle_ties``). The
distances are then recomputed from the chosen id row by row in float64 with a fixed
pairwise summation tree (``rowwise.distance``), so they do not depend on the batch, the
path a row took, or the thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import rowwise
from .fixed_point import quantize
from .metrics import check_metric

#: Centroids per chunk; fixed so per-row results do not depend on N.
CENTROID_CHUNK: int = 4096
#: Upper bound for the temporary score block (and the int64 quantised block).
BLOCK_BUDGET_BYTES: int = 256 * 2**20

_INF = float("inf")
_NAN = float("nan")
_U32 = 2.0**-24  # unit roundoff of float32
_TINY32 = 2.0**-126  # smallest normal float32: absolute error of an underflowed product
_U64 = 2.0**-53
_TINY64 = 2.0**-1022
_LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _rows_per_chunk(n_cols: int, bytes_per_elem: int, copies: int = 3) -> int:
    return max(1, BLOCK_BUDGET_BYTES // max(1, n_cols * bytes_per_elem * copies))


def _gamma(n: int, unit: float = _U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound of an n-term dot product (float32 default)."""
    nu = n * unit
    return nu / (1.0 - nu) if nu < 1.0 else _INF


def _fp32_prerank_allowed(x: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether the fp32 pre-ranking is sound: its error bound assumes IEEE fp32 products.

    CPU only (on CUDA, TF32 may be on; the GPU path is Triton anyway), full fp32 matmul
    precision (``"high"``/``"medium"`` let oneDNN compute fp32 products in bf16), and inputs
    that fp32 holds exactly: float64 inputs rank in float64 directly.
    """
    if x.device.type != "cpu" or x.dtype not in _LOW_PRECISION:
        return False
    if centroids.dtype not in _LOW_PRECISION:
        return False
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn_mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(mkldnn_mm, "fp32_precision", "none") in ("none", "ieee")


def _score_bound(
    x_norm: torch.Tensor,
    c_norm_max: float,
    cn_max: float,
    d: int,
    metric: str,
    unit: float = _U32,
    tiny: float = _TINY32,
) -> torch.Tensor:
    """Per-row bound on |computed score - exact score|, for every centroid and any BLAS
    order, in the precision whose unit roundoff is ``unit`` (float32 by default).

    ``x_norm``: an upper bound of ||x|| per row (fp64); ``c_norm_max``, ``cn_max``: the max
    ||c|| and ||c||^2 over the centroids. The l2 score ``||c||^2 - 2 x.c`` is a sum of D+1
    terms whose magnitudes add up to at most ``cn_max + 2 ||x|| max||c||`` (Cauchy-Schwarz),
    so any summation order is within gamma_{D+1} of it; add u for casting ||c||^2 (computed
    in fp64), u for the final rounding, an absolute term for underflowed (or flushed)
    products, and a safety factor 2 for the second-order terms.
    """
    xc = x_norm * c_norm_max
    if metric == "l2":
        mag = 2.0 * xc + cn_max
        err = (_gamma(d + 1, unit) + unit) * mag + unit * cn_max + 4.0 * (d + 1) * tiny
    else:
        err = (_gamma(d, unit) + unit) * xc + 2.0 * (d + 1) * tiny
    return 2.0 * err


def _by_row_blocks(n: int, rows: int, block: Callable[[int, int], None]) -> None:
    """block(r0, r1) over consecutive row blocks; a block that runs out of memory is
    halved and tried again rather than failing the call."""
    r0 = 0
    while r0 < n:
        r1 = min(n, r0 + rows)
        try:
            block(r0, r1)
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
            rows = max(1, rows // 2)
            continue
        r0 = r1


def _chunk_scores(
    x: torch.Tensor, c: torch.Tensor, cn: torch.Tensor | None, c0: int, metric: str
) -> torch.Tensor:
    """Ranking scores of the rows against centroids c0 : c0 + CENTROID_CHUNK, in x's dtype:
    ``||c||^2 - 2 x.c`` (l2) or ``-x.c`` (cosine); the row constant is left out."""
    cc = c[c0 : c0 + CENTROID_CHUNK]
    if metric == "l2":
        return torch.addmm(cn[c0 : c0 + CENTROID_CHUNK][None, :], x, cc.T, alpha=-2.0)
    return torch.mm(x, cc.T).neg_()


def _top2_fp32(
    xb: torch.Tensor, c32: torch.Tensor, cn32: torch.Tensor | None, metric: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 BLAS best score, second-best score and best id per row, over fixed chunks.

    The second best is taken with the best masked out, so a duplicate of the best centroid
    gives second == best (margin 0: the row is re-ranked). A NaN score leaves best = +inf or
    NaN and hence a NaN margin, which also sends the row to the fp64 path.
    """
    n = xb.shape[0]
    k = c32.shape[0]
    best = second = best_id = None
    for c0 in range(0, k, CENTROID_CHUNK):
        s = _chunk_scores(xb, c32, cn32, c0, metric)
        tmin, targ = s.min(dim=1)  # first occurrence on ties
        if s.shape[1] > 1:
            s.scatter_(1, targ[:, None], _INF)
            tsec = s.min(dim=1).values
        else:
            tsec = torch.full((n,), _INF, dtype=torch.float32, device=xb.device)
        if best is None:
            best, second, best_id = tmin, tsec, targ
            continue
        take = tmin < best
        second = torch.where(take, torch.minimum(best, tsec), torch.minimum(second, tmin))
        best = torch.where(take, tmin, best)
        best_id = torch.where(take, targ + c0, best_id)
    return best, second, best_id


def _top2_block(
    xf: torch.Tensor,
    cf: torch.Tensor,
    cn: torch.Tensor | None,
    metric: str,
    with_second: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ids of the best (and second-best) fp64 ranking score over all centroids of ``cf``.

    The score is ``||c||^2 - 2 x.c`` (l2) or ``-x.c`` (cosine): the row constant does not
    change the ranking. Ties go to the lowest id; the second best is the best of the others,
    so a duplicate of the best centroid is the second.
    """
    n = xf.shape[0]
    k = cf.shape[0]
    dev = xf.device
    best = torch.full((n,), _INF, dtype=torch.float64, device=dev)
    best_id = torch.full((n,), -1, dtype=torch.int64, device=dev)
    second = torch.full((n,), _INF, dtype=torch.float64, device=dev)
    second_id = torch.full((n,), -1, dtype=torch.int64, device=dev) if with_second else None
    for c0 in range(0, k, CENTROID_CHUNK):
        s = _chunk_scores(xf, cf, cn, c0, metric)
        tmin, targ = s.min(dim=1)  # first occurrence on ties
        take = tmin < best
        s.scatter_(1, targ[:, None], _INF)
        tsec, tsarg = s.min(dim=1)
        old_best = best <= tsec  # on a tie the earlier chunk has the lower id
        old_sec = second <= tmin
        if with_second:
            sid_if_take = torch.where(old_best, best_id, tsarg + c0)
            sid_if_keep = torch.where(old_sec, second_id, targ + c0)
            second_id = torch.where(take, sid_if_take, sid_if_keep)
        second = torch.where(
            take, torch.where(old_best, best, tsec), torch.where(old_sec, second, tmin)
        )
        best = torch.where(take, tmin, best)
        best_id = torch.where(take, targ + c0, best_id)
    _settle_ties(xf, cf, cn, metric, best, second, best_id, second_id)
    return best_id, second_id


def _settle_ties(
    xf: torch.Tensor,
    cf: torch.Tensor,
    cn: torch.Tensor | None,
    metric: str,
    best: torch.Tensor,
    second: torch.Tensor,
    best_id: torch.Tensor,
    second_id: torch.Tensor | None,
) -> None:
    """Re-decide, in place, the rows whose fp64 best and second scores lie within the
    GEMM's rounding bound of each other.

    BLAS may give two equal centroids fp64 scores an ulp apart by their place in the matrix
    (MKL does), so there the GEMM cannot pick the lowest id. Every centroid within the bound
    of such a row's best is compared by its row-wise value instead (``rowwise.pair_values``,
    lowest id on ties): the id no longer depends on the batch or on BLAS's blocking.
    """
    d = xf.shape[1]
    cn_max = float((cn if cn is not None else (cf * cf).sum(1)).max())
    x_norm = torch.linalg.vector_norm(xf, dim=1) * (1.0 + _gamma(d + 2, _U64))
    c_norm_max = math.sqrt(cn_max) * (1.0 + 2.0**-40)
    bound = _score_bound(x_norm, c_norm_max, cn_max, d, metric, _U64, _TINY64)
    tied = ((second - best) <= 2.0 * bound).nonzero()[:, 0]
    for t0 in range(0, tied.numel(), 256):
        rows = tied[t0 : t0 + 256]
        x = xf[rows]
        reach = (best[rows] + 2.0 * bound[rows])[:, None]
        r, c = [], []
        for c0 in range(0, cf.shape[0], CENTROID_CHUNK):
            ri, ci = (_chunk_scores(x, cf, cn, c0, metric) <= reach).nonzero(as_tuple=True)
            r.append(ri)
            c.append(ci + c0)
        r, c = torch.cat(r), torch.cat(c)
        (r1, c1), (r2, c2) = rowwise.lowest_two(r, c, rowwise.pair_values(x[r], cf[c], metric))
        best_id[rows[r1]] = c1
        if second_id is not None:
            second_id[rows[r2]] = c2


def _fp64_ids(
    x: torch.Tensor,
    cf: torch.Tensor,
    cn: torch.Tensor | None,
    metric: str,
    with_second: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp64 ranking of all rows of ``x``, chunked over rows (shrunk on OutOfMemory)."""
    n = x.shape[0]
    ids = torch.empty((n,), dtype=torch.int64, device=x.device)
    sec_ids = torch.empty_like(ids) if with_second else None

    def block(r0: int, r1: int) -> None:
        bi, si = _top2_block(x[r0:r1].to(torch.float64), cf, cn, metric, with_second)
        ids[r0:r1] = bi
        if with_second:
            sec_ids[r0:r1] = si

    _by_row_blocks(n, _rows_per_chunk(min(cf.shape[0], CENTROID_CHUNK), 8), block)
    return ids, sec_ids


def _fp32_ids(
    x: torch.Tensor, cf: torch.Tensor, cn: torch.Tensor | None, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ranking with the error-bound test; returns ids and the rows to re-rank in fp64."""
    n, d = x.shape
    c32 = cf.to(torch.float32)
    cn32 = cn.to(torch.float32) if metric == "l2" else None
    cn_max = float((cn if cn is not None else (cf * cf).sum(1)).max())  # NaN: all re-rank
    c_norm_max = math.sqrt(cn_max) * (1.0 + 2.0**-40)
    ids = torch.empty((n,), dtype=torch.int64, device=x.device)
    flagged = torch.empty((n,), dtype=torch.bool, device=x.device)
    # a ~21 MiB score block, not the whole budget: the min passes over it are
    # memory-bound, so they run faster on a block that mostly stays in cache

    def block(r0: int, r1: int) -> None:
        xb = x[r0:r1].to(torch.float32)
        best, second, bi = _top2_fp32(xb, c32, cn32, metric)
        # fp32 norm (any order: within gamma_{D+2}), inflated to an upper bound; the
        # absolute term covers squares that underflow or are flushed to zero
        x_norm = torch.linalg.vector_norm(xb, dim=1).to(torch.float64)
        x_norm = x_norm * (1.0 + _gamma(d + 2)) + math.sqrt(d) * 2.0**-63
        bound = _score_bound(x_norm, c_norm_max, cn_max, d, metric)
        margin = second.to(torch.float64) - best.to(torch.float64)
        ids[r0:r1] = bi
        flagged[r0:r1] = ~(margin > 2.0 * bound)  # NaN (non-finite scores) re-ranks too

    _by_row_blocks(n, _rows_per_chunk(min(cf.shape[0], CENTROID_CHUNK), 4, copies=12), block)
    return ids, flagged


def assign_torch(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    metric: str = "l2",
    with_second: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Nearest centroid per row: exact ids, fp32 distances, chunked over rows and centroids.

    Ranks in fp32 BLAS and re-ranks in fp64 only the rows whose fp32 margin is within the
    rounding bound (see the module docstring). ``with_second=True`` (rarely used) ranks all
    rows in fp64, which yields the runner-up id without a second bound test; float64
    inputs, non-CPU tensors and reduced fp32 matmul precision take that path too. The
    distances (and the second distance, never below the first) are recomputed row by row
    from the chosen ids, so they are the same whichever path a row took.
    """
    check_metric(metric)
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"bad shapes x={tuple(x.shape)} centroids={tuple(centroids.shape)}")
    n = x.shape[0]
    dev = x.device
    k = centroids.shape[0]
    if n == 0 or k == 0:
        ids = torch.full((n,), -1, dtype=torch.int64, device=dev)
        dist = torch.full((n,), _INF, dtype=torch.float32, device=dev)
        sec = torch.full((n,), _INF, dtype=torch.float32, device=dev) if with_second else None
        return ids, dist, sec
    cf = centroids.to(device=dev, dtype=torch.float64)
    cn = (cf * cf).sum(1) if metric == "l2" else None
    sec_ids = None
    if with_second or not _fp32_prerank_allowed(x, centroids):
        ids, sec_ids = _fp64_ids(x, cf, cn, metric, with_second)
    else:
        ids, flagged = _fp32_ids(x, cf, cn, metric)
        rerank = flagged.nonzero()[:, 0]
        if rerank.numel():
            ids[rerank] = _fp64_ids(x[rerank], cf, cn, metric, False)[0]
    dist = rowwise.distance(x, cf, ids, metric)
    sec = None
    if with_second:
        sec = rowwise.distance(x, cf, sec_ids, metric)
        # no runner-up (a single centroid) -> +inf; a bad row keeps its NaN
        sec = torch.where(sec_ids < 0, torch.where(ids < 0, _NAN, _INF), sec)
        sec = torch.maximum(sec, dist)
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
    check_metric(metric)
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
    if gmin == gmax:  # one parent (a level's first, or a batch of one node): no gather
        a, b = int(offs[gmin]), int(offs[gmin + 1])
        if b <= a:
            return ids, dist, sec
        i, d, s = assign_torch(x, centroids[a:b], metric=metric, with_second=with_second)
        return i + a, d, s
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


def partial_sums_torch(
    x: torch.Tensor, ids: torch.Tensor, n_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Int64 fixed-point sums and counts per id; exact, so independent of row order.

    Rows are quantised and added in blocks of ``rowwise.ROWWISE_BLOCK_ELEMS`` values so the
    temporaries stay in cache (the pass is memory-bound); the sums are exact integers,
    so the blocking does not change them.
    """
    n, d = x.shape
    dev = x.device
    sums = torch.zeros((n_clusters, d), dtype=torch.int64, device=dev)
    ids = ids.to(device=dev, dtype=torch.int64)
    keep = ids >= 0
    if n and int(ids.max()) >= n_clusters:
        raise ValueError("ids must be < n_clusters")
    counts = torch.bincount(ids[keep], minlength=n_clusters)[:n_clusters].to(torch.int64)
    if n and not bool(keep.all()):
        x, ids = x[keep], ids[keep]
        n = x.shape[0]
    rows = max(1, rowwise.ROWWISE_BLOCK_ELEMS // max(1, d))
    for r0 in range(0, n, rows):
        sums.index_add_(0, ids[r0 : r0 + rows], quantize(x[r0 : r0 + rows]))
    return sums, counts
