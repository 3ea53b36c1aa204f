"""A refit of a grown crawl, warm-started from the old tree, keeps every old node's id.

Planted data: 4 well-separated regions of 3 sub-clusters each (crawl A); the crawl then
grows by more rows of the same 12 sub-clusters and a few rows of a 5th region. The old tree
is a cold fit of A with branching [4, 3]; the refit, warm-started from it, allows 5 root
children, so exactly one level-1 node (the new region) and its 3 children are born, and
nothing is retired. A cold refit of the same grown data shows the ids would have moved.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import write_embeddings
from taxonomy_toys import assert_same_tree

from mdf_taxonomy.engine import PipelineFit, TaxonomyEngine
from mdf_taxonomy.model import Level, Taxonomy, TaxonomyStore
from mdf_taxonomy.model.warm_start import align_ids, grow_children, id_changes

DIM = 8
PARAMS = dict(n_levels=2, dim=DIM, seed=5, max_iter=8, progress=False)
#: A's rows whose path may change under the warm refit. The planted sub-clusters are about
#: 30 noise sigmas apart and the grown rows come from the same ones, so the centroids move
#: by far less than the ~15 sigmas from a row of A to a boundary (measured: at most 1.7 at
#: level 1, where the mix of sub-clusters changes, 0.5 at level 2): none should move; 1%
#: leaves room for an unlucky row, far below what a renumbering moves (most of them).
MAX_MOVED = 0.01


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, grown rows of the old regions, rows of the new region) as float32."""
    rng = np.random.default_rng(seed)
    regions = rng.normal(size=(5, DIM)) * 40.0
    subs = regions[:, None] + rng.normal(size=(5, 3, DIM)) * 8.0

    def draw(region: int, n: int) -> np.ndarray:
        which = rng.integers(0, 3, n)
        return subs[region, which] + rng.normal(size=(n, DIM))

    a = np.concatenate([draw(r, 120) for r in range(4)])
    more = np.concatenate([draw(r, 60) for r in range(4)])
    new = draw(4, 45)
    return a.astype(np.float32), more.astype(np.float32), new.astype(np.float32)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """Paths of crawl A and of the grown crawl (A's file plus one of new rows), and A."""
    root = tmp_path_factory.mktemp("stable-ids")
    a, more, new = _planted()
    write_embeddings(root / "A" / "part-0.parquet", a)
    write_embeddings(root / "grown" / "part-0.parquet", a)
    grown = np.concatenate([more, new])
    write_embeddings(root / "grown" / "part-1.parquet", grown, ids=len(a) + np.arange(len(grown)))
    return root, str(root / "A"), str(root / "grown"), a


def _engine(uri, branching=(5, 3), **kw) -> TaxonomyEngine:
    return TaxonomyEngine(
        storage_uri=str(uri), **{**PARAMS, "branching_factor": list(branching), **kw}
    )


@pytest.fixture(scope="module")
def old(crawl) -> tuple[str, Taxonomy]:
    root, a_path, _, _ = crawl
    uri = str(root / "old")
    tax = _engine(uri, (4, 3)).fit(a_path)
    assert [lv.n_nodes for lv in tax.levels] == [4, 12]
    return uri, tax


@pytest.fixture(scope="module")
def warm(crawl, old) -> tuple[TaxonomyEngine, Taxonomy]:
    root, _, grown, _ = crawl
    engine = _engine(root / "warm")
    tax = engine.fit(grown, warm_start=old[0])
    return engine, tax


def test_warm_refit_keeps_every_old_id_and_bears_the_planted_nodes(crawl, old, warm):
    _, a_path, _, a = crawl
    engine, tax = warm
    assert [lv.n_nodes for lv in tax.levels] == [5, 15]
    report = id_changes(old[1], tax)
    for lv in report.levels:
        assert lv.drifted == [], lv  # each old centroid's nearest new centroid: its own id
    counts = [(lv.kept, lv.born, lv.retired) for lv in report.levels]
    assert counts == [(4, 1, 0), (12, 3, 0)]
    # the born level-1 node is the new region's: its rows, and only they, are under it
    paths = tax.assign_paths(a)[0]
    assert (paths[:, 0] < 4).all() and (paths[:, 1] < 12).all()
    assert (tax.assign_paths(_planted()[2])[0][:, 0] == 4).all()
    assert (tax.levels[1].parents[12:] == 4).all()
    # the fit's summary says the same, without a pass over the rows
    assert engine.last_summary["fit"]["id_changes"] == report.as_dict()
    # A's rows under the old and the new tree, one read of A
    moved = engine.compare(a_path, old[0])
    for lv in moved["levels"]:
        assert lv["rows"] == len(a)
        assert lv["rows_moved"] <= MAX_MOVED * len(a), lv
        assert (lv["kept"], lv["born"], lv["retired"]) == counts[lv["level"] - 1]


@pytest.fixture(scope="module")
def cold(crawl) -> tuple[TaxonomyEngine, Taxonomy]:
    root, _, grown, _ = crawl
    engine = _engine(root / "cold")
    return engine, engine.fit(grown)


def test_cold_refit_renumbers_so_the_warm_start_is_what_keeps_ids(crawl, old, cold):
    _, a_path, _, a = crawl
    engine, cold = cold
    report = engine.compare(a_path, old[0])
    drifted = sum(len(lv["drifted"]) for lv in report["levels"])
    assert drifted > 0, report  # old centroids now nearest another id
    assert report["levels"][1]["rows_moved"] > 0.3 * len(a), report
    assert cold.levels[0].n_nodes == 5


def test_warm_refit_is_deterministic_and_skips_samples_it_does_not_need(crawl, old, warm):
    root, _, grown, _ = crawl
    again = _engine(root / "warm-again").fit(grown, warm_start=old[1])  # the tree, not its URI
    assert_same_tree(again, warm[1])
    assert again.state.history == warm[1].state.history
    # level 1 grows and level 2 has a new parent: both sample; without growth, neither
    phases = [p["phase"] for p in warm[0].last_fit.pass_log]
    assert phases.count("sample") == 2
    same_shape = _engine(root / "warm-4x3", (4, 3))
    tax = same_shape.fit(grown, warm_start=old[0])
    assert [p["phase"] for p in same_shape.last_fit.pass_log].count("sample") == 0
    assert all(lv.drifted == [] and lv.born == 0 for lv in id_changes(old[1], tax).levels)


def test_a_cosine_tree_keeps_its_ids_too(crawl):
    """Same shape, so nothing is born. (Grown, this cosine case shows the limit of a grown
    root: the new region is only 0.22 from region 0 in 1 - cosine, and the new root child
    drawn by k-means++ starts on old node 10's rows instead, which the report names as
    drifted; in l2 the new region is far and the draw finds it.)"""
    root, a_path, grown, a = crawl
    old = _engine(root / "cos-old", (4, 3), metric="cosine").fit(a_path)
    engine = _engine(root / "cos-warm", (4, 3), metric="cosine")
    tax = engine.fit(grown, warm_start=old)
    report = engine.compare(a_path, old)["levels"]
    assert [(lv["kept"], lv["born"], lv["drifted"]) for lv in report] == [(4, 0, []), (12, 0, [])]
    assert all(lv["shift_max"] < 0.05 for lv in report)  # 1 - cosine
    assert all(lv["rows_moved"] <= MAX_MOVED * len(a) for lv in report)
    assert [p["phase"] for p in engine.last_fit.pass_log].count("sample") == 0
    assert tax.config.metric == "cosine"


def test_a_deeper_refit_keeps_the_old_levels_and_bears_the_new_one(crawl, old):
    root, _, grown, _ = crawl
    tax = _engine(root / "deeper", (5, 3, 2), n_levels=3).fit(grown, warm_start=old[1])
    report = id_changes(old[1], tax).levels
    assert [(lv.kept, lv.born, lv.drifted) for lv in report[:2]] == [(4, 1, []), (12, 3, [])]
    assert (report[2].kept, report[2].born) == (0, tax.levels[2].n_nodes) and report[2].born


def test_a_resumed_warm_fit_ends_with_the_same_tree(crawl, old, warm):
    root, _, grown, _ = crawl
    engine = _engine(root / "resumed")
    config = engine._pipeline(grown, None, fit=True)

    def stop(tax: Taxonomy) -> None:
        if tax.state.level == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        PipelineFit(config, progress=False, on_pass=stop, warm_start=old[1]).run()
    assert not TaxonomyStore(str(root / "resumed")).load().state.complete
    with pytest.raises(ValueError, match="warm_start"):  # another old tree: refused
        engine.fit(grown, warm_start=warm[1])
    with pytest.raises(ValueError, match="warm_start"):  # none at all: refused too
        engine.fit(grown)
    assert_same_tree(engine.fit(grown, warm_start=old[0]), warm[1])
    assert engine.last_fit.resumed


def test_the_cli_warm_starts_from_a_storage_uri_and_prints_the_ids(crawl, old, warm, capsys):
    from mdf_taxonomy import cli

    root, _, grown, _ = crawl
    uri = str(root / "warm-cli")
    flags = ["--n-levels", "2", "--branching-factor", "5,3", "--dim", str(DIM), "--seed", "5"]
    argv = ["-q", "fit", "--input", grown, "--storage-uri", uri, *flags, "--max-iter", "8"]
    assert cli.main([*argv, "--warm-start", old[0]]) == 0
    printed = capsys.readouterr().out
    assert "level 1 ids: 4 kept, 1 born, 0 retired, 0 drifted" in printed
    assert "level 2 ids: 12 kept, 3 born, 0 retired, 0 drifted" in printed
    assert_same_tree(TaxonomyStore(uri).load(), warm[1])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(branching=(3, 3)), "level 1 may only grow"),
        (dict(branching=(5, 2)), "branching_factor at level 2 is 2"),
        (dict(metric="cosine"), "metric"),
        (dict(dim=DIM + 1), "dim"),
    ],
)
def test_a_warm_start_the_old_tree_cannot_give_is_refused(crawl, old, tmp_path, kw, match):
    _, _, grown, _ = crawl
    branching = kw.pop("branching", (5, 3))
    with pytest.raises(ValueError, match=match):
        _engine(tmp_path / "tax", branching, **kw).fit(grown, warm_start=old[1])


def test_warm_start_needs_a_finished_tree_other_than_the_fit_itself(crawl, old, tmp_path):
    _, _, grown, _ = crawl
    engine = _engine(tmp_path / "tax")
    with pytest.raises(ValueError, match="this engine's own storage_uri"):
        engine.fit(grown, warm_start=str(tmp_path / "tax"))
    unfinished = TaxonomyStore(old[0]).load("000001")
    with pytest.raises(ValueError, match="not a finished fit"):
        engine.fit(grown, warm_start=unfinished)
    with pytest.raises(TypeError, match="warm_start"):
        engine.fit(grown, warm_start=3)


def test_grown_children_keep_the_old_ones_and_reach_for_the_far_rows():
    rng = np.random.default_rng(1)
    fixed = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
    sample = np.concatenate([rng.normal(size=(50, 2)), rng.normal(size=(5, 2)) + [0, 50]])
    block = grow_children(fixed, sample.astype(np.float32), 3, seed=7)
    assert (block[:2] == fixed).all() and block[2, 1] > 45
    assert (grow_children(fixed, sample.astype(np.float32), 3, seed=7) == block).all()
    assert len(grow_children(fixed, fixed.copy(), 3, seed=7)) == 2  # no distinct row left


def _shuffled(tax: Taxonomy, seed: int) -> Taxonomy:
    """`tax` renumbered at random: level 1 in any order, the children of its old parents
    (those below 4) too; the born parent's children keep theirs, as align_ids does."""
    rng = np.random.default_rng(seed)
    l1, l2 = tax.levels
    p1 = rng.permutation(l1.n_nodes)
    off = l2.child_offsets(l1.n_nodes)
    blocks = [np.arange(off[p], off[p + 1]) for p in p1]
    p2 = np.concatenate(
        [rng.permutation(b) if p < 4 else b for p, b in zip(p1, blocks, strict=True)]
    )
    parents = np.repeat(np.arange(l1.n_nodes), [len(b) for b in blocks])
    levels = [Level(l1.centroids[p1], l1.parents), Level(l2.centroids[p2], parents)]
    return dataclasses.replace(tax, levels=levels)


def test_align_ids_gives_a_renumbered_tree_its_old_ids_back(old, warm):
    shuffled = _shuffled(warm[1], seed=3)
    assert id_changes(old[1], shuffled).levels[0].drifted  # the shuffle moved ids
    assert_same_tree(align_ids(shuffled, old[1]), warm[1])
    assert_same_tree(align_ids(warm[1], old[1]), warm[1])  # a warm tree: nothing moves


def test_align_ids_on_a_cold_refit_keeps_what_the_partition_allows(crawl, old, cold):
    _, _, _, a = crawl
    cold_tax = cold[1]
    aligned = align_ids(cold_tax, old[1])
    old_paths = old[1].assign_paths(a)[0]
    before = id_changes(old[1], cold_tax, old_paths, cold_tax.assign_paths(a)[0]).levels
    after = id_changes(old[1], aligned, old_paths, aligned.assign_paths(a)[0]).levels
    # this cold refit found another partition (a worse optimum than the warm refit's), so
    # not every row can keep its path, but ids are matched: fewer rows move at each level
    assert after[0].drifted == [] and (after[0].kept, after[0].born) == (4, 1)
    for b, c in zip(before, after, strict=True):
        assert c.rows_moved < b.rows_moved, (b, c)
    # the same tree renumbered: the same centroids, and the same partition of the rows
    for got, was in zip(aligned.levels, cold_tax.levels, strict=True):
        assert sorted(map(tuple, got.centroids)) == sorted(map(tuple, was.centroids))
    x = np.concatenate(_planted())
    new_ids, cold_ids = aligned.assign_paths(x)[0], cold_tax.assign_paths(x)[0]
    for level in range(2):
        pairs = set(zip(cold_ids[:, level], new_ids[:, level], strict=True))
        assert len(pairs) == len({c for c, _ in pairs}) == len({n for _, n in pairs})
