"""The one seam to Mega-Data-Factory.

Everything in mdf_taxonomy that needs MDF's framework imports it from here, so the
package runs unchanged on a real MDF install and on the Ray-based fallback. What
differs between the two runtimes is stated here once, as capabilities, so the rest
of the package asks "can it?" rather than "which one is it?".
"""

from __future__ import annotations

import importlib
import re
import time
from typing import Any

try:  # a real Mega-Data-Factory install wins
    from mega_data_factory import framework as _framework
    from mega_data_factory.framework.config import MetricsConfig

    MDF_FLAVOUR = "mega_data_factory"
except ImportError:  # pragma: no cover - exercised wherever MDF is absent
    from rust_free_fallback import framework as _framework
    from rust_free_fallback.framework.config import MetricsConfig

    MDF_FLAVOUR = "rust_free_fallback"

BatchResult = _framework.BatchResult
Operator = _framework.Operator
Refiner = _framework.Refiner
Filter = _framework.Filter
OperatorRegistry = _framework.OperatorRegistry
DataLoaderRegistry = _framework.DataLoaderRegistry
DataWriterRegistry = _framework.DataWriterRegistry
DataLoader = _framework.DataLoader
DataWriter = _framework.DataWriter
PipelineConfig = _framework.PipelineConfig
Executor = _framework.Executor
OperatorConfig = _framework.OperatorConfig
StageConfig = _framework.StageConfig
StageWorkerConfig = _framework.StageWorkerConfig
DataLoaderConfig = _framework.DataLoaderConfig
DataWriterConfig = _framework.DataWriterConfig
ExecutorConfig = _framework.ExecutorConfig

#: The runtime tells operators that the stream ended (an ``end_of_stream()`` call on
#: every replica), so work can be folded across batches. MDF's Executor has no such hook.
HAS_END_OF_STREAM = MDF_FLAVOUR == "rust_free_fallback"
#: The Executor calls ``DataWriter.close()`` after the last batch; MDF's never does (its
#: writers live in actors that are killed), so a writer there must finish every file it
#: starts within the same ``write``.
CLOSES_WRITERS = MDF_FLAVOUR == "rust_free_fallback"
#: ``Executor.shutdown()`` leaves a Ray session it did not start running. MDF's always
#: calls ``ray.shutdown()``, so Ray handles kept across runs must be re-resolved.
KEEPS_RAY_SESSION = MDF_FLAVOUR == "rust_free_fallback"
#: ParquetDataWriter takes ``partition_by`` as a list and ``storage_options``; MDF's
#: takes one column name and reads storage options from the environment.
WRITER_TAKES_OPTIONS = MDF_FLAVOUR == "rust_free_fallback"


def mdf_key(name: str) -> str:
    """How MDF spells a class after its snake-case YAML name: KMeansLevelRefiner ->
    kmeans_level_refiner -> KmeansLevelRefiner."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    return "".join(part.capitalize() for part in snake.split("_"))


_HOST_COMPONENTS = {
    "mega_data_factory": (
        "mega_data_factory.loaders",
        "mega_data_factory.operators",
        "mega_data_factory.writers",
    ),
    "rust_free_fallback": ("rust_free_fallback.writers",),
}


def load_host_components() -> None:
    """Register the runtime's own loaders, operators and writers, as `mdf run` does.

    A CLI of our own must do this too, or YAMLs that use MDF's `text_length_filter` or
    `ParquetDataWriter` find them missing from the registries.
    """
    for module in _HOST_COMPONENTS[MDF_FLAVOUR]:
        importlib.import_module(module)


def operator_stats(executor: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """Every operator's own `get_stats()`, custom keys included, merged over replicas.

    ``{stage name: {operator class: stats}}``. MDF's `get_operator_stats()` keeps only
    its standard keys (and names stages `stage_0`, ...), so on MDF the replicas are
    asked directly. Call it before `end_run(executor)`.
    """
    if MDF_FLAVOUR == "rust_free_fallback":
        return executor.get_operator_stats()
    import ray

    standard = executor.get_operator_stats()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for i, (stage, workers) in enumerate(zip(executor.config.stages, executor.stages, strict=True)):
        per_worker = ray.get([w.get_operator_stats.remote() for w in workers])
        merged: dict[str, dict[str, Any]] = {}
        for op_name in dict.fromkeys(name for stats in per_worker for name in stats):
            mine = [stats[op_name] for stats in per_worker if op_name in stats]
            extra = merge_counts(
                [{k: v for k, v in s.items() if k not in _STANDARD_STATS} for s in mine]
            )
            base = standard.get(f"stage_{i}", {}).get(op_name) or merge_counts(
                [{k: s[k] for k in ("input_records", "output_records") if k in s} for s in mine]
            )
            merged[op_name] = {**base, **extra}
        out[stage.name] = merged
    return out


def end_run(executor: Any) -> None:
    """End one Executor run and keep the Ray session for the next pass of a fit.

    MDF's `shutdown()` is `ray.shutdown()`, which would cost every pass a new Ray
    session (seconds) and end the fit backend's actors; its run's actors (loaders,
    stage workers, the dedup backend's buckets) are killed here instead, and their
    names are waited free, so the next Executor starts from fresh state as it would
    in a new session rather than finding a dying actor by name.
    """
    if KEEPS_RAY_SESSION:
        executor.shutdown()
        return
    import ray

    if not ray.is_initialized():
        return
    actors = [*executor.loader_workers, *(w for workers in executor.stages for w in workers)]
    names = [f"pipeline_loader_{i}" for i in range(len(executor.loader_workers))]
    for stage, workers in zip(executor.config.stages, executor.stages, strict=True):
        names += [
            f"pipeline_{stage.name}_{i}"
            if stage.worker.max_replicas > 1
            else f"pipeline_{stage.name}"
            for i in range(len(workers))
        ]
    dedup = [
        f"pipeline_dedup_backend_bucket_{i}"
        for i in range(executor.config.executor.dedup_num_buckets)
    ]
    for name in dedup:
        try:
            actors.append(ray.get_actor(name))
        except ValueError:
            continue
        names.append(name)
    for actor in actors:
        ray.kill(actor)
    deadline = time.monotonic() + 30
    for name in names:
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.05)


_STANDARD_STATS = frozenset(
    {
        "input_records",
        "output_records",
        "pass_rate",
        "total_time",
        "avg_latency",
        "min_latency",
        "max_latency",
        "p50_latency",
        "p95_latency",
        "p99_latency",
        "throughput",
    }
)


def merge_counts(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """Replicas' counts merged: numbers add up, nested dicts merge, anything else: last seen."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict):
                out[k] = merge_counts([out.get(k, {}), v])
            elif isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            else:
                out[k] = v
    return out


__all__ = [
    "HAS_END_OF_STREAM",
    "CLOSES_WRITERS",
    "KEEPS_RAY_SESSION",
    "MDF_FLAVOUR",
    "mdf_key",
    "WRITER_TAKES_OPTIONS",
    "BatchResult",
    "Operator",
    "Refiner",
    "Filter",
    "OperatorRegistry",
    "DataLoaderRegistry",
    "DataWriterRegistry",
    "DataLoader",
    "DataWriter",
    "PipelineConfig",
    "Executor",
    "OperatorConfig",
    "StageConfig",
    "StageWorkerConfig",
    "DataLoaderConfig",
    "DataWriterConfig",
    "ExecutorConfig",
    "MetricsConfig",
    "end_run",
    "load_host_components",
    "operator_stats",
    "merge_counts",
]
