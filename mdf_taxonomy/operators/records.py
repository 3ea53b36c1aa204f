"""From a batch of MDF records to one contiguous float32 matrix, with bad rows named.

MDF drops a whole batch when an operator raises, so nothing here raises for a bad
record: each one gets a reason instead, and the caller labels it as rejected.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

ERROR_FIELD = "taxonomy_error"


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


def parse_embeddings(records: list[dict], field_name: str, dim: int | None) -> ParsedBatch:
    """Validate each record's embedding (present, numeric, `dim` long, finite) and stack."""
    rows: list[np.ndarray] = []
    valid: list[int] = []
    errors: dict[int, str] = {}
    for i, rec in enumerate(records):
        value = rec.get(field_name) if isinstance(rec, dict) else None
        if value is None:
            errors[i] = f"missing_embedding: field {field_name!r} is absent or null"
            continue
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            errors[i] = f"bad_embedding: field {field_name!r} is not a numeric vector"
            continue
        if arr.ndim != 1 or (dim is not None and arr.shape[0] != dim):
            got = arr.shape[0] if arr.ndim == 1 else f"shape {arr.shape}"
            errors[i] = f"wrong_length: field {field_name!r} has {got} values, expected {dim}"
            continue
        if not np.isfinite(arr).all():
            errors[i] = f"non_finite: field {field_name!r} contains NaN or inf"
            continue
        if dim is None:
            dim = arr.shape[0]
        rows.append(arr)
        valid.append(i)
    x = np.stack(rows) if rows else np.zeros((0, dim or 0), dtype=np.float32)
    return ParsedBatch(np.ascontiguousarray(x), np.asarray(valid, dtype=np.int64), errors)
