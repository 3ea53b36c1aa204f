"""What the two MDF operators share: lazy snapshot loading, parsing, per-record errors.

Both operators are thin: parse the batch's embeddings, call the model and kernels, talk
to the backend, write fields. They are constructed in the driver and pickled into
actors, so the taxonomy is loaded lazily on the first batch.

Fields are typed numpy scalars and never None, so every Parquet file a writer
produces has the same schema whichever batch it holds: a rejected record has path
"", node ids -1, distance NaN and its reason in taxonomy_error (a good one has
""). A failure of the whole batch (say, unreachable storage) labels every record
with the reason instead of raising, because MDF would drop the batch silently.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa
import torch

from mdf_taxonomy._mdf import BatchResult, Refiner
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model import Taxonomy, TaxonomyStore
from mdf_taxonomy.model.config import check_parameter
from mdf_taxonomy.passes.batch import COMPUTE_DTYPES, LABEL_FIELDS
from mdf_taxonomy.passes.records import (
    ParsedBatch,
    find_record_embedding_field,
    parse_embeddings,
)

# the refiners' logger, named as before the split into one module per operator
log = logging.getLogger("mdf_taxonomy.operators.refiners")


def _values(column: pa.Array) -> Any:
    """An Arrow column as per-record values: numpy scalars for numbers, str for text."""
    if pa.types.is_string(column.type):
        return column.to_pylist()
    return column.to_numpy(zero_copy_only=False)


def write_fields(records: list[dict], columns: dict[str, pa.Array]) -> None:
    """Column-wise results into the records, one field at a time."""
    for name, column in columns.items():
        for rec, value in zip(records, _values(column), strict=True):
            rec[name] = value


class _TaxonomyRefiner(Refiner):
    """Shared plumbing: lazy snapshot loading, parsing, per-record error fields.

    Parameters
    ----------
    storage_uri : str
        Where the taxonomy's snapshots live (any fsspec URI); required.
    storage_options : dict or None, default=None
        fsspec options for storage_uri (credentials, endpoint).
    """

    def __init__(
        self,
        storage_uri: str,
        embedding_field: str | None = None,
        snapshot: str | None = None,
        device: str = "auto",
        kernel_backend: str = "auto",
        storage_options: dict[str, Any] | None = None,
        compute_dtype: str = "float32",
    ):
        super().__init__()
        for name, value in (
            ("device", device),
            ("kernel_backend", kernel_backend),
            ("compute_dtype", compute_dtype),
        ):
            check_parameter(name, value, type(self).__name__)
        self.compute_dtype = compute_dtype
        self.timings = {"parse_s": 0.0, "assign_s": 0.0, "flush_s": 0.0}
        if not storage_uri:
            raise ValueError(f"{type(self).__name__}: storage_uri is required")
        self.storage_uri = storage_uri
        self.embedding_field = embedding_field
        self.snapshot = snapshot
        self.device = device
        self.kernel_backend = kernel_backend
        self.assigner = make_assigner(kernel_backend)  # the kernels, chosen once
        self.storage_options = storage_options
        self._taxonomy: Taxonomy | None = None
        self.fields = LABEL_FIELDS  # the names of the fields written (the labeller's prefix)
        self.rejected: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_taxonomy"] = None  # reload inside the actor, never ship arrays by pickle
        if "_combiner" in state:
            state["_combiner"] = None
        return state

    @property
    def taxonomy(self) -> Taxonomy:
        if self._taxonomy is None:
            self._taxonomy = TaxonomyStore(self.storage_uri, self.storage_options).load(
                self.snapshot
            )
        return self._taxonomy

    def _torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def refine_batch(self, records: list[dict]) -> None:
        try:
            started = time.perf_counter()
            tax = self.taxonomy
            parsed = parse_embeddings(
                records, self._field_of(records), tax.dim, metric=tax.config.metric
            )
            self.timings["parse_s"] += time.perf_counter() - started
            for kind, n in parsed.reasons().items():
                self.rejected[kind] = self.rejected.get(kind, 0) + n
            columns = self._refine(parsed, tax, len(records))
        except Exception as e:  # noqa: BLE001 - MDF would drop the batch: label it instead
            log.exception("%s failed on a batch of %d records", type(self).__name__, len(records))
            reason = f"operator_failed: {type(e).__name__}: {e}"
            columns = self._blank_columns(len(records), reason)  # needs no store
            self.rejected["operator_failed"] = self.rejected.get("operator_failed", 0) + len(
                records
            )
        write_fields(records, columns)

    def _field_of(self, records: list[dict]) -> str:
        """The embedding field: as given, or found in the first batch with records."""
        if self.embedding_field is None and records:
            self.embedding_field = find_record_embedding_field(records)
            log.info("%s: embedding_field %r found", type(self).__name__, self.embedding_field)
        return self.embedding_field or ""

    def _refine(self, parsed: ParsedBatch, tax: Taxonomy, n_rows: int) -> dict[str, pa.Array]:
        raise NotImplementedError

    def _blank_columns(self, n_rows: int, reason: str) -> dict[str, pa.Array]:
        """The output fields of records that get no label, with the reason."""
        raise NotImplementedError

    def _rows(self, tax: Taxonomy, parsed: ParsedBatch) -> torch.Tensor:
        return tax.prepare(parsed.x, self._torch_device(), COMPUTE_DTYPES[self.compute_dtype])

    def _process_batch_with_rejected_impl(self, records: list[dict]) -> BatchResult:
        """With MDF's rejected-samples collection on, a record that got no label is reported
        there too, with its reason; it still passes on, so nothing is dropped."""
        passed = self._process_batch_impl(records)
        error = self.fields.error
        rejected = [
            {
                **rec,
                "_rejection_details": {"reason": rec[error], "operator": type(self).__name__},
            }
            for rec in passed
            if rec.get(error)
        ]
        return BatchResult(passed=passed, rejected=rejected)

    def get_stats(self) -> dict:
        """MDF's stats plus rejections by reason and where the operator's time went."""
        stats = super().get_stats()
        stats["rejected"] = dict(self.rejected)
        stats["timings"] = dict(self.timings)
        return stats
