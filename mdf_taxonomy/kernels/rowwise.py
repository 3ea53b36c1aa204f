"""Row-wise float64 arithmetic whose result is a function of one row and one centroid.

BLAS (MKL's fp64 GEMM included) picks its blocking by shape and by a column's place in
the matrix, so a matrix product can give two equal centroids scores an ulp apart, or give
a row a different score in another batch. Where the outcome must not depend on that (the
distances we report, and the choice between near-tied centroids), it is computed here:
elementwise IEEE operations summed by a fixed pairwise tree, never a reduction kernel.
"""

from __future__ import annotations

import math

import torch

#: Values per block of the row-wise passes (distance, quantisation): temporaries stay in
#: cache, and blocks are large enough that the per-op overhead is small.
ROWWISE_BLOCK_ELEMS: int = 2**17

_NAN = float("nan")
_U64 = 2.0**-53  # unit roundoff of float64
_TINY64 = 2.0**-1022


def fold_rowsum_(p: torch.Tensor) -> torch.Tensor:
    """Row sums of ``p`` (overwritten) by a fixed pairwise tree of elementwise adds.

    Each add is one IEEE operation on one pair, so a row's sum depends only on that row:
    not on the number of rows, their layout or the thread count, unlike a reduction kernel.
    """
    w = p.shape[1]
    if w == 0:
        return p.new_zeros(p.shape[0])
    while w > 1:
        h = (w + 1) // 2
        p[:, : w - h].add_(p[:, h:w])
        w = h
    return p[:, 0]


def _pair_values(x: torch.Tensor, c64: torch.Tensor, metric: str) -> torch.Tensor:
    """fp64 ``sum((x - c)^2)`` (l2) or ``1 - x.c`` (cosine) of paired rows (same shape)."""
    p = x.to(torch.float64, copy=True)
    if metric == "l2":
        return fold_rowsum_(p.sub_(c64).square_())
    return 1.0 - fold_rowsum_(p.mul_(c64))


def distance(x: torch.Tensor, c64: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
    """fp32 distance of each row to centroid ``ids[i]``, computed row by row in fp64.

    l2 is ``sum((x - c)^2)`` (no cancellation, exactly 0 for a row equal to its centroid),
    cosine ``1 - x.c``. Rows with id < 0 get NaN.
    """
    n, d = x.shape
    out = torch.empty((n,), dtype=torch.float32, device=x.device)
    rows = max(1, ROWWISE_BLOCK_ELEMS // max(1, d))
    for r0 in range(0, n, rows):
        i = ids[r0 : r0 + rows]
        s = _pair_values(x[r0 : r0 + rows], c64.index_select(0, i.clamp_min(0)), metric)
        out[r0 : r0 + rows] = torch.where(i >= 0, s, _NAN)
    return out


def _gamma64(n: int) -> float:
    nu = n * _U64
    return nu / (1.0 - nu)


def settle_ties(
    xf: torch.Tensor,
    cf: torch.Tensor,
    cn: torch.Tensor | None,
    metric: str,
    best: torch.Tensor,
    second: torch.Tensor,
    best_id: torch.Tensor,
    second_id: torch.Tensor | None,
) -> None:
    """Re-decide, in place, the rows whose fp64 GEMM best and second scores lie within the
    GEMM's rounding bound: every centroid within the bound of the best is compared by its
    row-wise fp64 value (lowest id on ties), so equal centroids give the lowest id and a
    row's id does not depend on the batch or on where BLAS put its centroid.
    """
    d = xf.shape[1]
    xn = torch.linalg.vector_norm(xf, dim=1) * (1.0 + _gamma64(d + 2))
    cn_all = cn if cn is not None else (cf * cf).sum(1)
    cn_max = float(cn_all.max())
    xc = xn * math.sqrt(cn_max) * (1.0 + 2.0**-40)
    if metric == "l2":
        err = (_gamma64(d + 1) + _U64) * (2.0 * xc + cn_max) + 4.0 * (d + 1) * _TINY64
    else:
        err = (_gamma64(d) + _U64) * xc + 2.0 * (d + 1) * _TINY64
    slack = 4.0 * err  # twice a per-score bound (with a safety factor 2) on both scores
    tied = ((second - best) <= slack).nonzero()[:, 0]
    if not tied.numel():
        return
    k = cf.shape[0]
    step = max(1, (1 << 22) // max(1, k))
    for t0 in range(0, tied.numel(), step):
        rows = tied[t0 : t0 + step]
        x = xf[rows]
        s = x @ cf.T
        s = cn_all[None, :] - 2.0 * s if metric == "l2" else -s
        r, c = (s <= (best[rows] + slack[rows])[:, None]).nonzero(as_tuple=True)
        v = _pair_values(x[r], cf[c], metric)  # pairs come row-major, ids ascending
        order = torch.sort(v, stable=True).indices
        order = order[torch.sort(r[order], stable=True).indices]
        r, c = r[order], c[order]
        first = torch.ones_like(r, dtype=torch.bool)
        first[1:] = r[1:] != r[:-1]
        best_id[rows[r[first]]] = c[first]
        if second_id is not None:
            nxt = torch.zeros_like(first)
            nxt[1:] = first[:-1] & ~first[1:]
            second_id[rows[r[nxt]]] = c[nxt]
