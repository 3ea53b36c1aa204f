"""The labelling operator: every record's path in a fitted taxonomy."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from mdf_taxonomy.model import Taxonomy, TaxonomyStore
from mdf_taxonomy.model.config import document_table_parameters
from mdf_taxonomy.operators.taxonomy_operator import _TaxonomyRefiner
from mdf_taxonomy.passes import batch
from mdf_taxonomy.passes.records import ParsedBatch


class TaxonomyPathRefiner(_TaxonomyRefiner):
    """Labels every record with its path in a fitted taxonomy (no refit).

    Adds taxonomy_path ("12/305/77"), taxonomy_l1..taxonomy_lN (int32),
    taxonomy_distance (float32, to the leaf centroid) and taxonomy_error.

    Parameters
    ----------
    snapshot : str or None, default=None
        The stored snapshot to label with (None: the latest); the engine pins one.
    n_levels : int or None, default=None
        Depth of the output schema (None: read from the store in the driver, which
        refuses a fit that is not finished).
    """

    def __init__(
        self,
        storage_uri: str,
        embedding_field: str = "embedding",
        snapshot: str | None = None,
        n_levels: int | None = None,
        device: str = "auto",
        kernel_backend: str = "auto",
        storage_options: dict[str, Any] | None = None,
        compute_dtype: str = "float32",
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

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return batch.label_schema(self.n_levels)

    def _blank_columns(self, n_rows: int, reason: str) -> dict[str, pa.Array]:
        return batch.label_columns(self.n_levels, n_rows, batch.all_rejected(n_rows, reason))

    def _refine(self, parsed: ParsedBatch, tax: Taxonomy, n_rows: int) -> dict[str, pa.Array]:
        if not tax.state.complete:
            raise RuntimeError(
                f"taxonomy at {self.storage_uri} is not complete (level {tax.state.level}, "
                f"{tax.state.phase}): finish the fit before labelling"
            )
        if not len(parsed.valid):
            return batch.label_columns(tax.n_levels, n_rows, parsed)
        started = time.perf_counter()
        paths, dist = tax.assign_paths(
            self._rows(tax, parsed), assigner=self.assigner, prepared=True
        )
        self.timings["assign_s"] += time.perf_counter() - started
        return batch.label_columns(tax.n_levels, n_rows, parsed, paths, dist)


document_table_parameters(TaxonomyPathRefiner)
