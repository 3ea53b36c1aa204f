"""A bounded, leaf-stratified sample of labelled rows, and the exact row count per leaf.

The report never holds the labelled data: one streaming pass reads only the leaf id and
error columns (bincounts, bounded memory), a second reads the projected columns of at
most `max_rows` rows, at most a per-leaf cap from each leaf (the first rows of each leaf
in file order), and stops once every leaf's cap is filled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from mdf_taxonomy.passes.arrow_rows import find_embedding_field

ERROR_FIELD = "taxonomy_error"
ID_CANDIDATES = ("id", "uuid", "key", "source_id")
URL_HINTS = ("image_url", "img_url", "url", "identifier", "image")


@dataclass
class LabelledSample:
    """What the report knows about the labelled rows."""

    rows: int = 0  # rows in the labelled data
    rejected: dict[str, int] = field(default_factory=dict)  # rows without a label, by reason
    leaf_counts: np.ndarray | None = None  # exact rows per leaf
    paths: np.ndarray | None = None  # (n, levels) int32, the sampled rows
    emb: np.ndarray | None = None  # (n, dim) float32
    ids: list[str] = field(default_factory=list)
    labels: dict[str, list[Any]] = field(default_factory=dict)
    image_urls: list[str] | None = None
    id_field: str | None = None
    image_field: str | None = None
    dedup_similarity: np.ndarray | None = None  # dedup_max_similarity, when dedup has run
    cap_per_leaf: int = 0


def open_dataset(uri: str, storage_options: dict[str, Any] | None = None) -> ds.Dataset:
    """A Parquet file, glob or Hive folder on any fsspec storage."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    afs = pafs.LocalFileSystem() if isinstance(fs, LocalFileSystem) else None
    afs = afs or pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return ds.dataset(path, format="parquet", partitioning="hive", filesystem=afs)


def leaf_cap(counts: np.ndarray, max_rows: int) -> int:
    """The largest per-leaf cap c with sum(min(c, count)) <= max_rows (small leaves whole)."""
    if counts.sum() <= max_rows:
        return int(counts.max(initial=0))
    lo, hi = 0, int(counts.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(counts, mid).sum() <= max_rows else (lo, mid - 1)
    return lo


def _to_matrix(col: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """List / fixed-size-list float rows as one (n, dim) float32 matrix."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_binary(arr.type):
        flat = np.frombuffer(b"".join(v.as_py() for v in arr), dtype=np.float32)
    else:
        flat = np.asarray(pc.list_flatten(arr).to_numpy(zero_copy_only=False), dtype=np.float32)
    return flat.reshape(len(arr), dim)


def read_sample(
    uri: str,
    n_levels: int,
    n_leaves: int,
    dim: int,
    embedding_field: str | None,
    label_fields: list[str] | None = None,
    max_rows: int = 50_000,
    storage_options: dict[str, Any] | None = None,
) -> LabelledSample:
    """Exact leaf counts and a leaf-stratified sample of at most `max_rows` labelled rows.

    `label_fields`: the label columns to read (None: none)."""
    data = open_dataset(uri, storage_options)
    names = set(data.schema.names)
    leaf_field = f"taxonomy_l{n_levels}"
    if leaf_field not in names:
        raise ValueError(
            f"{uri}: no {leaf_field} column: not labelled by this {n_levels}-level tree"
        )
    if embedding_field is None:
        embedding_field = find_embedding_field(data.schema)
    if embedding_field not in names:
        raise ValueError(f"{uri}: no embedding column {embedding_field!r}")
    out = LabelledSample(leaf_counts=np.zeros(n_leaves, dtype=np.int64))
    has_error = ERROR_FIELD in names
    rejected: Counter[str] = Counter()
    for batch in data.to_batches(columns=[leaf_field] + ([ERROR_FIELD] if has_error else [])):
        leaf = batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64)
        out.rows += len(leaf)
        ok = leaf >= 0
        if has_error:
            err = batch.column(1)
            ok &= pc.equal(err, "").to_numpy(zero_copy_only=False)
            bad = pc.filter(err, pc.not_equal(err, ""))
            rejected.update(r.split(":")[0] for r in bad.to_pylist())
        elif (~ok).any():
            rejected["unlabelled"] += int((~ok).sum())
        out.leaf_counts += np.bincount(leaf[ok], minlength=n_leaves)[:n_leaves]
    out.rejected = dict(rejected)

    out.id_field = next((c for c in ID_CANDIDATES if c in names), None)
    strings = [
        f.name
        for f in data.schema
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
    ]
    out.image_field = next((c for c in URL_HINTS if c in strings), None)
    label_fields = list(label_fields or [])
    missing = [c for c in label_fields if c not in names]
    if missing:
        raise ValueError(f"{uri}: no label column(s) {missing}; columns: {sorted(names)}")
    has_dedup = "dedup_max_similarity" in names
    columns = [f"taxonomy_l{i}" for i in range(1, n_levels + 1)] + [embedding_field]
    columns += [c for c in (out.id_field, out.image_field) if c] + list(label_fields)
    columns += [ERROR_FIELD] if has_error else []
    columns += ["dedup_max_similarity"] if has_dedup else []

    out.cap_per_leaf = cap = max(1, leaf_cap(out.leaf_counts, max_rows))
    need = np.minimum(out.leaf_counts, cap)
    if need.sum() > max_rows:  # more leaves than rows to sample: one row of evenly spread leaves
        filled = np.flatnonzero(need)
        need[:] = 0
        need[filled[np.linspace(0, len(filled) - 1, max_rows).astype(np.int64)]] = 1
    taken = np.zeros(n_leaves, dtype=np.int64)
    parts: list[pa.Table] = []
    row0 = 0
    for batch in data.to_batches(columns=columns):
        table = pa.Table.from_batches([batch])
        leaf = table.column(leaf_field).to_numpy(zero_copy_only=False).astype(np.int64)
        ok = leaf >= 0
        if has_error:
            ok &= pc.equal(table.column(ERROR_FIELD), "").to_numpy(zero_copy_only=False)
        keep = np.zeros(len(leaf), dtype=bool)
        idx = np.flatnonzero(ok)
        order = idx[np.argsort(leaf[idx], kind="stable")]  # rows of one leaf together
        if len(order):
            lv = leaf[order]
            starts = np.searchsorted(lv, lv, side="left")
            rank = np.arange(len(order)) - starts + taken[lv]
            keep[order[rank < need[lv]]] = True
            np.add.at(taken, leaf[keep], 1)
        if keep.any():
            sel = table.filter(pa.array(keep))
            if out.id_field is None:
                sel = sel.append_column("_row", pa.array(np.flatnonzero(keep) + row0))
            parts.append(sel)
        row0 += len(leaf)
        if (taken >= need).all():
            break
    table = pa.concat_tables(parts) if parts else None
    n = 0 if table is None else table.num_rows
    out.paths = np.zeros((n, n_levels), dtype=np.int32)
    out.emb = np.zeros((n, dim), dtype=np.float32)
    if table is None:
        out.labels = {c: [] for c in label_fields}
        return out
    for i in range(n_levels):
        out.paths[:, i] = table.column(f"taxonomy_l{i + 1}").to_numpy(zero_copy_only=False)
    out.emb = _to_matrix(table.column(embedding_field), dim)
    id_col = table.column(out.id_field or "_row")
    out.ids = [str(v) for v in id_col.to_pylist()]
    out.labels = {c: table.column(c).to_pylist() for c in label_fields}
    if out.image_field:
        urls = [str(v or "") for v in table.column(out.image_field).to_pylist()]
        if sum(u.startswith(("http://", "https://")) for u in urls) * 2 >= len(urls):
            out.image_urls = urls
        else:  # named like a URL column, but mostly not URLs
            out.image_field = None
    if has_dedup:
        col = table.column("dedup_max_similarity").to_numpy(zero_copy_only=False)
        out.dedup_similarity = np.asarray(col, dtype=np.float64)
    return out
