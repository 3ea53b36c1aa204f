"""Versioned taxonomy snapshots on any fsspec storage (local path, s3://, hdfs://, gs://...).

Layout under storage_uri:
    snapshots/000007/manifest.json          format, version, config, state, checksums
    snapshots/000007/level_1_centroids.npy  arrays as .npy, loaded with allow_pickle=False
    LATEST                                  name of the newest complete snapshot

The manifest is written after its arrays and LATEST after the manifest, so a writer
killed half way leaves the previous snapshot current. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from typing import Any

import fsspec
import numpy as np

from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy

FORMAT = "mdf-taxonomy"
FORMAT_VERSION = 1


class TaxonomyStoreError(RuntimeError):
    """A snapshot is missing, unreadable, corrupt, foreign or too new."""


class TaxonomyStore:
    def __init__(self, storage_uri: str, storage_options: dict[str, Any] | None = None):
        if not storage_uri or not isinstance(storage_uri, str):
            raise ValueError(f"storage_uri must be a non-empty string, got {storage_uri!r}")
        self.uri = storage_uri.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise TaxonomyStoreError(f"cannot open storage {self.uri!r}: {e}") from e

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # -- reading ---------------------------------------------------------------
    def latest_version(self) -> str | None:
        path = self._path("LATEST")
        try:
            if not self.fs.exists(path):
                return None
            return self.fs.cat_file(path).decode().strip() or None
        except (OSError, PermissionError) as e:
            raise TaxonomyStoreError(f"cannot read {self.uri}/LATEST: {e}") from e

    def load(self, version: str | None = None) -> Taxonomy:
        """Load a snapshot (the latest by default), verifying format and checksums."""
        manifest = self.manifest(version)
        version = manifest["version"]
        base = f"{self.uri}/snapshots/{version}"
        arrays = {}
        for name, meta in manifest["arrays"].items():
            try:
                raw = self.fs.cat_file(self._path("snapshots", version, meta["file"]))
            except (OSError, FileNotFoundError) as e:
                raise TaxonomyStoreError(f"{base}/{meta['file']}: cannot read ({e})") from e
            if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
                raise TaxonomyStoreError(
                    f"{base}/{meta['file']}: checksum mismatch, the snapshot is corrupt"
                )
            try:
                arr = np.load(io.BytesIO(raw), allow_pickle=False)
            except ValueError as e:
                raise TaxonomyStoreError(f"{base}/{meta['file']}: not a plain .npy ({e})") from e
            if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                raise TaxonomyStoreError(f"{base}/{meta['file']}: shape/dtype differ from manifest")
            arrays[name] = arr
        levels = [
            Level(arrays[f"level_{i}_centroids"], arrays[f"level_{i}_parents"])
            for i in range(1, manifest["n_levels_stored"] + 1)
        ]
        state = FitState(**manifest["state"])
        tax = Taxonomy(
            config=TaxonomyConfig.from_dict(manifest["config"]),
            dim=manifest["dim"],
            levels=levels,
            state=state,
            fingerprint=manifest["fingerprint"],
            version=version,
        )
        return tax

    def manifest(self, version: str | None = None) -> dict[str, Any]:
        """The verified manifest of a snapshot (the latest by default), without its arrays."""
        version = version or self.latest_version()
        if version is None:
            raise TaxonomyStoreError(
                f"no taxonomy at {self.uri!r} (no LATEST file): fit one first, or check the URI"
            )
        path = self._path("snapshots", version, "manifest.json")
        where = f"{self.uri}/snapshots/{version}/manifest.json"
        try:
            manifest = json.loads(self.fs.cat_file(path))
        except FileNotFoundError as e:
            raise TaxonomyStoreError(f"{where}: missing") from e
        except (OSError, ValueError) as e:
            raise TaxonomyStoreError(f"{where}: unreadable ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TaxonomyStoreError(f"{where}: not an {FORMAT} manifest (foreign artifact?)")
        fv = manifest.get("format_version")
        if not isinstance(fv, int) or fv > FORMAT_VERSION:
            raise TaxonomyStoreError(
                f"{where}: format_version {fv!r} is newer than this mdf-taxonomy reads "
                f"({FORMAT_VERSION}); upgrade mdf-taxonomy"
            )
        return manifest

    # -- writing ---------------------------------------------------------------
    def save(self, tax: Taxonomy) -> str:
        """Write `tax` as the next snapshot and make it LATEST; returns its version."""
        previous = self.latest_version()
        version = f"{(int(previous) + 1) if previous else 0:06d}"
        arrays: dict[str, np.ndarray] = {}
        for i, lv in enumerate(tax.levels, start=1):
            arrays[f"level_{i}_centroids"] = lv.centroids
            arrays[f"level_{i}_parents"] = lv.parents
        meta = {}
        try:
            self.fs.makedirs(self._path("snapshots", version), exist_ok=True)
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                raw = buf.getvalue()
                self.fs.pipe_file(self._path("snapshots", version, f"{name}.npy"), raw)
                meta[name] = {
                    "file": f"{name}.npy",
                    "sha256": hashlib.sha256(raw).hexdigest(),
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                }
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "version": version,
                "created_unix": time.time(),
                "config": tax.config.to_dict(),
                "dim": tax.dim,
                "fingerprint": tax.fingerprint,
                "n_levels_stored": len(tax.levels),
                "state": dataclasses.asdict(tax.state),
                "arrays": meta,
            }
            self.fs.pipe_file(
                self._path("snapshots", version, "manifest.json"),
                json.dumps(manifest, indent=1, sort_keys=True).encode(),
            )
            self.fs.pipe_file(self._path("LATEST"), version.encode())
        except (OSError, PermissionError) as e:
            raise TaxonomyStoreError(f"cannot write snapshot {version} to {self.uri!r}: {e}") from e
        tax.version = version
        return version
