"""MDF-compatible framework API (``mega_data_factory.framework`` surface) without Rust.

Importing this package also registers ``ParquetDataWriter`` and MDF's two text
operators (``TextLengthFilter``, ``TextExactDeduplicator``), as MDF's own components
are registered when ``mdf run`` starts.
"""

from .backend import DedupBackend
from .base import DataLoader, DataWriter
from .config import (
    DataLoaderConfig,
    DataWriterConfig,
    ExecutorConfig,
    MetricsConfig,
    OperatorConfig,
    PipelineConfig,
    RejectedSamplesConfig,
    StageConfig,
    StageWorkerConfig,
)
from .executor import Executor, InsufficientResourcesError
from .operator import BatchResult, CombinedOperator, Deduplicator, Filter, Operator, Refiner
from .registry import DataLoaderRegistry, DataWriterRegistry, OperatorRegistry

__all__ = [
    "BatchResult",
    "CombinedOperator",
    "DataLoader",
    "DataLoaderConfig",
    "DataLoaderRegistry",
    "DataWriter",
    "DataWriterConfig",
    "DataWriterRegistry",
    "DedupBackend",
    "Deduplicator",
    "Executor",
    "ExecutorConfig",
    "Filter",
    "InsufficientResourcesError",
    "MetricsConfig",
    "Operator",
    "OperatorConfig",
    "OperatorRegistry",
    "PipelineConfig",
    "Refiner",
    "RejectedSamplesConfig",
    "StageConfig",
    "StageWorkerConfig",
]

# Last: these import this package's modules and register themselves on import.
from rust_free_fallback import operators as _operators  # noqa: E402,F401
from rust_free_fallback import writers as _writers  # noqa: E402,F401
