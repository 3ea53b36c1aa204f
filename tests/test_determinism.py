"""Same data, config and seed give the same tree bit for bit, however the fit is run.

One reference fit (module fixture, the columnar pass) against fits that change only
how the work is cut: the face (columnar pass or MDF operators record by record),
workers / stage replicas, batch size, the cache of decoded rows, and how the rows
are split into files / row groups (and in what order they come).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import blobs, write_embeddings
from taxonomy_toys import assert_same_tree, labels_by_id

from mdf_taxonomy.engine import TaxonomyEngine

N, DIM = 360, 12
PARAMS = dict(n_levels=2, branching_factor=[3, 2], seed=11, max_iter=2, tol=0.0, progress=False)


@pytest.fixture(scope="module")
def rows():
    x, _ = blobs(N, DIM, 6, seed=4)
    return x, np.arange(1000, 1000 + N)  # ids that are not row positions


def _fit(tmp, data, name, **kw):
    engine = TaxonomyEngine(
        storage_uri=str(tmp / f"{name}-tax"), **{"batch_size": 64, **PARAMS, **kw}
    )
    engine.fit(str(data), output=str(tmp / f"{name}-out"))
    return engine.load(), labels_by_id(tmp / f"{name}-out", 2)


@pytest.fixture(scope="module")
def reference(ray_session, rows, tmp_path_factory):
    """3 files of 120 rows in row groups of 50, batch 64, 1 replica."""
    x, ids = rows
    tmp = tmp_path_factory.mktemp("det")
    data = tmp / "three"
    for i in range(3):
        sl = slice(i * 120, (i + 1) * 120)
        write_embeddings(data / f"part-{i}.parquet", x[sl], ids=ids[sl], row_group_size=50)
    tax, labels = _fit(tmp, data, "ref")
    assert tax.state.complete and [lv.n_nodes for lv in tax.levels] == [3, 6]
    assert sorted(labels) == sorted(ids.tolist())
    assert all(v[-1] == "" for v in labels.values())
    assert {v[1] for v in labels.values()} == {0, 1, 2}
    return data, tax, labels


def _check(got, want):
    tax, labels = got
    ref_tax, ref_labels = want
    assert_same_tree(tax, ref_tax)
    # the whole fit took the same course: same rows, inertia and repairs per pass
    assert tax.state.history == ref_tax.state.history
    assert labels == ref_labels


@pytest.mark.parametrize(
    "how",
    [
        {"num_replicas": 2},  # two columnar workers (Ray actors)
        {"cache_bytes": 0},  # every pass streamed from the files
        {"columnar": False},  # MDF's Executor and the operators' list path
        {"columnar": False, "num_replicas": 2, "batch_size": 200},
    ],
    ids=["2-workers", "streamed", "mdf-operators", "mdf-2-replicas-batch-200"],
)
def test_how_the_work_is_run_does_not_change_the_tree(reference, tmp_path, how):
    data, tax, labels = reference
    _check(_fit(tmp_path, data, "how", **how), (tax, labels))


def test_file_order_and_split_do_not_change_the_tree(reference, rows, tmp_path):
    _, tax, labels = reference
    x, ids = rows
    perm = np.random.default_rng(123).permutation(N)
    xs, ids_s = x[perm], ids[perm]
    data = tmp_path / "five"
    bounds = [0, 40, 130, 200, 290, N]  # uneven files, each with its own row-group size
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        write_embeddings(
            data / f"shard-{4 - i}.parquet",
            xs[a:b],
            ids=ids_s[a:b],
            row_group_size=[17, 33, 70, 29, 64][i],
        )
    _check(_fit(tmp_path, data, "five"), (tax, labels))
