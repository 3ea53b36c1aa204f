"""From a batch of MDF records to one contiguous float32 matrix, with bad rows named.

MDF drops a whole batch when an operator raises, so nothing here raises for a bad
record: each one gets a reason instead, and the caller labels it as rejected.

Two ways in, one validation: `parse_embeddings` takes MDF's list of dicts,
`parse_arrow` an Arrow column (the columnar pass). Both sort out the rows that are not
a numeric vector of the right length, stack the others into one candidate matrix and
hand it to `validate_matrix`, so the same rows give the same ParsedBatch either way.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mdf_taxonomy.passes.arrow_rows import (
    find_embedding_field,
    find_record_embedding_field,
    parse_arrow,
)
from mdf_taxonomy.passes.validation import (
    _NUMERIC_KINDS,
    MIN_COSINE_NORM,
    ParsedBatch,
    _merge,
    _missing,
    _not_numeric,
    _wrong_length,
    validate_matrix,
)

__all__ = [  # the Arrow way in and the validation are re-exported: callers import them here
    "ERROR_FIELD",
    "INFER_DIM_ROWS",
    "MIN_COSINE_NORM",
    "ParsedBatch",
    "find_embedding_field",
    "find_record_embedding_field",
    "infer_dim",
    "parse_arrow",
    "parse_embeddings",
    "validate_matrix",
]

FIELD_PREFIX = "taxonomy_"  # of every field our operators add
ERROR_FIELD = f"{FIELD_PREFIX}error"
INFER_DIM_ROWS = 10_000


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
