"""The three passes of balanced sampling over Parquet, read in this process.

1. count: rows per leaf (`count_leaves`), so the allocation can run (`SamplePlan.build`);
2. candidates: per leaf the keys its extra rows are picked from (`gather_candidates`),
   giving one cut-off per leaf (`SamplePlan.finish`);
3. select: each row's repeat count from the plan alone, selected rows written with every
   input column and `taxonomy_repeat` (`select_rows`).

Each pass takes the items (row groups) it reads, so work can be split: sizes add up,
candidates merge (`LeafCandidates.merge`) and the selection is row-local, so any split,
batch size or item order gives the same rows. `sample_parquet` runs all three.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from mdf_taxonomy.curation.sampling import (
    REPEAT_FIELD,
    LeafCandidates,
    SamplePlan,
    check_sampling,
    pass_batch_rows,
    repeats,
    row_keys,
)
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model.config import check_parameter
from mdf_taxonomy.model.taxonomy import Taxonomy
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.parquet_sink import ParquetSink
from mdf_taxonomy.passes.records import parse_arrow
from mdf_taxonomy.passes.staged_output import StagedOutput


def scan(
    tax: Taxonomy,
    source: ParquetInput,
    strategy: str,
    seed: int,
    items: list[str] | None = None,
    assigner: Any = None,
    device: str = "auto",
    rejected: Counter | None = None,
) -> Iterator[tuple[pa.RecordBatch, np.ndarray, np.ndarray, np.ndarray]]:
    """(record batch, leaf, score, priority) per batch of `items` (None: every row group);
    rows with a rejected embedding get leaf -1 and are counted by kind in `rejected`."""
    items = source.get_file_list() if items is None else items  # lists (and finds the field)
    field = source.embedding_field
    for _, batches in source.read_items(items):
        for batch in batches:
            parsed = parse_arrow(batch.column(field), field, tax.dim, metric=tax.config.metric)
            if rejected is not None:
                rejected.update(parsed.reasons())
            n = batch.num_rows
            leaves = np.full(n, -1, np.int64)
            scores, priorities = np.zeros(n, np.float32), np.zeros(n, np.uint64)
            keys = row_keys(tax, parsed.x, strategy, seed, assigner, device)
            for full, part in zip((leaves, scores, priorities), keys, strict=True):
                full[parsed.valid] = part
            yield batch, leaves, scores, priorities


def count_leaves(
    tax: Taxonomy,
    source: ParquetInput,
    items: list[str] | None = None,
    assigner: Any = None,
    device: str = "auto",
    rejected: Counter | None = None,
) -> np.ndarray:
    """Pass 1: (n_leaves,) int64 valid rows per leaf; workers' counts add up."""
    sizes = np.zeros(tax.levels[-1].n_nodes, np.int64)
    for _, leaves, _, _ in scan(tax, source, "random", 0, items, assigner, device, rejected):
        sizes += np.bincount(leaves[leaves >= 0], minlength=len(sizes))
    return sizes


def gather_candidates(
    plan: SamplePlan,
    tax: Taxonomy,
    source: ParquetInput,
    items: list[str] | None = None,
    assigner: Any = None,
    device: str = "auto",
) -> LeafCandidates:
    """Pass 2: per leaf the extra + 1 smallest keys; merge workers' with `merge`."""
    candidates = plan.candidates()
    for _, leaves, scores, priorities in scan(
        tax, source, plan.strategy, plan.seed, items, assigner, device
    ):
        candidates.offer(leaves, scores, priorities)
    return candidates


def select_rows(
    plan: SamplePlan,
    tax: Taxonomy,
    source: ParquetInput,
    sink: ParquetSink,
    items: list[str] | None = None,
    assigner: Any = None,
    device: str = "auto",
    rejected: Counter | None = None,
) -> dict[str, int]:
    """Pass 3: write the selected rows (every column, plus int32 `taxonomy_repeat`) to
    `sink`; returns rows read, rows selected and their repeats summed."""
    out = {"rows": 0, "selected_rows": 0, "selected_total": 0}
    for batch, leaves, scores, priorities in scan(
        tax, source, plan.strategy, plan.seed, items, assigner, device, rejected
    ):
        times = repeats(plan, leaves, scores, priorities)
        keep = times > 0
        out["rows"] += batch.num_rows
        out["selected_rows"] += int(keep.sum())
        out["selected_total"] += int(times.sum())
        if keep.any():
            table = pa.Table.from_batches([batch]).filter(pa.array(keep))
            if REPEAT_FIELD in table.column_names:
                table = table.drop_columns([REPEAT_FIELD])
            sink.write(table.append_column(REPEAT_FIELD, pa.array(times[keep], pa.int32())))
    return out


def build_plan(
    tax: Taxonomy,
    input: str | list[str],  # noqa: A002 - the engine's name
    target_size: int,
    multiplier: int = 1,
    strategy: str = "random",
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    embedding_field: str | None = None,
    kernel_backend: str = "auto",
    device: str = "auto",
    batch_rows: int = 4096,
) -> SamplePlan:
    """Passes 1 and 2 over `input`: the plan the selecting pass (or the MDF filter,
    `BalancedSampleFilter`) applies."""
    check_sampling(target_size, multiplier, strategy, seed)
    _check_run(tax, kernel_backend, device)
    source = ParquetInput(
        input,
        embedding_field,
        batch_rows=pass_batch_rows(batch_rows, tax.dim),
        storage_options=storage_options,
    )
    assigner = make_assigner(kernel_backend)
    return _plan(tax, source, target_size, multiplier, strategy, seed, assigner, device)


def _plan(
    tax: Taxonomy,
    source: ParquetInput,
    target_size: int,
    multiplier: int,
    strategy: str,
    seed: int,
    assigner: Any,
    device: str,
) -> SamplePlan:
    sizes = count_leaves(tax, source, assigner=assigner, device=device)
    plan = SamplePlan.build(tax, sizes, target_size, multiplier, strategy, seed)
    return plan.finish(gather_candidates(plan, tax, source, assigner=assigner, device=device))


def sample_parquet(
    tax: Taxonomy,
    input: str | list[str],  # noqa: A002 - the engine's name
    output: str,
    target_size: int,
    multiplier: int = 1,
    strategy: str = "random",
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    embedding_field: str | None = None,
    plan_uri: str | None = None,
    kernel_backend: str = "auto",
    device: str = "auto",
    batch_rows: int = 4096,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Balanced sample of `input` (Parquet, any fsspec URI) over `tax`, written to `output`.

    Three passes (module doc) over one listing of the input; the selected rows keep every
    input column and get int32 `taxonomy_repeat` (1..multiplier), each row written once.
    `plan_uri`: where to save the plan too (for `BalancedSampleFilter`). `output` is
    written whole or not at all and must be empty unless `overwrite` (a StagedOutput). A
    target above multiplier x the valid rows takes every valid row `multiplier` times
    (logged; `full_take` in the summary). Returns the summary.
    """
    check_sampling(target_size, multiplier, strategy, seed)
    _check_run(tax, kernel_backend, device)
    source = ParquetInput(
        input,
        embedding_field,
        batch_rows=pass_batch_rows(batch_rows, tax.dim),
        storage_options=storage_options,
    )
    assigner = make_assigner(kernel_backend)
    rejected: Counter = Counter()
    with StagedOutput(output, storage_options, overwrite) as staged:
        plan = _plan(tax, source, target_size, multiplier, strategy, seed, assigner, device)
        if plan_uri is not None:
            plan.save(plan_uri, storage_options)
        sink = ParquetSink(staged.staging_uri, storage_options=storage_options)
        try:
            counts = select_rows(plan, tax, source, sink, None, assigner, device, rejected)
        finally:
            files = [staged.final_path(f) for f in sink.close()]
    return {
        "command": "sample",
        "snapshot": tax.version,
        "target_size": plan.target_size,
        "multiplier": plan.multiplier,
        "strategy": plan.strategy,
        "seed": plan.seed,
        "full_take": plan.full_take,
        **counts,
        "valid_rows": int(plan.sizes.sum()),
        "rejected": dict(rejected),
        "leaves": len(plan.sizes),
        "leaves_sampled": int((plan.quota > 0).sum()),
        "output": output,
        "files": files,
        "plan_uri": plan_uri,
    }


def _check_run(tax: Taxonomy, kernel_backend: str, device: str) -> None:
    check_parameter("kernel_backend", kernel_backend, "sample")
    check_parameter("device", device, "sample")
    if not tax.levels or not tax.state.complete:
        raise ValueError(
            f"the taxonomy (snapshot {tax.version}) is not complete: finish the fit first"
        )
