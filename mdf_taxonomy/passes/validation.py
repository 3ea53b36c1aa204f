"""The one validation of embedding rows, and the reasons a row is refused.

Both ways in (MDF records, Arrow columns) end here, so a row gets the same verdict and
the same reason whichever face read it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdf_taxonomy.model.fitting import MAX_ABS_VALUE

#: torch's normalize divides by max(norm, 1e-12): below it a row does not become a unit
#: vector, so under cosine it has no direction to compare.
MIN_COSINE_NORM = 1e-12
_NUMERIC_KINDS = "fiu"  # float, signed, unsigned; bools, strings, bytes and objects are not
#: Rows per block when summing squares in float64: bounds the temporary, and each row's
#: sum is the same whichever block it lands in.
_NORM_BLOCK_ROWS = 4096


@dataclass
class ParsedBatch:
    """A batch's valid rows as one matrix, with the batch positions of the kept rows and
    a reason for every other one, so callers label rejected rows instead of raising."""

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
