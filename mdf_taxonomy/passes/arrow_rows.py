"""Arrow columns to a ParsedBatch without a Python step per row (the columnar pass).

An Arrow array is decoded into flat source values and row spans (`_Rows`), then the rows
of the expected length are gathered (a view where possible) and handed to the same
`validate_matrix` as MDF records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mdf_taxonomy.passes.validation import (
    ParsedBatch,
    _merge,
    _missing,
    _not_numeric,
    _wrong_length,
    validate_matrix,
)


def _is_numeric_list(t: pa.DataType, floats_only: bool = False) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return False
    v = t.value_type
    return pa.types.is_floating(v) or (not floats_only and pa.types.is_integer(v))


def _is_float32_binary(t: pa.DataType) -> bool:
    return pa.types.is_fixed_size_binary(t) and t.byte_width % 4 == 0


def _buffer_view(buf: pa.Buffer | None, dtype: np.dtype, offset: int, length: int) -> np.ndarray:
    """Elements [offset, offset + length) of an Arrow data buffer, as a numpy view."""
    if buf is None or length == 0:
        return np.zeros(0, dtype)
    return np.frombuffer(buf, dtype=dtype, count=offset + length)[offset:]


@dataclass
class _Rows:
    """One Arrow array as flat source values and each row's span in them."""

    missing: np.ndarray  # (n,) bool: null rows
    bad: np.ndarray  # (n,) bool: non-null rows that are not a numeric vector
    offsets: np.ndarray  # (n + 1,) int64: row i is flat[offsets[i]:offsets[i + 1]]
    flat: np.ndarray  # source values, in the Arrow value type
    fixed: bool  # every row spans the same width (no gather by lengths needed)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def candidates(self) -> np.ndarray:
        return ~self.missing & ~self.bad

    def rows_of(self, elements: np.ndarray) -> np.ndarray:
        """The rows holding flat positions `elements` (positions outside every row dropped)."""
        inside = (elements >= self.offsets[0]) & (elements < self.offsets[-1])
        return np.searchsorted(self.offsets, elements[inside], side="right") - 1

    def finite_rows(self) -> np.ndarray:
        """(n,) bool: every value of the row is finite once cast to float32."""
        ok = np.ones(len(self.missing), dtype=bool)
        if self.flat.dtype.kind != "f":
            return ok  # every integer is finite in float32
        seg = self.flat[self.offsets[0] : self.offsets[-1]]
        with np.errstate(over="ignore", invalid="ignore"):
            if seg.dtype.itemsize <= 4:  # NaN and inf reach the sum; an overflow only re-checks
                if np.isfinite(seg.sum(dtype=np.float32)):
                    return ok
                bad = ~np.isfinite(seg)
            else:
                if not seg.size or max(seg.max(), -seg.min()) <= np.finfo(np.float32).max:
                    return ok
                bad = ~np.isfinite(seg.astype(np.float32))
        ok[self.rows_of(np.flatnonzero(bad) + self.offsets[0])] = False
        return ok

    def gather(self, sel: np.ndarray, dim: int) -> np.ndarray:
        """The selected rows (each `dim` long) as one (k, dim) array of the source type:
        a view when every row is selected, else one vectorised gather."""
        lo, hi = int(self.offsets[0]), int(self.offsets[-1])
        n = len(sel)
        if not sel.any():  # also keeps the width when no row has it
            return np.zeros((0, dim), self.flat.dtype)
        if sel.all() and hi - lo == n * dim:
            view = self.flat[lo:hi].reshape(n, dim)
            view.flags.writeable = False  # Arrow memory: an in-place edit would change the batch
            return view
        if self.fixed:
            return self.flat[lo:hi].reshape(n, -1)[sel]
        return self.flat[lo:hi][np.repeat(sel, self.lengths)].reshape(-1, dim)


def _arrow_rows(arr: pa.Array) -> _Rows:
    """Decode one (unchunked) Arrow array; a type that holds no numeric vector gives every
    non-null row `bad`, never an exception."""
    n = len(arr)
    t = arr.type
    missing = (
        arr.is_null().to_numpy(zero_copy_only=False)
        if arr.null_count or pa.types.is_null(t)
        else np.zeros(n, dtype=bool)
    )
    empty = np.zeros(0, np.float32)
    if _is_numeric_list(t):
        child = arr.values  # the whole child: `arr.offset` is applied by the offsets below
        dtype = np.dtype(child.type.to_pandas_dtype())
        flat = _buffer_view(child.buffers()[1], dtype, child.offset, len(child))
        if pa.types.is_fixed_size_list(t):
            w = t.list_size
            offsets = (arr.offset + np.arange(n + 1, dtype=np.int64)) * w
        else:
            offsets = arr.offsets.to_numpy().astype(np.int64, copy=False)
        rows = _Rows(
            missing, np.zeros(n, dtype=bool), offsets, flat, pa.types.is_fixed_size_list(t)
        )
        if child.null_count:  # [1.0, None] is no numeric vector (as a dict row it is objects)
            nulls = np.flatnonzero(child.is_null().to_numpy(zero_copy_only=False))
            rows.bad[rows.rows_of(nulls)] = True
            rows.bad &= ~missing
        return rows
    if _is_float32_binary(t):
        w = t.byte_width // 4
        flat = _buffer_view(arr.buffers()[1], np.dtype("<f4"), arr.offset * w, n * w)
        offsets = np.arange(n + 1, dtype=np.int64) * w
        return _Rows(missing, np.zeros(n, dtype=bool), offsets, flat, True)
    return _Rows(missing, ~missing, np.zeros(n + 1, dtype=np.int64), empty, True)


def _majority_length(parts: Sequence[_Rows]) -> int | None:
    """infer_dim's rule on Arrow rows: the commonest length among non-null, numeric,
    non-empty rows that are finite in float32, a tie to the longer; None without one."""
    counted = []
    for r in parts:
        lengths = r.lengths
        ok = r.candidates & (lengths > 0)
        if ok.any():
            ok &= r.finite_rows()
        counted.append(lengths[ok])
    lengths = np.concatenate(counted) if counted else np.zeros(0, np.int64)
    if not len(lengths):
        return None
    values, counts = np.unique(lengths, return_counts=True)  # ascending: the last max wins
    return int(values[np.flatnonzero(counts == counts.max())[-1]])


def parse_arrow(
    column: pa.Array | pa.ChunkedArray, field_name: str, dim: int | None, metric: str = "l2"
) -> ParsedBatch:
    """`parse_embeddings` for an Arrow column, without a Python step per row.

    Takes list, large_list and fixed_size_list of any float or integer type, a null-typed
    column (every row missing) and fixed_size_binary(w) holding w/4 little-endian float32
    values. The same rows give the same ParsedBatch as parse_embeddings on
    `column.to_pylist()` as dicts (for fixed_size_binary: the bytes decoded as float32).
    A column of another type names every non-null row bad_embedding; null rows are
    missing_embedding either way. fixed_size_list<float32> or fixed_size_binary (and
    list<float32> whose rows are all kept) comes back as a read-only view on the Arrow
    buffer, no copy; other columns are gathered and cast once.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_arrow_rows(c) for c in chunks]
    if dim is None:
        dim = _majority_length(parts)
    errors: dict[int, str] = {}
    validated: list[ParsedBatch] = []
    base = 0
    for r in parts:
        n = len(r.missing)
        lengths = r.lengths
        cand = r.candidates
        errors.update(
            dict.fromkeys((np.flatnonzero(r.missing) + base).tolist(), _missing(field_name))
        )
        errors.update(
            dict.fromkeys((np.flatnonzero(r.bad) + base).tolist(), _not_numeric(field_name))
        )
        wrong = cand & ((lengths == 0) if dim is None else (lengths != dim))
        for i in np.flatnonzero(wrong):
            errors[base + int(i)] = _wrong_length(int(lengths[i]), dim, field_name)
        cand &= ~wrong
        for length in [dim] if dim is not None else np.unique(lengths[cand]).tolist():
            sel = cand & (lengths == length)
            src = r.gather(sel, length)
            with np.errstate(over="ignore", invalid="ignore"):
                x = src.astype(np.float32, copy=False)
            raw = None if src.dtype == np.float32 else src.__getitem__
            validated.append(
                validate_matrix(x, np.flatnonzero(sel) + base, field_name, metric, raw=raw)
            )
        base += n
    if dim is not None and not validated:
        validated.append(ParsedBatch(np.zeros((0, dim), np.float32), np.zeros(0, np.int64)))
    return _merge(validated, errors, dim)


def find_embedding_field(schema: pa.Schema) -> str:
    """The one column that can hold embeddings, so users need not name it.

    Candidates: list, large_list or fixed_size_list of floats, and fixed_size_binary with
    a width that is a positive multiple of 4 (packed float32). Integer lists are left out
    on purpose (token ids, counts), unless the column is named "embedding" and no float
    column competes. None or several: ValueError listing the columns.
    """
    found = [
        f
        for f in schema
        if _is_numeric_list(f.type, floats_only=True)
        or (_is_float32_binary(f.type) and f.type.byte_width > 0)
    ]
    if len(found) == 1:
        return found[0].name
    if not found and "embedding" in schema.names:
        return "embedding"  # by name: the usual column, of whatever type (parse names it)
    if found:
        listed = ", ".join(f"{f.name}: {f.type}" for f in found)
        raise ValueError(f"several columns could be the embedding ({listed}): set embedding_field")
    listed = ", ".join(f"{f.name}: {f.type}" for f in schema) or "none"
    raise ValueError(
        "no column holds embeddings (a list of floats or fixed_size_binary of float32); "
        f"columns: {listed}"
    )


def find_record_embedding_field(records: Sequence[dict], sample: int = 64) -> str:
    """`find_embedding_field` for MDF records: each field typed by Arrow from its first
    non-null value among the first `sample` records (a value Arrow cannot type counts as
    no vector)."""
    types: dict[str, pa.DataType] = {}
    for rec in records[:sample]:
        for name, value in rec.items():
            if name in types or value is None:
                continue
            try:
                types[name] = pa.array([value]).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
                types[name] = pa.null()
    return find_embedding_field(pa.schema(list(types.items())))
