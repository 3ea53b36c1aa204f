"""MDF's face of semantic dedup: a Filter that drops the records a dedup run marked.

The run (`TaxonomyEngine.dedup`, `mdf-taxonomy dedup`) stores each record's largest
similarity to an earlier-ranked row, so the filter can re-threshold it for another eps
without a new run. A record without the fields, or with values it cannot read, is kept
and counted by reason, never raised on (MDF would drop the whole batch).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from mdf_taxonomy._mdf import Filter
from mdf_taxonomy.curation.semdedup import is_duplicate
from mdf_taxonomy.curation.semdedup_parquet import DUPLICATE_FIELD, SIMILARITY_FIELD


class SemanticDedupFilter(Filter):
    """Drops the records a dedup run marked as duplicates.

    Parameters
    ----------
    eps : float or None, default=None
        Re-threshold: drop a record whose `similarity_field` is >= 1 - eps, the run's own
        rule, so any eps can be chosen after one run (a record without the similarity
        falls back to `duplicate_field`). None: drop the records the run flagged in
        `duplicate_field`.
    similarity_field : str, default='dedup_max_similarity'
        The run's largest similarity to an earlier-ranked row.
    duplicate_field : str, default='is_duplicate'
        The run's decision for its own eps.
    """

    def __init__(
        self,
        eps: float | None = None,
        similarity_field: str = SIMILARITY_FIELD,
        duplicate_field: str = DUPLICATE_FIELD,
    ):
        super().__init__()
        if eps is not None and not (
            isinstance(eps, Real) and not isinstance(eps, bool) and 0 <= eps <= 2
        ):
            raise ValueError(f"SemanticDedupFilter: eps must be None or in [0, 2], got {eps!r}")
        self.eps = None if eps is None else float(eps)
        self.similarity_field = similarity_field
        self.duplicate_field = duplicate_field
        self.dropped = 0
        self.kept_undecided: dict[str, int] = {}  # reason -> records kept without a decision

    def should_keep_batch(self, records: list[dict[str, Any]]) -> list[bool]:
        flags = []
        for rec in records:
            duplicate, reason = self._decide(rec)
            if reason:
                self.kept_undecided[reason] = self.kept_undecided.get(reason, 0) + 1
            self.dropped += bool(duplicate)
            flags.append(not duplicate)
        return flags

    def _decide(self, rec: Any) -> tuple[bool, str]:
        """(is it a duplicate, why it could not be told: "" when it could)."""
        if not isinstance(rec, dict):
            return False, "not_a_record"
        if self.eps is not None and rec.get(self.similarity_field) is not None:
            sim = rec[self.similarity_field]
            if not isinstance(sim, Real) or isinstance(sim, bool):
                return False, f"bad_{self.similarity_field}"
            if math.isnan(sim):  # the run did not compare it (bad embedding, no node)
                return False, "not_compared"
            return bool(is_duplicate(float(sim), self.eps)), ""
        flag = rec.get(self.duplicate_field)
        if flag is None:
            return False, f"missing_{self.duplicate_field}"
        if not isinstance(flag, bool) and type(flag).__name__ != "bool_":
            return False, f"bad_{self.duplicate_field}"
        return bool(flag), ""

    def get_stats(self) -> dict:
        """MDF's stats plus the records dropped and those kept undecided, by reason."""
        stats = super().get_stats()
        stats["dropped"] = self.dropped
        stats["kept_undecided"] = dict(self.kept_undecided)
        return stats
