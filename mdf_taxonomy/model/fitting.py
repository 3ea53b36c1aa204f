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
- A parent with fewer rows than children gets as many children as it has rows
  (at least one; a parent with no rows gets one child equal to itself).
- Empty cluster repair: an empty child takes the place of half of its largest
  sibling (ties: lowest id). Both centroids are the large one's, scaled by
  (1 +/- eps) on alternating coordinates, and the count is split in two.
- Convergence: a level stops when (previous inertia - inertia) / previous
  inertia < tol, or after max_iter Lloyd passes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy

REPAIR_EPS = 1.0 / 1024
INERTIA_FIXED_POINT_BITS = 16  # inertia is summed as int64 too, so convergence is order-free

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def sample_priorities(x: np.ndarray, seed: int, level: int) -> np.ndarray:
    """(N,) uint64 priority from each float32 row's bytes: bottom-k of these is the sample."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng([seed, level, 0x5A3])
    weights = rng.integers(1, 2**63, size=x.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (x.view(np.uint32).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return _splitmix64(h ^ np.uint64((seed * 1_000_003 + level) & 0xFFFFFFFFFFFFFFFF))


def node_seed(seed: int, level: int, node: int) -> int:
    return int(_splitmix64(np.array([seed * 1_000_003 + level * 7919 + node], dtype=np.uint64))[0]
               >> np.uint64(1))


def kmeans_plus_plus(sample: torch.Tensor, k: int, seed: int, metric: str = "l2") -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn does): each step draws 2 + log(k)
    candidates by D^2 sampling and keeps the one that lowers the potential most.
    Deterministic for a seed."""
    n = sample.shape[0]
    if k > n:
        raise ValueError(f"k-means++ needs at least k={k} rows, got {n}")
    gen = torch.Generator().manual_seed(seed)
    trials = 2 + int(np.log(k))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    best = _distance_to(sample, sample[chosen[0]], metric)
    for _ in range(1, k):
        total = float(best.sum())
        if total <= 0:  # every row sits on a chosen centre: take unchosen rows in order
            free = torch.ones(n, dtype=torch.bool)
            free[chosen] = False
            nxt = int(torch.nonzero(free)[0])
            best = torch.minimum(best, _distance_to(sample, sample[nxt], metric))
        else:
            cands = torch.multinomial(best / total, trials, replacement=True, generator=gen)
            options = [torch.minimum(best, _distance_to(sample, sample[c], metric))
                       for c in cands.tolist()]
            pick = int(torch.argmin(torch.stack([o.sum() for o in options])))
            nxt, best = int(cands[pick]), options[pick]
        chosen.append(nxt)
    return sample[chosen].float().clone()


def _distance_to(sample: torch.Tensor, centre: torch.Tensor, metric: str) -> torch.Tensor:
    d = kernels.assign(sample, centre[None].float(), metric=metric).distance
    return d.double().clamp_min(0)  # cosine distances of near-identical rows can dip below 0


def update_centroids(sums: torch.Tensor, counts: torch.Tensor, previous: np.ndarray,
                     parents: np.ndarray, metric: str) -> tuple[np.ndarray, int]:
    """New centroids from fixed-point sums; empty children repaired within their parent."""
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


def lloyd_on_sample(sample: torch.Tensor, centroids: np.ndarray, iters: int, metric: str
                    ) -> np.ndarray:
    """In-memory Lloyd iterations on the init sample (same assignment code as the passes)."""
    parents = np.zeros(len(centroids), dtype=np.int64)
    for _ in range(iters):
        a = kernels.assign(sample, torch.from_numpy(centroids), metric=metric)
        sums, counts = kernels.partial_sums(sample, a.ids, len(centroids))
        centroids, _ = update_centroids(sums, counts, centroids, parents, metric)
    return centroids


def init_children(sample: np.ndarray, rows: int, k_max: int, seed: int, metric: str,
                  init_iters: int, fallback: np.ndarray | None) -> np.ndarray:
    """Children centroids of one parent from its sample (see the module rules)."""
    k = min(k_max, rows, len(sample))
    if k == 0:
        if fallback is None:
            raise ValueError("no valid rows reached the top level: nothing to fit")
        return fallback[None].astype(np.float32)
    t = torch.from_numpy(np.array(sample, dtype=np.float32))  # writable copy
    centroids = kmeans_plus_plus(t, k, seed, metric).numpy()
    return lloyd_on_sample(t, centroids, init_iters, metric)


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
    """After a sampling pass: initial children for every parent of the new level."""
    cfg, level = tax.config, tax.state.level
    n_parents = 1 if level == 1 else tax.levels[level - 2].n_nodes
    blocks, parents = [], []
    for p in range(n_parents):
        fallback = None if level == 1 else tax.levels[level - 2].centroids[p]
        block = init_children(
            result.samples.get(p, np.zeros((0, tax.dim), np.float32)), result.rows.get(p, 0),
            cfg.branching(level), node_seed(cfg.seed, level, p), cfg.metric, cfg.init_iters,
            fallback,
        )
        blocks.append(block)
        parents.append(np.full(len(block), p, dtype=np.int64))
    new_level = Level(np.concatenate(blocks), np.concatenate(parents))
    history = tax.state.history + [
        {"level": level, "phase": "sample", "rows": int(sum(result.rows.values())),
         "nodes": new_level.n_nodes}
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
    inertia = result.inertia_fixed / float(2**INERTIA_FIXED_POINT_BITS)
    iteration = st.iteration + 1
    converged = st.inertia is not None and st.inertia > 0 and (
        (st.inertia - inertia) / st.inertia < cfg.tol
    )
    counts = result.counts.cpu().numpy()
    history = st.history + [
        {"level": st.level, "phase": "lloyd", "iteration": iteration, "rows": result.rows,
         "inertia": inertia, "repaired": repaired, "empty": int((counts == 0).sum())}
    ]
    levels = tax.levels[: st.level - 1] + [Level(centroids, lv.parents)]
    if converged or iteration >= cfg.max_iter:
        if st.level == cfg.n_levels:
            state = FitState(level=st.level, phase="done", iteration=iteration, inertia=inertia,
                             history=history)
        else:
            state = FitState(level=st.level + 1, phase="sample", history=history)
    else:
        state = FitState(level=st.level, phase="lloyd", iteration=iteration, inertia=inertia,
                         history=history)
    return replace(tax, levels=levels, state=state, version=None)


def inertia_to_fixed(distance: torch.Tensor) -> int:
    """Sum of distances as an exact int64 (order-free)."""
    return int(torch.round(distance.double().clamp_min(0) * 2**INERTIA_FIXED_POINT_BITS)
               .to(torch.int64).sum())


def resolve_config(cfg: TaxonomyConfig, dim: int) -> TaxonomyConfig:
    if cfg.dim is not None and cfg.dim != dim:
        raise ValueError(f"config dim={cfg.dim} but the data has {dim}-D embeddings")
    return replace(cfg, dim=dim)
