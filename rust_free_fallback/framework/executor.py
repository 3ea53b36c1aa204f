"""Executor: runs a PipelineConfig on Ray (MDF-compatible behaviour, fewer traps).

Flow: the driver lists the shards, starts one loader actor per contiguous
chunk (``pipeline_loader_{i}``, 1 CPU each) and a pool of replicas per stage
(``pipeline_stage_{stage}_{i}``); batches travel loader -> stage 1 -> ... ->
stage N by object reference, at most ``max_in_flight`` at a time (default: the
number of loaders, as in MDF), and the driver writes the last stage's output.

Differences from MDF, on purpose:
- an operator exception still drops the whole batch, but is logged as a
  warning and counted (``dropped_batches``) instead of vanishing;
- loaders + replicas that cannot fit the cluster raise
  ``InsufficientResourcesError`` at the start of ``execute()``, before any actor
  starts (MDF hangs forever); actors that fail to construct (e.g. a plugin not
  importable in workers) raise instead of yielding an empty run;
- ``shutdown()`` kills this executor's actors (freeing their names) and only
  shuts Ray down if this Executor started it, so one driver can run several
  passes in one Ray session (MDF always calls ``ray.shutdown()``);
- when it starts Ray, workers get the driver's ``sys.path`` as PYTHONPATH so
  plugins importable in the driver import in actors (single host);
- replicas: ``num_replicas`` pins the count; otherwise each stage starts with as
  many replicas as fit, between ``min_replicas`` and ``max_replicas`` (no
  autoscaling while running);
- the executor-owned DedupBackend is reset at the start of every run;
- ``checkpoint_interval`` is accepted but loaders always start from scratch;
  ``use_ray: false`` is rejected.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from .config import PipelineConfig, StageConfig
from .operator import (
    MDF_STAT_KEYS,
    CombinedOperator,
    Deduplicator,
    Operator,
    merge_raw_stats,
    summarize_raw_stats,
)
from .registry import DataLoaderRegistry, DataWriterRegistry, OperatorRegistry

logger = logging.getLogger(__name__)

LOADER_NAME = "pipeline_loader_{}"
STAGE_NAME = "pipeline_stage_{}_{}"


class InsufficientResourcesError(RuntimeError):
    """Loaders + stage replicas need more CPUs/GPUs than the Ray cluster has."""


# -- actors --------------------------------------------------------------------


class _LoaderWorker:
    """Iterates ``load_files`` over one chunk and hands out bounded batches."""

    def __init__(self, loader: Any, files: list[str], worker_id: int) -> None:
        self._loader = loader
        self._files = files
        self._worker_id = worker_id
        self._it: Iterator[dict[str, Any]] | None = None
        self._done = False

    @ray.method(num_returns=2)
    def next_batch(self, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """Up to ``limit`` records; (0, []) once the chunk is exhausted."""
        if self._done or limit <= 0:
            return 0, []
        if self._it is None:
            self._it = iter(
                self._loader.load_files(self._files, worker_id=self._worker_id, checkpoint=None)
            )
        batch: list[dict[str, Any]] = []
        for rec in self._it:
            batch.append(rec)
            if len(batch) >= limit:
                break
        else:
            self._done = True
        return len(batch), batch

    def ping(self) -> bool:
        return True


class _StageWorker:
    """One replica of a stage: a CombinedOperator pickled in from the driver."""

    def __init__(
        self,
        stage_name: str,
        combined: CombinedOperator,
        collect_rejected: bool,
        output_path: str | None,
    ) -> None:
        self._stage = stage_name
        self._op = combined
        self._collect = collect_rejected
        self._output_path = output_path
        self._stage_writer: Any = None
        self._dropped = [0] * len(combined.operators)

    def process(self, payload: Any) -> dict[str, Any]:
        """Run the stage on a batch; a failed/empty upstream batch passes through."""
        if isinstance(payload, dict):  # from the previous stage
            if payload["error"] is not None or not payload["records"]:
                return payload
            records, rejected = payload["records"], payload["rejected"]
        else:  # straight from a loader
            records, rejected = payload, []
        try:
            if self._collect:
                res = self._op.process_batch_with_rejected(records)
                passed, rejected = res.passed, rejected + res.rejected
            else:
                passed = [r for r in self._op.process_batch(records) if r is not None]
            if self._output_path and passed:
                self._write_stage_output(passed)
        except Exception as exc:  # noqa: BLE001 - MDF drops the batch; we report it
            idx = self._op.failed_operator_index
            label = self._op.operator_labels()[idx] if idx is not None else "<stage>"
            if idx is not None:
                self._dropped[idx] += 1
            return {
                "records": [],
                "rejected": [],
                "stage": self._stage,
                "operator": label,
                "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
            }
        return {
            "records": passed,
            "rejected": rejected,
            "stage": self._stage,
            "operator": None,
            "error": None,
        }

    def end_of_stream(self) -> int:
        """Fallback extension: tell operators the stream has ended, so that those that
        combine work across batches (an `end_of_stream()` method) can flush it. MDF has
        no such hook; operators must work without it. Returns the number of failures."""
        failures = 0
        for op in self._op.operators:
            hook = getattr(op, "end_of_stream", None)
            if callable(hook):
                try:
                    hook()
                except Exception:  # noqa: BLE001 - reported, never fatal to the run
                    failures += 1
                    logger.warning(
                        "end_of_stream of %s failed:\n%s", type(op).__name__, traceback.format_exc()
                    )
        return failures

    def _write_stage_output(self, records: list[dict[str, Any]]) -> None:
        if self._stage_writer is None:
            from rust_free_fallback.writers import ParquetDataWriter

            self._stage_writer = ParquetDataWriter(self._output_path, table_name=self._stage)
        self._stage_writer.write(records)

    def get_raw_stats(self) -> dict[str, dict[str, Any]]:
        out = {}
        labels = self._op.operator_labels()
        for lbl, op, dropped in zip(labels, self._op.operators, self._dropped, strict=True):
            raw = op._raw_stats() if isinstance(op, Operator) else {}
            out[lbl] = {**raw, "dropped_batches": dropped, "extra": _extra_stats(op)}
        return out

    def ping(self) -> bool:
        return True


_RemoteLoader = ray.remote(_LoaderWorker)
_RemoteStage = ray.remote(_StageWorker)


# -- helpers -------------------------------------------------------------------


def _extra_stats(op: Any) -> dict[str, Any]:
    """What an operator's own get_stats() adds to MDF's keys (rejections, timings...)."""
    try:
        return {k: v for k, v in op.get_stats().items() if k not in MDF_STAT_KEYS}
    except Exception:  # noqa: BLE001 - stats must never break a run
        return {}


def _sum_numbers(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge replicas' extra stats: numbers add up, nested dicts merge, the rest: first seen."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = _sum_numbers([out.get(k, {}), v])
            elif isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            else:
                out.setdefault(k, v)
    return out


def _chunks(items: list[str], n: int) -> list[list[str]]:
    """Split into ``n`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _worker_pythonpath() -> str:
    """Driver's import path for workers, so plugins importable here import there too."""
    paths = [str(Path(__file__).resolve().parents[2]), os.getcwd()]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths += [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    seen: list[str] = []
    for p in paths:
        if p not in seen and os.path.isdir(p):
            seen.append(p)
    return os.pathsep.join(seen)


def _kill(handles: list[Any]) -> None:
    for h in handles:
        try:
            ray.kill(h, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead is fine
            pass


def _wait_names_free(names: list[str], timeout: float = 10.0) -> None:
    """ray.kill is asynchronous; wait until the names can be reused."""
    deadline = time.monotonic() + timeout
    pending = list(names)
    while pending and time.monotonic() < deadline:
        still = []
        for name in pending:
            try:
                ray.get_actor(name)
                still.append(name)
            except ValueError:
                pass
        pending = still
        if pending:
            time.sleep(0.05)
    if pending:
        logger.warning("actor names still taken after shutdown: %s", pending)


def _jsonable_rejected(rec: dict[str, Any]) -> dict[str, Any]:
    """Rejection details as one JSON string column (their keys differ per reason)."""
    out = dict(rec)
    if "_rejection_details" in out:
        out["_rejection_details"] = json.dumps(out["_rejection_details"], default=str)
    return out


# -- executor ------------------------------------------------------------------


class Executor:
    """Runs a pipeline on Ray; ``execute()`` yields ``(input_count, output_count)`` per batch."""

    def __init__(self, config: PipelineConfig):
        self.config = config
        ex = config.executor
        if not ex.use_ray:
            raise ValueError("executor.use_ray=false is not supported by the fallback runtime")
        self._started_ray = False
        if not ray.is_initialized():
            ray.init(
                num_cpus=ex.num_cpus,
                include_dashboard=False,
                runtime_env={"env_vars": {"PYTHONPATH": _worker_pythonpath()}},
            )
            self._started_ray = True
        elif ex.num_cpus is not None:
            have = ray.cluster_resources().get("CPU", 0)
            if have != ex.num_cpus:
                logger.warning(
                    "Ray already initialised with %s CPUs; executor.num_cpus=%s is ignored",
                    have,
                    ex.num_cpus,
                )
        self.dedup_backend: Any = None
        self._owns_dedup = False
        try:
            self._setup()
        except BaseException:
            if self._owns_dedup:
                self.dedup_backend.kill()
            if self._started_ray:
                ray.shutdown()
            raise

    def _setup(self) -> None:
        config, ex = self.config, self.config.executor
        # Everything below is built here, in the driver, and pickled into actors.
        self.data_loader = DataLoaderRegistry.create(
            config.data_loader.type, config.data_loader.params
        )
        self.data_writer = DataWriterRegistry.create(
            config.data_writer.type, config.data_writer.params
        )
        self._stage_ops = {s.name: self._build_stage(s) for s in config.stages}
        self._rejected_writer: Any = None
        if ex.rejected_samples.enabled:
            rs = ex.rejected_samples
            self._rejected_writer = DataWriterRegistry.create(
                rs.writer_type or "ParquetDataWriter",
                {"output_path": rs.output_path or "./output/rejected_samples"},
            )
        self._loaders: list[Any] = []
        self._loader_names: list[str] = []
        self._replicas: dict[str, list[Any]] = {}
        self._replica_names: list[str] = []
        self._cached_stats: dict[str, Any] | None = None
        self._actors_ok = False
        self._closed = False
        self.run_id = uuid.uuid4().hex[:8]
        self.pipeline_stats: dict[str, Any] = self._fresh_pipeline_stats()

    @staticmethod
    def _fresh_pipeline_stats() -> dict[str, Any]:
        return {
            "batches": 0,
            "input_records": 0,
            "output_records": 0,
            "rejected_records": 0,
            "dropped_batches": 0,
            "dropped_records": 0,
            "loader_errors": 0,
            "wall_time": 0.0,
        }

    def _build_stage(self, stage: StageConfig) -> CombinedOperator:
        ops = []
        for oc in stage.operators:
            if not oc.enabled:
                continue
            op = OperatorRegistry.create(oc.get_class_name(), oc.params)
            if isinstance(op, Deduplicator) and op.backend is None:
                op.backend = self._shared_dedup_backend()
            ops.append(op)
        collect = self.config.executor.rejected_samples.enabled
        return CombinedOperator(ops, collect_rejected=collect)

    def _shared_dedup_backend(self) -> Any:
        if self.dedup_backend is None:
            from .backend import DedupBackend

            self.dedup_backend = DedupBackend(num_buckets=self.config.executor.dedup_num_buckets)
            self._owns_dedup = True
        return self.dedup_backend

    # -- planning ------------------------------------------------------------
    def _plan(self, n_loaders: int) -> dict[str, int]:
        """Replicas per stage, or InsufficientResourcesError naming the numbers."""
        total = ray.cluster_resources()
        cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
        need_cpu, need_gpu = float(n_loaders), 0.0
        reqs = []
        for s in self.config.stages:
            lo, hi = s.worker.replica_bounds()
            cpu = float(s.worker.resources.get("cpu", 1))
            gpu = float(s.worker.resources.get("gpu", 0))
            reqs.append((s.name, lo, hi, cpu, gpu))
            need_cpu += lo * cpu
            need_gpu += lo * gpu
        if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
            parts = [f"{n_loaders} loader(s) x 1 CPU"]
            parts += [
                f"stage '{n}': {lo} replica(s) x {c:g} CPU/{g:g} GPU" for n, lo, _, c, g in reqs
            ]
            raise InsufficientResourcesError(
                f"Pipeline needs {need_cpu:g} CPUs and {need_gpu:g} GPUs "
                f"({'; '.join(parts)}) but the Ray cluster has {cpus:g} CPUs and {gpus:g} "
                "GPUs; it would wait forever. Lower data_loader.num_workers, replicas or "
                "worker.resources, or raise executor.num_cpus."
            )
        free_cpu, free_gpu = cpus - need_cpu, gpus - need_gpu
        plan = {}
        for name, lo, hi, cpu, gpu in reqs:
            extra = hi - lo
            if cpu > 0:
                extra = min(extra, int(math.floor(free_cpu / cpu + 1e-9)))
            if gpu > 0:
                extra = min(extra, int(math.floor(free_gpu / gpu + 1e-9)))
            extra = max(0, extra)
            free_cpu -= extra * cpu
            free_gpu -= extra * gpu
            plan[name] = lo + extra
            if lo + extra < hi:
                logger.info("stage %s: %d of max %d replicas fit the cluster", name, lo + extra, hi)
        return plan

    def _start_actors(self, files: list[str]) -> None:
        ex, dl = self.config.executor, self.config.data_loader
        n_loaders = max(1, min(dl.num_workers, len(files)))
        plan = self._plan(n_loaders)
        names = [LOADER_NAME.format(i) for i in range(n_loaders)]
        for name in names:
            try:
                ray.get_actor(name)
            except ValueError:
                continue
            raise RuntimeError(
                f"Ray actor '{name}' already exists: another Executor is running "
                "in this Ray session; call its shutdown() first"
            )
        for i, chunk in enumerate(_chunks(files, n_loaders)):
            self._loaders.append(
                _RemoteLoader.options(name=names[i], num_cpus=1).remote(self.data_loader, chunk, i)
            )
            self._loader_names.append(names[i])
        for s in self.config.stages:
            cpu = float(s.worker.resources.get("cpu", 1))
            gpu = float(s.worker.resources.get("gpu", 0))
            pool = []
            for r in range(plan[s.name]):
                name = STAGE_NAME.format(s.name, r)
                pool.append(
                    _RemoteStage.options(name=name, num_cpus=cpu, num_gpus=gpu).remote(
                        s.name, self._stage_ops[s.name], ex.rejected_samples.enabled, s.output_path
                    )
                )
                self._replica_names.append(name)
            self._replicas[s.name] = pool
        self._check_started()
        self._actors_ok = True
        logger.info("started %d loader(s); replicas per stage: %s", n_loaders, plan)

    def _check_started(self, timeout: float = 300.0) -> None:
        """Fail loudly if an actor cannot be built (typically: plugin not importable there)."""
        actors = self._loaders + [a for pool in self._replicas.values() for a in pool]
        names = self._loader_names + self._replica_names
        refs = [a.ping.remote() for a in actors]
        try:
            ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise InsufficientResourcesError(
                f"pipeline actors not scheduled after {timeout:g}s; other Ray work may hold "
                f"the resources (available: {ray.available_resources()})"
            ) from None
        except Exception as exc:
            failed = []
            for name, ref in zip(names, refs, strict=True):
                try:
                    ray.get(ref, timeout=0)
                except Exception:  # noqa: BLE001 - collecting which ones failed
                    failed.append(name)
            raise RuntimeError(
                f"pipeline actors failed to start ({', '.join(failed)}). If the cause is an "
                "ImportError, make the plugin importable by Ray workers (install it, or put "
                f"it on PYTHONPATH before ray.init). Cause: {exc}"
            ) from exc

    # -- run -----------------------------------------------------------------
    def execute(self) -> Iterator[tuple[int, int]]:
        """Run the pipeline, yielding ``(input_count, output_count)`` per finished batch."""
        if self._closed:
            raise RuntimeError("Executor was shut down")
        self._teardown_actors()
        self.pipeline_stats = self._fresh_pipeline_stats()
        self._cached_stats = None
        ex, dl = self.config.executor, self.config.data_loader
        t0 = time.perf_counter()
        files = list(
            self.data_loader.get_file_list(max_samples=ex.max_samples, num_workers=dl.num_workers)
        )
        if not files or ex.max_samples == 0:
            logger.warning("nothing to do: %d file(s), max_samples=%s", len(files), ex.max_samples)
            return
        if self._owns_dedup:
            # Fresh seen-set per run, as with MDF (whose shutdown ends the Ray session).
            self.dedup_backend.reset()
        self._start_actors(files)
        yield from self._pump(ex.batch_size, ex.max_samples, ex.max_in_flight or len(self._loaders))
        self._end_streams()
        self.pipeline_stats["wall_time"] = time.perf_counter() - t0
        self._cached_stats = self._collect_stats()
        self._write_metrics()

    def _end_streams(self) -> None:
        """Stage by stage, in pipeline order, after the last batch has left every stage."""
        for stage, pool in self._replicas.items():
            failures = sum(ray.get([a.end_of_stream.remote() for a in pool]))
            if failures:
                logger.warning("stage %s: %d end_of_stream hook(s) failed", stage, failures)

    def _pump(
        self, batch_size: int, max_samples: int | None, max_in_flight: int
    ) -> Iterator[tuple[int, int]]:
        stats = self.pipeline_stats
        remaining = max_samples  # records not yet reserved by a load request
        loads: dict[Any, tuple[int, Any, int]] = {}  # count_ref -> (loader, batch_ref, limit)
        ready: list[tuple[int, Any]] = []  # loaded batches waiting for an in-flight slot
        inflight: dict[Any, tuple[int, list[tuple[str, int]]]] = {}
        busy = {name: [0] * len(pool) for name, pool in self._replicas.items()}
        idle = set(range(len(self._loaders)))

        def dispatch(n: int, ref: Any) -> None:
            used = []
            for stage in self.config.stages:
                load = busy[stage.name]
                r = min(range(len(load)), key=load.__getitem__)
                load[r] += 1
                used.append((stage.name, r))
                ref = self._replicas[stage.name][r].process.remote(ref)
            inflight[ref] = (n, used)

        while True:
            for i in sorted(idle):
                if len(inflight) + len(ready) + len(loads) >= max_in_flight + len(self._loaders):
                    break
                limit = batch_size if remaining is None else min(batch_size, remaining)
                if limit <= 0:
                    break
                if remaining is not None:
                    remaining -= limit
                count_ref, batch_ref = self._loaders[i].next_batch.remote(limit)
                loads[count_ref] = (i, batch_ref, limit)
                idle.discard(i)
            while ready and len(inflight) < max_in_flight:
                dispatch(*ready.pop(0))
            if not loads and not inflight and not ready:
                break
            done, _ = ray.wait(list(loads) + list(inflight), num_returns=1)
            ref = done[0]
            if ref in loads:
                i, batch_ref, limit = loads.pop(ref)
                try:
                    n = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - loader failure: stop that loader
                    logger.warning("loader %d failed, its remaining files are skipped: %s", i, exc)
                    stats["loader_errors"] += 1
                    n = 0
                if remaining is not None:
                    remaining += limit - n
                if n > 0:
                    idle.add(i)
                    stats["input_records"] += n
                    ready.append((n, batch_ref))
                continue
            n_in, used = inflight.pop(ref)
            for stage_name, r in used:
                busy[stage_name][r] -= 1
            try:
                result = ray.get(ref)
                if isinstance(result, list):  # pipeline without stages: the loaded batch
                    result = {"records": result, "rejected": [], "error": None}
            except Exception as exc:  # noqa: BLE001 - e.g. a replica died
                result = {
                    "records": [],
                    "rejected": [],
                    "stage": "?",
                    "operator": "?",
                    "error": f"{type(exc).__name__}: {exc}",
                }
            stats["batches"] += 1
            if result["error"] is not None:
                stats["dropped_batches"] += 1
                stats["dropped_records"] += n_in
                logger.warning(
                    "dropped batch of %d record(s): stage %s, operator %s raised %s",
                    n_in,
                    result["stage"],
                    result["operator"],
                    result["error"],
                )
                yield n_in, 0
                continue
            records = [r for r in result["records"] if r is not None]
            if records:
                self.data_writer.write(records)
            if result["rejected"] and self._rejected_writer is not None:
                self._rejected_writer.write([_jsonable_rejected(r) for r in result["rejected"]])
                stats["rejected_records"] += len(result["rejected"])
            stats["output_records"] += len(records)
            yield n_in, len(records)

    # -- stats ---------------------------------------------------------------
    def _collect_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stage, pool in self._replicas.items():
            try:
                per_replica = ray.get([a.get_raw_stats.remote() for a in pool])
            except Exception as exc:  # noqa: BLE001 - a dead replica loses its stats
                logger.warning("could not collect stats of stage %s: %s", stage, exc)
                per_replica = []
            merged: dict[str, Any] = {}
            for label in per_replica[0] if per_replica else {}:
                raws = [rep[label] for rep in per_replica if label in rep]
                summary = summarize_raw_stats(merge_raw_stats(raws))
                summary.update(_sum_numbers([r.get("extra", {}) for r in raws]))
                summary["dropped_batches"] = sum(r.get("dropped_batches", 0) for r in raws)
                summary["replicas"] = len(raws)
                merged[label] = summary
            out[stage] = merged
        return out

    def get_operator_stats(self) -> dict[str, Any]:
        """``{stage: {operator_class: stats}}`` merged over replicas (+ dropped_batches)."""
        if self._replicas and self._actors_ok:
            return self._collect_stats()
        return copy.deepcopy(self._cached_stats or {})

    def get_pipeline_stats(self) -> dict[str, Any]:
        """Run-level counters: batches, records in/out, dropped batches, loader errors."""
        return dict(self.pipeline_stats)

    def _write_metrics(self) -> None:
        m = self.config.executor.metrics
        if not (m.enabled and m.write_on_completion):
            return
        try:
            import fsspec

            fs, root = fsspec.core.url_to_fs(m.output_path)
            fs.makedirs(root, exist_ok=True)
            path = f"{root.rstrip('/')}/run_{time.strftime('%Y%m%d_%H%M%S')}_{self.run_id}.json"
            with fs.open(path, "w") as f:
                json.dump(
                    {
                        "run_id": self.run_id,
                        "pipeline": self.pipeline_stats,
                        "operators": self._cached_stats,
                    },
                    f,
                    indent=2,
                    default=str,
                )
            logger.info("metrics written to %s", path)
        except Exception as exc:  # noqa: BLE001 - metrics must never fail a finished run
            logger.warning("could not write metrics to %s: %s", m.output_path, exc)

    # -- teardown ------------------------------------------------------------
    def _teardown_actors(self) -> None:
        if self._replicas and self._actors_ok:
            self._cached_stats = self._collect_stats()
        self._actors_ok = False
        handles = self._loaders + [a for pool in self._replicas.values() for a in pool]
        _kill(handles)
        _wait_names_free(self._loader_names + self._replica_names)
        self._loaders, self._loader_names = [], []
        self._replicas, self._replica_names = {}, []

    def shutdown(self) -> None:
        """Close writers, kill this executor's actors; ray.shutdown() only if we started Ray."""
        if self._closed:
            return
        self._closed = True
        try:
            for w in (self.data_writer, self._rejected_writer):
                if w is not None and hasattr(w, "close"):
                    w.close()
        finally:
            if ray.is_initialized():
                self._teardown_actors()
                if self._owns_dedup and self.dedup_backend is not None:
                    names = self.dedup_backend.actor_names()
                    self.dedup_backend.kill()
                    _wait_names_free(names)
            if self._started_ray and ray.is_initialized():
                ray.shutdown()
