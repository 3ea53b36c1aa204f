"""The artifact: config validation, snapshots on fsspec storage, integrity checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from taxonomy_toys import small_taxonomy

from mdf_taxonomy.model import TaxonomyConfig, TaxonomyStore, TaxonomyStoreError


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_levels": 0}, "n_levels"),
        ({"branching_factor": [2]}, "branching_factor"),
        ({"metric": "manhattan"}, "metric"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1}, "tol"),
        ({"branching_factor": 0}, "branching_factor"),
    ],
)
def test_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TaxonomyConfig(**{"n_levels": 2, **kwargs})


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="branchin_factor"):
        TaxonomyConfig.from_dict({"branchin_factor": 3})


def test_snapshot_round_trip_and_versions(tmp_path):
    store = TaxonomyStore(str(tmp_path / "tax"))
    assert store.latest_version() is None
    tax = small_taxonomy()
    v0 = store.save(tax)
    v1 = store.save(tax)
    assert (v0, v1) == ("000000", "000001") and store.latest_version() == v1
    back = store.load()
    assert back.version == v1 and back.config == tax.config and back.dim == 4
    for a, b in zip(back.levels, tax.levels, strict=True):
        assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.parents, b.parents)
    paths, dist, _ = back.assign_paths(np.ones((5, 4), np.float32))
    assert paths.shape == (5, 2) and dist.dtype == np.float32
    # a level-2 node is always a child of the level-1 node on the same path
    assert np.all(back.levels[1].parents[paths[:, 1]] == paths[:, 0])


def test_corrupt_array_is_refused(tmp_path):
    store = TaxonomyStore(str(tmp_path))
    v = store.save(small_taxonomy())
    f = tmp_path / "snapshots" / v / "level_2_centroids.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(TaxonomyStoreError, match="checksum mismatch"):
        store.load()


def test_foreign_and_newer_manifests_are_refused(tmp_path):
    store = TaxonomyStore(str(tmp_path))
    v = store.save(small_taxonomy())
    m = tmp_path / "snapshots" / v / "manifest.json"
    manifest = json.loads(m.read_text())
    m.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(TaxonomyStoreError, match="newer"):
        store.load()
    m.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TaxonomyStoreError, match="foreign"):
        store.load()


def test_pickled_array_is_refused(tmp_path):
    store = TaxonomyStore(str(tmp_path))
    v = store.save(small_taxonomy())
    f = tmp_path / "snapshots" / v / "level_1_parents.npy"
    obj = np.array([{"evil": 1}], dtype=object)
    with open(f, "wb") as fh:
        np.save(fh, obj, allow_pickle=True)
    m = tmp_path / "snapshots" / v / "manifest.json"
    manifest = json.loads(m.read_text())
    import hashlib

    manifest["arrays"]["level_1_parents"]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    m.write_text(json.dumps(manifest))
    with pytest.raises(TaxonomyStoreError, match="not a plain .npy"):
        store.load()


def test_missing_taxonomy_names_the_uri(tmp_path):
    with pytest.raises(TaxonomyStoreError, match="no taxonomy at"):
        TaxonomyStore(str(tmp_path / "nothing")).load()


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(TaxonomyStoreError, match="cannot open storage"):
        TaxonomyStore("nosuchproto://bucket/x")
