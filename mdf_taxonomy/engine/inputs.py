"""Input accounting: rows in = rows read, checked against the input's own counts, and
what identifies a fit's input, so a resume over other data is refused with a reason."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import time
from typing import Any

from mdf_taxonomy import _mdf
from mdf_taxonomy._mdf import mdf_key
from mdf_taxonomy.engine.plan import _is_op, _runs_first, create_loader
from mdf_taxonomy.operators import InputError
from mdf_taxonomy.passes.input_report import (
    close_input_report,
    open_input_report,
    read_input_failures,
    read_input_report,
)
from mdf_taxonomy.passes.records import INFER_DIM_ROWS, find_record_embedding_field, infer_dim

log = logging.getLogger(__name__)


class PassIncomplete(RuntimeError):
    """A pass's totals miss rows: it is re-run from the same snapshot."""


class NothingLabelled(RuntimeError):
    """A run was asked to label records and labelled none; `result` has the counts."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


class InputAccount:
    """Rows in = rows read, checked per run against the input's own row counts.

    A loader that can count its input (ParquetEmbeddingLoader: the Parquet footers)
    and report what it skipped or failed on (to a named InputReport actor the driver
    opens, since loaders run in other processes) is held to it: a loader that died
    or lost rows fails the pass, a bad file fails the run naming it (on_bad_file:
    fail), or is counted and named (skip). Other loaders are taken at their word.
    """

    def __init__(
        self,
        config: Any,
        loader: Any | None = None,
        items: list[str] | None = None,
        report: bool = True,
    ):
        self.loader = loader or create_loader(config)
        self.max_samples = config.executor.max_samples
        if items is None:  # MDF's loaders may stream without a file list
            lister = getattr(self.loader, "get_file_list", None)
            items = lister(max_samples=self.max_samples) if callable(lister) else []
        self.items = items
        self.counts = callable(getattr(self.loader, "expected_rows", None))
        reports = report and hasattr(self.loader, "report_name")
        self.name = f"run-{os.getpid()}-{time.time_ns():x}" if reports else None
        self.listing_skipped: list[dict[str, Any]] = list(
            getattr(self.loader, "listing_skipped", [])
        )

    def pin(self, config: Any) -> Any:
        """The config with its loader reporting to this account's report."""
        if self.name is None:
            return config
        cfg = copy.copy(config)
        cfg.data_loader = copy.deepcopy(config.data_loader)
        cfg.data_loader.params = {**cfg.data_loader.params, "report_name": self.name}
        return cfg

    def open(self) -> None:
        """Open the report actor the loaders write to, before the run starts them."""
        if self.name is not None:
            open_input_report(self.name)

    def check(self, loaded: int) -> list[dict[str, Any]]:
        """After a run: raise on a failed item or missing rows; returns the items skipped."""
        if self.name is None:
            return []
        failures = read_input_failures(self.name)
        if failures:
            raise InputError(failures[0]["reason"])
        return self.check_rows(loaded, read_input_report(self.name))

    def check_rows(self, loaded: int, skipped: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Raise PassIncomplete unless the rows read are the input's rows less the items
        skipped; returns every item skipped (listing and load)."""
        if self.counts:
            lost = {e["item"] for e in skipped if e["stage"] == "load"}
            want = self.loader.expected_rows([i for i in self.items if i not in lost])
            if self.max_samples is not None:  # loaders split the cap: at most it
                ok, want = loaded <= min(want, self.max_samples), min(want, self.max_samples)
            else:
                ok = loaded == want
            if not ok:
                raise PassIncomplete(
                    f"the loaders gave {loaded} rows, the input holds {want}"
                    + (f" ({len(lost)} item(s) skipped)" if lost else "")
                )
        return [*self.listing_skipped, *skipped]

    def close(self) -> None:
        """Remove the report actor; its rows are read by then."""
        if self.name is not None:
            close_input_report(self.name)


def describe_input(
    loader: Any, items: list[str], max_samples: int | None, config: Any = None
) -> dict[str, Any]:
    """What identifies a fit's input: its content where the loader can describe it, and
    the operators that run before the fit (`config`'s), which decide the rows it sees.

    ParquetEmbeddingLoader describes its files by content (path within the input,
    size, footer hash) plus its filter, so the same data read from another folder is
    the same fit. Other loaders are identified by their sorted work items.
    """
    describe = getattr(loader, "describe_input", None)
    facts = describe(items) if callable(describe) else sorted(map(str, items))
    description = {"input": facts, "max_samples": max_samples}
    upstream = [{"operator": op.name, "params": op.params} for op in _upstream_configs(config)]
    if upstream:  # (left out when empty: a fit with none keeps its fingerprint)
        description["upstream"] = upstream
    return json.loads(json.dumps(description, sort_keys=True, default=str))


def input_fingerprint(
    loader: Any, items: list[str], max_samples: int | None, config: Any = None
) -> str:
    """The hash a snapshot stores of its input: a resume over other data is refused."""
    return fingerprint_of(describe_input(loader, items, max_samples, config))


def fingerprint_of(description: dict[str, Any]) -> str:
    """The fingerprint of a description from describe_input (the same JSON, hashed)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def input_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two input descriptions, in words (for a refused resume)."""
    said = []
    for key in ("max_samples", "warm_start"):
        if old.get(key) != new.get(key):
            said.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    if old.get("upstream") != new.get("upstream"):
        said.append(
            f"the operators before the fit {old.get('upstream')!r} -> {new.get('upstream')!r}"
        )
    was, now = old.get("input"), new.get("input")
    if isinstance(was, dict) and isinstance(now, dict):
        for key in ("filter", "columns"):
            if was.get(key) != now.get(key):
                said.append(f"{key} {was.get(key)!r} -> {now.get(key)!r}")
        files_was = {f["file"]: f for f in was.get("files", [])}
        files_now = {f["file"]: f for f in now.get("files", [])}
        for name in sorted(set(files_was) | set(files_now)):
            if name not in files_now:
                said.append(f"file {name} gone")
            elif name not in files_was:
                said.append(f"file {name} new")
            elif files_was[name] != files_now[name]:
                said.append(f"file {name} rewritten")
    elif was != now:
        said.append("other work items")
    return "; ".join(said[:10]) + (f"; and {len(said) - 10} more" if len(said) > 10 else "")


def _expected_rows(config: Any, stats: Any, loaded: int) -> int:
    """Rows the kmeans operator must have accounted for in a pass.

    When it is the pipeline's first operator that is every row the loaders read
    (so a lost batch is caught); after other operators it is what it was given.
    """
    if _runs_first(config, "KMeansLevelRefiner"):
        return loaded
    for stage_stats in (stats or {}).values():
        for name, op_stats in (stage_stats or {}).items():
            if name in ("KMeansLevelRefiner", mdf_key("KMeansLevelRefiner")):
                return int(op_stats.get("input_records", 0))
    return loaded


def _infer_dim(loader: Any, items: list[str], field: str | None, config: Any = None) -> int:
    """The fit's dim when none was given: the majority length of the first rows read, as
    the fit sees them: where a refiner upstream of the fit (an embedding refiner) makes
    the field, the upstream stages are run on the first batch and their output decides."""
    field = field or getattr(loader, "embedding_field", None)
    records = loader.load_files(items)
    upstream = _upstream_operators(config) if config is not None else []
    if any(isinstance(op, _mdf.Refiner) for op in upstream):
        records = _first_batch_through(upstream, records, config.executor.batch_size)
    if field is None:  # made upstream, name not given: found in the records themselves
        records = list(itertools.islice(records, INFER_DIM_ROWS))
        field = find_record_embedding_field(records)
        log.info("embedding_field %r found in the records the fit sees", field)
    dim, others = infer_dim(records, field)
    if others:
        log.warning(
            "inferred dim %d for %r from the majority of rows; rows of other lengths "
            "(length: rows) %s will be rejected as wrong_length",
            dim,
            field,
            others,
        )
    return dim


def _upstream_configs(config: Any) -> list[Any]:
    """The configs of the enabled operators that run before the pipeline's
    kmeans_level_refiner (none without a config)."""
    ops = []
    for stage in config.stages if config is not None else []:
        for op in stage.operators:
            if op.enabled and _is_op(op, "KMeansLevelRefiner"):
                return ops
            if op.enabled:
                ops.append(op)
    return ops


def _upstream_operators(config: Any) -> list[Any]:
    """The operators before the fit, built as the executor builds them."""
    return [
        _mdf.OperatorRegistry.create(op.get_class_name(), op.params)
        for op in _upstream_configs(config)
    ]


def _first_batch_through(ops: list[Any], records: Any, rows: int) -> list[dict]:
    """The first `rows` records after the filters and refiners of `ops`, in this process.

    Deduplicators are skipped: they only drop repeats, and need the run's shared backend.
    """
    batch = list(itertools.islice(records, rows))
    for op in ops:
        if isinstance(op, _mdf.Refiner | _mdf.Filter):
            batch = [rec for rec in op.process_batch(batch) if rec is not None]
    return batch
