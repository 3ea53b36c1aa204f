"""Each row's runner-up sibling at a level: the node where a row near a boundary may have
duplicates that the dedup within nodes cannot see (semdedup's cross-boundary option)."""

from __future__ import annotations

import numpy as np
import torch

from mdf_taxonomy.model.taxonomy import Taxonomy

_ROWS_PER_STEP = 8192


def runner_up(
    tax: Taxonomy, level: int, node: int, unit: torch.Tensor, raw: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """For rows of `node` at `level` (1-based): the nearest other child of the node's
    parent (ties: the smallest id; -1 for an only child) and the margin, its distance minus
    the distance to `node` (+inf for an only child).

    Distances are the tree's (1 - cosine, or Euclidean), in float64 from the centroids:
    `unit` rows for cosine, `raw` rows for l2. A row labelled with `node` whose nearest
    sibling is another one (a near-tie in the labeller's precision) has a margin <= 0.
    """
    lv = tax.levels[level - 1]
    n_parents = 1 if level == 1 else tax.levels[level - 2].n_nodes
    offsets = lv.child_offsets(n_parents)
    parent = int(lv.parents[node])
    lo, hi = int(offsets[parent]), int(offsets[parent + 1])
    n = int(unit.shape[0])
    other = np.full(n, -1, np.int64)
    margin = np.full(n, np.inf)
    if hi - lo < 2:
        return other, margin
    c = lv.centroids[lo:hi].astype(np.float64)
    cosine = tax.config.metric == "cosine"
    if cosine:
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        rows = unit.double().cpu().numpy()
    else:
        rows = np.asarray(raw, dtype=np.float64)
    c_sq = (c * c).sum(axis=1)
    own = node - lo
    for i in range(0, n, _ROWS_PER_STEP):
        x = rows[i : i + _ROWS_PER_STEP]
        if cosine:
            d = 1.0 - x @ c.T
        else:
            d = np.sqrt(np.maximum((x * x).sum(axis=1)[:, None] - 2.0 * x @ c.T + c_sq, 0.0))
        mine = d[:, own].copy()
        d[:, own] = np.inf
        best = np.argmin(d, axis=1)  # the first of equal distances: the smallest id
        other[i : i + len(x)] = lo + best
        margin[i : i + len(x)] = d[np.arange(len(x)), best] - mine
    return other, margin
