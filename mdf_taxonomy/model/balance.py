"""Node sizes: how even they are, and the adaptive branching that evens a skewed tree.

Every path has `n_levels` ids, so a node too large for curation is not split in place
(that would renumber its level) but gets more children at the next level: with
`max_node_size` set, a parent of S rows gets max(branching, ceil(S / max_node_size))
children, so its children hold at most max_node_size rows on average. S is counted by
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
    cfg: TaxonomyConfig, level: int, parent_sizes: np.ndarray | None, n_parents: int
) -> np.ndarray:
    """(n_parents,) children each parent is to get at `level`: the branching factor, or
    ceil(size / max_node_size) where that is more (module doc); level 1 and parents of
    unknown size keep the branching factor."""
    b = cfg.branching(level)
    wanted = np.full(n_parents, b, dtype=np.int64)
    if cfg.max_node_size is None or level == 1 or parent_sizes is None:
        return wanted
    split = -(-np.asarray(parent_sizes, dtype=np.int64) // cfg.max_node_size)  # ceil
    cap = min(MAX_BRANCHING, cfg.max_sample_per_node)
    return np.maximum(wanted, np.minimum(split, cap))


def sample_sizes(tax: Taxonomy) -> SampleSizes:
    """Each parent's init sample size for the level being fitted: sample_per_child per
    child it is to get (by the parent's stored size), capped by max_sample_per_node."""
    cfg, level = tax.config, tax.state.level
    b = cfg.branching(level)
    above = tax.levels[level - 2] if level > 1 else None
    sizes = None if above is None else above.sizes
    wanted = children_wanted(cfg, level, sizes, 1 if above is None else above.n_nodes)
    larger = {
        int(p): min(cfg.max_sample_per_node, cfg.sample_per_child * int(wanted[p]))
        for p in np.flatnonzero(wanted > b)
    }
    return SampleSizes(cfg.sample_size(level), larger)


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
