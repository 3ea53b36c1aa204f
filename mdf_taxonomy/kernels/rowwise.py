"""Row-wise float64 arithmetic whose result is a function of one row and one centroid.

BLAS (MKL's fp64 GEMM included) picks its blocking by shape and by a column's place in
the matrix, so a matrix product can give two equal centroids scores an ulp apart, or give
a row a different score in another batch. Where the outcome must not depend on that (the
distances we report, and the choice between near-tied centroids), it is computed here:
elementwise IEEE operations summed by a fixed pairwise tree, never a reduction kernel.
"""

from __future__ import annotations

import torch

#: Values per block of the row-wise passes (distance, quantisation): temporaries stay in
#: cache, and blocks are large enough that the per-op overhead is small.
ROWWISE_BLOCK_ELEMS: int = 2**17

_NAN = float("nan")


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


def pair_values(x: torch.Tensor, c64: torch.Tensor, metric: str) -> torch.Tensor:
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
        s = pair_values(x[r0 : r0 + rows], c64.index_select(0, i.clamp_min(0)), metric)
        out[r0 : r0 + rows] = torch.where(i >= 0, s, _NAN)
    return out


def lowest_two(
    rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Of (row, id, value) pairs, each row's lowest and second-lowest (value, id):
    ((rows, ids) of the firsts, (rows, ids) of the seconds, for rows that have one)."""
    order = torch.sort(ids, stable=True).indices
    order = order[torch.sort(values[order], stable=True).indices]
    order = order[torch.sort(rows[order], stable=True).indices]
    rows, ids = rows[order], ids[order]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    second = torch.zeros_like(first)
    second[1:] = first[:-1] & ~first[1:]
    return (rows[first], ids[first]), (rows[second], ids[second])
