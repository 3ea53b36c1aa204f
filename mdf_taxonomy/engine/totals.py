"""The counts a pass hands back, named: workers and backend buckets add them up in
string-keyed dicts (what crosses Ray), the engine reads them as fields and turns them
back into the same dicts where they reach a summary or a caller."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PassTotals:
    """A pass's `totals`: rows parsed (fitted or labelled), rows rejected, and the
    fit's exact inertia and flush counts. A count nobody reported is 0."""

    rows: int = 0
    rows_rejected: int = 0
    inertia_fixed: int = 0
    flushes: int = 0
    flush_bytes: int = 0

    @classmethod
    def of(cls, totals: Mapping[str, Any]) -> PassTotals:
        """The named counts of a totals dict (other keys, such as duplicate_flushes, are
        the backend's own)."""
        return cls(**{f.name: totals.get(f.name, 0) for f in dataclasses.fields(cls)})

    @property
    def seen(self) -> int:
        """Every row the operator was given: a pass is whole when this is the rows read."""
        return self.rows + self.rows_rejected


@dataclass(frozen=True)
class LabelCounts:
    """Rows the labelling operators saw, labelled and rejected (by reason)."""

    seen: int
    labelled: int
    rejected: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        """The `labelling` entry of a run's result and summary."""
        return {"seen": self.seen, "labelled": self.labelled, "rejected": self.rejected}


@dataclass(frozen=True)
class PassRecord:
    """One finished fit pass, as the fit summary and `PipelineFit.pass_log` list it."""

    snapshot: str
    level: int
    phase: str
    rows: int
    fitted: int
    seconds: float
    rows_per_s: float | None
    rejected: dict[str, int]
    flushes: int
    flush_bytes: int
    cached_rows: int
    skipped: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """The record as the summary's JSON keeps it (keys in field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
