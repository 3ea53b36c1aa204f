"""Refitting a grown crawl without renumbering the tree: a fit warm-started from an old
tree, and what moved between two trees.

Node ids are global per level and a level's nodes are sorted by parent, so one more child
anywhere but at the end of a level renumbers every later node of it. A warm start
therefore keeps the old tree's shape where the old tree has one: child j of an old parent
starts at the old child j and stays child j; the Lloyd passes then refine every level on
the new data as usual. The rules:

- Parents the old tree has (ids below its node count of the level above: nodes born in a
  warm fit come after the old ones) keep exactly their old children (a parent capped in
  the old fit for lack of rows stays capped, one split by max_node_size stays split; a
  cold refit, then `align_ids`, re-decides them).
- Level 1 may grow: with more root children allowed than the old tree has, the extra ones
  are appended after the old ones, drawn from the root's init sample by k-means++ that
  continues from the old centroids. Like any k-means++ draw it may start on an old
  node's rows rather than the new ones where those are not far from the old nodes; that
  old node is then emptied and repaired from a sibling, and `id_changes` names it drifted.
- Parents born in the warm fit, and levels below the old tree's depth, start as in a cold
  fit (k-means++ on their sample, max_node_size applying).
- Refused, naming what differs: another dim or metric, fewer root children than the old
  tree has, another branching factor below level 1, or an old tree that is not a finished
  fit.

A level whose every parent takes its old children needs no init sample, and the driver
skips its sampling pass (`needs_sample`). The old tree's content digest (`identity`) is part
of the fit's input description, so a resume with another old tree is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.fitting import SampleResult, distinct_rows
from mdf_taxonomy.model.seeding import node_seed
from mdf_taxonomy.model.taxonomy import Level, Taxonomy


def check_warm_start(old: Taxonomy, cfg: TaxonomyConfig, dim: int) -> None:
    """Raise ValueError, naming what differs, unless a fit of `cfg` on `dim`-D rows can
    start from `old` (see the module rules)."""
    if not old.state.complete or not old.levels:
        raise ValueError(
            f"warm_start: the old tree is not a finished fit (level {old.state.level}, "
            f"phase {old.state.phase}); finish it first"
        )
    if old.dim != dim:
        raise ValueError(f"warm_start: the old tree has dim={old.dim}, this fit dim={dim}")
    if old.config.metric != cfg.metric:
        raise ValueError(
            f"warm_start: the old tree has metric={old.config.metric!r}, this fit "
            f"metric={cfg.metric!r}"
        )
    roots = old.levels[0].n_nodes
    if cfg.branching(1) < roots:
        raise ValueError(
            f"warm_start: branching_factor at level 1 is {cfg.branching(1)}, but the old tree "
            f"has {roots} level-1 nodes; level 1 may only grow"
        )
    for level in range(2, min(cfg.n_levels, old.n_levels) + 1):
        if cfg.branching(level) != old.config.branching(level):
            raise ValueError(
                f"warm_start: branching_factor at level {level} is {cfg.branching(level)}, the "
                f"old tree's {old.config.branching(level)}; below level 1 it must stay (more "
                "children of an old parent would renumber every later node of the level): "
                "refit without warm_start instead"
            )


def identity(old: Taxonomy) -> dict[str, Any]:
    """What identifies an old tree in a fit's input description: its content, not where
    it was read from."""
    h = hashlib.sha256(f"{old.dim}:{old.config.metric}".encode())
    for lv in old.levels:
        h.update(lv.centroids.tobytes())
        h.update(lv.parents.tobytes())
    return {"sha256": h.hexdigest(), "nodes_per_level": [lv.n_nodes for lv in old.levels]}


def _parents(tree: Taxonomy, level: int) -> int:
    return 1 if level == 1 else tree.levels[level - 2].n_nodes


def needs_sample(old: Taxonomy, tax: Taxonomy) -> bool:
    """False when every parent of the level `tax` starts next takes its old children as
    they are, so that level's sampling pass can be skipped."""
    level = tax.state.level
    if level > old.n_levels or _parents(tax, level) != _parents(old, level):
        return True
    return level == 1 and tax.config.branching(1) > old.levels[0].n_nodes


def warm_children(
    old: Taxonomy, tax: Taxonomy, result: SampleResult | None
) -> dict[int, np.ndarray]:
    """The initial children of every parent the old tree has at the level `tax` starts
    next (parent -> (k, dim) float32 block, in the old order); `result` is the level's
    sampling pass, needed only where `needs_sample` says so (the root's growth)."""
    level, cfg = tax.state.level, tax.config
    if level > old.n_levels:
        return {}
    lv = old.levels[level - 1]
    n_old = _parents(old, level)
    offsets = lv.child_offsets(n_old)
    blocks = {p: lv.centroids[offsets[p] : offsets[p + 1]].copy() for p in range(n_old)}
    if level == 1 and cfg.branching(1) > len(blocks[0]):
        if result is None:
            raise ValueError("warm_children: level 1 grows, so it needs its sampling pass")
        sample = result.samples.get(0, np.zeros((0, tax.dim), np.float32))
        rows = result.rows.get(0, 0)
        k = max(len(blocks[0]), min(cfg.branching(1), rows, distinct_rows(sample)))
        blocks[0] = grow_children(blocks[0], sample, k, node_seed(cfg.seed, 1, 0))
    return blocks


def grow_children(fixed: np.ndarray, sample: np.ndarray, k: int, seed: int) -> np.ndarray:
    """`fixed` followed by up to k - len(fixed) rows of `sample`: greedy k-means++ (D^2
    sampling, 2 + log(k) candidates a step, the one that lowers the potential most)
    continued from the `fixed` centres, which stay as they are (no Lloyd on the sample,
    whose empty-cluster repair could move an old child). Deterministic for a seed; squared
    L2 ranks cosine rows too, as they are unit norm."""
    x = torch.from_numpy(np.array(sample, dtype=np.float64))
    chosen = torch.from_numpy(np.array(fixed, dtype=np.float64))
    if len(x) == 0 or k <= len(chosen):
        return np.asarray(fixed, dtype=np.float32)
    gen = torch.Generator().manual_seed(seed)
    trials = 2 + int(np.log(k))
    best = torch.cdist(x, chosen).square_().min(1).values
    while len(chosen) < k:
        cum = torch.cumsum(best, 0)
        total = float(cum[-1])
        if not total > 0:  # every sample row sits on a centre: no distinct row is left
            break
        u = torch.rand(trials, generator=gen, dtype=torch.float64) * total
        cands = torch.searchsorted(cum, u, right=True).clamp_max_(len(x) - 1)
        d = torch.cdist(x, x[cands]).square_()
        potential = torch.minimum(best[:, None], d).sum(0)
        j = int(torch.argmin(potential))  # first of the lowest
        chosen = torch.cat([chosen, x[cands[j]][None]])
        best = torch.minimum(best, d[:, j])
    return chosen.float().numpy()


# -- matching a cold refit ---------------------------------------------------------------


def align_ids(new: Taxonomy, old: Taxonomy) -> Taxonomy:
    """`new` renumbered to `old`'s ids where the trees match: top-down, the children of
    each new parent matched to an old parent are paired with that parent's old children
    by Hungarian matching on centroid distance (scipy's linear_sum_assignment) and put in
    the old order, the unmatched ones (born) after them; children of a born parent keep
    their order. The same tree, renumbered: every row's nodes are the same centroids.

    Ids are positions within a level, so an old id is kept exactly where every earlier
    parent of the level kept its number of children; where an old child is unmatched
    (retired: the new block is smaller) the later ids close up, and `id_changes` shows it.
    For a tree made by a warm start nothing moves: its ids are the old ones already.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # scipy comes with scikit-learn (the report and test extras)
        raise ImportError("align_ids needs scipy: pip install scipy") from e
    if old.dim != new.dim or old.config.metric != new.config.metric:
        raise ValueError("align_ids: the trees differ in dim or metric")
    levels = []
    above: list[int] = [0]  # the level above: original index of each renumbered node
    matched = {0: 0}  # the level above: renumbered position -> old id
    for level, lv in enumerate(new.levels, start=1):
        lo = old.levels[level - 1] if level <= old.n_levels else None
        new_off = lv.child_offsets(_parents(new, level))
        old_off = lo.child_offsets(_parents(old, level)) if lo is not None else None
        order: list[int] = []
        parents: list[int] = []
        below: dict[int, int] = {}
        for q, p in enumerate(above):
            kids = np.arange(new_off[p], new_off[p + 1])
            if lo is not None and q in matched:
                olds = np.arange(old_off[matched[q]], old_off[matched[q] + 1])
                d = _distances(lv.centroids[kids], lo.centroids[olds], new.config.metric)
                rows, cols = linear_sum_assignment(d)
                below.update({len(order) + i: int(olds[c]) for i, c in enumerate(np.sort(cols))})
                paired = rows[np.argsort(cols)]  # in the old children's order
                kids = np.concatenate([kids[paired], np.delete(kids, paired)])
            order.extend(kids.tolist())
            parents.extend([q] * len(kids))
        perm = np.array(order, dtype=np.int64)
        sizes = getattr(lv, "sizes", None)
        extra = {} if sizes is None else {"sizes": sizes[perm]}
        levels.append(Level(lv.centroids[perm], np.array(parents, np.int64), **extra))
        above, matched = order, below
    return replace(new, levels=levels, version=None)


# -- what moved -------------------------------------------------------------------------


@dataclass
class LevelChange:
    """How one level of a new tree relates to the old one, node id by node id.

    A node is kept when both trees have its id under the same parent id (and, where rows
    were labelled, it holds rows in the new tree); born when only the new tree has it;
    retired when only the old tree has it, or it holds no rows in the new tree. `drifted`:
    kept nodes whose old centroid is now nearer another node of the level than its own.
    Shifts are distances between a kept node's old and new centroid (Euclidean for l2,
    1 - cosine for cosine). `rows_moved`: labelled rows whose path down to this level
    differs between the trees.
    """

    level: int
    nodes_old: int
    nodes_new: int
    kept: int
    born: int
    retired: int
    drifted: list[int] = field(default_factory=list)
    shift_max: float = 0.0
    shift_median: float = 0.0
    rows: int | None = None
    rows_moved: int | None = None


@dataclass
class IdChangeReport:
    """Per level, what a refit kept, bore and retired, and the rows whose path changed."""

    levels: list[LevelChange]

    def as_dict(self) -> dict[str, Any]:
        return {"levels": [asdict(lv) for lv in self.levels]}


def id_changes(
    old: Taxonomy,
    new: Taxonomy,
    old_paths: np.ndarray | None = None,
    new_paths: np.ndarray | None = None,
) -> IdChangeReport:
    """Compare two trees id by id; with the paths of the same rows under both trees
    ((N, levels) int32, -1 for rows not labelled), also count rows per node and the rows
    whose path changed."""
    if old.dim != new.dim or old.config.metric != new.config.metric:
        raise ValueError(
            f"id_changes: the trees differ in dim or metric ({old.dim}, {old.config.metric!r} "
            f"vs {new.dim}, {new.config.metric!r})"
        )
    labelled = old_paths is not None and new_paths is not None
    if labelled and len(old_paths) != len(new_paths):
        raise ValueError(f"id_changes: {len(old_paths)} old paths, {len(new_paths)} new ones")
    out = []
    for level in range(1, max(old.n_levels, new.n_levels) + 1):
        lo = old.levels[level - 1] if level <= old.n_levels else None
        ln = new.levels[level - 1] if level <= new.n_levels else None
        n_old, n_new = (lo.n_nodes if lo else 0), (ln.n_nodes if ln else 0)
        both = min(n_old, n_new)
        matched = np.zeros(both, bool) if not both else lo.parents[:both] == ln.parents[:both]
        keep = matched.copy()
        change = LevelChange(level, n_old, n_new, 0, n_new - int(matched.sum()), 0)
        if labelled and ln is not None and level <= old.n_levels:
            ok = (old_paths[:, :level] >= 0).all(1) & (new_paths[:, :level] >= 0).all(1)
            counts = np.bincount(new_paths[ok, level - 1], minlength=n_new)
            keep &= counts[:both] > 0
            moved = (old_paths[ok, :level] != new_paths[ok, :level]).any(1)
            change.rows, change.rows_moved = int(ok.sum()), int(moved.sum())
        kept = np.flatnonzero(keep)
        change.kept, change.retired = len(kept), n_old - len(kept)
        if len(kept):
            d = _distances(lo.centroids[kept], ln.centroids, new.config.metric)
            shift = d[np.arange(len(kept)), kept]
            change.shift_max = float(shift.max())
            change.shift_median = float(np.median(shift))
            change.drifted = kept[d.argmin(1) != kept].tolist()
        out.append(change)
    return IdChangeReport(out)


def _distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """(len(a), len(b)) distances in the unit of `assign_paths` (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "cosine":
        na = np.linalg.norm(a, axis=1, keepdims=True)
        nb = np.linalg.norm(b, axis=1, keepdims=True)
        return 1.0 - (a / np.maximum(na, 1e-30)) @ (b / np.maximum(nb, 1e-30)).T
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))
