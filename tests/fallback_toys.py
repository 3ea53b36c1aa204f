"""Toy loader/operators for the rust_free_fallback tests (importable by Ray workers)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from rust_free_fallback.framework import (
    DataLoader,
    DataLoaderRegistry,
    Deduplicator,
    Filter,
    OperatorConfig,
    OperatorRegistry,
    Refiner,
)


class ToyLoader(DataLoader):
    """``num_files`` shards of ``records_per_file`` records with ids 0..N-1."""

    def __init__(self, num_files: int = 4, records_per_file: int = 25, dim: int = 4):
        self.num_files = num_files
        self.records_per_file = records_per_file
        self.dim = dim

    def get_file_list(self, max_samples: int | None = None, num_workers: int = 1) -> list[str]:
        return [f"shard-{i}" for i in range(self.num_files)]

    def load_files(
        self, file_list: list[str], worker_id: int | None = None, checkpoint: dict | None = None
    ) -> Iterator[dict[str, Any]]:
        for name in file_list:
            shard = int(name.split("-")[1])
            for j in range(self.records_per_file):
                n = shard * self.records_per_file + j
                yield {
                    "id": n,
                    "value": n,
                    "group": n // 2,
                    "worker": worker_id,
                    "emb": np.full(self.dim, n, dtype=np.float32),
                }


class AddSquare(Refiner):
    def refine_batch(self, records: list[dict]) -> None:
        for r in records:
            r["square"] = r["value"] ** 2

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return {"square": pa.int64()}


class KeepEven(Filter):
    def should_keep_batch(self, records: list[dict]) -> list[bool]:
        return [r["value"] % 2 == 0 for r in records]


class ExplodeOn(Refiner):
    """Raises on a batch containing ``bad_value``: the executor must drop that batch only."""

    def __init__(self, bad_value: int):
        super().__init__()
        self.bad_value = bad_value

    def refine_batch(self, records: list[dict]) -> None:
        for r in records:
            if r["value"] == self.bad_value:
                raise ValueError(f"boom on value {self.bad_value}")

    def get_output_schema(self) -> dict[str, pa.DataType]:
        return {}


class GroupDedup(Deduplicator):
    def get_dedup_keys_batch(self, records: list[dict]) -> list[str]:
        return [f"g{r['group']}" for r in records]


def register() -> None:
    """Register in the driver under class name and the YAML snake_case-derived key."""
    DataLoaderRegistry.register("ToyLoader", ToyLoader)
    for snake, cls in [
        ("add_square", AddSquare),
        ("keep_even", KeepEven),
        ("explode_on", ExplodeOn),
        ("group_dedup", GroupDedup),
    ]:
        OperatorRegistry.register(cls.__name__, cls)
        OperatorRegistry.register(OperatorConfig(name=snake).get_class_name(), cls)
