"""What a pipeline is and may do, read from its config before any pass: which operators
fit and label, whether a stage can run as a columnar pass, and the config each pass runs
(every taxonomy operator pinned to one snapshot)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

from mdf_taxonomy import _mdf
from mdf_taxonomy._mdf import mdf_key
from mdf_taxonomy.model import Taxonomy
from mdf_taxonomy.model.config import RunConfig
from mdf_taxonomy.operators import KMeansLevelRefiner, TaxonomyPathRefiner
from mdf_taxonomy.operators.registry import register


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
    return [
        op
        for stage in config.stages
        for op in stage.operators
        if op.enabled and _is_op(op, "KMeansLevelRefiner")
    ]


_SECTIONS = ("data_loader", "stages", "data_writer", "executor", "operators", "workers")


def check_sections(raw: Any, where: str) -> None:
    """MDF ignores an unknown top-level YAML key (`executer:`); we name it."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a pipeline config is a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(
            f"{where}: unknown top-level section(s) {unknown} (known: {list(_SECTIONS[:4])})"
        )


def create_loader(config: Any) -> Any:
    """The pipeline's data loader, built from its registered name (registering ours
    first: importing the package does not)."""
    register()
    return _mdf.DataLoaderRegistry.create(config.data_loader.type, config.data_loader.params)


def validate_pipeline(config: Any) -> None:
    """Check everything that can be checked before the first pass, so a typo costs
    seconds, not a fit: every component is registered and takes its params, and our
    own operators accept their values (a fit's labeller is built with the fit's depth,
    since its taxonomy does not exist yet)."""
    register()
    checks = [
        (
            "data_loader",
            _mdf.DataLoaderRegistry._loaders,
            config.data_loader.type,
            config.data_loader.params,
        ),
        (
            "data_writer",
            _mdf.DataWriterRegistry._writers,
            config.data_writer.type,
            config.data_writer.params,
        ),
    ]
    for stage in config.stages:
        for op in stage.operators:
            if op.enabled:
                checks.append(
                    (
                        f"stage {stage.name!r}",
                        _mdf.OperatorRegistry._operators,
                        op.get_class_name(),
                        op.params,
                        op.name,
                    )
                )
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


#: The writers a columnar labelling pass stands in for (same folders, files and columns).
COLUMNAR_WRITERS = ("ParquetDataWriter", "PartitionedParquetWriter", "DiscardWriter")


def columnar_plan(config: Any, labeller: str, cache_bytes: int | None = None) -> RunConfig | None:
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
        len(enabled) != 1 or config.data_writer.type not in COLUMNAR_WRITERS
    ):
        return None
    if config.data_loader.params.get("embedding_field") != op.params.get("embedding_field"):
        return None
    worker = getattr(stage, "worker", None)
    resources = dict(getattr(worker, "resources", None) or {})
    replicas = getattr(worker, "num_replicas", None) or getattr(worker, "min_replicas", None)
    return RunConfig(
        num_replicas=int(replicas or 1),
        cpus_per_replica=resources.get("cpu"),
        gpus_per_replica=float(resources.get("gpu") or 0),
        device=op.params.get("device", "auto"),
        kernel_backend=op.params.get("kernel_backend", "auto"),
        compute_dtype=op.params.get("compute_dtype", "float32"),
        cache_bytes=cache_bytes,
    )


_LABELLER_PARAMS = (
    "storage_uri",
    "embedding_field",
    "device",
    "kernel_backend",
    "storage_options",
    "compute_dtype",
)


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
    labels = any(
        op.enabled and _is_op(op, "TaxonomyPathRefiner")
        for stage in cfg.stages
        for op in stage.operators
    )
    for stage in cfg.stages:
        for i, op in enumerate(stage.operators):
            if not fit_pass and op.enabled and _is_op(op, "KMeansLevelRefiner"):
                if labels:
                    op.enabled = False
                    continue
                op = stage.operators[i] = _mdf.OperatorConfig(
                    name="taxonomy_path_refiner",
                    params={k: op.params[k] for k in _LABELLER_PARAMS if k in op.params},
                )
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
