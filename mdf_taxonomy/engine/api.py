"""TaxonomyEngine, the Python face: builds the MDF pipeline a user would write and runs
it through the same fit driver and runs as `mdf-taxonomy run`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import ray
import torch

from mdf_taxonomy import _mdf
from mdf_taxonomy.engine.curating import CurationMethods
from mdf_taxonomy.engine.fit_driver import PipelineFit
from mdf_taxonomy.engine.plan import pinned
from mdf_taxonomy.engine.running import label_summary, paths_in_memory, record_run
from mdf_taxonomy.engine.staging import StagedOutput, staged_run
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model import Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.config import RunConfig, document_table_parameters
from mdf_taxonomy.model.warm_start import id_changes
from mdf_taxonomy.passes.parquet_input import ParquetInput

#: The parameters the engine takes by keyword, besides its own: the fit and run tables'.
FIT_PARAMETERS = frozenset(TaxonomyConfig.__dataclass_fields__) - {"extra"}
RUN_PARAMETERS = frozenset(RunConfig.__dataclass_fields__)


class TaxonomyEngine(CurationMethods):
    """The Python face: `TaxonomyEngine(n_levels, branching_factor, dim, storage_uri).fit(...)`.

    It builds an MDF pipeline (ParquetEmbeddingLoader -> KMeansLevelRefiner ->
    TaxonomyPathRefiner -> ParquetDataWriter) and runs it through the same
    PipelineFit as `mdf-taxonomy run`: as columnar passes where it can, else through
    MDF's Executor.

    Besides its own parameters it takes, by keyword, every fit parameter of
    TaxonomyConfig and every run parameter of RunConfig; model/config.py declares their
    defaults, constraints and meaning once, and the entries after the engine's own four are
    read from there.

    Parameters
    ----------
    storage_uri : str, default='./output/taxonomy'
        Where the taxonomy's snapshots live (any fsspec URI).
    storage_options : dict or None, default=None
        Fsspec options for the input, the output and the store.
    progress : bool, default=True
        Progress bars and one line per pass on stderr.
    partition_by : list of str or None, default=None
        Output columns to partition the labelled Parquet by (Hive).
    """

    def __init__(
        self,
        n_levels: int = TaxonomyConfig.n_levels,
        branching_factor: int | list[int] = TaxonomyConfig.branching_factor,
        dim: int | None = TaxonomyConfig.dim,
        storage_uri: str = "./output/taxonomy",
        *,
        storage_options: dict[str, Any] | None = None,
        progress: bool = True,
        partition_by: list[str] | None = None,
        **params: Any,
    ):
        unknown = sorted(set(params) - FIT_PARAMETERS - RUN_PARAMETERS)
        if unknown:
            raise TypeError(
                f"TaxonomyEngine: unknown parameter(s) {unknown}; fit parameters: "
                f"{sorted(FIT_PARAMETERS)}, run parameters: {sorted(RUN_PARAMETERS)}"
            )
        self.fit_params = TaxonomyConfig(
            n_levels=n_levels,
            branching_factor=branching_factor,
            dim=dim,
            **{k: v for k, v in params.items() if k in FIT_PARAMETERS},
        ).to_dict()
        self.run = RunConfig(**{k: v for k, v in params.items() if k in RUN_PARAMETERS})
        self.storage_uri = storage_uri
        self.storage_options = storage_options
        self.progress = progress
        self.partition_by = partition_by
        self.last_fit: PipelineFit | None = None  # the driver of the last fit, its pass log
        self.last_summary: dict[str, Any] = {}  # what the last fit or predict recorded

    def __getattr__(self, name: str) -> Any:
        """A run parameter by name (engine.num_replicas)."""
        if name != "run" and name in RunConfig.__dataclass_fields__:
            return getattr(self.run, name)
        raise AttributeError(name)

    # -- pipelines -------------------------------------------------------------------
    def _loader_params(self, input: str | list[str], **extra: Any) -> dict[str, Any]:
        """ParquetEmbeddingLoader's params: one place for the field and storage options."""
        return {
            "path": input,
            "embedding_field": self.fit_params["embedding_field"],
            "storage_options": self.storage_options,
            "on_bad_file": self.on_bad_file,
            **extra,
        }

    def _pipeline(
        self,
        input: str | list[str],
        output: str | None,
        fit: bool,
        loader_extra: dict[str, Any] | None = None,
    ) -> Any:
        """The pipeline a user would write for this fit (`fit`) or labelling run, with
        replicas sharing the cores the loaders leave."""
        _mdf.load_host_components()
        cpus = (
            ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else os.cpu_count() or 1
        )
        per_replica = self.cpus_per_replica or max(
            0.1, min(1.0, (cpus - self.num_loaders) / self.num_replicas)
        )
        common = {
            "storage_uri": self.storage_uri,
            "device": self.device,
            "kernel_backend": self.kernel_backend,
            "compute_dtype": self.compute_dtype,
            "storage_options": self.storage_options,
            "embedding_field": self.fit_params["embedding_field"],
        }
        ops = []
        if fit:
            ops.append(
                _mdf.OperatorConfig(
                    name="kmeans_level_refiner",
                    params={
                        **common,
                        **{k: v for k, v in self.fit_params.items() if k != "embedding_field"},
                        "backend_buckets": self.backend_buckets,
                        "flush_rows": self.flush_rows,
                    },
                )
            )
        ops.append(_mdf.OperatorConfig(name="taxonomy_path_refiner", params=dict(common)))
        writer = (
            _mdf.DataWriterConfig(type=self._writer_type(), params=self._writer_params(output))
            if output
            else _mdf.DataWriterConfig(type="DiscardWriter", params={})
        )
        return _mdf.PipelineConfig(
            data_loader=_mdf.DataLoaderConfig(
                type="ParquetEmbeddingLoader",
                params=self._loader_params(input, **(loader_extra or {})),
                num_workers=self.num_loaders,
            ),
            stages=[
                _mdf.StageConfig(
                    name="taxonomy",
                    operators=ops,
                    worker=_mdf.StageWorkerConfig(
                        resources={"cpu": per_replica, "gpu": self.gpus_per_replica},
                        min_replicas=self.num_replicas,
                        max_replicas=self.num_replicas,
                    ),
                )
            ],
            data_writer=writer,
            executor=_mdf.ExecutorConfig(
                batch_size=self.batch_size,
                max_in_flight=max(2 * self.num_replicas, self.num_loaders),
                metrics=_mdf.MetricsConfig(enabled=False),
            ),
        )

    def _writer_type(self) -> str:
        """Ours where the output is partitioned (bounded files per node), else MDF's."""
        return "PartitionedParquetWriter" if self.partition_by else "ParquetDataWriter"

    def _writer_params(self, output: str) -> dict[str, Any]:
        """The writer's params, in the dialect of the runtime's ParquetDataWriter."""
        params: dict[str, Any] = {"output_path": output}
        if self.partition_by:
            params["partition_by"] = self.partition_by
        if self.storage_options and (self.partition_by or _mdf.WRITER_TAKES_OPTIONS):
            params["storage_options"] = self.storage_options
        elif self.storage_options:
            raise ValueError(
                "storage_options: MDF's ParquetDataWriter takes none (it reads "
                "credentials from the environment); leave it unset under MDF, or "
                "partition the output (partition_by), which our writer does"
            )
        return params

    def _label(
        self,
        input: str | list[str],
        output: str,
        tax: Taxonomy,
        staged: StagedOutput,
        loader_extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The labelling run pinned to `tax`, staged into `output`; its summary."""
        config = self._pipeline(input, output, fit=False, loader_extra=loader_extra)
        result = staged_run(
            pinned(config, tax, fit_pass=False),
            staged,
            progress=self.progress,
            desc="label",
            columnar=self.columnar,
            taxonomy=tax,
        )
        return label_summary(result)

    # -- API ----------------------------------------------------------------------
    def fit(
        self,
        input: str | list[str],
        output: str | None = None,
        filter: Any = None,
        overwrite: bool = False,
        warm_start: Taxonomy | str | None = None,
    ) -> Taxonomy:  # noqa: A002
        """Fit (or resume) the taxonomy on `input`; write labelled records to `output`
        (refused if it holds data, unless `overwrite`).

        Parameters
        ----------
        warm_start : Taxonomy, str or None, default=None
            A finished tree, or the storage URI of one (its latest snapshot), to refit from
            so that its nodes keep their ids; the summary's fit.id_changes says what was
            kept and born (model/warm_start.py has the rules). None: a cold fit.
        """
        warm = None if warm_start is None else self._tree(warm_start, "warm_start")
        extra = {"filter": filter} if filter is not None else {}
        staged = (
            StagedOutput(output, self.storage_options, overwrite) if output is not None else None
        )
        config = self._pipeline(input, None, fit=True, loader_extra=extra)
        run = PipelineFit(
            config,
            progress=self.progress,
            max_pass_retries=self.max_pass_retries,
            columnar=self.columnar,
            cache_bytes=self.cache_bytes,
            warm_start=warm,
        )
        self.last_fit = run
        tax = run.run()
        summary: dict[str, Any] = {
            "command": "fit",
            "runtime": _mdf.MDF_FLAVOUR,
            "fit": run.summary,
        }
        if warm is not None:
            summary["fit"]["id_changes"] = id_changes(warm, tax).as_dict()
        if output is not None:
            summary["label"] = self._label(input, output, tax, staged, extra)
        summary["summary_uri"] = record_run(self.storage_uri, self.storage_options, summary)
        self.last_summary = summary
        return tax

    def load(self) -> Taxonomy:
        """The latest snapshot in the store."""
        return TaxonomyStore(self.storage_uri, self.storage_options).load()

    def _tree(self, tree: Taxonomy | str, name: str) -> Taxonomy:
        """A tree given as itself or by its storage URI (latest snapshot), other than ours."""
        if isinstance(tree, Taxonomy):
            return tree
        if not isinstance(tree, str):
            raise TypeError(f"{name}: a Taxonomy or a storage URI, not {type(tree).__name__}")
        if tree.rstrip("/") == self.storage_uri.rstrip("/"):
            raise ValueError(
                f"{name}={tree!r} is this engine's own storage_uri (fit anew elsewhere)"
            )
        return TaxonomyStore(tree, self.storage_options).load()

    def compare(
        self,
        input: str | list[str],  # noqa: A002
        old: Taxonomy | str,
        new: Taxonomy | str | None = None,
    ) -> dict[str, Any]:
        """What moved from `old` to `new` (a tree or storage URI; None: this engine's
        stored tree): per level, nodes kept, born, retired and drifted, centroid shifts,
        and the `input` rows whose path changed, each row labelled by both trees in one
        read in this process (model.warm_start.id_changes). The report, as a dict."""
        old_tax = self._tree(old, "old")
        new_tax = self.load() if new is None else self._tree(new, "new")
        report = id_changes(old_tax, new_tax, *self._paths(input, [old_tax, new_tax]))
        self.last_summary = {"command": "compare", **report.as_dict()}
        return report.as_dict()

    def predict(
        self,
        input: str | list[str] | np.ndarray | torch.Tensor,
        output: str | None = None,
        overwrite: bool = False,
    ) -> np.ndarray | str:
        """Paths of `input` rows: an array in, (N, n_levels) int32 node ids out.

        A URI with `output` runs the labelling pipeline and returns `output` (refused if
        it holds data, unless `overwrite`); a URI without it is read in this process and
        labelled in memory (-1 rows for records with a rejected embedding).
        """
        tax = self.load()
        if isinstance(input, np.ndarray | torch.Tensor):
            return tax.assign_paths(input, assigner=make_assigner(self.kernel_backend))[0]
        if output is not None:
            staged = StagedOutput(output, self.storage_options, overwrite)
            label = self._label(input, output, tax, staged)
            self.last_summary = {
                "command": "predict",
                "runtime": _mdf.MDF_FLAVOUR,
                "label": label,
            }
            return output
        return self._paths(input, [tax])[0]

    def _paths(self, input: str | list[str], trees: list[Taxonomy]) -> list[np.ndarray]:  # noqa: A002
        """Each tree's paths of the `input` rows, read once in this process."""
        source = ParquetInput(**self._loader_params(input))
        return paths_in_memory(source, trees, make_assigner(self.kernel_backend))


document_table_parameters(TaxonomyEngine, extra=FIT_PARAMETERS | RUN_PARAMETERS)
