"""The k-means arithmetic between passes: init from a sample, centroid update,
empty-cluster repair, convergence. Pure functions of their inputs, so the fit
is deterministic however the passes were computed.

Rules, stated plainly (after FAISS's Clustering):
- Sampling: a parent's sample is bottom-k by content-hash priority, so it does not
  depend on batch size, worker count or file order; the rule is in model/sampling.py.
- Init: greedy k-means++ on the parent's sample (model/seeding.py; generator seeded
  by seed, level, parent), then `init_iters` Lloyd iterations on the sample in memory.
- A parent gets the branching factor's children, or more where `max_node_size` or
  `balance_factor` splits it (model/balance.py), at most as many as it has rows, and at
  most as many as its sample holds distinct rows (so no two children start on one point and every
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
  the driver. The bounds are in model/limits.py, the helpers below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.kernels.fixed_point import (  # inertia's fixed point: order-free too
    INERTIA_FIXED_POINT_BITS,  # noqa: F401 - callers import it here
    inertia_from_fixed,
    quantize_inertia,
)
from mdf_taxonomy.model.balance import children_wanted, level_balance, parent_groups, size_flags
from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.limits import (  # callers import the bounds here too
    FIXED_SUM_LIMIT,
    MAX_ABS_VALUE,
    MAX_ROWS_PER_SUM,
    SUM_OVERFLOWED,
)
from mdf_taxonomy.model.sampling import sample_priorities  # noqa: F401 - callers import it here
from mdf_taxonomy.model.seeding import kmeans_plus_plus, node_seed  # callers import them here
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy

log = logging.getLogger(__name__)

REPAIR_EPS = 1.0 / 1024


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


def start_level(
    tax: Taxonomy, result: SampleResult, initial: dict[int, np.ndarray] | None = None
) -> Taxonomy:
    """After a sampling pass: initial children for every parent of the new level.

    `initial`: parents whose children are given (a warm start, model/warm_start.py),
    taken as they are and counted as `warm_parents`; the others start from their sample.

    A parent is to get the branching factor's children, or more when max_node_size or
    balance_factor splits it (model/balance.py). The history entry counts the parents that got fewer
    than that: `empty_parents` (no rows), `few_rows` (fewer rows), `few_distinct` (fewer
    distinct sample rows than min(wanted, rows)); `capped_parents` is their union and
    `capped_children` the children not made. `distinct_rows` is the number of distinct
    rows over the level's samples. With either set, `split_parents` counts the
    parents that got more children than the branching factor, `split_children` the
    children beyond it.
    """
    cfg, level = tax.config, tax.state.level
    n_parents = 1 if level == 1 else tax.levels[level - 2].n_nodes
    b = cfg.branching(level)
    counted = np.array([result.rows.get(p, 0) for p in range(n_parents)], dtype=np.int64)
    wanted = children_wanted(cfg, level, counted, n_parents, parent_groups(tax, level))
    blocks, parents = [], []
    seen = {
        "distinct_rows": 0,
        "capped_parents": 0,
        "capped_children": 0,
        "empty_parents": 0,
        "few_rows": 0,
        "few_distinct": 0,
    }
    if initial:
        seen["warm_parents"] = 0
    if cfg.max_node_size is not None or cfg.balance_factor is not None:
        seen.update(split_parents=0, split_children=0)
    for p in range(n_parents):
        if initial and p in initial:
            blocks.append(np.asarray(initial[p], dtype=np.float32))
            parents.append(np.full(len(blocks[-1]), p, dtype=np.int64))
            seen["warm_parents"] += 1
            continue
        fallback = None if level == 1 else tax.levels[level - 2].centroids[p]
        rows = result.rows.get(p, 0)
        block, distinct = init_children(
            result.samples.get(p, np.zeros((0, tax.dim), np.float32)),
            rows,
            int(wanted[p]),
            node_seed(cfg.seed, level, p),
            cfg.metric,
            cfg.init_iters,
            fallback,
        )
        blocks.append(block)
        parents.append(np.full(len(block), p, dtype=np.int64))
        seen["distinct_rows"] += distinct
        k = int(wanted[p])
        if len(block) < k:
            seen["capped_parents"] += 1
            seen["capped_children"] += k - len(block)
            seen["empty_parents"] += rows == 0
            seen["few_rows"] += 0 < rows < k
            seen["few_distinct"] += 0 < rows and distinct < min(k, rows)
        if len(block) > b:
            seen["split_parents"] += 1
            seen["split_children"] += len(block) - b
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
    above = tax.levels[: level - 1]
    if level > 1 and result.rows:  # the parents' rows under their final centroids
        above[-1] = Level(above[-1].centroids, above[-1].parents, counted)
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
    return replace(tax, levels=above + [new_level], state=state, version=None)


def finish_pass(tax: Taxonomy, result: LloydResult) -> Taxonomy:
    """After a Lloyd pass: new centroids, repair, and the convergence decision.

    The pass's counts become the level's sizes; the entry of a level's last pass also
    holds their `balance` (model/balance.py) and the oversized/undersized node counts
    of the bounds that are set."""
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
    levels = tax.levels[: st.level - 1] + [Level(centroids, lv.parents, counts)]
    if converged or iteration >= cfg.max_iter:
        history[-1].update(balance=level_balance(counts), **size_flags(cfg, counts))
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
