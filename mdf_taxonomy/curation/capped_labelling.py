"""Labelling with a hard bound on the rows of each node, over Parquet, in this process.

The rule and its passes are `model.capacity`'s: counting passes read the embedding
column only, until no node of the capped level is over capacity; a last pass writes
every input column with the label columns (`passes.batch.label_columns`), the capped
node in place of the nearest one. Rows with a rejected embedding get blank labels and
their reason, as in labelling, and are counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from mdf_taxonomy.curation.sampling import pass_batch_rows, resolve_device
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model.capacity import CapacityPlan, Tally, settle
from mdf_taxonomy.model.taxonomy import Taxonomy
from mdf_taxonomy.passes.batch import label_columns
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.parquet_sink import ParquetSink
from mdf_taxonomy.passes.records import ParsedBatch, parse_arrow
from mdf_taxonomy.passes.staged_output import StagedOutput

log = logging.getLogger(__name__)


def _batches(
    tax: Taxonomy, source: ParquetInput, items: list[str], columns: list[str] | None
) -> Iterator[tuple[pa.RecordBatch, ParsedBatch]]:
    field = source.embedding_field
    for _, batches in source.read_items(items, columns):
        for batch in batches:
            yield batch, parse_arrow(batch.column(field), field, tax.dim, metric=tax.config.metric)


def label_capped_parquet(
    tax: Taxonomy,
    input: str | list[str],  # noqa: A002 - the engine's name
    output: str,
    capacity: int,
    level: int | None = None,
    storage_options: dict[str, Any] | None = None,
    embedding_field: str | None = None,
    kernel_backend: str = "auto",
    device: str = "auto",
    batch_rows: int = 4096,
    max_passes: int = 64,
    plan_uri: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Label `input` with at most `capacity` rows in each node of `level` (None: the
    leaves) and write it to `output` (written whole or not at all; see StagedOutput).
    `plan_uri`: also save the settled thresholds there, for TaxonomyPathRefiner's
    capacity_plan. Returns the summary: passes, nodes cut, rows moved off their nearest
    node, node sizes before and after, rejected rows by reason."""
    plan = CapacityPlan(tax, capacity, level)
    if not tax.state.complete:
        raise ValueError(f"the taxonomy (snapshot {tax.version}) is not complete: finish the fit")
    source = ParquetInput(
        input,
        embedding_field,
        batch_rows=pass_batch_rows(batch_rows, tax.dim),
        storage_options=storage_options,
    )
    items = source.get_file_list()
    field = source.embedding_field
    assigner, device = make_assigner(kernel_backend), resolve_device(device)
    first: list[Tally] = []

    def placements():
        for _, parsed in _batches(tax, source, items, [field]):
            if len(parsed.valid):
                yield plan.place(parsed.x, assigner, device)

    def progress(p: CapacityPlan, total: Tally) -> None:
        if not first:  # the first pass counts the rows at their nearest node
            first.append(total)
        over = int((total.counts > p.capacity).sum())
        log.info("capacity pass %d: %d node(s) over %d, %d cut", p.passes, over, capacity, p.cut)

    settle(plan, placements, max_passes, progress)
    if plan_uri is not None:
        plan.save(plan_uri, storage_options)
    rejected: Counter = Counter()
    sizes = np.zeros(len(plan.thresholds), np.int64)
    moved = rows = 0
    with StagedOutput(output, storage_options, overwrite) as staged:
        sink = ParquetSink(staged.staging_uri, storage_options=storage_options)
        try:
            for batch, parsed in _batches(tax, source, items, None):
                rejected.update(parsed.reasons())
                labels = None
                if len(parsed.valid):
                    placement = plan.place(parsed.x, assigner, device)
                    labels = plan.labels(placement, assigner, device)
                    node = labels.paths[:, plan.level - 1]
                    sizes += np.bincount(node, minlength=len(sizes))
                    moved += int((node != placement.labelled).sum())
                rows += batch.num_rows
                table = pa.Table.from_batches([batch])
                columns = label_columns(tax.n_levels, batch.num_rows, parsed, labels)
                for name, column in columns.items():
                    if name in table.column_names:
                        table = table.drop_columns([name])
                    table = table.append_column(name, column)
                sink.write(table)
        finally:
            files = [staged.final_path(f) for f in sink.close()]
    nearest = first[0].counts
    return {
        "command": "label-capped",
        "snapshot": tax.version,
        "capacity": capacity,
        "level": plan.level,
        "passes": plan.passes + 1,
        "nodes_cut": int((plan.thresholds < np.iinfo(np.int64).max).sum()),
        "rows": rows,
        "moved_rows": moved,
        "max_node_rows_nearest": int(nearest.max(initial=0)),
        "max_node_rows": int(sizes.max(initial=0)),
        "over_capacity": int((sizes > capacity).sum()),
        "rejected": dict(rejected),
        "output": output,
        "files": files,
        "plan_uri": plan_uri,
    }
