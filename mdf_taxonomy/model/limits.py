"""The fit's range: the bounds that keep its int64 fixed-point sums exact.

Sums are int64 fixed point, exact and order-free while they stay under FIXED_SUM_LIMIT;
rows beyond MAX_ABS_VALUE are rejected when parsed, and a sum that reaches the limit is
marked SUM_OVERFLOWED (never wrapped) and refused by the driver (model/fitting.py holds
the helpers that add, mark and check sums against these bounds).
"""

from __future__ import annotations

from mdf_taxonomy import kernels

MAX_ABS_VALUE: float = 2.0**15
"""The fit's range: parse_embeddings rejects a row holding a |value| above it.

A value in range is < 2**39 in fixed point (x 2**FIXED_POINT_BITS), so MAX_ROWS_PER_SUM
rows of any values in range sum exactly under FIXED_SUM_LIMIT; it also stays finite
in float16 compute (max 65504) and its squares in float32 distances.
"""

FIXED_SUM_LIMIT: int = 2**62
"""Fixed-point sums are kept below this magnitude: two such sums add exactly in int64
(|a + b| < 2**63), and a sum that reaches it is marked SUM_OVERFLOWED, never wrapped."""

SUM_OVERFLOWED: int = -(2**63)
"""The mark of an overflowed sum. Adding anything below FIXED_SUM_LIMIT to it leaves it
at or past the limit (-2**63 + a stays below -2**62, or wraps above 2**62), so the mark
survives to the driver, which refuses it."""

MAX_ROWS_PER_SUM: int = (FIXED_SUM_LIMIT - 1) // (
    int(MAX_ABS_VALUE) * 2**kernels.FIXED_POINT_BITS + 1
)
"""Rows (8388607) whose sum is exact whatever their values in range: a node fed more
rows than this in one pass can be refused. Rows of |value| <= 1 allow 2**38 rows."""
