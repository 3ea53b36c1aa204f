"""Fit state between batches, sharded over named Ray bucket actors by node id.

Modelled on MDF's DedupBackend: one named actor per bucket, reused by name, and
the backend object itself is small and pickled into every worker. Sums are
int64 fixed point, so the order in which flushes arrive changes nothing. Every
flush carries an id; a bucket ignores an id it has seen in this pass, so a
retried task is never counted twice. Flushes from another pass are refused.
A sum that would pass int64's headroom is marked SUM_OVERFLOWED, never wrapped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from mdf_taxonomy.model.fitting import add_fixed_sums
from mdf_taxonomy.model.sampling import BottomK


def bucket_of(node: Any, num_buckets: int) -> Any:
    """The bucket that holds a node's partials (an int or an array of node ids).

    Nodes are dealt round-robin, so bucket i holds nodes i, i + n, i + 2n, ...: its local
    index of a node is node // n and the driver merges buckets by strided copies.
    """
    return node % num_buckets


@ray.remote(num_cpus=0, max_restarts=0)
class FitBucket:
    """One shard of a pass's partial sums, counts and init samples."""

    def __init__(self) -> None:
        self.start(None, 0, 0, 0, 1)

    def start(
        self, pass_id: str | None, n_nodes: int, dim: int, bucket: int, n_buckets: int
    ) -> bool:
        self.pass_id = pass_id
        self.bucket, self.n_buckets = bucket, n_buckets
        n_local = len(range(bucket, n_nodes, n_buckets))
        self.sums = np.zeros((n_local, dim), dtype=np.int64)
        self.counts = np.zeros(n_local, dtype=np.int64)
        self.seen: set[str] = set()
        self.totals = {"rows": 0, "inertia_fixed": 0, "flushes": 0, "duplicate_flushes": 0}
        self.rejected: dict[str, int] = {}
        self.samples = BottomK()
        self.parent_rows: dict[int, int] = {}
        return True

    def _accept(self, pass_id: str, flush_id: str) -> bool:
        if pass_id != self.pass_id:
            raise RuntimeError(
                f"flush for pass {pass_id!r} reached a bucket in pass {self.pass_id!r}"
            )
        if flush_id in self.seen:
            self.totals["duplicate_flushes"] += 1
            return False
        self.seen.add(flush_id)
        self.totals["flushes"] += 1
        return True

    def _count(self, totals: dict[str, int] | None, rejected: dict[str, int] | None) -> None:
        for k, v in (totals or {}).items():
            self.totals[k] = self.totals.get(k, 0) + int(v)
        for k, v in (rejected or {}).items():
            self.rejected[k] = self.rejected.get(k, 0) + int(v)

    def add_partials(
        self,
        pass_id: str,
        flush_id: str,
        nodes: np.ndarray,
        sums: np.ndarray,
        counts: np.ndarray,
        totals: dict[str, int] | None = None,
        rejected: dict[str, int] | None = None,
    ) -> bool:
        if not self._accept(pass_id, flush_id):
            return False
        local = nodes // self.n_buckets  # nodes are unique within a flush
        block = self.sums[local]
        add_fixed_sums(block, sums)
        self.sums[local] = block
        self.counts[local] += counts
        self._count(totals, rejected)
        return True

    def offer_samples(
        self,
        pass_id: str,
        flush_id: str,
        parents: np.ndarray,
        priorities: np.ndarray,
        vectors: np.ndarray,
        parent_rows: dict[int, int],
        k: int,
        totals: dict[str, int] | None = None,
        rejected: dict[str, int] | None = None,
    ) -> dict[int, int]:
        """Merge candidates into each parent's bottom-k; returns, for the touched parents
        whose sample is full, the k-th priority: rows above it can never enter."""
        if not self._accept(pass_id, flush_id):
            return {}
        for p, n in parent_rows.items():
            self.parent_rows[int(p)] = self.parent_rows.get(int(p), 0) + int(n)
        cut = self.samples.offer(parents, priorities, vectors, k)
        self._count(totals, rejected)
        return cut

    def collect(self) -> dict[str, Any]:
        return {
            "pass_id": self.pass_id,
            "sums": self.sums,
            "counts": self.counts,
            "totals": dict(self.totals),
            "rejected": dict(self.rejected),
            "samples": self.samples.vectors(),
            "parent_rows": dict(self.parent_rows),
        }


class FitBackend:
    """Driver and workers share this handle; the bucket actors hold the state.

    The driver calls `start_pass` (creating the actors) before a pass and
    `collect` after it; workers call `add_partials` / `offer_samples`, which
    split a flush by bucket and send one remote call per bucket in parallel.
    """

    def __init__(self, num_buckets: int = 2, name_prefix: str = "mdf_taxonomy_fit"):
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.num_buckets = num_buckets
        self.name_prefix = name_prefix
        self._handles: list[Any] | None = None
        self._session: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "num_buckets": self.num_buckets,
            "name_prefix": self.name_prefix,
            "_handles": None,
            "_session": None,
        }

    def bucket_name(self, i: int) -> str:
        return f"{self.name_prefix}_bucket_{i}"

    def _buckets(self, create: bool = False) -> list[Any]:
        """Handles to the bucket actors of the current Ray session.

        Handles are kept per session: MDF's Executor shuts Ray down after every run,
        and a handle from an ended session points at an actor that no longer exists.
        """
        session = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
        if self._handles is None or session != self._session:
            handles = []
            for i in range(self.num_buckets):
                if create:
                    handles.append(
                        FitBucket.options(name=self.bucket_name(i), get_if_exists=True).remote()
                    )
                else:
                    try:
                        handles.append(ray.get_actor(self.bucket_name(i)))
                    except ValueError as e:
                        raise RuntimeError(
                            f"fit backend actor {self.bucket_name(i)!r} is gone: the pass "
                            "must be re-run"
                        ) from e
            self._handles = handles
            self._session = ray.get_runtime_context().gcs_address
        return self._handles

    # -- driver ------------------------------------------------------------------
    def start_pass(self, pass_id: str, n_nodes: int, dim: int) -> None:
        """Reset every bucket for a new pass, creating any that is missing.

        The driver keeps the handles: a non-detached named actor is garbage
        collected once no handle to it is left.
        """

        def start() -> None:
            ray.get(
                [
                    b.start.remote(pass_id, n_nodes, dim, i, self.num_buckets)
                    for i, b in enumerate(self._buckets(create=True))
                ]
            )

        try:
            start()
        except ray.exceptions.RayActorError:  # a bucket died since the last pass
            self._handles = None
            start()

    def collect(self, n_nodes: int, dim: int) -> dict[str, Any]:
        """All buckets merged, in node order."""
        parts = ray.get([b.collect.remote() for b in self._buckets()])
        sums = np.zeros((n_nodes, dim), dtype=np.int64)
        counts = np.zeros(n_nodes, dtype=np.int64)
        totals: dict[str, int] = {}
        rejected: dict[str, int] = {}
        samples: dict[int, np.ndarray] = {}
        parent_rows: dict[int, int] = {}
        for i, part in enumerate(parts):
            sums[i :: self.num_buckets] = part["sums"]
            counts[i :: self.num_buckets] = part["counts"]
            for k, v in part["totals"].items():
                totals[k] = totals.get(k, 0) + v
            for k, v in part["rejected"].items():
                rejected[k] = rejected.get(k, 0) + v
            samples.update(part["samples"])
            for p, n in part["parent_rows"].items():
                parent_rows[p] = parent_rows.get(p, 0) + n
        return {
            "sums": sums,
            "counts": counts,
            "totals": totals,
            "rejected": rejected,
            "samples": samples,
            "parent_rows": parent_rows,
            "pass_ids": sorted({str(p["pass_id"]) for p in parts}),
        }

    def shutdown(self) -> None:
        """Kill the bucket actors (the next start_pass creates fresh ones)."""
        for i in range(self.num_buckets):
            try:
                ray.kill(ray.get_actor(self.bucket_name(i)))
            except ValueError:
                pass
        self._handles = None

    # -- workers -------------------------------------------------------------------
    def add_partials(
        self,
        pass_id: str,
        flush_id: str,
        nodes: np.ndarray,
        sums: np.ndarray,
        counts: np.ndarray,
        totals: dict[str, int],
        rejected: dict[str, int],
    ) -> None:
        calls = []
        for i, b in enumerate(self._buckets()):
            mine = bucket_of(nodes, self.num_buckets) == i
            extra = (totals, rejected) if i == 0 else (None, None)
            if i == 0 or mine.any():
                calls.append(
                    b.add_partials.remote(
                        pass_id, flush_id, nodes[mine], sums[mine], counts[mine], *extra
                    )
                )
        ray.get(calls)

    def offer_samples(
        self,
        pass_id: str,
        flush_id: str,
        parents: np.ndarray,
        priorities: np.ndarray,
        vectors: np.ndarray,
        k: int,
        parent_rows: dict[int, int],
        totals: dict[str, int],
        rejected: dict[str, int],
    ) -> dict[int, int]:
        """Candidates (already a local bottom-k) plus every parent's row count; returns the
        cut-off priority of every touched parent whose sample is full."""
        calls = []
        for i, b in enumerate(self._buckets()):
            mine = bucket_of(parents, self.num_buckets) == i
            rows = {p: c for p, c in parent_rows.items() if bucket_of(p, self.num_buckets) == i}
            extra = (totals, rejected) if i == 0 else (None, None)
            if i == 0 or rows:
                calls.append(
                    b.offer_samples.remote(
                        pass_id,
                        flush_id,
                        parents[mine],
                        priorities[mine],
                        vectors[mine],
                        rows,
                        k,
                        *extra,
                    )
                )
        cut: dict[int, int] = {}
        for part in ray.get(calls):
            cut.update(part)
        return cut
