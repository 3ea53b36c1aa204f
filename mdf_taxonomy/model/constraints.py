"""The constraints a parameter table states (`config.PARAMETER_CONSTRAINTS` and its
siblings), as scikit-learn's `_parameter_constraints` do: each says whether a value is
acceptable (`ok`) and, as its string, what it must be."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Int:
    """An integer (not a bool) in [lo, hi]."""

    lo: int
    hi: int

    def ok(self, v: Any) -> bool:
        return _is_int(v) and self.lo <= v <= self.hi

    def __str__(self) -> str:
        if _pow2(self.hi + 1) and self.hi > 1024:
            return f"must be an integer in [{self.lo}, {_num(self.hi + 1)})"
        return f"must be an integer in [{self.lo}, {_num(self.hi)}]"


@dataclass(frozen=True)
class PerLevel:
    """One `inner` for every level, or a list of them (its length is checked against n_levels)."""

    inner: Int

    def ok(self, v: Any) -> bool:
        return self.inner.ok(v) or (isinstance(v, tuple) and all(self.inner.ok(b) for b in v))

    def __str__(self) -> str:
        return f"{self.inner}, or a list of such integers, one per level"


@dataclass(frozen=True)
class OrNone:
    inner: Any

    def ok(self, v: Any) -> bool:
        return v is None or self.inner.ok(v)

    def __str__(self) -> str:
        return f"{self.inner}, or null"


@dataclass(frozen=True)
class FiniteAtLeast:
    """A finite real number (not a bool) >= lo."""

    lo: float

    def ok(self, v: Any) -> bool:
        real = isinstance(v, int | float) and not isinstance(v, bool)
        return real and math.isfinite(v) and v >= self.lo

    def __str__(self) -> str:
        return f"must be a finite number >= {self.lo:g}"


@dataclass(frozen=True)
class OneOf:
    options: tuple[str, ...]

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and v in self.options

    def __str__(self) -> str:
        return f"must be one of {self.options}"


@dataclass(frozen=True)
class NonEmptyStr:
    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and bool(v)

    def __str__(self) -> str:
        return "must be a non-empty string"


@dataclass(frozen=True)
class Bool:
    def ok(self, v: Any) -> bool:
        return isinstance(v, bool)

    def __str__(self) -> str:
        return "must be true or false"


@dataclass(frozen=True)
class Device:
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""

    def ok(self, v: Any) -> bool:
        if v in ("auto", "cpu", "cuda"):
            return True
        return isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit()

    def __str__(self) -> str:
        return "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"


@dataclass(frozen=True)
class Identifier:
    """Letters, digits and underscores (possibly none): safe in a column or folder name."""

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and re.fullmatch(r"\w*", v, re.ASCII) is not None

    def __str__(self) -> str:
        return "must be letters, digits and underscores"


Constraint = (
    Int | PerLevel | OrNone | FiniteAtLeast | OneOf | NonEmptyStr | Bool | Device | Identifier
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _num(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n > 1024 and _pow2(n) else str(n)
