"""Where a parent's children start: per-node seeds and greedy k-means++ on its sample.

The generator of a parent's k-means++ is seeded by node_seed(seed, level, parent), so the
init is deterministic; the in-memory Lloyd iterations that follow, and the rules for how
many children a parent gets, are in model/fitting.py.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.model.limits import MAX_ABS_VALUE
from mdf_taxonomy.model.sampling import splitmix64


def node_seed(seed: int, level: int, node: int) -> int:
    z = (seed * 1_000_003 + level * 7919 + node) & 0xFFFFFFFFFFFFFFFF  # any seed < 2**63
    return int(splitmix64(np.array([z], dtype=np.uint64))[0] >> np.uint64(1))


def kmeans_plus_plus(
    sample: torch.Tensor, k: int, seed: int, metric: str = "l2", *, prune: bool = True
) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn does): each step draws 2 + log(k)
    candidates by D^2 sampling and keeps the one that lowers the potential most.
    Deterministic for a seed.

    Each row keeps its nearest chosen centre and each centre the radius of its rows, so a
    step computes distances only for the rows of centres that a candidate can be nearer
    to (triangle inequality: d(centre, candidate) < 2 radius); `prune=False` runs the same
    loop over every row and chooses the same centres. Cosine rows are L2-normalised, so
    1 - x.y = ||x - y||^2 / 2 ranks as squared L2 and both metrics share the arithmetic.
    """
    n = sample.shape[0]
    if k > n:
        raise ValueError(f"k-means++ needs at least k={k} rows, got {n}")
    if k < 1 or metric not in kernels.METRICS:
        raise ValueError(f"k-means++ needs k >= 1 and metric l2 or cosine, got {k}, {metric!r}")
    gen = torch.Generator().manual_seed(seed)
    trials = 2 + int(np.log(k))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    if k == 1:
        return sample[chosen].float().clone()
    # Shifting by a row changes no distance but keeps fp32 dot products small.
    xs = sample.float() - sample[0].float()
    xn = torch.linalg.vector_norm(xs, dim=1, dtype=torch.float64).square_()
    max_sq = float(xn.max())
    if not max_sq < _F32_MAX / 4:  # fp32 dot products could overflow (or rows are NaN)
        raise OverflowError(_KPP_OVERFLOW)
    tol = 2.0 * (xs.shape[1] + 2) * 2.0**-24 * max_sq  # bound on a distance's rounding
    slack = 3.0 * math.sqrt(tol) + 1e-12  # what `tol` can move a pruning test by
    centres = torch.empty((k, xs.shape[1]), dtype=torch.float32)
    centres_sq = torch.empty(k, dtype=torch.float64)
    centres[0], centres_sq[0] = xs[chosen[0]], xn[chosen[0]]
    best = _distance_to(xs, xn, centres[:1], centres_sq[:1], tol)[:, 0].contiguous()
    owner = torch.zeros(n, dtype=torch.int64)  # each row's nearest chosen centre
    radius = torch.zeros(k, dtype=torch.float64)  # max sqrt(best) over a centre's rows
    radius[0] = best.max().sqrt()
    everyone = torch.arange(n)
    for i in range(1, k):
        cum = torch.cumsum(best, 0)
        total = float(cum[-1])
        if not math.isfinite(total):
            raise OverflowError(_KPP_OVERFLOW)
        if total <= 0:  # every row sits on a chosen centre: take unchosen rows in order
            free = torch.ones(n, dtype=torch.bool)
            free[chosen] = False
            chosen += torch.nonzero(free)[: k - i, 0].tolist()
            break
        # D^2 sampling: row r is drawn with probability best[r] / total
        u = torch.rand(trials, generator=gen, dtype=torch.float64) * total
        last = torch.searchsorted(cum, cum[-1:])  # last row of nonzero weight
        cands = torch.minimum(torch.searchsorted(cum, u, right=True), last)
        y, y_sq = xs[cands], xn[cands]
        if prune:  # x (nearest centre c) can only get nearer to y if d(c, y) < 2 d(x, c)
            reach = _distance_to(centres[:i], centres_sq[:i], y, y_sq, tol).sqrt_()
            near = (reach < radius[:i, None] * _GROW + slack).any(1)
            rows = torch.nonzero(near[owner])[:, 0]
            live = (reach[owner[rows]] < best[rows].sqrt()[:, None] * _GROW + slack).any(1)
            sub = rows[live]
        else:
            near = torch.ones(i, dtype=torch.bool)
            rows = sub = everyone
        if len(sub) * 2 > n:  # pruning saves less than the gather costs: every row, in place
            sub = everyone
            d = _distance_to(xs, xn, y, y_sq, tol)
        else:
            d = _distance_to(xs[sub], xn[sub], y, y_sq, tol)
        bs = best[sub]
        gain = (bs[:, None] - d).clamp_min_(0).sum(0)
        pick = int(torch.argmax(gain))  # first of the largest
        nd = d[:, pick]
        better = nd < bs  # holds the candidate itself
        took = sub[better]
        best[took] = nd[better]
        owner[took] = i
        stay = rows[owner[rows] != i]  # the near centres' rows that keep their centre
        radius[:i][near] = 0.0
        radius.scatter_reduce_(0, owner[stay], best[stay].sqrt(), "amax")
        radius[i] = nd[better].max().sqrt()
        centres[i], centres_sq[i] = y[pick], y_sq[pick]
        chosen.append(int(cands[pick]))
    return sample[chosen].float().clone()


_F32_MAX = float(torch.finfo(torch.float32).max)
_GROW = 2.0 * (1 + 1e-5)  # twice the bound, plus rounding of the square roots
_KPP_OVERFLOW = (
    "k-means++ distances overflowed: rows beyond "
    f"+/-{MAX_ABS_VALUE:g} (MAX_ABS_VALUE) reached the fit"
)


def _distance_to(
    rows: torch.Tensor,
    rows_sq: torch.Tensor,
    centres: torch.Tensor,
    centres_sq: torch.Tensor,
    tol: float,
) -> torch.Tensor:
    """(m, t) fp64 squared L2 distances: fp32 dot products (fast) expanded with fp64
    squared norms are within `tol` of exact; those under `tol` are recomputed exactly, so
    duplicate rows are exactly 0 apart and the zero-potential case is seen."""
    d = rows_sq[:, None] + centres_sq[None] - 2.0 * (rows @ centres.T).double()
    d.clamp_min_(0)
    i, j = torch.nonzero(d <= tol, as_tuple=True)
    if i.numel():
        diff = rows[i].double() - centres[j].double()
        d[i, j] = (diff * diff).sum(1)
    return d
