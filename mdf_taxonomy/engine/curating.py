"""The engine's curation methods: what curators do with a stored tree (balanced
sampling, semantic dedup, size-capped labelling), each over Parquet in this process."""

from __future__ import annotations

from typing import Any

import numpy as np

from mdf_taxonomy.curation.capped_labelling import label_capped_parquet
from mdf_taxonomy.curation.sampling import resolve_device
from mdf_taxonomy.curation.sampling_passes import sample_parquet
from mdf_taxonomy.curation.semdedup_parquet import dedup_parquet
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model.capacity import capped_labels
from mdf_taxonomy.passes.validation import validate_matrix


class CurationMethods:
    """Mixed into TaxonomyEngine, whose settings (store, device, kernels, batch size)
    they run with."""

    def sample(
        self,
        input: str | list[str],  # noqa: A002
        output: str,
        target_size: int,
        multiplier: int = 1,
        strategy: str = "random",
        seed: int | None = None,
        plan_uri: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """A balanced subset of `input` over the stored tree, written to `output` (every
        column, plus `taxonomy_repeat`): ssl-data-curation's top-down allocation of
        `target_size`, each row taken at most `multiplier` times, leaves filled by
        `strategy` ('random' by content hash, 'closest', 'furthest'). `seed`: the tree's
        by default. `plan_uri`: also save the plan, for BalancedSampleFilter. The summary."""
        tax = self.load()
        self.last_summary = sample_parquet(
            tax,
            input,
            output,
            target_size,
            multiplier,
            strategy,
            tax.config.seed if seed is None else seed,
            storage_options=self.storage_options,
            embedding_field=self.fit_params["embedding_field"],
            plan_uri=plan_uri,
            kernel_backend=self.kernel_backend,
            device=self.device,
            batch_rows=self.batch_size,
            overwrite=overwrite,
        )
        return self.last_summary

    def dedup(
        self,
        input: str | list[str],  # noqa: A002
        output: str,
        eps: float,
        level: int | None = None,
        ranking: str = "hard",
        seed: int | None = None,
        cross_boundary_margin: float | None = None,
        id_field: str = "id",
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """SemDeDup within the nodes of `level` (None: the leaves) over labelled `input`:
        every row gets its highest cosine similarity to an earlier-ranked row of its node
        (`ranking`: 'hard' furthest from the centroid first, 'easy', or 'random' by content
        hash) and that row's id, and `is_duplicate` for `eps`, so eps can be chosen again
        later. `cross_boundary_margin`: rows closer than that to a sibling node are also
        compared with its rows. `seed`: the tree's by default. `output` is refused if it
        holds data, unless `overwrite`. The summary."""
        tax = self.load()
        self.last_summary = dedup_parquet(
            tax,
            input,
            output,
            eps,
            level=level,
            ranking=ranking,
            seed=tax.config.seed if seed is None else seed,
            cross_boundary_margin=cross_boundary_margin,
            id_field=id_field,
            embedding_field=self.fit_params["embedding_field"],
            storage_options=self.storage_options,
            compute_dtype=self.compute_dtype,
            device=self.device,
            on_bad_file=self.on_bad_file,
            overwrite=overwrite,
        )
        return self.last_summary

    def label_capped(
        self,
        input: str | list[str] | np.ndarray,  # noqa: A002
        output: str | None,
        capacity: int,
        level: int | None = None,
        max_passes: int = 64,
        plan_uri: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any] | np.ndarray:
        """Label `input` with at most `capacity` rows in each node of `level` (None: the
        leaves): a row whose nearest child is full goes to its nearest sibling with room,
        by deferred acceptance (model/capacity.py), the same nodes for any batching or
        order. A URI is read in counting passes (at most `max_passes`) and written to
        `output` with every column and the label columns (the summary is returned); an
        array in gives its (N, n_levels) int32 paths. `plan_uri`: also save the settled
        thresholds, for TaxonomyPathRefiner's capacity_plan."""
        tax = self.load()
        if isinstance(input, np.ndarray):
            assigner, device = make_assigner(self.kernel_backend), resolve_device(self.device)
            rows = np.ascontiguousarray(input, dtype=np.float32)  # ties hash float32 bytes
            parsed = validate_matrix(rows, np.arange(len(rows)), "input", tax.config.metric)
            if parsed.errors:
                bad = sorted(parsed.errors)
                raise ValueError(
                    f"label_capped: row(s) {bad[:5]} ({len(bad)} in all) are not usable, "
                    f"row {bad[0]}: {parsed.errors[bad[0]]}; a Parquet input rejects such "
                    "records one by one"
                )
            plan, labels = capped_labels(
                tax, lambda: [parsed.x], capacity, level, assigner, device, max_passes
            )
            if plan_uri is not None:
                plan.save(plan_uri, self.storage_options)
            return labels[0].paths
        if output is None:
            raise ValueError("label_capped needs an output for a Parquet input")
        self.last_summary = label_capped_parquet(
            tax,
            input,
            output,
            capacity,
            level,
            storage_options=self.storage_options,
            embedding_field=self.fit_params["embedding_field"],
            kernel_backend=self.kernel_backend,
            device=self.device,
            batch_rows=self.batch_size,
            max_passes=max_passes,
            plan_uri=plan_uri,
            overwrite=overwrite,
        )
        return self.last_summary
