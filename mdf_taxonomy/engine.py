"""TaxonomyEngine: drives levels x passes of an MDF pipeline, with checkpoints and resume.

A fit is a loop over passes of the same pipeline. Before each pass the current
snapshot is pinned into every KMeansLevelRefiner of the pipeline; during it the
refiners stream partials into the FitBackend; after it the driver turns the
totals into the next snapshot (model.fitting) and saves it. Every finished pass
is a checkpoint: running the same fit again continues from the latest snapshot.
A pass whose totals do not account for every row (a backend actor or worker
died) is run again from the same snapshot, so the result is unchanged.

YAML pipelines (`mdf-taxonomy run`) and the Python API take the same path.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import ray
import torch
from fsspec.implementations.local import LocalFileSystem

from mdf_taxonomy import _mdf
from mdf_taxonomy._mdf import mdf_key
from mdf_taxonomy.backend import FitBackend
from mdf_taxonomy.model import Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.config import RunConfig
from mdf_taxonomy.model.fitting import (
    LloydResult,
    SampleResult,
    finish_pass,
    resolve_config,
    start_level,
)
from mdf_taxonomy.operators import (
    InputError,
    KMeansLevelRefiner,
    TaxonomyPathRefiner,
)
from mdf_taxonomy.operators.registry import register
from mdf_taxonomy.passes.columnar import WorkerPool
from mdf_taxonomy.passes.input_report import (
    close_input_report,
    open_input_report,
    read_input_failures,
    read_input_report,
)
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.records import infer_dim, parse_arrow

log = logging.getLogger(__name__)


class PassIncomplete(RuntimeError):
    """A pass's totals miss rows: it is re-run from the same snapshot."""


class NothingLabelled(RuntimeError):
    """A run was asked to label records and labelled none; `result` has the counts."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


class OutputExists(ValueError):
    """The output already holds data; replacing it must be asked for (`overwrite`)."""


class StagedOutput:
    """A run's records go to a staging folder beside `uri`, moved there when the run ends.

    So a re-run, or a retry after a crash, never adds rows to an earlier output: an
    existing non-empty output is refused unless `overwrite`, and a crashed run leaves
    only its staging folder, which the next run over the same output clears. Checked
    when built, before any pass: the output's storage must take a file.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 overwrite: bool = False):
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
            if self.fs.exists(self.path) and not overwrite and (
                    not self.fs.isdir(self.path) or self.fs.ls(self.path)):
                raise OutputExists(f"output {self.uri!r} exists and is not empty: pass "
                                   "--overwrite (overwrite=True) to replace it")
            for stale in self.fs.glob(f"{self.path}.staging-*"):
                log.warning("removing %s, left by an earlier run that did not finish", stale)
                self.fs.rm(stale, recursive=True)
            self.staging = f"{self.path}.staging-{os.getpid()}-{time.time_ns():x}"
            self.fs.makedirs(self.staging, exist_ok=True)
            self.fs.pipe_file(f"{self.staging}/.write-test", b"")
            self.fs.rm(f"{self.staging}/.write-test")
        except OutputExists:
            raise
        except Exception as e:  # noqa: BLE001 - any storage error: one line naming the URI
            raise OutputExists(f"output {self.uri!r} is not writable: "
                               f"{type(e).__name__}: {e}") from e
        self.staging_uri = self.fs.unstrip_protocol(self.staging)

    def commit(self) -> None:
        """Make the staged records the output: one rename on a local disk; on object
        stores, which have no rename, a copy of each file, then the staging removed."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        if isinstance(self.fs, LocalFileSystem):
            os.replace(self.staging, self.path)
            return
        for src in self.fs.find(self.staging):
            self.fs.copy(src, self.path + src[len(self.staging):])
        self.fs.rm(self.staging, recursive=True)

    def reset(self) -> None:
        """Empty the staging folder (a run is about to be repeated)."""
        self.fs.rm(self.staging, recursive=True)
        self.fs.makedirs(self.staging, exist_ok=True)

    def abort(self) -> None:
        try:
            self.fs.rm(self.staging, recursive=True)
        except Exception as e:  # noqa: BLE001 - the next run clears it anyway
            log.warning("could not remove %s: %s", self.staging, e)


def check_labelled(result: dict[str, Any]) -> None:
    """Fail a run that read nothing, or labelled none of the records it was asked to."""
    lab = result["labelling"]
    if result["rows_in"] == 0:
        raise NothingLabelled("the run read no records: check the input path and filter",
                              result)
    if lab["seen"] and not lab["labelled"]:
        raise NothingLabelled(f"labelled none of {lab['seen']} records (rejected "
                              f"{lab['rejected']}): check embedding_field, dim and the taxonomy",
                              result)


def staged_run(config: Any, staged: StagedOutput | None, progress: bool = True,
               desc: str = "run", retries: int = 2, columnar: bool = True,
               taxonomy: Taxonomy | None = None) -> dict[str, Any]:
    """run_pipeline with the writer pointed at `staged`'s folder, committed on success.

    A run that lost rows (a loader or worker died) is run again from an empty staging
    folder, so the committed output holds every row once.
    """
    if staged is not None:
        config = copy.deepcopy(config)
        config.data_writer.params = {**config.data_writer.params,
                                     "output_path": staged.staging_uri}
    try:
        for attempt in range(retries + 1):
            try:
                result = run_pipeline(config, progress=progress, desc=desc, columnar=columnar,
                                      taxonomy=taxonomy)
                break
            except PassIncomplete as e:
                log.warning("%s run incomplete (%s); attempt %d of %d", desc, e, attempt + 1,
                            retries + 1)
                if attempt == retries:
                    raise
                if staged is not None:
                    staged.reset()
        check_labelled(result)
    except BaseException:
        if staged is not None:
            staged.abort()
        raise
    if staged is not None:
        staged.commit()
    return result


def _is_op(op: Any, class_name: str) -> bool:
    """True when a YAML operator entry names `class_name` (either spelling)."""
    keys = {class_name, mdf_key(class_name)}
    return op.name in keys or op.get_class_name() in keys


def _runs_first(config: Any, class_name: str) -> bool:
    """True when `class_name` is the pipeline's first enabled operator: then it must see
    every row the loaders read."""
    first = next((op for st in config.stages for op in st.operators if op.enabled), None)
    return first is not None and _is_op(first, class_name)


def fit_operators(config: Any) -> list[Any]:
    """The pipeline's enabled kmeans_level_refiners: a pipeline with one is a fit."""
    return [op for stage in config.stages for op in stage.operators
            if op.enabled and _is_op(op, "KMeansLevelRefiner")]


def _progress(total: int | None, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="rows", disable=not enabled, file=sys.stderr,
                leave=False, dynamic_ncols=True)


class InputAccount:
    """Rows in = rows read, checked per run against the input's own row counts.

    A loader that can count its input (ParquetEmbeddingLoader: the Parquet footers)
    and report what it skipped or failed on (to a named InputReport actor the driver
    opens, since loaders run in other processes) is held to it: a loader that died
    or lost rows fails the pass, a bad file fails the run naming it (on_bad_file:
    fail), or is counted and named (skip). Other loaders are taken at their word.
    """

    def __init__(self, config: Any, loader: Any | None = None, items: list[str] | None = None,
                 report: bool = True):
        register()
        self.loader = loader or _mdf.DataLoaderRegistry.create(config.data_loader.type,
                                                               config.data_loader.params)
        self.max_samples = config.executor.max_samples
        if items is None:  # MDF's loaders may stream without a file list
            lister = getattr(self.loader, "get_file_list", None)
            items = lister(max_samples=self.max_samples) if callable(lister) else []
        self.items = items
        self.counts = callable(getattr(self.loader, "expected_rows", None))
        reports = report and hasattr(self.loader, "report_name")
        self.name = f"run-{os.getpid()}-{time.time_ns():x}" if reports else None
        self.listing_skipped: list[dict[str, Any]] = list(
            getattr(self.loader, "listing_skipped", []))

    def pin(self, config: Any) -> Any:
        """The config with its loader reporting to this account's report."""
        if self.name is None:
            return config
        cfg = copy.copy(config)
        cfg.data_loader = copy.deepcopy(config.data_loader)
        cfg.data_loader.params = {**cfg.data_loader.params, "report_name": self.name}
        return cfg

    def open(self) -> None:
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
                raise PassIncomplete(f"the loaders gave {loaded} rows, the input holds {want}"
                                     + (f" ({len(lost)} item(s) skipped)" if lost else ""))
        return [*self.listing_skipped, *skipped]

    def close(self) -> None:
        if self.name is not None:
            close_input_report(self.name)


_SECTIONS = ("data_loader", "stages", "data_writer", "executor", "operators", "workers")


def check_sections(raw: Any, where: str) -> None:
    """MDF ignores an unknown top-level YAML key (`executer:`); we name it."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a pipeline config is a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown top-level section(s) {unknown} "
                         f"(known: {list(_SECTIONS[:4])})")


def validate_pipeline(config: Any) -> None:
    """Check everything that can be checked before the first pass, so a typo costs
    seconds, not a fit: every component is registered and takes its params, and our
    own operators accept their values (a fit's labeller is built with the fit's depth,
    since its taxonomy does not exist yet)."""
    register()
    checks = [("data_loader", _mdf.DataLoaderRegistry._loaders, config.data_loader.type,
               config.data_loader.params),
              ("data_writer", _mdf.DataWriterRegistry._writers, config.data_writer.type,
               config.data_writer.params)]
    for stage in config.stages:
        for op in stage.operators:
            if op.enabled:
                checks.append((f"stage {stage.name!r}", _mdf.OperatorRegistry._operators,
                               op.get_class_name(), op.params, op.name))
    for where, registry, key, params, *spelled in checks:
        cls = registry.get(key)
        if cls is None:
            name = f"{spelled[0]!r} (looked up as {key!r})" if spelled else repr(key)
            raise ValueError(f"{where}: unknown component {name}; registered: {sorted(registry)}")
        try:
            inspect.signature(cls).bind(**(params or {}))
        except TypeError as e:
            accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
            raise ValueError(f"{where}: {cls.__name__}: {e} (accepted: {accepted})") from e
    fits = fit_operators(config)
    depth = None
    for op in fits:
        try:
            depth = KMeansLevelRefiner(**op.params).config.n_levels
        except (TypeError, ValueError) as e:
            raise ValueError(f"kmeans_level_refiner params: {e}") from e
    for stage in config.stages:
        for op in stage.operators:
            if op.enabled and _is_op(op, "TaxonomyPathRefiner"):
                params = {**op.params, "n_levels": op.params.get("n_levels") or depth}
                try:
                    TaxonomyPathRefiner(**{k: v for k, v in params.items() if v is not None})
                except (TypeError, ValueError) as e:
                    raise ValueError(f"stage {stage.name!r}: taxonomy_path_refiner: {e}") from e


def columnar_plan(config: Any, labeller: str, cache_bytes: int | None = None
                  ) -> RunConfig | None:
    """How the columnar pass runs `config`'s taxonomy stage, where it can replace MDF's stream
    without changing what the stage sees: the input is ParquetEmbeddingLoader's, the
    taxonomy operator `labeller` runs first, and the executor caps no rows. A labelling
    run must also have nothing but that operator and a Parquet (or discard) writer."""
    if config.data_loader.type != "ParquetEmbeddingLoader" or config.executor.max_samples:
        return None
    if not _runs_first(config, labeller):
        return None
    enabled = [(st, op) for st in config.stages for op in st.operators if op.enabled]
    stage, op = enabled[0]
    if labeller == "TaxonomyPathRefiner" and (
            len(enabled) != 1 or config.data_writer.type not in ("ParquetDataWriter",
                                                                 "DiscardWriter")):
        return None
    loader_field = config.data_loader.params.get("embedding_field", "embedding")
    if loader_field != op.params.get("embedding_field", "embedding"):
        return None
    worker = getattr(stage, "worker", None)
    resources = dict(getattr(worker, "resources", None) or {})
    replicas = getattr(worker, "num_replicas", None) or getattr(worker, "min_replicas", None)
    return RunConfig(
        num_replicas=int(replicas or 1), cpus_per_replica=resources.get("cpu"),
        gpus_per_replica=float(resources.get("gpu") or 0),
        device=op.params.get("device", "auto"),
        kernel_backend=op.params.get("kernel_backend", "auto"),
        compute_dtype=op.params.get("compute_dtype", "float32"), cache_bytes=cache_bytes)


class PipelineFit:
    """Runs the fit passes of one MDF PipelineConfig that holds a KMeansLevelRefiner."""

    def __init__(self, config: Any, progress: bool = True, max_pass_retries: int = 2,
                 on_pass: Callable[[Taxonomy], None] | None = None, columnar: bool = True,
                 cache_bytes: int | None = None):
        ops = fit_operators(config)
        if len(ops) != 1:
            raise ValueError(
                f"a fit pipeline needs exactly one enabled kmeans_level_refiner, found {len(ops)}"
            )
        self.config = config
        self.op = ops[0]
        params = dict(self.op.params)
        try:
            probe = KMeansLevelRefiner(**params)
        except TypeError as e:
            raise ValueError(f"kmeans_level_refiner params: {e}") from e
        self.fit_config: TaxonomyConfig = probe.config
        self.storage_uri: str = probe.storage_uri
        self.storage_options = probe.storage_options
        self.backend: FitBackend = probe.backend
        self.store = TaxonomyStore(self.storage_uri, self.storage_options)
        self.progress = progress
        self.max_pass_retries = max_pass_retries
        self.on_pass = on_pass
        self.rows_total: int | None = None
        self.pass_log: list[dict[str, Any]] = []
        self.resumed = False
        self.summary: dict[str, Any] = {}
        self.account: InputAccount
        self.plan = columnar_plan(config, "KMeansLevelRefiner", cache_bytes) if columnar else None
        self.pool: WorkerPool | None = None  # the columnar workers, kept across passes

    # -- the loop ----------------------------------------------------------------
    def run(self) -> Taxonomy:
        """Fit (or resume) to the end, holding the store's writer lease throughout."""
        started = time.perf_counter()
        with self.store.writer_lease():
            tax = self._start_or_resume()
            level_started = time.perf_counter()
            try:
                while not tax.state.complete:
                    level = tax.state.level
                    tax = self._one_pass(tax)
                    if tax.state.level != level or tax.state.complete:
                        self._level_summary(tax, level, time.perf_counter() - level_started)
                        level_started = time.perf_counter()
            finally:
                self.account.close()
                self.close_pool()
        self.summary = self._fit_summary(tax, time.perf_counter() - started)
        return tax

    def _fit_summary(self, tax: Taxonomy, seconds: float) -> dict[str, Any]:
        """The fit's counts for the run summary: passes run now, rows, rejections."""
        last = self.pass_log[-1] if self.pass_log else {}
        return {"storage_uri": self.storage_uri, "snapshot": tax.version,
                "nodes_per_level": [lv.n_nodes for lv in tax.levels],
                "passes_run": len(self.pass_log), "resumed": self.resumed,
                "rows_seen": last.get("rows"), "rows_fitted": last.get("fitted"),
                "rejected": last.get("rejected", {}), "skipped": last.get("skipped", []),
                "seconds": round(seconds, 3),
                "passes": self.pass_log}

    def _start_or_resume(self) -> Taxonomy:
        loader = _mdf.DataLoaderRegistry.create(self.config.data_loader.type,
                                                self.config.data_loader.params)
        max_samples = self.config.executor.max_samples
        items = loader.get_file_list(max_samples=max_samples)
        if not items:
            raise ValueError(f"the loader {self.config.data_loader.type} found no input")
        self.account = InputAccount(self.config, loader, items, report=self.plan is None)
        description = describe_input(loader, items, max_samples)
        fingerprint = fingerprint_of(description)
        if self.store.latest_version() is not None:
            tax = self.store.load()
            wanted = resolve_config(self.fit_config, tax.dim)
            if not wanted.same_tree(tax.config):
                diff = {k: (v, tax.config.to_dict()[k]) for k, v in wanted.to_dict().items()
                        if tax.config.to_dict()[k] != v}
                raise ValueError(
                    f"{self.storage_uri} holds a fit with other parameters {diff} "
                    "(new, stored): use another storage_uri to fit anew"
                )
            if tax.fingerprint != fingerprint:
                stored = self._stored_input()
                what = input_differences(stored, description) if stored else "unrecorded"
                raise ValueError(
                    f"{self.storage_uri} holds a fit of other input data ({what}; "
                    f"fingerprint {tax.fingerprint[:12]} != {fingerprint[:12]}): use another "
                    "storage_uri, or the same input"
                )
            log.info("resuming fit at %s from snapshot %s (level %d, %s, iteration %d)",
                     self.storage_uri, tax.version, tax.state.level, tax.state.phase,
                     tax.state.iteration)
            self.resumed = True
            return tax
        dim = self.fit_config.dim or _infer_dim(loader, items, self.fit_config.embedding_field)
        tax = Taxonomy(config=resolve_config(self.fit_config, dim), dim=dim,
                       fingerprint=fingerprint)
        self.store.save(tax)
        self._record_input(description)
        return tax

    def _input_uri(self) -> str:
        return f"{self.storage_uri.rstrip('/')}/input.json"

    def _record_input(self, description: dict[str, Any]) -> None:
        """The fit's input description, kept so a refused resume can say what differs."""
        with fsspec.open(self._input_uri(), "w", **(self.storage_options or {})) as f:
            json.dump(description, f, sort_keys=True)

    def _stored_input(self) -> dict[str, Any] | None:
        try:
            with fsspec.open(self._input_uri(), "r", **(self.storage_options or {})) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _one_pass(self, tax: Taxonomy) -> Taxonomy:
        st = tax.state
        n_nodes = 0 if st.phase == "sample" else tax.levels[st.level - 1].n_nodes
        for attempt in range(self.max_pass_retries + 1):
            try:
                result = self._stream(tax, n_nodes)
                break
            except PassIncomplete as e:
                log.warning("pass over snapshot %s incomplete (%s); attempt %d of %d",
                            tax.version, e, attempt + 1, self.max_pass_retries + 1)
                if self.pool is None:
                    self.backend.shutdown()
                self.close_pool()
                if attempt == self.max_pass_retries:
                    raise
        if st.phase == "sample":
            rows = result["parent_rows"]
            nxt = start_level(tax, SampleResult(rows=rows, samples=result["samples"]))
        else:
            nxt = finish_pass(tax, LloydResult(
                sums=torch.from_numpy(result["sums"]), counts=torch.from_numpy(result["counts"]),
                inertia_fixed=int(result["totals"].get("inertia_fixed", 0)),
                rows=int(result["totals"]["rows"])))
        self.store.save(nxt)
        self._pass_summary(nxt)
        if self.on_pass is not None:
            self.on_pass(nxt)
        return nxt

    def _pass_summary(self, tax: Taxonomy) -> None:
        """One line per pass: level, iteration, rows, rows/s, inertia and its change."""
        p, h = self.pass_log[-1], tax.state.history[-1]
        line = (f"L{p['level']} {p['phase']}"
                + (f" it{h['iteration']}" if p["phase"] == "lloyd" else "")
                + f": {p['rows']} rows, {p['rows_per_s'] or 0:.0f} rows/s")
        if p["phase"] == "lloyd":
            prev = [x for x in tax.state.history[:-1]
                    if x["phase"] == "lloyd" and x["level"] == h["level"]]
            change = (f" ({(h['inertia'] - prev[-1]['inertia']) / prev[-1]['inertia']:+.2%})"
                      if prev and prev[-1]["inertia"] else "")
            line += f", inertia {h['inertia']:.6g}{change}, empty repaired {h['repaired']}"
        else:
            line += f", {h['nodes']} nodes initialised"
        if p["rejected"]:
            line += f", rejected {p['rejected']}"
        _say(line, self.progress)

    def close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _stream(self, tax: Taxonomy, n_nodes: int) -> dict[str, Any]:
        if self.plan is not None:
            return self._stream_columnar(tax)
        return self._stream_mdf(tax, n_nodes)

    def _stream_columnar(self, tax: Taxonomy) -> dict[str, Any]:
        if self.pool is None:  # the loader that listed the input feeds the workers
            if self.plan.num_replicas > 1:
                ensure_ray()
            self.pool = WorkerPool(self.account.loader, self.account.items, self.plan)
        started = time.perf_counter()
        try:
            result, loaded, skipped = self.pool.fit_pass(tax)
        except ray.exceptions.RayError as e:
            raise PassIncomplete(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
        seconds = time.perf_counter() - started
        skipped = self.account.check_rows(loaded, skipped)
        self._log_pass(tax, result, loaded, seconds, skipped)
        totals = result["totals"]
        if totals.get("rows", 0) + totals.get("rows_rejected", 0) != loaded:
            raise PassIncomplete(f"the workers accounted for {totals} of {loaded} rows")
        return result

    def _log_pass(self, tax: Taxonomy, result: dict[str, Any], loaded: int, seconds: float,
                  skipped: list[dict[str, Any]]) -> None:
        st, totals = tax.state, result["totals"]
        self.rows_total = self.rows_total or loaded
        self.pass_log.append({"snapshot": tax.version, "level": st.level, "phase": st.phase,
                              "rows": loaded, "fitted": int(totals.get("rows", 0)),
                              "seconds": round(seconds, 3),
                              "rows_per_s": loaded / seconds if seconds else None,
                              "rejected": result["rejected"],
                              "flushes": totals.get("flushes", 0),
                              "flush_bytes": totals.get("flush_bytes", 0),
                              "cached_rows": result.get("cached_rows", 0),
                              "skipped": skipped})

    def _stream_mdf(self, tax: Taxonomy, n_nodes: int) -> dict[str, Any]:
        st = tax.state
        cfg = self.account.pin(pinned(self.config, tax, fit_pass=True))
        ensure_ray(cfg.executor.num_cpus)  # MDF's Executor ended the last pass's Ray session
        self.backend.start_pass(tax.version, n_nodes, tax.dim)
        self.account.open()
        desc = f"L{st.level} {st.phase}" + (f" it{st.iteration + 1}" if st.phase == "lloyd" else "")
        bar = _progress(self.rows_total, desc, self.progress)
        started = time.perf_counter()
        executor = _mdf.Executor(cfg)
        loaded = 0
        try:
            for n_in, _n_out in executor.execute():
                loaded += n_in
                if bar is not None:
                    bar.update(n_in)
            stats = _mdf.operator_stats(executor)
            result = self.backend.collect(n_nodes, tax.dim)
        except (ray.exceptions.RayError, RuntimeError) as e:
            raise PassIncomplete(str(e)) from e
        finally:
            _mdf.end_run(executor)
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - started
        skipped = self.account.check(loaded)
        totals = result["totals"]
        seen = totals.get("rows", 0) + totals.get("rows_rejected", 0)
        expected = _expected_rows(cfg, stats, loaded)
        if result["pass_ids"] != [str(tax.version)] or seen != expected:
            raise PassIncomplete(f"backend accounted for {seen} rows, the stage saw {expected}")
        self._log_pass(tax, result, loaded, seconds, skipped)
        return result

    def _level_summary(self, tax: Taxonomy, level: int, seconds: float) -> None:
        hist = [h for h in tax.state.history if h["level"] == level and h["phase"] == "lloyd"]
        lv = tax.levels[level - 1]
        sizes = np.bincount(lv.parents) if level > 1 else np.array([lv.n_nodes])
        line = (f"level {level}: {lv.n_nodes} nodes (children per parent min/median/max "
                f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}), {len(hist)} Lloyd passes, "
                f"inertia {hist[-1]['inertia'] if hist else float('nan'):.6g}, {seconds:.1f}s")
        _say(line, self.progress)


def _say(line: str, progress: bool) -> None:
    """Progress lines go to stderr when progress is on, else to the log."""
    if progress:
        print(line, file=sys.stderr)
    else:
        log.info(line)


_LABELLER_PARAMS = ("storage_uri", "embedding_field", "device", "kernel_backend",
                    "storage_options", "compute_dtype")


def pinned(config: Any, tax: Taxonomy, fit_pass: bool) -> Any:
    """A copy of the pipeline with every taxonomy operator pinned to one snapshot.

    In a fit pass the labelling operators are switched off (the tree is not
    finished) and the records are discarded. In the final run the fit is over, so
    each kmeans_level_refiner gives way to labelling: switched off where the pipeline
    labels anyway, else replaced by a taxonomy_path_refiner on the same taxonomy, so
    no row is assigned twice. Labellers get the tree's depth, so their output schema
    is known even when the store cannot be reached.
    """
    cfg = copy.deepcopy(config)
    labels = any(op.enabled and _is_op(op, "TaxonomyPathRefiner")
                 for stage in cfg.stages for op in stage.operators)
    for stage in cfg.stages:
        for i, op in enumerate(stage.operators):
            if not fit_pass and op.enabled and _is_op(op, "KMeansLevelRefiner"):
                if labels:
                    op.enabled = False
                    continue
                op = stage.operators[i] = _mdf.OperatorConfig(
                    name="taxonomy_path_refiner",
                    params={k: op.params[k] for k in _LABELLER_PARAMS if k in op.params})
                labels = True
            if _is_op(op, "KMeansLevelRefiner"):
                op.params = {**op.params, "snapshot": tax.version}
            elif _is_op(op, "TaxonomyPathRefiner"):
                op.params = {**op.params, "snapshot": tax.version, "n_levels": tax.n_levels}
                if fit_pass:
                    op.enabled = False
    if fit_pass:
        cfg.data_writer = _mdf.DataWriterConfig(type="DiscardWriter", params={})
    return cfg


def describe_input(loader: Any, items: list[str], max_samples: int | None) -> dict[str, Any]:
    """What identifies a fit's input: its content where the loader can describe it.

    ParquetEmbeddingLoader describes its files by content (path within the input,
    size, footer hash) plus its filter, so the same data read from another folder is
    the same fit. Other loaders are identified by their sorted work items.
    """
    describe = getattr(loader, "describe_input", None)
    facts = describe(items) if callable(describe) else sorted(map(str, items))
    return json.loads(json.dumps({"input": facts, "max_samples": max_samples},
                                 sort_keys=True, default=str))


def input_fingerprint(loader: Any, items: list[str], max_samples: int | None) -> str:
    return fingerprint_of(describe_input(loader, items, max_samples))


def fingerprint_of(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def input_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two input descriptions, in words (for a refused resume)."""
    said = []
    for key in ("max_samples",):
        if old.get(key) != new.get(key):
            said.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
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


def _infer_dim(loader: Any, items: list[str], field: str) -> int:
    """The fit's dim when none was given: the majority length of the first rows read."""
    dim, others = infer_dim(loader.load_files(items), field)
    if others:
        log.warning("inferred dim %d for %r from the majority of rows; rows of other lengths "
                    "(length: rows) %s will be rejected as wrong_length", dim, field, others)
    return dim


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start Ray if no session is running; workers import what this process imports."""
    if not ray.is_initialized():
        path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": path}})


class TaxonomyEngine:
    """The Python face: `TaxonomyEngine(n_levels, branching_factor, dim, storage_uri).fit(...)`.

    It builds an MDF pipeline (ParquetEmbeddingLoader -> KMeansLevelRefiner ->
    TaxonomyPathRefiner -> ParquetDataWriter) and runs it through the same
    PipelineFit as `mdf-taxonomy run`: as columnar passes where it can, else through
    MDF's Executor.

    storage_uri: where the taxonomy's snapshots live (any fsspec URI).
    storage_options: fsspec options for the input, the output and the store.
    progress: progress bars and one line per pass on stderr.
    partition_by: output columns to partition the labelled Parquet by (Hive).
    params: every fit parameter of TaxonomyConfig (metric, seed, max_iter, tol, ...)
        and every run parameter of RunConfig (num_replicas, device, compute_dtype,
        cache_bytes, columnar, on_bad_file, ...), by name; model/config.py declares
        their defaults, constraints and meaning once.
    """

    def __init__(self, n_levels: int = TaxonomyConfig.n_levels,
                 branching_factor: int | list[int] = TaxonomyConfig.branching_factor,
                 dim: int | None = TaxonomyConfig.dim, storage_uri: str = "./output/taxonomy",
                 *, storage_options: dict[str, Any] | None = None, progress: bool = True,
                 partition_by: list[str] | None = None, **params: Any):
        fit_names = set(TaxonomyConfig.__dataclass_fields__) - {"extra"}
        run_names = set(RunConfig.__dataclass_fields__)
        unknown = sorted(set(params) - fit_names - run_names)
        if unknown:
            raise TypeError(f"TaxonomyEngine: unknown parameter(s) {unknown}; fit parameters: "
                            f"{sorted(fit_names)}, run parameters: {sorted(run_names)}")
        self.fit_params = TaxonomyConfig(
            n_levels=n_levels, branching_factor=branching_factor, dim=dim,
            **{k: v for k, v in params.items() if k in fit_names}).to_dict()
        self.run = RunConfig(**{k: v for k, v in params.items() if k in run_names})
        self.storage_uri = storage_uri
        self.storage_options = storage_options
        self.progress = progress
        self.partition_by = partition_by
        self.last_fit: PipelineFit | None = None
        self.last_summary: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        """A run parameter by name (engine.num_replicas)."""
        if name != "run" and name in RunConfig.__dataclass_fields__:
            return getattr(self.run, name)
        raise AttributeError(name)

    # -- pipelines -------------------------------------------------------------------
    def _loader_params(self, input: str | list[str], **extra: Any) -> dict[str, Any]:
        return {"path": input, "embedding_field": self.fit_params["embedding_field"],
                "storage_options": self.storage_options, "on_bad_file": self.on_bad_file,
                **extra}

    def _pipeline(self, input: str | list[str], output: str | None, fit: bool,
                  loader_extra: dict[str, Any] | None = None) -> Any:
        _mdf.load_host_components()
        cpus = (ray.cluster_resources().get("CPU", 1) if ray.is_initialized()
                else os.cpu_count() or 1)
        per_replica = self.cpus_per_replica or max(
            0.1, min(1.0, (cpus - self.num_loaders) / self.num_replicas))
        common = {"storage_uri": self.storage_uri, "device": self.device,
                  "kernel_backend": self.kernel_backend, "compute_dtype": self.compute_dtype,
                  "storage_options": self.storage_options,
                  "embedding_field": self.fit_params["embedding_field"]}
        ops = []
        if fit:
            ops.append(_mdf.OperatorConfig(name="kmeans_level_refiner", params={
                **common, **{k: v for k, v in self.fit_params.items() if k != "embedding_field"},
                "backend_buckets": self.backend_buckets, "flush_rows": self.flush_rows}))
        ops.append(_mdf.OperatorConfig(name="taxonomy_path_refiner", params=dict(common)))
        writer = (_mdf.DataWriterConfig(type="ParquetDataWriter",
                                        params=self._writer_params(output))
                  if output else _mdf.DataWriterConfig(type="DiscardWriter", params={}))
        return _mdf.PipelineConfig(
            data_loader=_mdf.DataLoaderConfig(
                type="ParquetEmbeddingLoader",
                params=self._loader_params(input, **(loader_extra or {})),
                num_workers=self.num_loaders),
            stages=[_mdf.StageConfig(
                name="taxonomy", operators=ops,
                worker=_mdf.StageWorkerConfig(
                    resources={"cpu": per_replica, "gpu": self.gpus_per_replica},
                    min_replicas=self.num_replicas, max_replicas=self.num_replicas))],
            data_writer=writer,
            executor=_mdf.ExecutorConfig(
                batch_size=self.batch_size,
                max_in_flight=max(2 * self.num_replicas, self.num_loaders),
                metrics=_mdf.MetricsConfig(enabled=False)),
        )

    def _writer_params(self, output: str) -> dict[str, Any]:
        """ParquetDataWriter's params in the dialect of the runtime's writer."""
        params: dict[str, Any] = {"output_path": output}
        if _mdf.WRITER_TAKES_OPTIONS:
            params.update({k: v for k, v in (("partition_by", self.partition_by),
                                             ("storage_options", self.storage_options))
                           if v is not None})
            return params
        if self.storage_options:
            raise ValueError("storage_options: MDF's ParquetDataWriter takes none (it reads "
                             "credentials from the environment); leave it unset under MDF")
        if self.partition_by:
            if len(self.partition_by) != 1:
                raise ValueError(f"partition_by={self.partition_by!r}: MDF's ParquetDataWriter "
                                 "partitions by one column")
            params["partition_by"] = self.partition_by[0]
        return params

    # -- API ----------------------------------------------------------------------
    def fit(self, input: str | list[str], output: str | None = None,
            filter: Any = None, overwrite: bool = False) -> Taxonomy:  # noqa: A002
        """Fit (or resume) the taxonomy on `input`; write labelled records to `output`
        (refused if it holds data, unless `overwrite`)."""
        extra = {"filter": filter} if filter is not None else {}
        staged = (StagedOutput(output, self.storage_options, overwrite)
                  if output is not None else None)
        config = self._pipeline(input, None, fit=True, loader_extra=extra)
        run = PipelineFit(config, progress=self.progress, max_pass_retries=self.max_pass_retries,
                          columnar=self.columnar, cache_bytes=self.cache_bytes)
        self.last_fit = run
        tax = run.run()
        summary: dict[str, Any] = {"command": "fit", "runtime": _mdf.MDF_FLAVOUR,
                                   "fit": run.summary}
        if output is not None:
            final = pinned(self._pipeline(input, output, fit=False, loader_extra=extra),
                           tax, fit_pass=False)
            result = staged_run(final, staged, progress=self.progress, desc="label",
                                columnar=self.columnar, taxonomy=tax)
            summary["label"] = label_summary(result)
        summary["summary_uri"] = record_run(self.storage_uri, self.storage_options, summary)
        self.last_summary = summary
        return tax

    def load(self) -> Taxonomy:
        return TaxonomyStore(self.storage_uri, self.storage_options).load()

    def predict(self, input: str | list[str] | np.ndarray | torch.Tensor,
                output: str | None = None, overwrite: bool = False) -> np.ndarray | str:
        """Paths of `input` rows: an array in, (N, n_levels) int32 node ids out.

        A URI with `output` runs the labelling pipeline and returns `output` (refused if
        it holds data, unless `overwrite`); a URI without it is read in this process and
        labelled in memory (-1 rows for records with a rejected embedding).
        """
        tax = self.load()
        if isinstance(input, np.ndarray | torch.Tensor):
            return tax.assign_paths(input, backend=self.kernel_backend)[0]
        if output is not None:
            staged = StagedOutput(output, self.storage_options, overwrite)
            final = pinned(self._pipeline(input, output, fit=False), tax, fit_pass=False)
            result = staged_run(final, staged, progress=self.progress, desc="label",
                                columnar=self.columnar, taxonomy=tax)
            self.last_summary = {"command": "predict", "runtime": _mdf.MDF_FLAVOUR,
                                 "label": label_summary(result)}
            return output
        source = ParquetInput(**self._loader_params(input))
        field = self.fit_params["embedding_field"]
        out = []
        for _, batches in source.read_items(source.get_file_list()):
            column = pa.Table.from_batches(batches).column(field)
            parsed = parse_arrow(column, field, tax.dim, metric=tax.config.metric)
            paths = np.full((len(column), tax.n_levels), -1, dtype=np.int32)
            if len(parsed.valid):
                paths[parsed.valid] = tax.assign_paths(parsed.x, backend=self.kernel_backend)[0]
            out.append(paths)
        return np.concatenate(out) if out else np.zeros((0, tax.n_levels), np.int32)


def run_pipeline(config: Any, progress: bool = True, desc: str = "run",
                 columnar: bool = True, taxonomy: Taxonomy | None = None) -> dict[str, Any]:
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
        raise PassIncomplete(f"the labeller saw {seen} of the {result['rows_in']} rows read "
                             "(a batch was lost)")
    return result


def _run_columnar(config: Any, settings: RunConfig, taxonomy: Taxonomy | None = None
                  ) -> dict[str, Any]:
    """A labelling run as a columnar pass: the same result as run_pipeline's."""
    stage, op = next((st, op) for st in config.stages for op in st.operators if op.enabled)
    labeller = TaxonomyPathRefiner(**op.params)  # validates, and reads the depth
    pinned_to = op.params.get("snapshot")
    tax = (taxonomy if taxonomy is not None and pinned_to and taxonomy.version == pinned_to
           else labeller.taxonomy)
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
        counts, loaded, skipped = pool.label(tax, output,
                                             writer.params.get("storage_options"),
                                             partition_by)
    except ray.exceptions.RayError as e:
        raise PassIncomplete(f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        pool.close()
    skipped = account.check_rows(loaded, skipped)
    totals, rejected = counts["totals"], counts["rejected"]
    seen = totals.get("rows", 0) + totals.get("rows_rejected", 0)
    if seen != loaded:
        raise PassIncomplete(f"the labeller saw {seen} of the {loaded} rows read")
    labelling = {"seen": seen, "labelled": totals.get("rows", 0), "rejected": rejected}
    return {"rows_in": loaded, "rows_out": loaded,
            "seconds": round(time.perf_counter() - started, 3), "labelling": labelling,
            "timings": counts["timings"],
            "stats": {stage.name: {"TaxonomyPathRefiner": {
                "input_records": seen, "output_records": loaded, "rejected": rejected,
                "replicas": replicas, "pass": "columnar"}}},
            "skipped": skipped}


def _run_once(config: Any, progress: bool, desc: str) -> dict[str, Any]:
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
    return {"rows_in": rows_in, "rows_out": rows_out, "seconds": round(seconds, 3),
            "labelling": label_counts(stats), "stats": stats}


def label_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What a run summary keeps of a labelling run."""
    keys = ("rows_in", "rows_out", "seconds", "labelling", "skipped", "timings")
    return {k: result[k] for k in keys if k in result}


def label_counts(stats: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Rows the labelling operators saw, labelled and rejected (by reason)."""
    seen = 0
    rejected: dict[str, int] = {}
    for stage_stats in stats.values():
        for name, op_stats in stage_stats.items():
            if name in ("TaxonomyPathRefiner", mdf_key("TaxonomyPathRefiner")):
                seen += int(op_stats.get("input_records", 0))
                for reason, n in (op_stats.get("rejected") or {}).items():
                    rejected[reason] = rejected.get(reason, 0) + int(n)
    return {"seen": seen, "labelled": seen - sum(rejected.values()), "rejected": rejected}


def record_run(storage_uri: str, storage_options: dict[str, Any] | None,
               summary: dict[str, Any]) -> str | None:
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
