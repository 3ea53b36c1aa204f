"""The snapshot format: what a manifest and its .npy files must be before anything is trusted.

A manifest may name only plain files of its own folder, with the shapes and dtypes save()
writes; a .npy header is parsed before its data so that no object dtype (pickle) is read.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np

from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.phase import Phase
from mdf_taxonomy.model.storage import TaxonomyStoreError
from mdf_taxonomy.model.taxonomy import FitState

FORMAT = "mdf-taxonomy"
#: The newest format read. 2 adds the optional level_i_sizes arrays; a snapshot without
#: them is written as 1, so older readers still load it.
FORMAT_VERSION = 2
PHASES = tuple(p.value for p in Phase)  # ("sample", "lloyd", "done")
DTYPES = {"centroids": "float32", "parents": "int64", "sizes": "int64"}  # see Level
OPTIONAL = ("sizes",)  # arrays a level may lack

_VERSION = re.compile(r"[0-9]{6,18}")  # f"{n:06d}"
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # no separator, no "..", no "/"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_LATEST_BYTES = 64
_MAX_MANIFEST_BYTES = 64 << 20
_NPY_HEAD_BYTES = 16 << 10  # numpy itself refuses headers over 10000 bytes


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_version(version: Any, where: str) -> None:
    if not (
        isinstance(version, str)
        and _VERSION.fullmatch(version)
        and f"{int(version):06d}" == version
    ):
        raise TaxonomyStoreError(
            f"{where}: {version!r} is not a snapshot version (six or more digits, e.g. '000007')"
        )


def _check_manifest(m: Any, version: str, where: str) -> None:
    """Types and cross-references of a manifest, before anything it names is read."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TaxonomyStoreError(f"{where}: not an {FORMAT} manifest (foreign artifact?)")
    fv = m.get("format_version")
    if not _is_int(fv) or fv < 1:
        raise TaxonomyStoreError(f"{where}: format_version {fv!r} is not a valid format version")
    if fv > FORMAT_VERSION:
        raise TaxonomyStoreError(
            f"{where}: format_version {fv!r} is newer than this mdf-taxonomy reads "
            f"({FORMAT_VERSION}); upgrade mdf-taxonomy"
        )

    def need(ok: Any, key: str, rule: str) -> None:
        if not ok:
            raise TaxonomyStoreError(f"{where}: {key} {m.get(key)!r} {rule}")

    need(m.get("version") == version, "version", f"does not match its folder {version!r}")
    need(_is_int(m.get("dim")) and m["dim"] >= 1, "dim", "must be an integer >= 1")
    need(isinstance(m.get("fingerprint"), str), "fingerprint", "must be a string")
    n = m.get("n_levels_stored")
    need(_is_int(n) and n >= 0, "n_levels_stored", "must be an integer >= 0")
    need(isinstance(m.get("config"), dict), "config", "must be an object")
    try:
        config = TaxonomyConfig.from_dict(m["config"])
    except (TypeError, ValueError) as e:
        raise TaxonomyStoreError(f"{where}: config is not valid ({e})") from e
    need(n <= config.n_levels, "n_levels_stored", f"exceeds the config's {config.n_levels} levels")
    st = m.get("state")
    need(isinstance(st, dict), "state", "must be an object")
    try:
        state = FitState(**st)
    except TypeError as e:
        raise TaxonomyStoreError(f"{where}: state is not valid ({e})") from e
    need(
        _is_int(state.level)
        and state.level >= 1
        and state.phase in PHASES
        and _is_int(state.iteration)
        and state.iteration >= 0
        and (state.inertia is None or _is_number(state.inertia))
        and isinstance(state.history, list),
        "state",
        f"is not a fit state (level >= 1, phase in {PHASES}, iteration >= 0, finite inertia)",
    )
    arrays = m.get("arrays")
    levels = range(1, n + 1)
    expected = [f"level_{i}_{kind}" for i in levels for kind in DTYPES if kind not in OPTIONAL]
    optional = {f"level_{i}_{kind}" for i in levels for kind in OPTIONAL}
    need(
        isinstance(arrays, dict) and set(expected) <= set(arrays) <= set(expected) | optional,
        "arrays",
        f"must hold exactly {expected}, and optionally {sorted(optional)}",
    )
    for i in range(1, n + 1):
        for kind in DTYPES:
            name = f"level_{i}_{kind}"
            if name not in arrays:
                continue
            _check_entry(arrays[name], name, kind, m["dim"], arrays[f"level_{i}_centroids"], where)


def _check_entry(e: Any, name: str, kind: str, dim: int, centroids: Any, where: str) -> None:
    """One manifest array entry: a plain file of its folder, and the shape and dtype save()
    writes (centroids (n, dim), parents and sizes (n,) with the same n)."""
    if not isinstance(e, dict):
        raise TaxonomyStoreError(f"{where}: array {name!r} entry {e!r} is not an object")

    def need(ok: Any, key: str, rule: str) -> None:
        if not ok:
            raise TaxonomyStoreError(f"{where}: array {name!r} {key} {e.get(key)!r} {rule}")

    f = e.get("file")
    need(
        isinstance(f, str) and _FILE_NAME.fullmatch(f) and ".." not in f,
        "file",
        "is not a plain file name inside its snapshot folder",
    )
    sha = e.get("sha256")
    need(isinstance(sha, str) and _SHA256.fullmatch(sha), "sha256", "is not a sha256 hex digest")
    need(e.get("dtype") == DTYPES[kind], "dtype", f"is not {DTYPES[kind]!r}")
    shape = e.get("shape")
    need(
        isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape),
        "shape",
        "is not a list of non-negative integers",
    )
    if kind == "centroids":
        need(len(shape) == 2 and shape[1] == dim, "shape", f"is not [n_nodes, dim={dim}]")
    else:
        n_nodes = centroids["shape"][0]
        need(shape == [n_nodes], "shape", f"is not [{n_nodes}], the node count of its centroids")


def _npy_header(head: bytes, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from the start of a .npy file, refusing object dtypes."""
    fp = io.BytesIO(head)
    try:
        npy_version = np.lib.format.read_magic(fp)
        reader = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(npy_version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {npy_version}")
        shape, fortran_order, dtype = reader(fp)
    except (ValueError, OSError, SyntaxError) as e:
        raise TaxonomyStoreError(f"{where}: not a plain .npy ({e})") from e
    if dtype.hasobject:
        raise TaxonomyStoreError(f"{where}: not a plain .npy (object dtype, it would need pickle)")
    if fortran_order:
        raise TaxonomyStoreError(f"{where}: not a plain .npy (Fortran order, not as saved here)")
    return shape, dtype, fp.tell()
