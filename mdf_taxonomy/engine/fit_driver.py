"""The fit driver: levels x passes of one MDF pipeline, with checkpoints and resume.

Before each pass the current snapshot is pinned into the pipeline's KMeansLevelRefiner;
during it the refiner (or the columnar workers) add up partials; after it the driver
turns the totals into the next snapshot (model.fitting) and saves it. Every finished
pass is a checkpoint: running the same fit again continues from the latest snapshot.
A pass whose totals do not account for every row (a backend actor or worker died) is
run again from the same snapshot, so the result is unchanged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import ray
import torch

from mdf_taxonomy import _mdf
from mdf_taxonomy.backend import FitBackend
from mdf_taxonomy.engine.inputs import (
    InputAccount,
    PassIncomplete,
    _expected_rows,
    _infer_dim,
    describe_input,
    fingerprint_of,
    input_differences,
)
from mdf_taxonomy.engine.plan import columnar_plan, create_loader, fit_operators, pinned
from mdf_taxonomy.engine.running import _progress, _say, ensure_ray
from mdf_taxonomy.engine.totals import PassRecord, PassTotals
from mdf_taxonomy.model import Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.balance import level_balance
from mdf_taxonomy.model.fitting import (
    LloydResult,
    SampleResult,
    finish_pass,
    resolve_config,
    start_level,
)
from mdf_taxonomy.model.phase import Phase
from mdf_taxonomy.model.warm_start import check_warm_start, identity, needs_sample, warm_children
from mdf_taxonomy.operators import KMeansLevelRefiner
from mdf_taxonomy.passes.columnar import WorkerPool

log = logging.getLogger(__name__)


class PipelineFit:
    """Runs the fit passes of one MDF PipelineConfig that holds a KMeansLevelRefiner."""

    def __init__(
        self,
        config: Any,
        progress: bool = True,
        max_pass_retries: int = 2,
        on_pass: Callable[[Taxonomy], None] | None = None,
        columnar: bool = True,
        cache_bytes: int | None = None,
        warm_start: Taxonomy | None = None,
    ):
        """`warm_start`: a finished tree whose ids this fit keeps (model/warm_start.py)."""
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
        self.passes: list[PassRecord] = []
        self.resumed = False
        self.summary: dict[str, Any] = {}
        self.account: InputAccount
        self.plan = columnar_plan(config, "KMeansLevelRefiner", cache_bytes) if columnar else None
        self.pool: WorkerPool | None = None  # the columnar workers, kept across passes
        self.warm_start = warm_start

    @property
    def pass_log(self) -> list[dict[str, Any]]:
        """The passes run so far, as the fit summary lists them."""
        return [p.as_dict() for p in self.passes]

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
        last = self.passes[-1] if self.passes else None
        return {
            "storage_uri": self.storage_uri,
            "snapshot": tax.version,
            "nodes_per_level": [lv.n_nodes for lv in tax.levels],
            "balance_per_level": [
                None if lv.sizes is None else level_balance(lv.sizes) for lv in tax.levels
            ],
            "passes_run": len(self.passes),
            "resumed": self.resumed,
            "rows_seen": last.rows if last else None,
            "rows_fitted": last.fitted if last else None,
            "rejected": last.rejected if last else {},
            "skipped": last.skipped if last else [],
            "seconds": round(seconds, 3),
            "passes": self.pass_log,
        }

    def _start_or_resume(self) -> Taxonomy:
        """The stored snapshot when it is a fit of these parameters and this input (else
        refused, saying what differs), or a new empty fit."""
        loader = create_loader(self.config)
        max_samples = self.config.executor.max_samples
        items = loader.get_file_list(max_samples=max_samples)
        if not items:
            raise ValueError(f"the loader {self.config.data_loader.type} found no input")
        self.account = InputAccount(self.config, loader, items, report=self.plan is None)
        description = describe_input(loader, items, max_samples, self.config)
        if self.warm_start is not None:  # part of the fit's identity: a resume must agree
            description["warm_start"] = identity(self.warm_start)
        fingerprint = fingerprint_of(description)
        if self.store.latest_version() is not None:
            tax = self.store.load()
            wanted = resolve_config(self.fit_config, tax.dim)
            if not wanted.same_tree(tax.config):
                diff = {
                    k: (v, tax.config.to_dict()[k])
                    for k, v in wanted.to_dict().items()
                    if tax.config.to_dict()[k] != v
                }
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
            if self.warm_start is not None:
                check_warm_start(self.warm_start, wanted, tax.dim)
            log.info(
                "resuming fit at %s from snapshot %s (level %d, %s, iteration %d)",
                self.storage_uri,
                tax.version,
                tax.state.level,
                tax.state.phase,
                tax.state.iteration,
            )
            self.resumed = True
            return tax
        dim = self.fit_config.dim or _infer_dim(
            loader, items, self.fit_config.embedding_field, self.config
        )
        tax = Taxonomy(
            config=resolve_config(self.fit_config, dim), dim=dim, fingerprint=fingerprint
        )
        if self.warm_start is not None:
            check_warm_start(self.warm_start, tax.config, dim)
        self.store.save(tax)
        self._record_input(description)
        return tax

    def _input_uri(self) -> str:
        """Where the fit's input description lives: beside its snapshots."""
        return f"{self.storage_uri.rstrip('/')}/input.json"

    def _record_input(self, description: dict[str, Any]) -> None:
        """The fit's input description, kept so a refused resume can say what differs."""
        with fsspec.open(self._input_uri(), "w", **(self.storage_options or {})) as f:
            json.dump(description, f, sort_keys=True)

    def _stored_input(self) -> dict[str, Any] | None:
        """The recorded input description; None for a store written without one."""
        try:
            with fsspec.open(self._input_uri(), "r", **(self.storage_options or {})) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _one_pass(self, tax: Taxonomy) -> Taxonomy:
        """One pass over the snapshot `tax`, re-run while it loses rows; the next snapshot."""
        st = tax.state
        n_nodes = 0 if st.phase == Phase.SAMPLE else tax.levels[st.level - 1].n_nodes
        warm = self.warm_start
        if st.phase == Phase.SAMPLE and warm is not None and not needs_sample(warm, tax):
            nxt = start_level(tax, SampleResult({}, {}), warm_children(warm, tax, None))
            self.store.save(nxt)
            _say(f"L{st.level}: {nxt.levels[-1].n_nodes} nodes from the old tree", self.progress)
            if self.on_pass is not None:
                self.on_pass(nxt)
            return nxt
        for attempt in range(self.max_pass_retries + 1):
            try:
                result, totals = self._stream(tax, n_nodes)
                break
            except PassIncomplete as e:
                log.warning(
                    "pass over snapshot %s incomplete (%s); attempt %d of %d",
                    tax.version,
                    e,
                    attempt + 1,
                    self.max_pass_retries + 1,
                )
                if self.pool is None:
                    self.backend.shutdown()
                self.close_pool()
                if attempt == self.max_pass_retries:
                    raise
        if st.phase == Phase.SAMPLE:
            sample = SampleResult(rows=result["parent_rows"], samples=result["samples"])
            initial = warm_children(warm, tax, sample) if warm is not None else None
            nxt = start_level(tax, sample, initial)
        else:
            nxt = finish_pass(
                tax,
                LloydResult(
                    sums=torch.from_numpy(result["sums"]),
                    counts=torch.from_numpy(result["counts"]),
                    inertia_fixed=int(totals.inertia_fixed),
                    rows=int(totals.rows),
                ),
            )
        self.store.save(nxt)
        self._pass_summary(nxt)
        if self.on_pass is not None:
            self.on_pass(nxt)
        return nxt

    def _pass_summary(self, tax: Taxonomy) -> None:
        """One line per pass: level, iteration, rows, rows/s, inertia and its change."""
        p, h = self.passes[-1], tax.state.history[-1]
        line = (
            f"L{p.level} {p.phase}"
            + (f" it{h['iteration']}" if p.phase == Phase.LLOYD else "")
            + f": {p.rows} rows, {p.rows_per_s or 0:.0f} rows/s"
        )
        if p.phase == Phase.LLOYD:
            prev = [
                x
                for x in tax.state.history[:-1]
                if x["phase"] == Phase.LLOYD and x["level"] == h["level"]
            ]
            change = (
                f" ({(h['inertia'] - prev[-1]['inertia']) / prev[-1]['inertia']:+.2%})"
                if prev and prev[-1]["inertia"]
                else ""
            )
            line += f", inertia {h['inertia']:.6g}{change}, empty repaired {h['repaired']}"
        else:
            line += f", {h['nodes']} nodes initialised"
        if p.rejected:
            line += f", rejected {p.rejected}"
        _say(line, self.progress)

    def close_pool(self) -> None:
        """Stop the columnar workers (a failed pass starts fresh ones)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _stream(self, tax: Taxonomy, n_nodes: int) -> tuple[dict[str, Any], PassTotals]:
        """The pass's merged partials and their totals, by columnar workers or MDF."""
        if self.plan is not None:
            return self._stream_columnar(tax)
        return self._stream_mdf(tax, n_nodes)

    def _stream_columnar(self, tax: Taxonomy) -> tuple[dict[str, Any], PassTotals]:
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
        totals = PassTotals.of(result["totals"])
        self._log_pass(tax, result, totals, loaded, seconds, skipped)
        if totals.seen != loaded:
            raise PassIncomplete(f"the workers accounted for {result['totals']} of {loaded} rows")
        return result, totals

    def _log_pass(
        self,
        tax: Taxonomy,
        result: dict[str, Any],
        totals: PassTotals,
        loaded: int,
        seconds: float,
        skipped: list[dict[str, Any]],
    ) -> None:
        """Record the pass for the summary; its row count sizes later progress bars."""
        st = tax.state
        self.rows_total = self.rows_total or loaded
        self.passes.append(
            PassRecord(
                snapshot=tax.version,
                level=st.level,
                phase=st.phase,
                rows=loaded,
                fitted=int(totals.rows),
                seconds=round(seconds, 3),
                rows_per_s=loaded / seconds if seconds else None,
                rejected=result["rejected"],
                flushes=totals.flushes,
                flush_bytes=totals.flush_bytes,
                cached_rows=result.get("cached_rows", 0),
                skipped=skipped,
            )
        )

    def _stream_mdf(self, tax: Taxonomy, n_nodes: int) -> tuple[dict[str, Any], PassTotals]:
        st = tax.state
        cfg = self.account.pin(pinned(self.config, tax, fit_pass=True))
        ensure_ray(cfg.executor.num_cpus)  # MDF's Executor ended the last pass's Ray session
        self.backend.start_pass(tax.version, n_nodes, tax.dim)
        self.account.open()
        desc = f"L{st.level} {st.phase}" + (
            f" it{st.iteration + 1}" if st.phase == Phase.LLOYD else ""
        )
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
        totals = PassTotals.of(result["totals"])
        expected = _expected_rows(cfg, stats, loaded)
        if result["pass_ids"] != [str(tax.version)] or totals.seen != expected:
            raise PassIncomplete(
                f"backend accounted for {totals.seen} rows, the stage saw {expected}"
            )
        self._log_pass(tax, result, totals, loaded, seconds, skipped)
        return result, totals

    def _level_summary(self, tax: Taxonomy, level: int, seconds: float) -> None:
        """One line per finished level: its nodes, their spread, passes and inertia."""
        hist = [h for h in tax.state.history if h["level"] == level and h["phase"] == Phase.LLOYD]
        lv = tax.levels[level - 1]
        sizes = np.bincount(lv.parents) if level > 1 else np.array([lv.n_nodes])
        line = (
            f"level {level}: {lv.n_nodes} nodes (children per parent min/median/max "
            f"{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}), {len(hist)} Lloyd passes, "
            f"inertia {hist[-1]['inertia'] if hist else float('nan'):.6g}, {seconds:.1f}s"
        )
        if lv.sizes is not None:
            b = level_balance(lv.sizes)
            line += f"; rows per node gini {b['gini']:.3f}, max/median {b['max_over_median']}"
        _say(line, self.progress)
