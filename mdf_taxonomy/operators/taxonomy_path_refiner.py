"""The labelling operator: every record's path in a fitted taxonomy."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from mdf_taxonomy.model import Taxonomy, TaxonomyStore
from mdf_taxonomy.model.capacity import CapacityPlan, plan_snapshot
from mdf_taxonomy.model.config import check_parameter, document_table_parameters
from mdf_taxonomy.model.taxonomy import Labels
from mdf_taxonomy.operators.taxonomy_operator import _TaxonomyRefiner
from mdf_taxonomy.passes import batch
from mdf_taxonomy.passes.records import FIELD_PREFIX, ParsedBatch


class TaxonomyPathRefiner(_TaxonomyRefiner):
    """Labels every record with its path in a fitted taxonomy (no refit).

    Adds taxonomy_path ("12/305/77"), taxonomy_l1..taxonomy_lN (int32),
    taxonomy_distance (float32, to the leaf centroid), taxonomy_margin (float32: how much
    farther the runner-up among the leaf's siblings is; small means a borderline row, +inf
    an only child) and taxonomy_error ("" or why the record got no label).

    Parameters
    ----------
    snapshot : str or None, default=None
        The stored snapshot (version, e.g. "000008") to label with, pinned so that a new
        fit in the same store does not change the labels of a running job (None: the
        latest when the operator is built); the engine pins one.
    n_levels : int or None, default=None
        Depth of the output schema (None: read from the store in the driver, which
        refuses a fit that is not finished).
    field_prefix : str, default='taxonomy_'
        What the names of the added fields start with (letters, digits, underscores), so
        labels of a second taxonomy can sit beside the first's.
    capacity_plan : str or None, default=None
        A capacity plan (`TaxonomyEngine.label_capped(..., plan_uri=...)`, any fsspec
        URI): rows go where that capped run put them, its nodes' thresholds applied
        row by row (None: the nearest node). Its snapshot is the one labelled with, and
        rows are placed in float32 as that run placed them, whatever `compute_dtype`.
    """

    def __init__(
        self,
        storage_uri: str,
        embedding_field: str | None = None,
        snapshot: str | None = None,
        n_levels: int | None = None,
        device: str = "auto",
        kernel_backend: str = "auto",
        storage_options: dict[str, Any] | None = None,
        compute_dtype: str = "float32",
        field_prefix: str = FIELD_PREFIX,
        capacity_plan: str | None = None,
    ):
        super().__init__(
            storage_uri,
            embedding_field,
            snapshot,
            device,
            kernel_backend,
            storage_options,
            compute_dtype,
        )
        if n_levels is None:  # read in the driver, so the schema never depends on the store
            manifest = TaxonomyStore(storage_uri, storage_options).manifest(snapshot)
            if manifest.get("state", {}).get("phase") != "done":
                raise ValueError(
                    f"TaxonomyPathRefiner: the taxonomy at {storage_uri!r} (snapshot "
                    f"{manifest.get('version')}) is not complete: finish the fit first"
                )
            n_levels = int(manifest["n_levels_stored"])
        self.n_levels = n_levels
        check_parameter("field_prefix", field_prefix, type(self).__name__)
        self.fields = batch.LabelFields(field_prefix)
        self.capacity_plan = capacity_plan
        self._capacity: CapacityPlan | None = None
        if capacity_plan is not None:  # read in the driver: a bad plan fails the job here
            self.snapshot = self.snapshot or plan_snapshot(capacity_plan, storage_options)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_capacity"] = None  # reloaded inside the actor
        return state

    def _capped(self, tax: Taxonomy, parsed: ParsedBatch) -> Labels:
        if self._capacity is None:
            self._capacity = CapacityPlan.load(self.capacity_plan, tax, self.storage_options)
        device = str(self._torch_device())
        placement = self._capacity.place(parsed.x, self.assigner, device)
        return self._capacity.labels(placement, self.assigner, device)

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return batch.label_schema(self.n_levels, self.fields)

    def _blank_columns(self, n_rows: int, reason: str) -> dict[str, pa.Array]:
        rejected = batch.all_rejected(n_rows, reason)
        return batch.label_columns(self.n_levels, n_rows, rejected, fields=self.fields)

    def _refine(self, parsed: ParsedBatch, tax: Taxonomy, n_rows: int) -> dict[str, pa.Array]:
        if not tax.state.complete:
            raise RuntimeError(
                f"taxonomy at {self.storage_uri} is not complete (level {tax.state.level}, "
                f"{tax.state.phase}): finish the fit before labelling"
            )
        labels = None
        if len(parsed.valid):
            started = time.perf_counter()
            if self.capacity_plan is not None:
                labels = self._capped(tax, parsed)
            else:
                rows = self._rows(tax, parsed)
                labels = tax.assign_paths(rows, assigner=self.assigner, prepared=True)
            self.timings["assign_s"] += time.perf_counter() - started
        return batch.label_columns(tax.n_levels, n_rows, parsed, labels, self.fields)


document_table_parameters(TaxonomyPathRefiner)
