"""Node sizes: how even they are, and the adaptive branching that evens a skewed tree.

Every path has `n_levels` ids, so a node too large for curation is not split in place
(that would renumber its level) but gets more children at the next level: with
`max_node_size` set, a parent of S rows gets max(branching, ceil(S / max_node_size))
children, so its children hold at most max_node_size rows on average. With
`balance_factor` f set, the bound is relative: a parent over f x the median size M of
its siblings (the children of its own parent) gets ceil(branching x S / (f x M))
children, so they are at most f times a median sibling's children on average; with both
set a parent gets the larger count. S is counted by
the sampling pass of the new level (the rows under the parent's final centroid), so the
number of children depends on counts only, whatever the batching, and the parent's
stored size becomes S: an inner node's size is the sum of its children's. A leaf's size
is the count of its level's last Lloyd pass (the rows nearest the centroids before their
last update). The sampling pass sizes a parent's sample by the count its level's last
Lloyd pass gave (sample_per_child per child it is to get, capped by
max_sample_per_node), and the children stay within what k-means++ can make: at most
max_sample_per_node (and MAX_BRANCHING), the parent's rows and the sample's distinct
rows. Level 1 has no counted parent and keeps its branching factor. Leaves over
max_node_size cannot be split and are counted as `oversized`; nodes under
`min_node_size` are counted as `undersized`, not merged: merging would renumber their
siblings and break the paths already written with the tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from mdf_taxonomy.model.config import MAX_BRANCHING, TaxonomyConfig
from mdf_taxonomy.model.sampling import SampleSizes

if TYPE_CHECKING:
    from mdf_taxonomy.model.taxonomy import Taxonomy


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of node sizes: 0 when all are equal, (n-1)/n when one node holds
    every row; 0 for no rows."""
    s = np.sort(np.asarray(sizes, dtype=np.float64))
    n, total = len(s), float(s.sum())
    if n == 0 or total <= 0:
        return 0.0
    rank = np.arange(1, n + 1, dtype=np.float64)
    return float(((2 * rank - n - 1) * s).sum() / (n * total))


def level_balance(sizes: np.ndarray) -> dict[str, Any]:
    """How even a level's node sizes are: gini, max/median (None when the median is 0),
    max, median, the node count and the empty nodes."""
    s = np.asarray(sizes, dtype=np.int64)
    if s.size == 0:
        return {
            "n_nodes": 0,
            "gini": 0.0,
            "max_over_median": None,
            "max": 0,
            "median": 0.0,
            "empty": 0,
        }
    median = float(np.median(s))
    return {
        "n_nodes": int(s.size),
        "gini": round(gini(s), 6),
        "max_over_median": round(float(s.max()) / median, 6) if median > 0 else None,
        "max": int(s.max()),
        "median": median,
        "empty": int((s == 0).sum()),
    }


def size_flags(cfg: TaxonomyConfig, sizes: np.ndarray) -> dict[str, int]:
    """Nodes over max_node_size (`oversized`) and under min_node_size (`undersized`),
    for the bounds that are set."""
    flags = {}
    if cfg.max_node_size is not None:
        flags["oversized"] = int((sizes > cfg.max_node_size).sum())
    if cfg.min_node_size is not None:
        flags["undersized"] = int((sizes < cfg.min_node_size).sum())
    return flags


def children_wanted(
    cfg: TaxonomyConfig,
    level: int,
    parent_sizes: np.ndarray | None,
    n_parents: int,
    parent_groups: np.ndarray | None = None,
) -> np.ndarray:
    """(n_parents,) children each parent is to get at `level`: the branching factor, or
    more where max_node_size or balance_factor asks (module doc); level 1 and parents of
    unknown size keep the branching factor. `parent_groups`: each parent's own parent,
    whose children are its siblings (None: all are siblings)."""
    b = cfg.branching(level)
    wanted = np.full(n_parents, b, dtype=np.int64)
    if level == 1 or parent_sizes is None:
        return wanted
    sizes = np.asarray(parent_sizes, dtype=np.int64)
    split = np.zeros(n_parents, dtype=np.int64)
    if cfg.max_node_size is not None:
        split = -(-sizes // cfg.max_node_size)  # ceil
    if cfg.balance_factor is not None:
        split = np.maximum(split, _relative_split(sizes, parent_groups, b, cfg.balance_factor))
    cap = min(MAX_BRANCHING, cfg.max_sample_per_node)
    return np.maximum(wanted, np.minimum(split, cap))


def _relative_split(
    sizes: np.ndarray, groups: np.ndarray | None, b: int, factor: float
) -> np.ndarray:
    """ceil(b x S / (factor x M)) for parents over factor x M, M the median size of their
    siblings (0 elsewhere), so a split parent's children are at most factor times as large
    on average as a median sibling's."""
    groups = np.zeros(len(sizes), np.int64) if groups is None else np.asarray(groups)
    split = np.zeros(len(sizes), dtype=np.int64)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        limit = factor * float(np.median(sizes[members]))
        over = members[sizes[members] > limit]
        if limit > 0 and over.size:
            split[over] = np.ceil(b * sizes[over] / limit).astype(np.int64)
    return split


def sample_sizes(tax: Taxonomy) -> SampleSizes:
    """Each parent's init sample size for the level being fitted: sample_per_child per
    child it is to get (by the parent's stored size), capped by max_sample_per_node."""
    cfg, level = tax.config, tax.state.level
    b = cfg.branching(level)
    above = tax.levels[level - 2] if level > 1 else None
    sizes = None if above is None else above.sizes
    n_parents = 1 if above is None else above.n_nodes
    wanted = children_wanted(cfg, level, sizes, n_parents, parent_groups(tax, level))
    larger = {
        int(p): min(cfg.max_sample_per_node, cfg.sample_per_child * int(wanted[p]))
        for p in np.flatnonzero(wanted > b)
    }
    return SampleSizes(cfg.sample_size(level), larger)


def parent_groups(tax: Taxonomy, level: int) -> np.ndarray | None:
    """Each parent's own parent for the parents of `level` (None below level 3: the
    parents of level 2 are the root's children, all siblings)."""
    return tax.levels[level - 2].parents if level > 2 else None


def split_parents(tax: Taxonomy, level: int) -> np.ndarray:
    """Ids of the nodes of level-1 that got more children at `level` than its branching
    factor (the parents balancing split); empty for level 1."""
    if level == 1:
        return np.zeros(0, dtype=np.int64)
    n_parents = tax.levels[level - 2].n_nodes
    children = np.bincount(tax.levels[level - 1].parents, minlength=n_parents)
    return np.flatnonzero(children > tax.config.branching(level))


def undersized_nodes(tax: Taxonomy, level: int) -> np.ndarray:
    """Ids of the nodes of `level` under min_node_size rows (empty when it is unset or the
    level has no stored sizes)."""
    sizes, low = tax.levels[level - 1].sizes, tax.config.min_node_size
    if sizes is None or low is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(sizes < low)
