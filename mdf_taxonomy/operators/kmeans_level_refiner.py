"""The fitting operator: one pass of the level being fitted, streamed through MDF."""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from mdf_taxonomy import _mdf
from mdf_taxonomy.backend import FitBackend, PartialsCombiner
from mdf_taxonomy.model import Taxonomy, TaxonomyConfig
from mdf_taxonomy.model.balance import sample_sizes
from mdf_taxonomy.model.config import check_parameter, document_table_parameters
from mdf_taxonomy.operators.taxonomy_operator import _TaxonomyRefiner
from mdf_taxonomy.passes import batch
from mdf_taxonomy.passes.records import ERROR_FIELD, ParsedBatch

# the refiners' logger, named as before the split into one module per operator
log = logging.getLogger("mdf_taxonomy.operators.refiners")


class KMeansLevelRefiner(_TaxonomyRefiner):
    """One Lloyd (or sampling) pass of the level being fitted, streamed through MDF.

    Each batch is assigned with the snapshot's centroids and its per-cluster
    fixed-point sums go to the sharded FitBackend (or, in a sampling pass, its
    bottom-k rows per parent). The driver (TaxonomyEngine / `mdf-taxonomy run`)
    turns the pass's totals into the next snapshot. Records get the ids of the
    levels fitted so far.

    The fit parameters build a TaxonomyConfig, which owns their defaults and
    constraints; the run parameters are checked against RunConfig's table.

    Parameters
    ----------
    snapshot : str or None, default=None
        The snapshot whose centroids this pass uses (None: the latest); the driver pins
        each pass to one.
    flush_rows : int, default=0
        Rows of partials folded before a flush to the backend (0: flush every batch). It
        needs the end-of-stream call that rust_free_fallback's Executor makes; under a
        real MDF install every batch is flushed. See RunConfig.flush_rows.
    backend_name : str, default='mdf_taxonomy_fit'
        Name prefix of the bucket actors, shared by the driver and every replica.
    """

    def __init__(
        self,
        storage_uri: str,
        embedding_field: str | None = None,
        snapshot: str | None = None,
        n_levels: int = 1,
        branching_factor: int | list[int] = 16,
        dim: int | None = None,
        metric: str = "l2",
        seed: int = 0,
        max_iter: int = 20,
        tol: float = 1e-4,
        sample_per_child: int = 64,
        max_sample_per_node: int = 65536,
        init_iters: int = 10,
        max_node_size: int | None = None,
        min_node_size: int | None = None,
        balance_factor: float | None = None,
        centroid_search: str = "exact",
        coarse_min_children: int = 65536,
        coarse_probe: int = 8,
        backend_buckets: int = 2,
        flush_rows: int = 0,
        backend_name: str = "mdf_taxonomy_fit",
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
        self.config = TaxonomyConfig(
            n_levels=n_levels,
            branching_factor=branching_factor,
            dim=dim,
            metric=metric,
            seed=seed,
            max_iter=max_iter,
            tol=tol,
            sample_per_child=sample_per_child,
            max_sample_per_node=max_sample_per_node,
            init_iters=init_iters,
            max_node_size=max_node_size,
            min_node_size=min_node_size,
            balance_factor=balance_factor,
            centroid_search=centroid_search,
            coarse_min_children=coarse_min_children,
            coarse_probe=coarse_probe,
            embedding_field=embedding_field,
        )
        check_parameter("backend_buckets", backend_buckets, type(self).__name__)
        check_parameter("flush_rows", flush_rows, type(self).__name__)
        self.backend = FitBackend(backend_buckets, backend_name)
        self.flush_rows = flush_rows
        self.flush_failures = 0
        self._combiner: PartialsCombiner | None = None
        # (pass, {parent: k-th priority}): the bucket's sample is full below it
        self._sample_cut: tuple[str | None, dict[int, int]] = (None, {})
        if flush_rows > 0 and not self._combining():
            log.warning(
                "flush_rows=%d needs an end-of-stream hook that %s lacks: "
                "flushing every batch instead",
                flush_rows,
                _mdf.MDF_FLAVOUR,
            )

    def _combining(self) -> bool:
        """Fold batches across flushes only where the runtime tells us the stream ended."""
        return self.flush_rows > 0 and _mdf.HAS_END_OF_STREAM

    def end_of_stream(self) -> None:
        """Called by rust_free_fallback's Executor after the last batch: flush the rest."""
        if self._combiner is not None:
            started = time.perf_counter()
            try:
                self._combiner.flush(self.backend)
            except Exception:
                self.flush_failures += 1
                raise
            finally:
                self.timings["flush_s"] += time.perf_counter() - started

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return batch.fit_schema(self.config.n_levels)

    def _blank_columns(self, n_rows: int, reason: str) -> dict[str, pa.Array]:
        return batch.fit_columns(self.config.n_levels, n_rows, batch.all_rejected(n_rows, reason))

    def _refine(self, parsed: ParsedBatch, tax: Taxonomy, n_rows: int) -> dict[str, pa.Array]:
        st = tax.state
        started = time.perf_counter()
        x = self._rows(tax, parsed)
        paths, nodes, distance = batch.walk(tax, x, self.assigner)
        columns = batch.fit_columns(self.config.n_levels, n_rows, parsed, paths)
        if st.complete:
            self.timings["assign_s"] += time.perf_counter() - started
            return columns
        pass_id = tax.version or "unversioned"
        flush_id = parsed.flush_id(pass_id)
        totals = {"rows": len(parsed.valid), "rows_rejected": len(parsed.errors)}
        try:
            if st.phase == "sample":
                if self._sample_cut[0] != pass_id:
                    self._sample_cut = (pass_id, {})
                cut = self._sample_cut[1]
                offer = batch.sample_offer(tax, x, nodes, cut)
                cut.update(
                    self.backend.offer_samples(
                        pass_id,
                        flush_id,
                        offer.parents,
                        offer.priorities,
                        offer.vectors,
                        sample_sizes(tax),
                        offer.parent_rows,
                        totals,
                        parsed.reasons(),
                    )
                )
            else:
                sums, counts, totals["inertia_fixed"] = batch.lloyd_partials(
                    tax, x, nodes, distance, self.assigner
                )
                self.timings["assign_s"] += time.perf_counter() - started
                started = time.perf_counter()
                combiner = self._combiner
                if combiner is None or combiner.pass_id != pass_id:
                    self._combiner = combiner = PartialsCombiner(
                        pass_id, len(counts), tax.dim, x.device
                    )
                combiner.add(flush_id, sums, counts, totals, parsed.reasons())
                if not self._combining() or combiner.rows >= self.flush_rows:
                    combiner.flush(self.backend)
            self.timings["flush_s"] += time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - counted; the driver's row check re-runs the pass
            self.flush_failures += 1
            log.error("backend flush failed (%s); the driver will see the missing rows", e)
            reason = f"backend_flush_failed: {type(e).__name__}: {e}"
            errors = columns[ERROR_FIELD].to_pylist()
            for i in parsed.valid:
                errors[i] = reason
            columns[ERROR_FIELD] = pa.array(errors, pa.string())
        return columns

    def get_stats(self) -> dict:
        stats = super().get_stats()
        stats["flush_failures"] = self.flush_failures
        return stats


document_table_parameters(KMeansLevelRefiner)
