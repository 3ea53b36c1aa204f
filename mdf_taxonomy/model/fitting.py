"""The k-means arithmetic between passes: init from a sample, centroid update,
empty-cluster repair, convergence. Pure functions of their inputs, so the fit
is deterministic however the passes were computed.

Rules, stated plainly (after FAISS's Clustering):
- Sampling: each row gets a priority from a hash of its own bytes (and the seed
  and level); a parent's sample is the rows with the smallest priorities
  (bottom-k). The sample therefore does not depend on batch size, worker count
  or file order.
- Init: greedy k-means++ on the parent's sample (generator seeded by seed,
  level, parent), then `init_iters` Lloyd iterations on the sample in memory.
- A parent gets at most as many children as it has rows, and at most as many as
  its sample holds distinct rows (so no two children start on one point and every
  row has one nearest child); at least one; a parent with no rows gets one child
  equal to itself. Capped parents are counted in the level's history entry and
  logged once per level.
- Empty cluster repair: an empty child takes the place of half of its largest
  sibling (ties: lowest id). Both centroids are the large one's, scaled by
  (1 +/- eps) on alternating coordinates, and the count is split in two.
- Convergence: a level stops when (previous inertia - inertia) / previous
  inertia < tol, or after max_iter Lloyd passes.
- Range: sums are int64 fixed point, exact and order-free while they stay under
  FIXED_SUM_LIMIT; rows beyond MAX_ABS_VALUE are rejected when parsed, and a sum
  that reaches the limit is marked SUM_OVERFLOWED (never wrapped) and refused by
  the driver.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.kernels.fixed_point import (  # inertia's fixed point: order-free too
    INERTIA_FIXED_POINT_BITS,  # noqa: F401 - callers import it here
    inertia_from_fixed,
    quantize_inertia,
)
from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.sampling import (
    sample_priorities,  # noqa: F401 - callers import it here
    splitmix64,
)
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy

log = logging.getLogger(__name__)

REPAIR_EPS = 1.0 / 1024

MAX_ABS_VALUE: float = 2.0**15
"""The fit's range: parse_embeddings rejects a row holding a |value| above it.

A value in range is < 2**39 in fixed point (x 2**FIXED_POINT_BITS), so MAX_ROWS_PER_SUM
rows of any values in range sum exactly under FIXED_SUM_LIMIT; it also stays finite
in float16 compute (max 65504) and its squares in float32 distances.
"""

FIXED_SUM_LIMIT: int = 2**62
"""Fixed-point sums are kept below this magnitude: two such sums add exactly in int64
(|a + b| < 2**63), and a sum that reaches it is marked SUM_OVERFLOWED, never wrapped."""

SUM_OVERFLOWED: int = -(2**63)
"""The mark of an overflowed sum. Adding anything below FIXED_SUM_LIMIT to it leaves it
at or past the limit (-2**63 + a stays below -2**62, or wraps above 2**62), so the mark
survives to the driver, which refuses it."""

MAX_ROWS_PER_SUM: int = (FIXED_SUM_LIMIT - 1) // (
    int(MAX_ABS_VALUE) * 2**kernels.FIXED_POINT_BITS + 1
)
"""Rows (8388607) whose sum is exact whatever their values in range: a node fed more
rows than this in one pass can be refused. Rows of |value| <= 1 allow 2**38 rows."""


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


def update_centroids(
    sums: torch.Tensor, counts: torch.Tensor, previous: np.ndarray, parents: np.ndarray, metric: str
) -> tuple[np.ndarray, int]:
    """New centroids from fixed-point sums; empty children repaired within their parent."""
    check_fixed_sums(sums)
    counts_np = counts.cpu().numpy().astype(np.int64).copy()
    mean = kernels.from_fixed_point(sums.cpu()).numpy()
    new = previous.astype(np.float64).copy()
    filled = counts_np > 0
    new[filled] = mean[filled] / counts_np[filled, None]
    repaired = 0
    sign = np.where(np.arange(new.shape[1]) % 2 == 0, 1.0, -1.0)
    for j in np.flatnonzero(~filled):
        siblings = np.flatnonzero(parents == parents[j])
        big = siblings[np.argmax(counts_np[siblings])]  # argmax: first of the largest
        if counts_np[big] < 2:
            continue  # nothing to split: keep the old centroid
        new[j] = new[big] * (1 + REPAIR_EPS * sign)
        new[big] = new[big] * (1 - REPAIR_EPS * sign)
        counts_np[j] = counts_np[big] // 2
        counts_np[big] -= counts_np[j]
        repaired += 1
    if metric == "cosine":
        norms = np.linalg.norm(new, axis=1, keepdims=True)
        new = np.where(norms > 0, new / np.maximum(norms, 1e-30), new)
    return new.astype(np.float32), repaired


def lloyd_on_sample(
    sample: torch.Tensor, centroids: np.ndarray, iters: int, metric: str
) -> np.ndarray:
    """In-memory Lloyd iterations on the init sample (same assignment code as the passes)."""
    parents = np.zeros(len(centroids), dtype=np.int64)
    for _ in range(iters):
        a = kernels.assign(sample, torch.from_numpy(centroids), metric=metric)
        sums, counts = kernels.partial_sums(sample, a.ids, len(centroids))
        centroids, _ = update_centroids(sums, counts, centroids, parents, metric)
    return centroids


def distinct_rows(sample: np.ndarray) -> int:
    """Rows of `sample` that are distinct points (-0.0 equals 0.0)."""
    if len(sample) == 0:
        return 0
    s = np.ascontiguousarray(sample, dtype=np.float32) + np.float32(0.0)  # -0.0 -> 0.0
    return len(np.unique(s.view(np.dtype((np.void, s.shape[1] * 4))).ravel()))


def init_children(
    sample: np.ndarray,
    rows: int,
    k_max: int,
    seed: int,
    metric: str,
    init_iters: int,
    fallback: np.ndarray | None,
) -> tuple[np.ndarray, int]:
    """Children centroids of one parent from its sample (see the module rules), and the
    number of distinct rows in the sample."""
    distinct = distinct_rows(sample)
    k = min(k_max, rows, distinct)
    if k == 0:
        if fallback is None:
            raise ValueError("no valid rows reached the top level: nothing to fit")
        return fallback[None].astype(np.float32), distinct
    t = torch.from_numpy(np.array(sample, dtype=np.float32))  # writable copy
    centroids = kmeans_plus_plus(t, k, seed, metric).numpy()
    return lloyd_on_sample(t, centroids, init_iters, metric), distinct


@dataclass
class SampleResult:
    """What a sampling pass gathered: per parent, its row count and bottom-k sample."""

    rows: dict[int, int]
    samples: dict[int, np.ndarray]  # parent -> (m, dim) float32, sorted by priority


@dataclass
class LloydResult:
    """What a Lloyd pass gathered for the level being refined."""

    sums: torch.Tensor  # (n_nodes, dim) int64 fixed point
    counts: torch.Tensor  # (n_nodes,) int64
    inertia_fixed: int
    rows: int


def start_level(tax: Taxonomy, result: SampleResult) -> Taxonomy:
    """After a sampling pass: initial children for every parent of the new level.

    The history entry counts the parents that got fewer children than the branching
    factor: `empty_parents` (no rows), `few_rows` (fewer rows than the branching
    factor), `few_distinct` (fewer distinct sample rows than min(branching, rows));
    `capped_parents` is their union and `capped_children` the children not made.
    `distinct_rows` is the number of distinct rows over the level's samples.
    """
    cfg, level = tax.config, tax.state.level
    n_parents = 1 if level == 1 else tax.levels[level - 2].n_nodes
    b = cfg.branching(level)
    blocks, parents = [], []
    seen = {
        "distinct_rows": 0,
        "capped_parents": 0,
        "capped_children": 0,
        "empty_parents": 0,
        "few_rows": 0,
        "few_distinct": 0,
    }
    for p in range(n_parents):
        fallback = None if level == 1 else tax.levels[level - 2].centroids[p]
        rows = result.rows.get(p, 0)
        block, distinct = init_children(
            result.samples.get(p, np.zeros((0, tax.dim), np.float32)),
            rows,
            b,
            node_seed(cfg.seed, level, p),
            cfg.metric,
            cfg.init_iters,
            fallback,
        )
        blocks.append(block)
        parents.append(np.full(len(block), p, dtype=np.int64))
        seen["distinct_rows"] += distinct
        if len(block) < b:
            seen["capped_parents"] += 1
            seen["capped_children"] += b - len(block)
            seen["empty_parents"] += rows == 0
            seen["few_rows"] += 0 < rows < b
            seen["few_distinct"] += 0 < rows and distinct < min(b, rows)
    if seen["capped_parents"]:
        log.warning(
            "level %d: %d of %d parents got fewer than %d children (%d without rows, %d with "
            "fewer rows, %d with fewer distinct rows in their sample); %d children not made",
            level,
            seen["capped_parents"],
            n_parents,
            b,
            seen["empty_parents"],
            seen["few_rows"],
            seen["few_distinct"],
            seen["capped_children"],
        )
    new_level = Level(np.concatenate(blocks), np.concatenate(parents))
    history = tax.state.history + [
        {
            "level": level,
            "phase": "sample",
            "rows": int(sum(result.rows.values())),
            "nodes": new_level.n_nodes,
            **seen,
        }
    ]
    state = FitState(level=level, phase="lloyd", iteration=0, inertia=None, history=history)
    return replace(tax, levels=tax.levels[: level - 1] + [new_level], state=state, version=None)


def finish_pass(tax: Taxonomy, result: LloydResult) -> Taxonomy:
    """After a Lloyd pass: new centroids, repair, and the convergence decision."""
    cfg, st = tax.config, tax.state
    lv = tax.levels[st.level - 1]
    centroids, repaired = update_centroids(
        result.sums, result.counts, lv.centroids, lv.parents, cfg.metric
    )
    inertia = inertia_from_fixed(result.inertia_fixed)
    iteration = st.iteration + 1
    converged = (
        st.inertia is not None
        and st.inertia > 0
        and ((st.inertia - inertia) / st.inertia < cfg.tol)
    )
    counts = result.counts.cpu().numpy()
    history = st.history + [
        {
            "level": st.level,
            "phase": "lloyd",
            "iteration": iteration,
            "rows": result.rows,
            "inertia": inertia,
            "repaired": repaired,
            "empty": int((counts == 0).sum()),
        }
    ]
    levels = tax.levels[: st.level - 1] + [Level(centroids, lv.parents)]
    if converged or iteration >= cfg.max_iter:
        if st.level == cfg.n_levels:
            state = FitState(
                level=st.level, phase="done", iteration=iteration, inertia=inertia, history=history
            )
        else:
            state = FitState(level=st.level + 1, phase="sample", history=history)
    else:
        state = FitState(
            level=st.level, phase="lloyd", iteration=iteration, inertia=inertia, history=history
        )
    return replace(tax, levels=levels, state=state, version=None)


def inertia_to_fixed(distance: torch.Tensor) -> int:
    """Sum of distances in fixed point, exact (order-free) for any finite distances: summed
    in int64 chunks that cannot overflow, the chunks as Python ints."""
    q = quantize_inertia(distance)
    if q.numel() == 0:
        return 0
    peak = float(q.max())
    if not np.isfinite(peak):
        raise OverflowError("a distance is not finite: inertia cannot be summed")
    if peak >= FIXED_SUM_LIMIT:  # a single row past int64 headroom: Python ints, exactly
        return sum(int(v) for v in q.tolist())
    step = max(1, int(FIXED_SUM_LIMIT // max(peak, 1.0)))
    ints = q.to(torch.int64)
    return sum(int(ints[i : i + step].sum()) for i in range(0, len(ints), step))


def out_of_range(sums: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Where fixed-point sums are at or past FIXED_SUM_LIMIT (SUM_OVERFLOWED included)."""
    return (sums >= FIXED_SUM_LIMIT) | (sums <= -FIXED_SUM_LIMIT)


def mark_overflowed(sums: np.ndarray | torch.Tensor) -> None:
    """In place: every sum at or past FIXED_SUM_LIMIT becomes SUM_OVERFLOWED."""
    sums[out_of_range(sums)] = SUM_OVERFLOWED


def add_fixed_sums(total: np.ndarray | torch.Tensor, part: np.ndarray | torch.Tensor) -> None:
    """total += part in place, never wrapping: an element out of range in either, or in the
    result, becomes SUM_OVERFLOWED."""
    bad = out_of_range(total) | out_of_range(part)
    total += part
    bad |= out_of_range(total)
    total[bad] = SUM_OVERFLOWED


def check_fixed_sums(sums: np.ndarray | torch.Tensor) -> None:
    """Raise OverflowError if any node's sum reached FIXED_SUM_LIMIT (driver side)."""
    bad = out_of_range(sums)
    if bool(bad.any()):
        bad = bad.cpu().numpy() if isinstance(bad, torch.Tensor) else bad
        nodes = np.flatnonzero(bad.reshape(len(bad), -1).any(axis=1))
        raise OverflowError(
            f"fixed-point sums of {len(nodes)} node(s) (first {nodes[:5].tolist()}) reached "
            f"2**62 and would overflow int64: a node may take at most {MAX_ROWS_PER_SUM} rows "
            f"per pass of values up to +/-{MAX_ABS_VALUE:g} (rows of smaller values: "
            f"proportionally more); use more branching at this level or rescale the data"
        )


def resolve_config(cfg: TaxonomyConfig, dim: int) -> TaxonomyConfig:
    if cfg.dim is not None and cfg.dim != dim:
        raise ValueError(f"config dim={cfg.dim} but the data has {dim}-D embeddings")
    return replace(cfg, dim=dim)
