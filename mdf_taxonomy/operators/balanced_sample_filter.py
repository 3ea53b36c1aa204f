"""The MDF face of balanced sampling: keep the rows a sample plan selects.

The plan (`curation.sampling.SamplePlan`, written by `sample_parquet` or `build_plan`)
holds one cut-off per leaf, so whether a record is kept is a function of the record and
the plan alone: any number of replicas, any batching and any order keep the same rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from mdf_taxonomy._mdf import BatchResult, Filter
from mdf_taxonomy.curation.sampling import REPEAT_FIELD, SamplePlan, repeats, row_keys
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model import Taxonomy, TaxonomyStore
from mdf_taxonomy.model.config import check_parameter
from mdf_taxonomy.passes.records import find_record_embedding_field, parse_embeddings

log = logging.getLogger(__name__)

NOT_SELECTED = "not_selected"


class BalancedSampleFilter(Filter):
    """Keeps the records a balanced-sampling plan selects and writes on each of them
    `taxonomy_repeat` (int32, 1..multiplier): how many times the sample takes it.

    A record whose embedding is missing or invalid is dropped with its reason (the
    labeller's reasons, e.g. "wrong_length: ..."), counted in the stats (`rejected`, by
    kind) and, with MDF's rejected-samples collection on, reported there; an unselected
    record is reported with reason "not_selected". Nothing raises: a batch that fails as
    a whole (say, an unreadable plan) is dropped and counted as "operator_failed".

    Parameters
    ----------
    storage_uri : str
        The fitted taxonomy (any fsspec URI); the plan's snapshot of it is loaded.
    plan_uri : str
        The sample plan's JSON (any fsspec URI), from `sample_parquet` or `build_plan`.
    embedding_field : str or None, default=None
        The column holding the vectors (None: the one column of float vectors found in
        the first batch).
    device : str, default='auto'
        Where the rows are assigned ("auto": CUDA when there is one).
    kernel_backend : str, default='auto'
        The assignment kernels: "auto", "torch" or "triton".
    storage_options : dict or None, default=None
        fsspec options for storage_uri and plan_uri (credentials, endpoint).
    """

    def __init__(
        self,
        storage_uri: str,
        plan_uri: str,
        embedding_field: str | None = None,
        device: str = "auto",
        kernel_backend: str = "auto",
        storage_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        where = type(self).__name__
        for name, value in (("storage_uri", storage_uri), ("plan_uri", plan_uri)):
            if not value:
                raise ValueError(f"{where}: {name} is required")
        check_parameter("device", device, where)
        check_parameter("kernel_backend", kernel_backend, where)
        self.storage_uri = storage_uri
        self.plan_uri = plan_uri
        self.embedding_field = embedding_field
        self.device = device
        self.kernel_backend = kernel_backend
        self.storage_options = storage_options
        self.assigner = make_assigner(kernel_backend)
        self._plan: SamplePlan | None = SamplePlan.load(plan_uri, storage_options)  # checked
        self._taxonomy: Taxonomy | None = None  # loaded in the actor, on the first batch
        self.rejected: dict[str, int] = {}
        self.selected = {"rows": 0, "repeats": 0}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_plan"] = state["_taxonomy"] = None  # reloaded inside the actor
        return state

    def _load(self) -> tuple[SamplePlan, Taxonomy]:
        if self._plan is None:
            self._plan = SamplePlan.load(self.plan_uri, self.storage_options)
        if self._taxonomy is None:
            store = TaxonomyStore(self.storage_uri, self.storage_options)
            tax = store.load(self._plan.snapshot)
            self._plan.check_taxonomy(tax)
            self._taxonomy = tax
        return self._plan, self._taxonomy

    def _count(self, kind: str, n: int = 1) -> None:
        self.rejected[kind] = self.rejected.get(kind, 0) + n

    def _judge(self, records: list[dict]) -> tuple[np.ndarray, dict[int, str]]:
        """(repeats per record, reason per record dropped for its embedding or a failure);
        writes `taxonomy_repeat` on the selected records."""
        n = len(records)
        try:
            plan, tax = self._load()
            if self.embedding_field is None and records:
                self.embedding_field = find_record_embedding_field(records)
                log.info("%s: embedding_field %r found", type(self).__name__, self.embedding_field)
            parsed = parse_embeddings(
                records, self.embedding_field or "", tax.dim, metric=tax.config.metric
            )
            leaves = np.full(n, -1, np.int64)
            scores, priorities = np.zeros(n, np.float32), np.zeros(n, np.uint64)
            keys = row_keys(tax, parsed.x, plan.strategy, plan.seed, self.assigner, self.device)
            for full, part in zip((leaves, scores, priorities), keys, strict=True):
                full[parsed.valid] = part
            times, errors = repeats(plan, leaves, scores, priorities), dict(parsed.errors)
            for kind, count in parsed.reasons().items():
                self._count(kind, count)
        except Exception as e:  # noqa: BLE001 - MDF would drop the batch silently: count it
            log.exception("%s failed on a batch of %d records", type(self).__name__, n)
            times = np.zeros(n, np.int32)
            errors = dict.fromkeys(range(n), f"operator_failed: {type(e).__name__}: {e}")
            self._count("operator_failed", n)
        for i in np.flatnonzero(times):
            records[i][REPEAT_FIELD] = np.int32(times[i])
        self.selected["rows"] += int((times > 0).sum())
        self.selected["repeats"] += int(times.sum())
        return times, errors

    def should_keep_batch(self, records: list[dict[str, Any]]) -> list[bool]:
        times, _ = self._judge(records)
        return (times > 0).tolist()

    def _process_batch_with_rejected_impl(self, records: list[dict[str, Any]]) -> BatchResult:
        """Dropped records go to MDF's rejected samples with their own reason."""
        result = BatchResult(passed=[], rejected=[])
        if not records:
            return result
        times, errors = self._judge(records)
        for i, rec in enumerate(records):
            if times[i] > 0:
                result.passed.append(rec)
                continue
            details = {"reason": errors.get(i, NOT_SELECTED), "operator": type(self).__name__}
            result.rejected.append({**rec, "_rejection_details": details})
        return result

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return {REPEAT_FIELD: pa.int32()}

    def get_stats(self) -> dict[str, Any]:
        """MDF's stats plus rejections by reason and the rows (and repeats) selected."""
        stats = super().get_stats()
        stats["rejected"] = dict(self.rejected)
        stats["selected"] = dict(self.selected)
        return stats
