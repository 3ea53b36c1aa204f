"""Balanced hierarchical sampling (Vo et al. 2024, "Automatic Data Curation for
Self-Supervised Learning"): a `target_size` split top-down over the tree, then per leaf
the rows to take and how often.

The allocation: at a node with quota Q whose children can give c_i = multiplier * size_i
rows, find the largest integer cut x with sum_i min(x, c_i) <= Q, give each child
min(x, c_i), and hand the remainder one each to the children above the cut (c_i > x) in
ascending node id. At a leaf with quota q and size s, every row is taken floor(q / s)
times (`base`) and `extra` = q mod s rows once more: the extra rows of smallest key
(score, priority), score 0 for "random", the distance to the leaf centroid for "closest",
minus it for "furthest", priority the row's content hash (`model.sampling`), so ties and
the random pick are a function of the data and the seed alone, never of the read order.

A leaf's pick is one cut-off key: the (extra + 1)-th smallest, found by a mergeable
bottom-k per leaf; a row is taken once more when its key is below it. So the selection
is row-local (`repeats`): the same whatever the workers, batches or file order. Rows with
equal embeddings have equal keys and are taken or left together; where such a group
straddles the cut-off it is left, so a leaf never gets more than its quota (exactly its
quota when keys are distinct). A target above multiplier * (valid rows) is a full take,
logged at WARNING: every valid row `multiplier` times.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
import torch

from mdf_taxonomy.model.sampling import sample_priorities
from mdf_taxonomy.model.storage import write_json
from mdf_taxonomy.model.taxonomy import Taxonomy

log = logging.getLogger(__name__)

STRATEGIES = ("random", "closest", "furthest")
REPEAT_FIELD = "taxonomy_repeat"
#: The hash salt of sampling priorities, apart from the fit's per-level salts (1..levels).
SAMPLE_SALT = 0x5A17_B41A
PLAN_FORMAT = "mdf-taxonomy-sample-plan"
PLAN_FORMAT_VERSION = 1


def check_sampling(target_size: Any, multiplier: Any, strategy: Any, seed: Any) -> None:
    """Raise ValueError naming the parameter that is out of its range."""
    for name, value, low in (("target_size", target_size, 1), ("multiplier", multiplier, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


# -- allocation -------------------------------------------------------------------------------


def _sum_by(groups: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Exact int64 sums of `values` per group (np.add.at: no float rounding)."""
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, groups, values)
    return out


def split_quota(quota: np.ndarray, parents: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Each child's share of its parent's `quota` (children sorted by parent, `cap` the
    most each can give), by the cut rule of the module doc, for every parent at once."""
    n = len(quota)
    lo = np.zeros(n, dtype=np.int64)  # sum min(lo, cap) <= quota holds throughout
    hi = np.zeros(n, dtype=np.int64)
    np.maximum.at(hi, parents, cap)
    while np.any(lo < hi):  # binary search for the largest cut, all parents together
        mid = (lo + hi + 1) // 2
        ok = _sum_by(parents, np.minimum(mid[parents], cap), n) <= quota
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid - 1)
    give = np.minimum(lo[parents], cap)
    left = quota - _sum_by(parents, give, n)
    above = cap > lo[parents]
    ranked = np.cumsum(above)  # rank of a child among its parent's children above the cut
    starts = np.searchsorted(parents, np.arange(n), side="left")
    rank = ranked - np.concatenate([[0], ranked])[starts[parents]] - 1
    return give + (above & (rank < left[parents]))


def allocate(
    parents: Sequence[np.ndarray], leaf_sizes: np.ndarray, target_size: int, multiplier: int = 1
) -> list[np.ndarray]:
    """Quota of every node, level by level (level 1 first, the leaves last).

    `parents[i]`: each node's parent at level i + 1 (sorted, as `Level.parents`);
    `leaf_sizes`: rows per leaf. Inner sizes are sums of their children's. The root's
    quota is min(target_size, multiplier * rows): a larger target is a full take, logged.
    """
    sizes = [np.asarray(leaf_sizes, dtype=np.int64)]
    for i in range(len(parents) - 1, 0, -1):
        sizes.insert(0, _sum_by(parents[i], sizes[0], len(parents[i - 1])))
    total = int(sizes[0].sum())
    if target_size > multiplier * total:
        log.warning(
            "target_size %d is more than multiplier %d x %d rows: taking every row %d times",
            target_size,
            multiplier,
            total,
            multiplier,
        )
    quota = np.array([min(target_size, multiplier * total)], dtype=np.int64)
    out = []
    for level_parents, level_sizes in zip(parents, sizes, strict=True):
        quota = split_quota(quota, np.asarray(level_parents, np.int64), multiplier * level_sizes)
        out.append(quota)
    return out


# -- the plan -----------------------------------------------------------------------------


def row_scores(strategy: str, distance: np.ndarray) -> np.ndarray:
    """The first part of a row's key: 0 (random: priority alone), distance or -distance."""
    if strategy == "random":
        return np.zeros(len(distance), dtype=np.float32)
    return np.asarray(distance if strategy == "closest" else -distance, dtype=np.float32)


def _before(scores, priorities, cut_scores, cut_priorities) -> np.ndarray:
    """Keys (score, priority) strictly below the cut-off keys, element by element."""
    return (scores < cut_scores) | ((scores == cut_scores) & (priorities < cut_priorities))


@dataclass(frozen=True)
class SamplePlan:
    """What the selecting pass needs: per leaf its size, base repeats, extra rows and the
    cut-off key of those; small (five numbers a leaf), JSON on any fsspec storage."""

    target_size: int
    multiplier: int
    strategy: str
    seed: int
    snapshot: str | None  # the taxonomy version the plan was made for
    sizes: np.ndarray  # (n_leaves,) int64 valid rows per leaf
    base: np.ndarray  # (n_leaves,) int64 times every row of the leaf is taken
    extra: np.ndarray  # (n_leaves,) int64 rows taken once more
    cut_score: np.ndarray  # (n_leaves,) float32 } the (extra + 1)-th smallest key:
    cut_priority: np.ndarray  # (n_leaves,) uint64 } rows below it are the extra rows

    @classmethod
    def build(
        cls,
        tax: Taxonomy,
        sizes: np.ndarray,
        target_size: int,
        multiplier: int = 1,
        strategy: str = "random",
        seed: int = 0,
    ) -> SamplePlan:
        """The allocation over `tax` with leaf `sizes`; cut-offs still to find (`finish`)."""
        check_sampling(target_size, multiplier, strategy, seed)
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.shape != (tax.levels[-1].n_nodes,):
            raise ValueError(f"sizes: {sizes.shape} for {tax.levels[-1].n_nodes} leaves")
        quota = allocate([lv.parents for lv in tax.levels], sizes, target_size, multiplier)[-1]
        safe = np.maximum(sizes, 1)
        n = len(sizes)
        return cls(
            int(target_size),
            int(multiplier),
            strategy,
            int(seed),
            tax.version,
            sizes,
            quota // safe,
            quota % safe,
            np.zeros(n, np.float32),
            np.zeros(n, np.uint64),
        )

    @property
    def quota(self) -> np.ndarray:
        """Rows (with repeats) each leaf gives."""
        return self.base * self.sizes + self.extra

    @property
    def full_take(self) -> bool:
        return self.target_size > self.multiplier * int(self.sizes.sum())

    def finish(self, candidates: LeafCandidates) -> SamplePlan:
        """The plan with each leaf's cut-off from the merged candidates of every worker."""
        found, score, priority = candidates.cutoffs()
        short = np.flatnonzero((self.extra > 0) & ~found)
        if len(short):
            leaf = int(short[0])
            raise RuntimeError(
                f"leaf {leaf}: {self.sizes[leaf]} rows counted, fewer found when picking "
                f"its {self.extra[leaf]} extra rows: the input changed between the passes"
            )
        return replace(self, cut_score=score, cut_priority=priority)

    def candidates(self) -> LeafCandidates:
        """An empty bottom-k for this plan's leaves: extra + 1 keys where extra > 0."""
        return LeafCandidates(np.where(self.extra > 0, self.extra + 1, 0))

    def check_taxonomy(self, tax: Taxonomy) -> None:
        """Refuse a taxonomy other than the one the plan was made for."""
        if tax.levels[-1].n_nodes != len(self.sizes) or (
            self.snapshot is not None and tax.version != self.snapshot
        ):
            raise ValueError(
                f"sample plan for snapshot {self.snapshot} ({len(self.sizes)} leaves), "
                f"taxonomy is snapshot {tax.version} ({tax.levels[-1].n_nodes} leaves)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "format_version": PLAN_FORMAT_VERSION,
            "target_size": self.target_size,
            "multiplier": self.multiplier,
            "strategy": self.strategy,
            "seed": self.seed,
            "snapshot": self.snapshot,
            **{k: getattr(self, k).tolist() for k in ("sizes", "base", "extra", "cut_priority")},
            "cut_score": [float(v) for v in self.cut_score],  # float32 -> float is exact
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplePlan:
        if d.get("format") != PLAN_FORMAT or d.get("format_version") != PLAN_FORMAT_VERSION:
            raise ValueError(f"not a sample plan of format {PLAN_FORMAT} {PLAN_FORMAT_VERSION}")
        check_sampling(d["target_size"], d["multiplier"], d["strategy"], d["seed"])
        arrays = {
            "sizes": np.asarray(d["sizes"], np.int64),
            "base": np.asarray(d["base"], np.int64),
            "extra": np.asarray(d["extra"], np.int64),
            "cut_score": np.asarray(d["cut_score"], np.float32),
            "cut_priority": np.asarray(d["cut_priority"], np.uint64),
        }
        if len({a.shape for a in arrays.values()}) != 1:
            raise ValueError("sample plan: per-leaf arrays of different lengths")
        keep = ("target_size", "multiplier", "strategy", "seed", "snapshot")
        return cls(**{k: d[k] for k in keep}, **arrays)

    def save(self, uri: str, storage_options: dict[str, Any] | None = None) -> str:
        """Write the plan as JSON to `uri` (any fsspec URI); returns `uri`."""
        return write_json(uri, self.to_dict(), storage_options)

    @classmethod
    def load(cls, uri: str, storage_options: dict[str, Any] | None = None) -> SamplePlan:
        with fsspec.open(uri, "r", **(storage_options or {})) as f:
            return cls.from_dict(json.load(f))


def repeats(
    plan: SamplePlan, leaves: np.ndarray, scores: np.ndarray, priorities: np.ndarray
) -> np.ndarray:
    """(N,) int32 times each row is taken (0: not selected; leaf -1: a rejected row).

    Row-local: a function of the row's leaf and key and of the plan alone."""
    ok = leaves >= 0
    leaf = np.where(ok, leaves, 0)
    once_more = (plan.extra[leaf] > 0) & _before(
        scores, priorities, plan.cut_score[leaf], plan.cut_priority[leaf]
    )
    return np.where(ok, plan.base[leaf] + once_more, 0).astype(np.int32)


class LeafCandidates:
    """Per leaf, the k[leaf] smallest keys (score, priority) offered so far.

    The multiset of a leaf's k smallest keys does not depend on the order in which keys
    arrive or on how they were split, so workers keep one each and `merge` them in any
    order (as `model.sampling.BottomK`, with a k of each leaf's own). Offers are buffered
    and folded in by one sort once the buffer outgrows what is kept.
    """

    def __init__(self, k: np.ndarray):
        self.k = np.asarray(k, dtype=np.int64)
        n = len(self.k)
        self._kept = self._empty()
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        self._full = np.zeros(n, dtype=bool)  # the leaf holds k keys: those above its
        self._cut_score = np.zeros(n, dtype=np.float32)  # k-th key cannot enter
        self._cut_priority = np.zeros(n, dtype=np.uint64)

    @staticmethod
    def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.uint64)

    def offer(self, leaves: np.ndarray, scores: np.ndarray, priorities: np.ndarray) -> None:
        leaf = np.where(leaves >= 0, leaves, 0)
        wanted = (leaves >= 0) & (self.k[leaf] > 0)
        full = wanted & self._full[leaf]
        wanted[full] = _before(
            scores[full],
            priorities[full],
            self._cut_score[leaf[full]],
            self._cut_priority[leaf[full]],
        )
        if wanted.any():
            self._pending.append((leaves[wanted], scores[wanted], priorities[wanted]))
            self._n_pending += int(wanted.sum())
        if self._n_pending > max(len(self._kept[0]), 1 << 16):
            self._fold()

    def merge(self, other: LeafCandidates) -> None:
        """Take in another worker's candidates (same leaves and k)."""
        if not np.array_equal(self.k, other.k):
            raise ValueError("cannot merge candidates of different plans")
        other._fold()
        self.offer(*other._kept)

    def _fold(self) -> None:
        if not self._pending:
            return
        leaf, score, priority = (
            np.concatenate(parts) for parts in zip(self._kept, *self._pending, strict=True)
        )
        order = np.lexsort((priority, score, leaf))
        leaf, score, priority = leaf[order], score[order], priority[order]
        rank = np.arange(len(leaf)) - np.searchsorted(leaf, leaf, side="left")
        keep = rank < self.k[leaf]
        self._kept = leaf[keep], score[keep], priority[keep]
        self._pending, self._n_pending = [], 0
        last = keep & (rank == self.k[leaf] - 1)
        self._full[leaf[last]] = True
        self._cut_score[leaf[last]] = score[last]
        self._cut_priority[leaf[last]] = priority[last]

    def cutoffs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(leaf holds k keys, its k-th smallest score, priority) per leaf."""
        self._fold()
        return self._full.copy(), self._cut_score.copy(), self._cut_priority.copy()


#: Values (rows x dim) an in-process pass reads per batch at least: a batch's grouped
#: search costs a fixed amount per parent whatever its rows (most of all the torch search
#: on the CPU), so large batches amortise it; no result depends on the batching.
PASS_BATCH_VALUES = 2**22
PASS_BATCH_MAX_ROWS = 2**16


def pass_batch_rows(batch_rows: int, dim: int) -> int:
    """The read batch of an in-process pass: `batch_rows`, raised to PASS_BATCH_VALUES
    values of `dim` (at most PASS_BATCH_MAX_ROWS rows)."""
    return max(batch_rows, min(PASS_BATCH_MAX_ROWS, PASS_BATCH_VALUES // max(1, dim)))


def resolve_device(device: str) -> str:
    """A torch device for `device` ("auto": CUDA when there is one, else the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def row_keys(
    tax: Taxonomy,
    x: np.ndarray,
    strategy: str,
    seed: int,
    assigner: Any = None,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(leaf, score, priority) of valid float32 rows `x`: the one place both faces (the
    Parquet passes, the MDF filter) compute what the plan is applied to. `device`: where
    the rows are assigned (see `resolve_device`)."""
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.uint64)
    labels = tax.assign_paths(x, assigner=assigner, device=resolve_device(device))
    leaves = labels.paths[:, -1].astype(np.int64)
    priorities = sample_priorities(x, seed, SAMPLE_SALT)
    return leaves, row_scores(strategy, labels.distance), priorities
