"""Operator base classes (MDF-compatible surface).

Operators process batches (``list[dict]``); ``None`` in the output marks a
dropped record. Stats are collected around every batch so the executor can
report per-operator throughput and latency, merged over replicas.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .backend import DedupBackend

# Latency samples kept per operator: enough for stable p99, bounded memory.
_MAX_LATENCY_SAMPLES = 10_000

Record = dict[str, Any]


@dataclass
class BatchResult:
    """Passed and rejected records of one batch (rejected carry ``_rejection_details``)."""

    passed: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def _empty_raw_stats() -> dict[str, Any]:
    return {
        "input_records": 0,
        "output_records": 0,
        "total_time": 0.0,
        "min_latency": float("inf"),
        "max_latency": 0.0,
        "latencies": [],
    }


def merge_raw_stats(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge raw stats of several replicas of one operator (sums, min/max, pooled samples)."""
    out = _empty_raw_stats()
    for raw in raws:
        out["input_records"] += raw.get("input_records", 0)
        out["output_records"] += raw.get("output_records", 0)
        out["total_time"] += raw.get("total_time", 0.0)
        out["min_latency"] = min(out["min_latency"], raw.get("min_latency", float("inf")))
        out["max_latency"] = max(out["max_latency"], raw.get("max_latency", 0.0))
        out["latencies"].extend(raw.get("latencies", []))
    return out


#: The keys of MDF's per-operator stats dict, in its order.
MDF_STAT_KEYS = (
    "input_records",
    "output_records",
    "pass_rate",
    "total_time",
    "avg_latency",
    "min_latency",
    "max_latency",
    "p50_latency",
    "p95_latency",
    "p99_latency",
    "throughput",
)


def summarize_raw_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn raw counters into MDF's stats dict (pass_rate in percent, latencies per record)."""
    n_in = raw["input_records"]
    if n_in == 0:
        return {k: 0 if k.endswith("_records") else 0.0 for k in MDF_STAT_KEYS}
    lat = sorted(raw["latencies"])

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * q))] if lat else 0.0

    total = raw["total_time"]
    return {
        "input_records": n_in,
        "output_records": raw["output_records"],
        "pass_rate": 100.0 * raw["output_records"] / n_in,
        "total_time": total,
        "avg_latency": total / n_in,
        "min_latency": 0.0 if raw["min_latency"] == float("inf") else raw["min_latency"],
        "max_latency": raw["max_latency"],
        "p50_latency": pct(0.50),
        "p95_latency": pct(0.95),
        "p99_latency": pct(0.99),
        "throughput": n_in / total if total > 0 else 0.0,
    }


class Operator(ABC):
    """Base of all operators: wraps ``_process_batch_impl`` with timing and counters."""

    def __init__(self, collect_rejected: bool = False):
        self._collect_rejected = collect_rejected
        self._stats = _empty_raw_stats()

    # -- stats ---------------------------------------------------------------
    def _record(self, n_in: int, n_out: int, seconds: float) -> None:
        if not hasattr(self, "_stats"):  # subclass forgot super().__init__()
            self._stats = _empty_raw_stats()
        if n_in <= 0:
            return
        s = self._stats
        per_record = seconds / n_in
        s["input_records"] += n_in
        s["output_records"] += n_out
        s["total_time"] += seconds
        s["min_latency"] = min(s["min_latency"], per_record)
        s["max_latency"] = max(s["max_latency"], per_record)
        lat = s["latencies"]
        lat.extend([per_record] * min(n_in, _MAX_LATENCY_SAMPLES))
        if len(lat) > _MAX_LATENCY_SAMPLES:
            del lat[: len(lat) - _MAX_LATENCY_SAMPLES]

    def _raw_stats(self) -> dict[str, Any]:
        """Counters before summarizing; the executor merges these across replicas."""
        raw = getattr(self, "_stats", None) or _empty_raw_stats()
        return {**raw, "latencies": list(raw["latencies"])}

    def get_stats(self) -> dict[str, Any]:
        """MDF stats: counts, pass_rate (%), total_time, per-record latencies (s), throughput."""
        return summarize_raw_stats(self._raw_stats())

    def reset_stats(self) -> None:
        self._stats = _empty_raw_stats()

    # -- processing ----------------------------------------------------------
    def process_batch(self, records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        """Process a batch; the output may contain ``None`` for dropped records."""
        start = time.perf_counter()
        results = self._process_batch_impl(records)
        self._record(len(records), sum(r is not None for r in results), time.perf_counter() - start)
        return results

    def process_batch_with_rejected(self, records: list[dict[str, Any]]) -> BatchResult:
        """Like ``process_batch`` but also returns rejected records for inspection."""
        start = time.perf_counter()
        result = self._process_batch_with_rejected_impl(records)
        self._record(len(records), len(result.passed), time.perf_counter() - start)
        return result

    def _process_batch_with_rejected_impl(self, records: list[dict[str, Any]]) -> BatchResult:
        """Default: no rejection metadata, just drop the ``None`` entries."""
        results = self._process_batch_impl(records)
        return BatchResult(passed=[r for r in results if r is not None], rejected=[])

    @abstractmethod
    def _process_batch_impl(self, records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        """Subclasses implement the actual batch transformation."""

    def get_output_schema(self) -> dict[str, pa.DataType]:
        """New output fields and their Arrow types (none by default)."""
        return {}


def _rejected_copy(record: Record, details: dict[str, Any]) -> Record:
    out = dict(record)
    out["_rejection_details"] = details
    return out


class Refiner(Operator):
    """Enriches records in place (adds fields); never drops records."""

    @abstractmethod
    def refine_batch(self, records: list[dict[str, Any]]) -> None:
        """Mutate ``records`` in place."""

    def _process_batch_impl(self, records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        if not records:
            return []
        self.refine_batch(records)
        return list(records)

    @abstractmethod
    def get_output_schema(self) -> dict[str, pa.DataType]:
        """Fields added by ``refine_batch`` and their Arrow types."""


class Filter(Operator):
    """Keeps or drops records according to ``should_keep_batch``."""

    @abstractmethod
    def should_keep_batch(self, records: list[dict[str, Any]]) -> list[bool]:
        """One flag per record: True keeps it."""

    def _flags(self, records: list[Record]) -> list[bool]:
        flags = list(self.should_keep_batch(records))
        if len(flags) != len(records):
            raise ValueError(
                f"{type(self).__name__}.should_keep_batch returned "
                f"{len(flags)} flags for {len(records)} records"
            )
        return flags

    def _process_batch_impl(self, records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        if not records:
            return []
        return [r if keep else None for r, keep in zip(records, self._flags(records), strict=True)]

    def _process_batch_with_rejected_impl(self, records: list[dict[str, Any]]) -> BatchResult:
        result = BatchResult()
        if not records:
            return result
        details = {"reason": "filtered", "operator": type(self).__name__}
        for rec, keep in zip(records, self._flags(records), strict=True):
            if keep:
                result.passed.append(rec)
            else:
                result.rejected.append(_rejected_copy(rec, dict(details)))
        return result

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return {}


class Deduplicator(Operator):
    """Drops records whose dedup key was already seen, using a shared ``DedupBackend``.

    The executor injects the backend (``self.backend``) when it is None so that
    all replicas share the same seen-set held by Ray actors.
    """

    def __init__(self, backend: DedupBackend | None = None, representative_id_field: str = "id"):
        super().__init__()
        self.backend = backend
        self.representative_id_field = representative_id_field

    @abstractmethod
    def get_dedup_keys_batch(self, records: list[dict[str, Any]]) -> list[str]:
        """One dedup key per record."""

    def get_representative_ids_batch(self, records: list[dict[str, Any]]) -> list[str]:
        """Ids recorded for the first occurrence of a key (for rejected-sample reports)."""
        return [str(r.get(self.representative_id_field, "")) for r in records]

    def _require_backend(self) -> DedupBackend:
        if self.backend is None:
            raise RuntimeError(
                f"{type(self).__name__}: no DedupBackend set (the Executor "
                "injects one; set .backend when using it standalone)"
            )
        return self.backend

    def _process_batch_impl(self, records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        backend = self._require_backend()
        if not records:
            return []
        is_new = backend.batch_mark_seen(self.get_dedup_keys_batch(records))
        return [r if new else None for r, new in zip(records, is_new, strict=True)]

    def _process_batch_with_rejected_impl(self, records: list[dict[str, Any]]) -> BatchResult:
        backend = self._require_backend()
        result = BatchResult()
        if not records:
            return result
        keys = self.get_dedup_keys_batch(records)
        if backend.track_representative:
            rep_ids = self.get_representative_ids_batch(records)
            marks = backend.batch_mark_seen_with_ids(keys, rep_ids)
        else:
            marks = [(new, None) for new in backend.batch_mark_seen(keys)]
        for rec, key, (new, rep) in zip(records, keys, marks, strict=True):
            if new:
                result.passed.append(rec)
                continue
            details: dict[str, Any] = {
                "reason": "duplicate",
                "operator": type(self).__name__,
                "dedup_key": key,
            }
            if rep is not None:
                details["representative_id"] = rep
            result.rejected.append(_rejected_copy(rec, details))
        return result

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return {}

    def reset(self) -> None:
        """Forget all seen keys (clears the shared backend)."""
        if self.backend is not None:
            self.backend.reset()


class CombinedOperator(Operator):
    """Runs a stage's operators in sequence; only surviving records reach the next one.

    ``failed_operator_index`` tells the executor which operator raised, so a
    dropped batch can be attributed in the stats.
    """

    def __init__(self, operators: list[Operator], collect_rejected: bool = False):
        super().__init__(collect_rejected=collect_rejected)
        self.operators = list(operators)
        self.failed_operator_index: int | None = None

    def _run(self, idx: int, fn, batch):
        self.failed_operator_index = idx
        out = fn(batch)
        self.failed_operator_index = None
        return out

    def _process_batch_impl(self, records: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
        batch = list(records)
        for i, op in enumerate(self.operators):
            if not batch:
                break
            batch = [r for r in self._run(i, op.process_batch, batch) if r is not None]
        return batch

    def _process_batch_with_rejected_impl(self, records: list[dict[str, Any]]) -> BatchResult:
        batch, rejected = list(records), []
        for i, op in enumerate(self.operators):
            if not batch:
                break
            res = self._run(i, op.process_batch_with_rejected, batch)
            batch = res.passed
            rejected.extend(res.rejected)
        return BatchResult(passed=batch, rejected=rejected)

    def operator_labels(self) -> list[str]:
        """Stable per-operator labels: class name, suffixed when a class repeats."""
        names = [type(op).__name__ for op in self.operators]
        labels = []
        for i, n in enumerate(names):
            dup = names.count(n) > 1
            labels.append(f"{n}_{names[: i + 1].count(n)}" if dup else n)
        return labels

    def get_stats(self) -> dict[str, Any]:
        """Per-operator stats keyed by class name (MDF shape)."""
        return {
            lbl: op.get_stats()
            for lbl, op in zip(self.operator_labels(), self.operators, strict=True)
        }

    def get_output_schema(self) -> dict[str, pa.DataType]:
        schema: dict[str, pa.DataType] = {}
        for op in self.operators:
            schema.update(op.get_output_schema())
        return schema
