"""Versioned taxonomy snapshots on any fsspec storage (local path, s3://, hdfs://, gs://...).

Layout under storage_uri:
    snapshots/000007/manifest.json          format, version, config, state, checksums
    snapshots/000007/level_1_centroids.npy  arrays as .npy, loaded with allow_pickle=False
    snapshots/000007/level_1_sizes.npy      rows per node, where known (format 2)
    LATEST                                  name of the newest complete snapshot
    LOCK                                    the writer lease, while a writer holds one

Every file is written under a temporary name and then moved into place: the arrays,
then the manifest, then LATEST, so a reader never sees a half-written file and a
writer killed half way leaves the previous snapshot current. LATEST only moves
forward. Nothing read back is trusted: LATEST must be a version, a manifest may name
only plain files of its own folder, sizes and types must agree before an array is
read, and the arrays must form a tree. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from typing import Any

import numpy as np

from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.lease import LeasedStorage, WriterLease
from mdf_taxonomy.model.manifest import (
    _MAX_LATEST_BYTES,
    _MAX_MANIFEST_BYTES,
    _NPY_HEAD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    _check_manifest,
    _check_version,
    _npy_header,
)
from mdf_taxonomy.model.storage import TaxonomyStoreError
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy

__all__ = ["TaxonomyStore", "TaxonomyStoreError", "WriterLease"]


class TaxonomyStore(LeasedStorage):
    """The snapshots of one storage_uri (see the module docstring for the layout)."""

    # -- reading ---------------------------------------------------------------
    def latest_version(self) -> str | None:
        """The version LATEST names, or None when there is no LATEST yet."""
        where = f"{self.uri}/LATEST"
        try:
            raw = self._read_small(self._path("LATEST"), _MAX_LATEST_BYTES, where)
        except FileNotFoundError:
            self._check_reachable()
            return None
        except OSError as e:
            raise TaxonomyStoreError(f"cannot read {where}: {e}") from e
        version = raw.decode("utf-8", errors="replace").strip()
        _check_version(version, where)
        return version

    def load(self, version: str | None = None) -> Taxonomy:
        """Load a snapshot (the latest by default), verifying format, sizes, checksums and
        that its arrays form a tree."""
        manifest = self.manifest(version)
        version = manifest["version"]
        arrays = {
            name: self._read_array(version, meta) for name, meta in manifest["arrays"].items()
        }
        levels, n_parents = [], 1
        for i in range(1, manifest["n_levels_stored"] + 1):
            centroids, parents = arrays[f"level_{i}_centroids"], arrays[f"level_{i}_parents"]
            where = f"{self.uri}/snapshots/{version}/level_{i}"
            finite = np.isfinite(centroids)
            if not finite.all():
                raise TaxonomyStoreError(
                    f"{where}_centroids.npy: level {i} centroids hold "
                    f"{int(finite.size - finite.sum())} non-finite values (NaN or inf)"
                )
            if parents.size and (parents.min() < 0 or parents.max() >= n_parents):
                raise TaxonomyStoreError(
                    f"{where}_parents.npy: level {i} parents span {parents.min()}..{parents.max()}"
                    f", out of range 0..{n_parents - 1} (the nodes of the level above)"
                )
            if np.any(np.diff(parents) < 0):
                raise TaxonomyStoreError(
                    f"{where}_parents.npy: level {i} parents are not sorted "
                    "(a level's nodes are grouped by parent)"
                )
            sizes = arrays.get(f"level_{i}_sizes")
            if sizes is not None and sizes.size and sizes.min() < 0:
                raise TaxonomyStoreError(f"{where}_sizes.npy: level {i} sizes hold negative counts")
            levels.append(Level(centroids, parents, sizes))
            n_parents = levels[-1].n_nodes
        return Taxonomy(
            config=TaxonomyConfig.from_dict(manifest["config"]),
            dim=manifest["dim"],
            levels=levels,
            state=FitState(**manifest["state"]),
            fingerprint=manifest["fingerprint"],
            version=version,
        )

    def manifest(self, version: str | None = None) -> dict[str, Any]:
        """The verified manifest of a snapshot (the latest by default), without its arrays."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise TaxonomyStoreError(
                    f"no taxonomy at {self.uri!r} (no LATEST file): fit one first, or check the URI"
                )
        _check_version(version, f"{self.uri}: snapshot")
        where = f"{self.uri}/snapshots/{version}/manifest.json"
        try:
            raw = self._read_small(
                self._path("snapshots", version, "manifest.json"), _MAX_MANIFEST_BYTES, where
            )
            manifest = json.loads(raw)
        except FileNotFoundError as e:
            raise TaxonomyStoreError(f"{where}: missing") from e
        except (OSError, ValueError) as e:
            raise TaxonomyStoreError(f"{where}: unreadable ({e})") from e
        _check_manifest(manifest, version, where)
        return manifest

    def _read_array(self, version: str, meta: dict[str, Any]) -> np.ndarray:
        """One array whose header, manifest entry and real size agree before its data is read."""
        path = self._path("snapshots", version, meta["file"])
        where = f"{self.uri}/snapshots/{version}/{meta['file']}"
        try:
            with self._reach():
                self.fs.invalidate_cache(path)
                size = self.fs.size(path)
                head = (
                    self.fs.cat_file(path, start=0, end=min(size, _NPY_HEAD_BYTES)) if size else b""
                )
        except OSError as e:
            raise TaxonomyStoreError(f"{where}: cannot read ({e})") from e
        shape, dtype, offset = _npy_header(head, where)
        if list(shape) != meta["shape"] or str(dtype) != meta["dtype"]:
            raise TaxonomyStoreError(
                f"{where}: shape/dtype differ from manifest (file {list(shape)} {dtype}, "
                f"manifest {meta['shape']} {meta['dtype']})"
            )
        want = offset + math.prod(shape) * dtype.itemsize
        if size != want:
            raise TaxonomyStoreError(
                f"{where}: {size} bytes, but shape {list(shape)} {dtype} needs {want}: "
                f"{'truncated' if size < want else 'padded'}, the snapshot is corrupt"
            )
        try:
            with self._reach():
                raw = self.fs.cat_file(path)
        except OSError as e:
            raise TaxonomyStoreError(f"{where}: cannot read ({e})") from e
        if len(raw) != size:
            raise TaxonomyStoreError(f"{where}: changed while being read")
        if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            raise TaxonomyStoreError(f"{where}: checksum mismatch, the snapshot is corrupt")
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise TaxonomyStoreError(f"{where}: not a plain .npy ({e})") from e

    # -- writing ---------------------------------------------------------------
    def save(self, tax: Taxonomy) -> str:
        """Write `tax` as the next snapshot and make it LATEST; returns its version.

        Under `writer_lease` it first checks that LOCK still names the lease (at the start
        and again before moving LATEST); without one, it refuses while another writer
        holds a live lease. LATEST never moves back: if another writer moved it to this
        version or past it meanwhile, TaxonomyStoreError names both and LATEST stays.
        """
        self._check_writer()
        previous = self.latest_version()
        version = f"{0 if previous is None else int(previous) + 1:06d}"
        arrays: dict[str, np.ndarray] = {}
        for i, lv in enumerate(tax.levels, start=1):
            arrays[f"level_{i}_centroids"] = lv.centroids
            arrays[f"level_{i}_parents"] = lv.parents
            if lv.sizes is not None:
                arrays[f"level_{i}_sizes"] = lv.sizes
        with_sizes = any(lv.sizes is not None for lv in tax.levels)
        meta = {}
        try:
            with self._reach():
                self.fs.makedirs(self._path("snapshots", version), exist_ok=True)
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                raw = buf.getvalue()
                self._put(self._path("snapshots", version, f"{name}.npy"), raw)
                meta[name] = {
                    "file": f"{name}.npy",
                    "sha256": hashlib.sha256(raw).hexdigest(),
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                }
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION if with_sizes else 1,
                "version": version,
                "created_unix": time.time(),
                "config": tax.config.to_dict(),
                "dim": tax.dim,
                "fingerprint": tax.fingerprint,
                "n_levels_stored": len(tax.levels),
                "state": dataclasses.asdict(tax.state),
                "arrays": meta,
            }
            self._put(
                self._path("snapshots", version, "manifest.json"),
                json.dumps(manifest, indent=1, sort_keys=True).encode(),
            )
            self._check_writer()
            current = self.latest_version()
            if current is not None and int(current) >= int(version):
                raise TaxonomyStoreError(
                    f"{self.uri}/LATEST is {current}, not older than snapshot {version} being "
                    f"saved: another writer moved it meanwhile; LATEST stays at {current}"
                )
            self._put(self._path("LATEST"), version.encode())
        except OSError as e:
            raise TaxonomyStoreError(f"cannot write snapshot {version} to {self.uri!r}: {e}") from e
        tax.version = version
        return version
