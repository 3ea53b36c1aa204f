"""From a batch of MDF records to one contiguous float32 matrix, with bad rows named.

MDF drops a whole batch when an operator raises, so nothing here raises for a bad
record: each one gets a reason instead, and the caller labels it as rejected.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdf_taxonomy.model.fitting import MAX_ABS_VALUE

ERROR_FIELD = "taxonomy_error"
#: torch's normalize divides by max(norm, 1e-12): below it a row does not become a unit
#: vector, so under cosine it has no direction to compare.
MIN_COSINE_NORM = 1e-12
INFER_DIM_ROWS = 10_000
_NUMERIC_KINDS = "fiu"  # float, signed, unsigned; bools, strings, bytes and objects are not


@dataclass
class ParsedBatch:
    x: np.ndarray  # (n_valid, dim) float32, C-contiguous
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


def _vector(rec: Any, field_name: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(float32 vector, the values as given, "") for a flat numeric vector, else a reason."""
    value = rec.get(field_name) if isinstance(rec, dict) else None
    if value is None:
        return None, None, f"missing_embedding: field {field_name!r} is absent or null"
    try:  # text and raw bytes are not vectors, even when numpy could read them as one
        raw = None if isinstance(value, str | bytes | bytearray | memoryview) else np.asarray(value)
    except (TypeError, ValueError):  # ragged nesting, odd objects
        raw = None
    if raw is None or raw.dtype.kind not in _NUMERIC_KINDS or raw.ndim == 0:
        return None, None, f"bad_embedding: field {field_name!r} is not a numeric vector"
    if raw.ndim != 1:
        return None, None, (f"bad_embedding: field {field_name!r} is nested (shape "
                            f"{raw.shape}), not a flat vector")
    return raw.astype(np.float32, copy=False), raw, ""


def _value_reason(arr: np.ndarray, raw: np.ndarray, field_name: str) -> str:
    """Why a row that is not finite in float32 is refused: NaN/inf given, or out of range."""
    with np.errstate(over="ignore", invalid="ignore"):
        given = raw.astype(np.float64)
    if np.isfinite(given).all():  # finite, but past float32 (or huge ints)
        return _out_of_range(float(np.abs(given).max()), field_name)
    return f"non_finite: field {field_name!r} contains NaN or inf"


def _out_of_range(peak: float, field_name: str) -> str:
    return (f"out_of_range: field {field_name!r} has |value| up to {peak:.3g}, the fit's "
            f"range is ±{MAX_ABS_VALUE:g}")


def parse_embeddings(records: list[dict], field_name: str, dim: int | None,
                     metric: str = "l2") -> ParsedBatch:
    """Validate each record's embedding and stack the valid ones.

    Valid: a flat numeric vector (ints are cast), `dim` long (None: the batch's majority
    length, see `infer_dim`), finite, every |value| <= MAX_ABS_VALUE (the range in which
    the fit's fixed-point sums are exact) and, under cosine, a norm >= MIN_COSINE_NORM.
    """
    if dim is None:
        try:
            dim, _ = infer_dim(records, field_name, max_rows=len(records))
        except ValueError:
            pass  # no row is valid: each gets its own reason below
    rows: list[np.ndarray] = []
    valid: list[int] = []
    errors: dict[int, str] = {}
    with np.errstate(over="ignore", invalid="ignore"):  # float32 casts that overflow: inf
        for i, rec in enumerate(records):
            arr, raw, reason = _vector(rec, field_name)
            if arr is None:
                errors[i] = reason
                continue
            if (arr.shape[0] == 0) if dim is None else (arr.shape[0] != dim):
                expected = "at least 1" if dim is None else dim
                errors[i] = (f"wrong_length: field {field_name!r} has {arr.shape[0]} values, "
                             f"expected {expected}")
                continue
            if not np.isfinite(arr).all():
                errors[i] = _value_reason(arr, raw, field_name)
                continue
            rows.append(arr)
            valid.append(i)
    x = np.stack(rows) if rows else np.zeros((0, dim or 0), dtype=np.float32)
    keep = np.ones(len(rows), dtype=bool)
    if len(rows):
        peak = np.abs(x).max(axis=1)
        for j in np.flatnonzero(peak > MAX_ABS_VALUE):
            errors[valid[j]] = _out_of_range(float(peak[j]), field_name)
            keep[j] = False
        if metric == "cosine":
            norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
            for j in np.flatnonzero(keep & ~(norm >= MIN_COSINE_NORM)):
                errors[valid[j]] = (f"zero_vector: field {field_name!r} has norm "
                                    f"{norm[j]:.3g} (cosine is undefined)")
                keep[j] = False
    valid_arr = np.asarray(valid, dtype=np.int64)
    if not keep.all():
        x, valid_arr = x[keep], valid_arr[keep]
    return ParsedBatch(np.ascontiguousarray(x), valid_arr, errors)


def infer_dim(records: Iterable[dict], field_name: str, max_rows: int = INFER_DIM_ROWS
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
        raise ValueError(f"no valid {field_name!r} embedding (a flat, finite numeric vector) "
                         f"in the first {read} rows: cannot infer dim; set dim in the config")
    dim = max(lengths, key=lambda n: (lengths[n], n))
    return dim, {n: c for n, c in sorted(lengths.items()) if n != dim}
