"""From a batch of MDF records to one contiguous float32 matrix, with bad rows named.

MDF drops a whole batch when an operator raises, so nothing here raises for a bad
record: each one gets a reason instead, and the caller labels it as rejected.

Two ways in, one validation: `parse_embeddings` takes MDF's list of dicts,
`parse_arrow` an Arrow column (the columnar pass). Both sort out the rows that are not
a numeric vector of the right length, stack the others into one candidate matrix and
hand it to `validate_matrix`, so the same rows give the same ParsedBatch either way.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mdf_taxonomy.model.fitting import MAX_ABS_VALUE

ERROR_FIELD = "taxonomy_error"
#: torch's normalize divides by max(norm, 1e-12): below it a row does not become a unit
#: vector, so under cosine it has no direction to compare.
MIN_COSINE_NORM = 1e-12
INFER_DIM_ROWS = 10_000
_NUMERIC_KINDS = "fiu"  # float, signed, unsigned; bools, strings, bytes and objects are not
#: Rows per block when summing squares in float64: bounds the temporary, and each row's
#: sum is the same whichever block it lands in.
_NORM_BLOCK_ROWS = 4096


@dataclass
class ParsedBatch:
    x: np.ndarray  # (n_valid, dim) float32, C-contiguous; may be a read-only Arrow view
    valid: np.ndarray  # (n_valid,) int64 positions in the batch
    errors: dict[int, str] = field(default_factory=dict)  # position -> reason

    def reasons(self) -> dict[str, int]:
        """Rejections counted by kind (the part of the reason before ':')."""
        return dict(Counter(r.split(":")[0] for r in self.errors.values()))

    def flush_id(self, pass_id: str) -> str:
        """Same batch, same id: a retried task's flush is recognised and ignored."""
        h = hashlib.blake2b(digest_size=16)
        h.update(pass_id.encode())
        h.update(self.x.tobytes())
        h.update(self.valid.tobytes())
        h.update(repr(sorted(self.errors.items())).encode())
        return h.hexdigest()


# -- reasons ---------------------------------------------------------------------------------


def _missing(field_name: str) -> str:
    return f"missing_embedding: field {field_name!r} is absent or null"


def _not_numeric(field_name: str) -> str:
    return f"bad_embedding: field {field_name!r} is not a numeric vector"


def _wrong_length(n: int, dim: int | None, field_name: str) -> str:
    expected = "at least 1" if dim is None else dim
    return f"wrong_length: field {field_name!r} has {n} values, expected {expected}"


def _out_of_range(peak: float, field_name: str) -> str:
    return (
        f"out_of_range: field {field_name!r} has |value| up to {peak:.3g}, the fit's "
        f"range is ±{MAX_ABS_VALUE:g}"
    )


def _value_reason(raw: Any, field_name: str) -> str:
    """Why a row that is not finite in float32 is refused: NaN/inf given, or out of range."""
    with np.errstate(over="ignore", invalid="ignore"):
        given = np.asarray(raw).astype(np.float64)
    if np.isfinite(given).all():  # finite, but past float32 (or huge ints)
        return _out_of_range(float(np.abs(given).max()), field_name)
    return f"non_finite: field {field_name!r} contains NaN or inf"


# -- the one validation ----------------------------------------------------------------------


def _row_norms(x: np.ndarray) -> np.ndarray:
    """Each row's norm, summed in float64 block by block (no (n, dim) float64 copy)."""
    norm = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], _NORM_BLOCK_ROWS):
        blk = np.square(x[s : s + _NORM_BLOCK_ROWS], dtype=np.float64)
        norm[s : s + _NORM_BLOCK_ROWS] = np.sqrt(blk.sum(axis=1))
    return norm


def validate_matrix(
    x: np.ndarray,
    positions: np.ndarray,
    field_name: str,
    metric: str = "l2",
    raw: Callable[[int], Any] | None = None,
) -> ParsedBatch:
    """Keep the candidate rows whose values the fit can use; name the others.

    `x` (n, dim) float32 holds rows that are already numeric vectors of the right
    length, `positions` their places in the batch. A row is refused when a value is not
    finite in float32, |value| > MAX_ABS_VALUE (the range in which the fit's
    fixed-point sums are exact) or, under cosine, its norm < MIN_COSINE_NORM. The
    checks are whole-matrix; only refused rows cost Python. `raw(j)` gives row j's
    values as the caller had them (before the float32 cast), so a float64 1e39 is
    named out_of_range, not inf; None: `x` is the source. When every row is kept, the
    returned x is `x` itself (no copy).
    """
    n = x.shape[0]
    errors: dict[int, str] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = (x.min(), x.max()) if x.size else (0.0, 0.0)  # NaN propagates
        if np.isfinite(lo) and np.isfinite(hi) and max(hi, -lo) <= MAX_ABS_VALUE:
            finite, over = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
            keep = finite.copy()  # the usual batch: no row to look at
        else:
            peak = np.maximum(x.max(axis=1), -x.min(axis=1))
            finite = np.isfinite(peak)
            over = finite & (peak > MAX_ABS_VALUE)
            keep = finite & ~over
        if metric == "cosine" and n:
            # float32 squares first; a row under 1e-12 (norm 1e-6, far above the bound
            # even after float32 rounding and underflow) is summed again in float64
            small = np.flatnonzero(keep & ~(np.einsum("ij,ij->i", x, x) >= 1e-12))
            norm = _row_norms(x[small])
        else:
            small, norm = np.zeros(0, dtype=np.int64), np.zeros(0)
    source = (lambda j: x[j]) if raw is None else raw
    for j in np.flatnonzero(~finite):
        errors[int(positions[j])] = _value_reason(source(j), field_name)
    with np.errstate(over="ignore", invalid="ignore"):
        for j in np.flatnonzero(over):  # the peak as the row's own float32 cast sees it
            row = np.asarray(source(j)).astype(np.float32)
            errors[int(positions[j])] = _out_of_range(float(np.abs(row).max()), field_name)
    for j, nm in zip(small.tolist(), norm.tolist(), strict=True):
        if not nm >= MIN_COSINE_NORM:
            errors[int(positions[j])] = (
                f"zero_vector: field {field_name!r} has norm {nm:.3g} (cosine is undefined)"
            )
            keep[j] = False
    valid = np.asarray(positions, dtype=np.int64)
    if not keep.all():
        x, valid = x[keep], valid[keep]
    return ParsedBatch(np.ascontiguousarray(x), valid, errors)


def _merge(parts: Sequence[ParsedBatch], errors: dict[int, str], dim: int | None) -> ParsedBatch:
    """One batch from validated parts plus the structural errors, errors by position."""
    for p in parts:
        errors.update(p.errors)
    errors = dict(sorted(errors.items()))
    if dim is None:  # no valid row to give the width: nothing was kept (see infer_dim)
        return ParsedBatch(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), errors)
    if len(parts) == 1:  # keeps a zero-copy view as it is
        return ParsedBatch(parts[0].x, parts[0].valid, errors)
    kept = [p for p in parts if len(p.valid)]
    if not kept:
        return ParsedBatch(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), errors)
    x = np.concatenate([p.x for p in kept]) if len(kept) > 1 else kept[0].x
    return ParsedBatch(x, np.concatenate([p.valid for p in kept]), errors)


# -- MDF records -----------------------------------------------------------------------------


def _as_vector(value: Any, field_name: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(float32 vector, the values as given, "") for a flat numeric vector, else a reason."""
    if value is None:
        return None, None, _missing(field_name)
    try:  # text and raw bytes are not vectors, even when numpy could read them as one
        raw = None if isinstance(value, str | bytes | bytearray | memoryview) else np.asarray(value)
    except (TypeError, ValueError):  # ragged nesting, odd objects
        raw = None
    if raw is None or raw.dtype.kind not in _NUMERIC_KINDS or raw.ndim == 0:
        return None, None, _not_numeric(field_name)
    if raw.ndim != 1:
        reason = (
            f"bad_embedding: field {field_name!r} is nested (shape {raw.shape}), not a flat vector"
        )
        return None, None, reason
    return raw.astype(np.float32, copy=False), raw, ""


def _vector(rec: Any, field_name: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """`_as_vector` of a record's field; a record that is not a dict has no field."""
    return _as_vector(rec.get(field_name) if isinstance(rec, dict) else None, field_name)


def _field_values(records: Sequence[Any], field_name: str) -> list[Any]:
    return [rec.get(field_name) if isinstance(rec, dict) else None for rec in records]


def _stack_uniform(values: list[Any]) -> tuple[np.ndarray, np.ndarray, list[Any]] | None:
    """(positions, (m, L) array as given, the values) when every non-null value is a flat
    numeric vector of one length L > 0 that stacks as it would parse alone, else None.

    Only 1-D numeric ndarrays and lists/tuples starting with a number qualify: a memoryview
    or an all-bool row would stack into a numeric matrix beside numeric rows but is
    refused on its own, so such batches go through the per-record loop.
    """
    positions: list[int] = []
    rows: list[Any] = []
    for i, v in enumerate(values):
        t = type(v)
        if t is np.ndarray:
            if v.ndim != 1 or v.dtype.kind not in _NUMERIC_KINDS:
                return None
        elif t is list or t is tuple:
            if not v or isinstance(v[0], bool) or not isinstance(v[0], int | float | np.number):
                return None
        elif v is None:
            continue
        else:
            return None
        positions.append(i)
        rows.append(v)
    if not rows:
        return None
    try:
        stacked = np.asarray(rows)
    except (TypeError, ValueError, OverflowError):  # ragged, nested, odd elements
        return None
    if stacked.ndim != 2 or stacked.dtype.kind not in _NUMERIC_KINDS or not stacked.shape[1]:
        return None  # strings or objects among the elements, nesting, empty rows
    return np.asarray(positions, dtype=np.int64), stacked, rows


def _parse_stacked(
    n: int,
    positions: np.ndarray,
    stacked: np.ndarray,
    rows: list[Any],
    field_name: str,
    dim: int | None,
    metric: str,
) -> ParsedBatch | None:
    """parse_embeddings for a batch `_stack_uniform` could stack; None: use the loop."""
    errors = dict.fromkeys(np.setdiff1d(np.arange(n), positions).tolist(), _missing(field_name))
    with np.errstate(over="ignore", invalid="ignore"):
        x = stacked.astype(np.float32, copy=False)
    length = x.shape[1]
    if dim is None:  # every row has one length: it is the majority when any row is finite
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite(x).all(axis=1).any():
                return None  # no row gives the dim: the loop names each one
        dim = length
    if length != dim:
        errors.update(dict.fromkeys(positions.tolist(), _wrong_length(length, dim, field_name)))
        return _merge([], errors, dim)
    part = validate_matrix(x, positions, field_name, metric, raw=rows.__getitem__)
    return _merge([part], errors, dim)


def _parse_loop(
    records: Sequence[Any], values: list[Any], field_name: str, dim: int | None, metric: str
) -> ParsedBatch:
    """The per-record way: any mix of values, each judged on its own."""
    if dim is None:
        try:
            dim, _ = infer_dim(records, field_name, max_rows=len(records))
        except ValueError:
            pass  # no row is valid: each gets its own reason below
    errors: dict[int, str] = {}
    cand: dict[int, tuple[list[np.ndarray], list[int], list[np.ndarray]]] = {}
    with np.errstate(over="ignore", invalid="ignore"):  # float32 casts that overflow: inf
        for i, v in enumerate(values):
            arr, raw, reason = _as_vector(v, field_name)
            if arr is None:
                errors[i] = reason
                continue
            length = arr.shape[0]
            if (length == 0) if dim is None else (length != dim):
                errors[i] = _wrong_length(length, dim, field_name)
                continue
            rows, pos, raws = cand.setdefault(length, ([], [], []))
            rows.append(arr)
            pos.append(i)
            raws.append(raw)
    if dim is not None and dim not in cand:
        cand[dim] = ([], [], [])
    parts = [  # one length when dim is known; without it, each length (all are refused)
        validate_matrix(
            np.stack(rows) if rows else np.zeros((0, length), np.float32),
            np.asarray(pos, dtype=np.int64),
            field_name,
            metric,
            raw=raws.__getitem__,
        )
        for length, (rows, pos, raws) in cand.items()
    ]
    return _merge(parts, errors, dim)


def parse_embeddings(
    records: list[dict], field_name: str, dim: int | None, metric: str = "l2"
) -> ParsedBatch:
    """Validate each record's embedding and stack the valid ones.

    Valid: a flat numeric vector (ints are cast), `dim` long (None: the batch's majority
    length, see `infer_dim`), finite, every |value| <= MAX_ABS_VALUE (the range in which
    the fit's fixed-point sums are exact) and, under cosine, a norm >= MIN_COSINE_NORM.
    A batch of same-length numeric rows (and nulls) is stacked once and checked as a
    matrix; any other batch goes record by record. Both give the same ParsedBatch.
    """
    values = _field_values(records, field_name)
    uniform = _stack_uniform(values)
    if uniform is not None:
        parsed = _parse_stacked(len(values), *uniform, field_name, dim, metric)
        if parsed is not None:
            return parsed
    return _parse_loop(records, values, field_name, dim, metric)


def infer_dim(
    records: Iterable[dict], field_name: str, max_rows: int = INFER_DIM_ROWS
) -> tuple[int, dict[int, int]]:
    """The embedding length of most rows among the first `max_rows` records.

    Counts the lengths of rows that are flat, numeric, non-empty and finite, so an
    empty, short or broken first row does not decide the dim; a tie goes to the longer
    length (truncated rows are likelier than padded ones). Returns (dim, {other length:
    rows}) for the caller to log; raises ValueError naming the field when no row is
    valid. Reads no more than `max_rows` records from `records`.
    """
    lengths: Counter[int] = Counter()
    read = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for rec in itertools.islice(records, max_rows):
            read += 1
            arr, _, _ = _vector(rec, field_name)
            if arr is not None and arr.shape[0] > 0 and np.isfinite(arr).all():
                lengths[arr.shape[0]] += 1
    if not lengths:
        raise ValueError(
            f"no valid {field_name!r} embedding (a flat, finite numeric vector) "
            f"in the first {read} rows: cannot infer dim; set dim in the config"
        )
    dim = max(lengths, key=lambda n: (lengths[n], n))
    return dim, {n: c for n, c in sorted(lengths.items()) if n != dim}


# -- Arrow columns ---------------------------------------------------------------------------


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
    on purpose (token ids, counts). None or several: ValueError listing the columns.
    """
    found = [
        f
        for f in schema
        if _is_numeric_list(f.type, floats_only=True)
        or (_is_float32_binary(f.type) and f.type.byte_width > 0)
    ]
    if len(found) == 1:
        return found[0].name
    if found:
        listed = ", ".join(f"{f.name}: {f.type}" for f in found)
        raise ValueError(f"several columns could be the embedding ({listed}): set embedding_field")
    listed = ", ".join(f"{f.name}: {f.type}" for f in schema) or "none"
    raise ValueError(
        "no column holds embeddings (a list of floats or fixed_size_binary of float32); "
        f"columns: {listed}"
    )
