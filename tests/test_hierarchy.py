"""A 3-level fit recovers a planted tree; small parents get fewer children, never empty ones."""

from __future__ import annotations

import numpy as np
import torch
from conftest import write_embeddings

from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.model import Taxonomy, TaxonomyConfig
from mdf_taxonomy.model.fitting import SampleResult, start_level


def planted_tree(branching=(3, 3, 2), per_leaf=60, dim=16, seed=0):
    """Rows around leaves of a tree whose levels are 5x tighter each step down."""
    rng = np.random.default_rng(seed)
    centres = [np.zeros((1, dim))]
    for level, b in enumerate(branching):
        scale = 60.0 / 5**level
        parent = centres[-1]
        centres.append(
            np.repeat(parent, b, axis=0) + rng.normal(size=(len(parent) * b, dim)) * scale
        )
    n_leaves = len(centres[-1])
    leaf = np.repeat(np.arange(n_leaves), per_leaf)
    x = centres[-1][leaf] + rng.normal(size=(len(leaf), dim)) * 0.4
    truth = []
    for level in range(len(branching)):
        div = int(np.prod(branching[level + 1 :]))
        truth.append(leaf // div)
    perm = rng.permutation(len(leaf))
    return x[perm].astype(np.float32), [t[perm] for t in truth]


def test_three_level_fit_recovers_the_planted_tree(ray_session, tmp_path):
    from sklearn.metrics import adjusted_mutual_info_score

    x, truth = planted_tree()
    write_embeddings(tmp_path / "d.parquet", x, row_group_size=400)
    engine = TaxonomyEngine(
        n_levels=3,
        branching_factor=[3, 3, 2],
        seed=1,
        max_iter=6,
        storage_uri=str(tmp_path / "t"),
        batch_size=256,
        progress=False,
    )
    tax = engine.fit(str(tmp_path / "d.parquet"))
    paths = engine.predict(x)
    amis = [adjusted_mutual_info_score(truth[lv], paths[:, lv]) for lv in range(3)]
    assert min(amis) >= 0.95, amis
    assert [lv.n_nodes for lv in tax.levels] == [3, 9, 18]
    # passes per level are recorded for the scale plan
    lloyd = [h for h in tax.state.history if h["phase"] == "lloyd"]
    assert {h["level"] for h in lloyd} == {1, 2, 3}


def test_small_parent_gets_fewer_children_and_empty_parent_one():
    cfg = TaxonomyConfig(n_levels=2, branching_factor=[3, 4], dim=2)
    from mdf_taxonomy.model import Level

    l1 = Level(np.array([[0, 0], [10, 10], [50, 50]], np.float32), np.zeros(3))
    tax = Taxonomy(config=cfg, dim=2, levels=[l1])
    tax.state.level, tax.state.phase = 2, "sample"
    rng = np.random.default_rng(0)
    samples = {
        0: rng.normal(size=(40, 2)).astype(np.float32),
        1: np.array([[10, 10], [11, 11]], np.float32),
    }
    nxt = start_level(tax, SampleResult(rows={0: 40, 1: 2}, samples=samples))
    lv = nxt.levels[1]
    assert np.bincount(lv.parents, minlength=3).tolist() == [4, 2, 1]
    # the parent without rows keeps one child at its own centroid
    assert np.array_equal(lv.centroids[-1], [50, 50])
    # children of one parent are all distinct
    assert len(torch.unique(torch.from_numpy(lv.centroids[4:6]), dim=0)) == 2
