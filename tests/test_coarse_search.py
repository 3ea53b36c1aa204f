"""The coarse-to-fine search for huge levels (kernels.coarse_search): near-exact on
clustered data, deterministic whatever the batch, exact below its threshold, and chosen
by the tree's own config (old manifests, which lack it, load as exact)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_embeddings
from taxonomy_toys import assert_same_tree

from mdf_taxonomy.kernels import CoarseSearchAssigner, TorchAssigner, with_centroid_search
from mdf_taxonomy.kernels import coarse_search as cs
from mdf_taxonomy.model import TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy

EXACT = TorchAssigner()


def clustered(k: int, d: int, n: int, seed: int = 0, noise: float = 0.5):
    """k centroids in k/256 super-clusters, and n rows near randomly chosen centroids."""
    g = torch.Generator().manual_seed(seed)
    sup = torch.randn(max(1, k // 256), d, generator=g) * 2.0
    c = sup[torch.randint(0, sup.shape[0], (k,), generator=g)] + torch.randn(k, d, generator=g)
    own = torch.randint(0, k, (n,), generator=g)
    return c, c[own] + noise * torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def data():
    return clustered(4096, 32, 2000)


def same(a, b) -> None:
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.distance, b.distance)
    assert (a.second is None) == (b.second is None)
    if a.second is not None:
        assert torch.equal(a.second, b.second)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_recall_and_inertia_against_exact_on_clustered_data(data, metric):
    c, x = data
    if metric == "cosine":
        c, x = (torch.nn.functional.normalize(t, dim=1) for t in (c, x))
    coarse = CoarseSearchAssigner(EXACT, n_probe=8, min_centroids=1)
    assert coarse.exact is False and coarse.name == "coarse"
    e = EXACT.assign(x, c, metric=metric, with_second=True)
    a = coarse.assign(x, c, metric=metric, with_second=True)
    hit = a.ids == e.ids
    assert hit.float().mean() >= 0.99
    inertia = float(a.distance.double().sum() / e.distance.double().sum())
    assert 1.0 <= inertia <= 1.005
    # distances are the exact kernels' for the chosen ids; second is an upper bound
    assert torch.equal(a.distance[hit], e.distance[hit])
    assert bool((a.second >= e.second).all()) and bool((a.second >= a.distance).all())


def test_the_index_covers_every_centroid_once_and_is_deterministic(data):
    c, _ = data
    one, two = cs.build_index(c, EXACT), cs.build_index(c, EXACT)
    for u, v in zip(one, two, strict=True):
        assert torch.equal(u, v)
    assert torch.equal(torch.sort(one.members).values, torch.arange(c.shape[0]))
    assert torch.equal(one.centroids, c[one.members])
    assert int(one.offsets[-1]) == c.shape[0] and bool((one.offsets.diff() > 0).all())
    assert one.coarse.shape[0] == cs.default_cells(c.shape[0]) == 64


def test_a_rows_result_does_not_depend_on_its_batch(data):
    c, x = data[0], data[1][:1000]
    coarse = CoarseSearchAssigner(EXACT, n_probe=4, min_centroids=1)
    whole = coarse.assign(x, c, with_second=True)
    cs.clear_cache()
    again = coarse.assign(x, c, with_second=True)
    same(whole, again)
    parts = [coarse.assign(x[a:b], c, with_second=True) for a, b in ((0, 1), (1, 400), (400, 1000))]
    for field in ("ids", "distance", "second"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field))


def test_the_probed_cells_are_those_of_exact_arithmetic(data):
    c, x = data
    index = cs.build_index(c, EXACT)
    got = cs.probe_cells(x[:300], index.coarse, 5, "l2")
    exact = torch.cdist(x[:300].double(), index.coarse.double()).square()
    want = torch.sort(exact, dim=1, stable=True).indices[:, :5]
    assert torch.equal(torch.sort(got, 1).values, torch.sort(want, 1).values)


def test_below_the_threshold_it_is_the_exact_search(data):
    c, x = data
    coarse = CoarseSearchAssigner(EXACT, n_probe=2, min_centroids=c.shape[0] + 1)
    same(coarse.assign(x, c, with_second=True), EXACT.assign(x, c, with_second=True))
    groups = torch.arange(x.shape[0]) % 3
    offs = torch.tensor([0, 1000, 1001, c.shape[0]])
    same(
        coarse.grouped_assign(x, groups, c, offs, with_second=True),
        EXACT.grouped_assign(x, groups, c, offs, with_second=True),
    )
    ids = torch.arange(x.shape[0]) % c.shape[0]
    got, want = coarse.partial_sums(x, ids, 4096), EXACT.partial_sums(x, ids, 4096)
    assert all(torch.equal(u, v) for u, v in zip(got, want, strict=True))


def test_grouped_levels_search_big_parents_by_index_and_the_rest_exactly(data):
    c, x = data
    # parent 0: 10 children, parent 1: none, parent 2: 4000 (big), parent 3: 86
    offs = torch.tensor([0, 10, 10, 4010, 4096])
    groups = torch.tensor([0, 2, 3, 2, 2, 0])[torch.arange(x.shape[0]) % 6]
    groups[5] = 1
    coarse = CoarseSearchAssigner(EXACT, n_probe=8, min_centroids=1000)
    a = coarse.grouped_assign(x, groups, c, offs, with_second=True)
    e = EXACT.grouped_assign(x, groups, c, offs, with_second=True)
    small = groups != 2
    for field in ("ids", "distance", "second"):
        assert torch.equal(getattr(a, field)[small], getattr(e, field)[small])
    assert int(a.ids[5]) == -1 and a.distance[5] == float("inf")
    big = ~small
    assert bool(((a.ids[big] >= 10) & (a.ids[big] < 4010)).all())
    assert (a.ids[big] == e.ids[big]).float().mean() >= 0.99
    # the big parent's rows alone give the same bits as inside the mixed batch
    alone = coarse.grouped_assign(x[big], groups[big], c, offs)
    assert torch.equal(alone.ids, a.ids[big]) and torch.equal(alone.distance, a.distance[big])
    with pytest.raises(ValueError, match="group ids"):
        coarse.grouped_assign(x[:2], torch.tensor([0, 4]), c, offs)


def test_the_index_is_cached_per_tensor_and_rebuilt_when_it_changes(data):
    c, _ = data
    c = c.clone()
    coarse = CoarseSearchAssigner(EXACT, min_centroids=1)
    first = coarse.index(c)
    assert coarse.index(c) is first
    c[0] += 1.0
    assert coarse.index(c) is not first


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="n_probe"):
        CoarseSearchAssigner(EXACT, n_probe=0)
    with pytest.raises(ValueError, match="centroid_search"):
        with_centroid_search(EXACT, "fast")
    with pytest.raises(ValueError, match="centroid_search"):
        TaxonomyConfig(centroid_search="fast")
    with pytest.raises(ValueError, match="coarse_probe"):
        TaxonomyConfig(coarse_probe=0)
    assert with_centroid_search(EXACT, "exact") is EXACT


def _tree(c: torch.Tensor, **config) -> Taxonomy:
    cfg = TaxonomyConfig(branching_factor=c.shape[0], **config)
    level = Level(c.numpy(), np.zeros(c.shape[0], dtype=np.int64))
    return Taxonomy(cfg, c.shape[1], [level], FitState(level=1, phase="done"))


def test_the_tree_labels_with_its_own_centroid_search(data):
    c, x = data
    exact_tree = _tree(c)
    coarse_tree = _tree(c, centroid_search="coarse", coarse_min_children=100, coarse_probe=2)
    e = exact_tree.assign_paths(x, assigner=EXACT)
    a = coarse_tree.assign_paths(x, assigner=EXACT)  # the caller's kernels, the tree's search
    want = CoarseSearchAssigner(EXACT, n_probe=2, min_centroids=100).assign(x, c)
    assert np.array_equal(a.paths[:, 0], want.ids.numpy())
    assert np.array_equal(e.paths[:, 0], EXACT.assign(x, c).ids.numpy())
    assert 0.9 < float(np.mean(a.paths == e.paths)) < 1.0  # 2 probes of 64 cells: approximate


def test_manifests_without_the_search_keys_load_as_exact(data, tmp_path):
    c, _ = data
    store = TaxonomyStore(str(tmp_path / "tax"))
    version = store.save(_tree(c[:64], centroid_search="coarse", coarse_probe=3))
    path = tmp_path / "tax" / "snapshots" / version / "manifest.json"
    m = json.loads(path.read_text())
    assert m["config"]["centroid_search"] == "coarse" and m["config"]["coarse_probe"] == 3
    for key in ("centroid_search", "coarse_min_children", "coarse_probe"):
        del m["config"][key]
    path.write_text(json.dumps(m))
    cfg = store.load().config
    assert (cfg.centroid_search, cfg.coarse_min_children, cfg.coarse_probe) == ("exact", 65536, 8)


def test_a_coarse_fit_is_deterministic_and_near_the_exact_fit(ray_session, tmp_path):
    from mdf_taxonomy.engine import TaxonomyEngine

    c, x = clustered(256, 16, 2048, seed=3, noise=0.4)
    x = x.numpy()
    one, two = tmp_path / "one", tmp_path / "two"
    write_embeddings(one / "part-0.parquet", x, row_group_size=500)
    for i in range(4):  # the same rows, other files and row groups
        write_embeddings(two / f"part-{i}.parquet", x[i::4], ids=np.arange(i, 2048, 4))
    params = dict(branching_factor=256, seed=5, max_iter=2, tol=0.0, progress=False)
    params |= dict(kernel_backend="torch", device="cpu")
    coarse = dict(centroid_search="coarse", coarse_min_children=128, coarse_probe=6)

    def fit(data, name, **kw):
        engine = TaxonomyEngine(storage_uri=str(tmp_path / name), **params, **kw)
        engine.fit(str(data))
        return engine.load()

    a, b, e = fit(one, "a", **coarse), fit(two, "b", **coarse), fit(one, "e")
    assert_same_tree(a, b)
    assert a.config.centroid_search == "coarse" and e.config.centroid_search == "exact"
    inertia = [t.state.history[-1]["inertia"] for t in (a, e)]
    assert abs(inertia[0] / inertia[1] - 1.0) <= 0.005
