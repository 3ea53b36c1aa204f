"""The one seam to Mega-Data-Factory.

Everything in mdf_taxonomy that needs MDF's framework imports it from here, so the
package runs unchanged on a real MDF install and on the Ray-based fallback.
"""

from __future__ import annotations

try:  # a real Mega-Data-Factory install wins
    from mega_data_factory import framework as _framework
    from mega_data_factory.framework.config import MetricsConfig

    MDF_FLAVOUR = "mega_data_factory"
except ImportError:  # pragma: no cover - exercised wherever MDF is absent
    from rust_free_fallback import framework as _framework
    from rust_free_fallback.framework.config import MetricsConfig

    MDF_FLAVOUR = "rust_free_fallback"

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

__all__ = [
    "MDF_FLAVOUR",
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
]
