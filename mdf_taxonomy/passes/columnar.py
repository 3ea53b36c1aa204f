"""The columnar pass: row groups -> Arrow -> one tensor per row group -> kernels.

A fit is many passes over the same input, so its workers live for the whole fit:
each holds its share of the row groups (balanced by rows, fixed for the fit), the
device, and, where they fit in `cache_bytes`, the decoded rows of its row groups,
so a pass after the first costs kernel time only. A pass is one call per worker;
a worker folds the whole pass into one exact int64 partial (or one bottom-k per
parent) and returns it, so a pass sends one message per worker, whatever the rows.

One worker runs in this process (no Ray at all), with reader threads decoding the
next row groups while the kernels work; several run as Ray actors, one per GPU
or CPU share. Labelling appends the label columns to each row group's Arrow table
and writes it as one Parquet file per row group, named by its place in the input,
so the output does not depend on the number of workers either.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mdf_taxonomy.model import Taxonomy
from mdf_taxonomy.model.balance import sample_sizes
from mdf_taxonomy.model.config import RunConfig
from mdf_taxonomy.model.fitting import add_fixed_sums
from mdf_taxonomy.model.phase import Phase
from mdf_taxonomy.model.sampling import BottomK
from mdf_taxonomy.passes.batch import LABEL_FIELDS, LabelFields
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.worker import PassWorker, WorkerTotals, _add

__all__ = ["PassWorker", "WorkerPool", "WorkerTotals", "split_items"]

log = logging.getLogger(__name__)


def split_items(items: list[str], rows: list[int], n: int) -> list[list[str]]:
    """Items dealt to n workers, balanced by rows (largest first to the lightest), each
    share kept in input order: deterministic for the same input."""
    shares: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(items)), key=lambda i: (-rows[i], i)):
        w = min(range(n), key=lambda w: (load[w], w))
        shares[w].append(i)
        load[w] += rows[i]
    return [[items[i] for i in sorted(share)] for share in shares]


class WorkerPool:
    """The workers of one fit (or one labelling run), kept across its passes."""

    def __init__(self, source: ParquetInput, items: list[str], run: RunConfig):
        self.source = source
        self.items = items
        self.run = run
        index = {item: i for i, item in enumerate(items)}
        n = max(1, min(run.num_replicas, len(items)))
        shares = split_items(items, [source.item_rows(i) for i in items], n)
        if run.num_replicas == 1:
            self.local: PassWorker | None = PassWorker(source, items, index, run)
            self.actors: list[Any] = []
        else:
            import ray

            remote = ray.remote(PassWorker).options(
                num_cpus=run.cpus_per_replica if run.cpus_per_replica is not None else 1,
                num_gpus=run.gpus_per_replica,
                max_restarts=0,
            )
            self.local = None
            self.actors = [remote.remote(source, share, index, run) for share in shares]

    def _each(self, method: str, *args: Any) -> list[WorkerTotals]:
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        import ray

        try:
            return ray.get([getattr(a, method).remote(*args) for a in self.actors])
        except ray.exceptions.RayTaskError as e:  # the worker's own error, not Ray's
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
                raise cause from e
            raise

    def fit_pass(self, tax: Taxonomy) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
        """(merged result in FitBackend.collect's shape, rows read, items skipped)."""
        parts = self._each("fit_pass", tax)
        st = tax.state
        n_nodes = 0 if st.phase == Phase.SAMPLE else tax.levels[st.level - 1].n_nodes
        totals: dict[str, int] = {}
        rejected: dict[str, int] = {}
        parent_rows: dict[int, int] = {}
        samples = BottomK()
        k = sample_sizes(tax) if st.phase == Phase.SAMPLE else 0
        with_sums = [p for p in parts if p.sums is not None]
        if len(with_sums) == 1:  # one worker: its partial is the pass's (already marked)
            sums, counts = with_sums[0].sums, with_sums[0].counts
        else:
            sums = np.zeros((n_nodes, tax.dim), dtype=np.int64)
            counts = np.zeros(n_nodes, dtype=np.int64)
            for part in with_sums:
                add_fixed_sums(sums, part.sums)
                counts += part.counts
        for part in parts:
            _add(totals, part.totals)
            _add(rejected, part.rejected)
            _add(parent_rows, part.parent_rows)
            for p, (prio, vec) in part.samples.kept.items():
                samples.offer(np.full(len(prio), p, np.int64), prio, vec, k)
        totals["flushes"] = len(parts)
        totals["flush_bytes"] = int(sum(0 if p.sums is None else p.sums.nbytes for p in parts))
        result = {
            "sums": sums,
            "counts": counts,
            "totals": totals,
            "rejected": rejected,
            "samples": samples.vectors(),
            "parent_rows": parent_rows,
            "pass_ids": [str(tax.version)],
            "cached_rows": sum(p.timings.get("cached_rows", 0) for p in parts),
        }
        return (result, sum(p.loaded for p in parts), [e for p in parts for e in p.skipped])

    def label(
        self,
        tax: Taxonomy,
        output_uri: str | None,
        storage_options: dict | None = None,
        partition_by: list[str] | None = None,
        fields: LabelFields = LABEL_FIELDS,
    ) -> tuple[dict[str, Any], int, list[dict[str, Any]]]:
        """Label every row group into `output_uri`: (counts, rows read, items skipped)."""
        parts = self._each("label_pass", tax, output_uri, storage_options, partition_by, fields)
        totals: dict[str, int] = {}
        rejected: dict[str, int] = {}
        timings: dict[str, float] = {}
        for part in parts:
            _add(totals, part.totals)
            _add(rejected, part.rejected)
            _add(timings, part.timings)
        timings = {k: round(v, 3) for k, v in timings.items()}
        return (
            {"totals": totals, "rejected": rejected, "timings": timings},
            sum(p.loaded for p in parts),
            [e for p in parts for e in p.skipped],
        )

    @property
    def workers(self) -> list[Any]:
        return [self.local] if self.local is not None else list(self.actors)

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []
        self.local = None
