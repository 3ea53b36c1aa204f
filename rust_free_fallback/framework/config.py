"""Pipeline configuration dataclasses and the YAML schema (MDF-compatible).

Unknown keys inside a section raise ``ValueError`` naming key and section
(typos must not silently change a run); unknown top-level keys are ignored,
as in MDF, so a YAML file can carry extra sections for other tools.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class OperatorConfig:
    """One operator of a stage: ``{name: snake_case, params: {...}, enabled: true}``."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True

    def get_class_name(self) -> str:
        """MDF's lookup key: ``kmeans_level_refiner`` -> ``KmeansLevelRefiner``."""
        return "".join(part.capitalize() for part in self.name.split("_"))


@dataclass
class StageWorkerConfig:
    """Replicas and per-replica resources (``{cpu, gpu}``) of a stage."""

    resources: dict[str, Any] = field(default_factory=dict)
    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None

    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas: num_replicas pins both; otherwise defaults to 1."""
        if self.num_replicas is not None:
            return self.num_replicas, self.num_replicas
        lo = self.min_replicas if self.min_replicas is not None else 1
        hi = self.max_replicas if self.max_replicas is not None else lo
        return lo, max(lo, hi)


@dataclass
class StageConfig:
    name: str
    operators: list[OperatorConfig]
    worker: StageWorkerConfig = field(default_factory=StageWorkerConfig)
    output_path: str | None = None


@dataclass
class DataLoaderConfig:
    type: str
    params: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 8
    checkpoint_interval: int = 1000


@dataclass
class DataWriterConfig:
    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RejectedSamplesConfig:
    """Where filtered/duplicate records go when ``enabled`` (default writer: Parquet)."""

    enabled: bool = False
    output_path: str | None = None
    writer_type: str | None = None


@dataclass
class MetricsConfig:
    """Run metrics; the fallback writes a JSON summary on completion when enabled."""

    enabled: bool = True
    output_path: str = "./output/metrics"
    collect_custom_metrics: bool = False
    write_on_completion: bool = True
    generate_report: bool = False
    debug_samples_per_operator: int = 20
    huggingface_repo: str | None = None
    huggingface_token: str | None = None


@dataclass
class ExecutorConfig:
    max_samples: int | None = None
    batch_size: int = 100
    use_ray: bool = True
    num_cpus: int | None = None
    dedup_num_buckets: int = 2
    max_in_flight: int | None = None
    rejected_samples: RejectedSamplesConfig = field(default_factory=RejectedSamplesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


# -- parsing -----------------------------------------------------------------

_RESOURCE_KEYS = ("cpu", "gpu")


def _section(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"Section '{where}' must be a mapping, got {type(value).__name__}")
    return value


def _build(cls: type, data: Any, where: str, nested: dict[str, Any] | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``; reject unknown keys, require required ones."""
    data = _section(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ValueError(
                f"Unknown key '{key}' in section '{where}' (allowed: {', '.join(fields)})"
            )
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ValueError(f"Missing required key '{name}' in section '{where}'")
    kwargs = dict(data)
    for name, builder in (nested or {}).items():
        if name in kwargs:
            kwargs[name] = builder(kwargs[name], f"{where}.{name}")
    for name in ("params", "resources"):
        if name in kwargs and name in fields:
            kwargs[name] = dict(_section(kwargs[name], f"{where}.{name}"))
    return cls(**kwargs)


def _check_int(value: Any, where: str, minimum: int, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"'{where}' must be an integer >= {minimum}, got {value!r}")


def _worker(data: Any, where: str) -> StageWorkerConfig:
    w = _build(StageWorkerConfig, data, where)
    for key, val in w.resources.items():
        if key not in _RESOURCE_KEYS:
            raise ValueError(
                f"Unknown key '{key}' in section '{where}.resources' "
                f"(allowed: {', '.join(_RESOURCE_KEYS)})"
            )
        if isinstance(val, bool) or not isinstance(val, int | float) or val < 0:
            raise ValueError(f"'{where}.resources.{key}' must be a number >= 0, got {val!r}")
    for name in ("num_replicas", "min_replicas", "max_replicas"):
        _check_int(getattr(w, name), f"{where}.{name}", 1)
    if w.min_replicas and w.max_replicas and w.min_replicas > w.max_replicas:
        raise ValueError(
            f"'{where}': min_replicas ({w.min_replicas}) > max_replicas ({w.max_replicas})"
        )
    return w


def _operator(data: Any, where: str) -> OperatorConfig:
    op = _build(OperatorConfig, data, where)
    if not isinstance(op.name, str) or not op.name:
        raise ValueError(f"'{where}.name' must be a non-empty string")
    return op


def _stage(data: Any, where: str) -> StageConfig:
    def ops(value: Any, w: str) -> list[OperatorConfig]:
        if not isinstance(value, list):
            raise ValueError(f"Section '{w}' must be a list of operators")
        return [_operator(o, f"{w}[{i}]") for i, o in enumerate(value)]

    stage = _build(StageConfig, data, where, {"operators": ops, "worker": _worker})
    if not isinstance(stage.name, str) or not stage.name:
        raise ValueError(f"'{where}.name' must be a non-empty string")
    return stage


def _executor(data: Any, where: str) -> ExecutorConfig:
    ex = _build(
        ExecutorConfig,
        data,
        where,
        {
            "rejected_samples": lambda v, w: _build(RejectedSamplesConfig, v, w),
            "metrics": lambda v, w: _build(MetricsConfig, v, w),
        },
    )
    _check_int(ex.max_samples, f"{where}.max_samples", 0)
    _check_int(ex.batch_size, f"{where}.batch_size", 1, allow_none=False)
    _check_int(ex.dedup_num_buckets, f"{where}.dedup_num_buckets", 1, allow_none=False)
    _check_int(ex.max_in_flight, f"{where}.max_in_flight", 1)
    if ex.num_cpus is not None and (
        isinstance(ex.num_cpus, bool)
        or not isinstance(ex.num_cpus, int | float)
        or ex.num_cpus <= 0
    ):
        raise ValueError(f"'{where}.num_cpus' must be a positive number, got {ex.num_cpus!r}")
    return ex


@dataclass
class PipelineConfig:
    """Whole pipeline: loader, ordered stages, writer, executor settings."""

    data_loader: DataLoaderConfig
    stages: list[StageConfig]
    data_writer: DataWriterConfig
    executor: ExecutorConfig

    @classmethod
    def from_yaml(cls, config_path: str) -> PipelineConfig:
        """Parse a YAML file (schema in MDF_INTERFACE.md)."""
        text = Path(config_path).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{config_path}: top level must be a mapping")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """Build from an already-parsed mapping; unknown top-level keys are ignored."""
        for key in ("data_loader", "stages", "data_writer"):
            if key not in data:
                raise ValueError(f"Missing required top-level key '{key}'")
        loader = _build(DataLoaderConfig, data["data_loader"], "data_loader")
        _check_int(loader.num_workers, "data_loader.num_workers", 1, allow_none=False)
        stages_raw = data["stages"]
        if not isinstance(stages_raw, list):
            raise ValueError("Section 'stages' must be a list")
        stages = [_stage(s, f"stages[{i}]") for i, s in enumerate(stages_raw)]
        names = [s.name for s in stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"Duplicate stage names: {sorted(dup)}")
        writer = _build(DataWriterConfig, data["data_writer"], "data_writer")
        executor = _executor(data.get("executor"), "executor")
        return cls(data_loader=loader, stages=stages, data_writer=writer, executor=executor)
