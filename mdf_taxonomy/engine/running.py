"""One run of a pipeline, not a fit: through MDF's Executor or as a columnar labelling
pass, its rows accounted for, its counts and timings summed, its summary recorded."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import ray

from mdf_taxonomy import _mdf
from mdf_taxonomy._mdf import mdf_key
from mdf_taxonomy.engine.inputs import InputAccount, PassIncomplete
from mdf_taxonomy.engine.plan import _runs_first, columnar_plan
from mdf_taxonomy.engine.totals import LabelCounts, PassTotals
from mdf_taxonomy.model import Taxonomy
from mdf_taxonomy.model.config import RunConfig
from mdf_taxonomy.operators import TaxonomyPathRefiner
from mdf_taxonomy.operators.registry import register
from mdf_taxonomy.passes.columnar import WorkerPool
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.records import parse_arrow

log = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start Ray if no session is running; workers import what this process imports."""
    if not ray.is_initialized():
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    """A tqdm bar on stderr (None without tqdm): rows, not batches, so replicas add up."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(
        total=total,
        desc=desc,
        unit="rows",
        disable=not enabled,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


def _say(line: str, progress: bool) -> None:
    """Progress lines go to stderr when progress is on, else to the log."""
    if progress:
        print(line, file=sys.stderr)
    else:
        log.info(line)


def run_pipeline(
    config: Any,
    progress: bool = True,
    desc: str = "run",
    columnar: bool = True,
    taxonomy: Taxonomy | None = None,
) -> dict[str, Any]:
    """One run of `config`: rows in/out, every operator's stats, the labellers' counts,
    the input items skipped; rows read are checked against the input's own counts.

    A labelling run that is only a Parquet input, a taxonomy_path_refiner and a Parquet
    writer runs as a columnar pass (same labels, written column-wise); the rest through
    the MDF Executor. `taxonomy`: the labeller's snapshot when the caller holds it
    already (a fit's last), so the columnar pass need not load it again."""
    plan = columnar_plan(config, "TaxonomyPathRefiner") if columnar else None
    if plan is not None:
        return _run_columnar(config, plan, taxonomy)
    account = InputAccount(config)
    config = account.pin(config)
    ensure_ray(config.executor.num_cpus)
    account.open()
    try:
        result = _run_once(config, progress, desc)
        result["skipped"] = account.check(result["rows_in"])
    finally:
        account.close()
    seen = result["labelling"]["seen"]
    if _runs_first(config, "TaxonomyPathRefiner") and seen != result["rows_in"]:
        raise PassIncomplete(
            f"the labeller saw {seen} of the {result['rows_in']} rows read (a batch was lost)"
        )
    return result


def _run_columnar(
    config: Any, settings: RunConfig, taxonomy: Taxonomy | None = None
) -> dict[str, Any]:
    """A labelling run as a columnar pass: the same result as run_pipeline's."""
    stage, op = next((st, op) for st in config.stages for op in st.operators if op.enabled)
    labeller = TaxonomyPathRefiner(**op.params)  # validates, and reads the depth
    pinned_to = op.params.get("snapshot")
    tax = (
        taxonomy
        if taxonomy is not None and pinned_to and taxonomy.version == pinned_to
        else labeller.taxonomy
    )
    source = ParquetInput(**config.data_loader.params)
    items = source.get_file_list()
    account = InputAccount(config, source, items, report=False)
    writer = config.data_writer
    started = time.perf_counter()
    if settings.num_replicas > 1:
        ensure_ray()
    pool = WorkerPool(source, items, settings)
    replicas = len(pool.workers)
    try:
        partition_by = writer.params.get("partition_by")
        if isinstance(partition_by, str):
            partition_by = [partition_by]
        output = None if writer.type == "DiscardWriter" else writer.params["output_path"]
        counts, loaded, skipped = pool.label(
            tax, output, writer.params.get("storage_options"), partition_by, labeller.fields
        )
    except ray.exceptions.RayError as e:
        raise PassIncomplete(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        pool.close()
    skipped = account.check_rows(loaded, skipped)
    totals, rejected = PassTotals.of(counts["totals"]), counts["rejected"]
    if totals.seen != loaded:
        raise PassIncomplete(f"the labeller saw {totals.seen} of the {loaded} rows read")
    labelling = LabelCounts(seen=totals.seen, labelled=totals.rows, rejected=rejected)
    return {
        "rows_in": loaded,
        "rows_out": loaded,
        "seconds": round(time.perf_counter() - started, 3),
        "labelling": labelling.as_dict(),
        "timings": counts["timings"],
        "stats": {
            stage.name: {
                "TaxonomyPathRefiner": {
                    "input_records": totals.seen,
                    "output_records": loaded,
                    "rejected": rejected,
                    "replicas": replicas,
                    "pass": "columnar",
                }
            }
        },
        "skipped": skipped,
    }


def _run_once(config: Any, progress: bool, desc: str) -> dict[str, Any]:
    """One pass of MDF's Executor over `config`; a dead worker makes it PassIncomplete."""
    register()
    executor = _mdf.Executor(config)
    rows_in = rows_out = 0
    bar = _progress(None, desc, progress)
    started = time.perf_counter()
    try:
        for n_in, n_out in executor.execute():
            rows_in += n_in
            rows_out += n_out
            if bar is not None:
                bar.update(n_in)
        stats = _mdf.operator_stats(executor)
    except ray.exceptions.RayError as e:  # a worker died: its batches and stats are lost
        raise PassIncomplete(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        _mdf.end_run(executor)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "seconds": round(seconds, 3),
        "labelling": label_counts(stats),
        "stats": stats,
    }


def paths_in_memory(
    source: ParquetInput, trees: list[Taxonomy], assigner: Any = None
) -> list[np.ndarray]:
    """Each tree's (N, levels) int32 paths of the rows of `source`, read once in this
    process (-1 rows for records with a rejected embedding); the trees must agree on dim
    and metric, which decide how rows are parsed."""
    tax = trees[0]
    if any((t.dim, t.config.metric) != (tax.dim, tax.config.metric) for t in trees):
        raise ValueError("the trees differ in dim or metric: their rows cannot be read once")
    items = source.get_file_list()  # lists the files, and finds the field if unnamed
    field = source.embedding_field
    out: list[list[np.ndarray]] = [[] for _ in trees]
    for _, batches in source.read_items(items):
        column = pa.Table.from_batches(batches).column(field)
        parsed = parse_arrow(column, field, tax.dim, metric=tax.config.metric)
        for t, got in zip(trees, out, strict=True):
            paths = np.full((len(column), t.n_levels), -1, dtype=np.int32)
            if len(parsed.valid):
                paths[parsed.valid] = t.assign_paths(parsed.x, assigner=assigner)[0]
            got.append(paths)
    return [
        np.concatenate(got) if got else np.zeros((0, t.n_levels), np.int32)
        for t, got in zip(trees, out, strict=True)
    ]


def label_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What a run summary keeps of a labelling run."""
    keys = ("rows_in", "rows_out", "seconds", "labelling", "skipped", "timings")
    return {k: result[k] for k in keys if k in result}


def label_counts(stats: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rows the labelling operators saw, labelled and rejected (by reason), from every
    stage's operator stats: the `labelling` entry of a run's result."""
    seen = 0
    rejected: dict[str, int] = {}
    for stage_stats in stats.values():
        for name, op_stats in stage_stats.items():
            if name in ("TaxonomyPathRefiner", mdf_key("TaxonomyPathRefiner")):
                seen += int(op_stats.get("input_records", 0))
                for reason, n in (op_stats.get("rejected") or {}).items():
                    rejected[reason] = rejected.get(reason, 0) + int(n)
    return LabelCounts(
        seen=seen, labelled=seen - sum(rejected.values()), rejected=rejected
    ).as_dict()


def record_run(
    storage_uri: str, storage_options: dict[str, Any] | None, summary: dict[str, Any]
) -> str | None:
    """Write a run's summary next to the snapshots (`runs/<UTC time>-<pid>.json`).

    Returns its URI, or None (with a warning) where the store cannot take it: a summary
    never fails a run that did its work.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    uri = f"{storage_uri.rstrip('/')}/runs/{stamp}-{os.getpid()}.json"
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True, default=str)
    except Exception as e:  # noqa: BLE001 - reported, the run itself succeeded
        log.warning("could not write the run summary to %s: %s", uri, e)
        return None
    return uri
