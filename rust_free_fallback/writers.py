"""ParquetDataWriter: one Parquet file per batch, through fsspec.

Registered as ``ParquetDataWriter`` in ``DataWriterRegistry`` on import.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any
from urllib.parse import quote

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rust_free_fallback.framework.base import DataWriter
from rust_free_fallback.framework.registry import DataWriterRegistry

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _arrow_ready(value: Any) -> Any:
    """Multi-dim arrays become nested lists of 1-D arrays (Arrow infers 1-D only).

    1-D numpy arrays are left as-is so float32 stays ``list<float>`` instead of
    becoming ``list<double>`` via Python floats.
    """
    if isinstance(value, np.ndarray) and value.ndim > 1:
        return [_arrow_ready(v) for v in value]
    return value


def _partition_segment(col: str, value: Any) -> str:
    text = HIVE_NULL if value is None else str(value)
    return f"{col}={quote(text, safe='')}"


class ParquetDataWriter(DataWriter):
    """Writes each batch as a new Parquet file under ``output_path/table_name/``.

    ``output_path`` is any fsspec URI (local path, ``s3://``, ``memory://``...).
    With ``partition_by`` the batch is split into Hive directories
    (``col=value/``) and the partition columns are dropped from the files, as
    Hive readers (``pyarrow.dataset``, Spark, DuckDB) expect. File names carry a
    per-process writer id plus a counter, so concurrent writers never collide.
    """

    def __init__(
        self,
        output_path: str,
        table_name: str = "default",
        partition_by: str | list[str] | None = None,
        compression: str = "snappy",
        storage_options: dict[str, Any] | None = None,
    ):
        self.output_path = str(output_path).rstrip("/")
        self.table_name = table_name
        if isinstance(partition_by, str):
            partition_by = [partition_by]
        self.partition_by = list(partition_by or [])
        self.compression = compression
        self.storage_options = dict(storage_options or {})
        self.files_written: list[str] = []
        self.records_written = 0
        self._fs = None
        self._writer_id: str | None = None
        self._counter = itertools.count()

    def __getstate__(self) -> dict[str, Any]:
        # A copy in another process gets its own writer id and filesystem handle.
        state = dict(self.__dict__)
        state.update(_fs=None, _writer_id=None, _counter=None, files_written=[])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._counter = itertools.count()

    @property
    def table_path(self) -> str:
        return f"{self.output_path}/{self.table_name}" if self.table_name else self.output_path

    def _filesystem(self) -> tuple[Any, str]:
        if self._fs is None:
            self._fs, root = fsspec.core.url_to_fs(self.table_path, **self.storage_options)
            self._root = root.rstrip("/")
            self._fs.makedirs(self._root, exist_ok=True)
        return self._fs, self._root

    def _next_name(self) -> str:
        if self._writer_id is None:
            self._writer_id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        return f"part-{self._writer_id}-{next(self._counter):06d}.parquet"

    def _write_table(self, table: pa.Table, directory: str) -> None:
        fs, _ = self._filesystem()
        fs.makedirs(directory, exist_ok=True)
        path = f"{directory}/{self._next_name()}"
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression=self.compression)
        self.files_written.append(path)
        self.records_written += table.num_rows

    def write(self, data: list[dict[str, Any]]) -> None:
        """Write one batch (no-op for an empty batch)."""
        if not data:
            return
        _, root = self._filesystem()
        rows = [{k: _arrow_ready(v) for k, v in rec.items()} for rec in data]
        if not self.partition_by:
            self._write_table(pa.Table.from_pylist(rows), root)
            return
        missing = [c for c in self.partition_by if c not in rows[0]]
        if missing:
            raise KeyError(
                f"partition_by columns {missing} not in records (fields: {sorted(rows[0])})"
            )
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for rec in rows:
            key = tuple(rec.get(c) for c in self.partition_by)
            groups.setdefault(key, []).append(
                {k: v for k, v in rec.items() if k not in self.partition_by}
            )
        for key, recs in groups.items():
            sub = "/".join(
                _partition_segment(c, v) for c, v in zip(self.partition_by, key, strict=True)
            )
            self._write_table(pa.Table.from_pylist(recs), f"{root}/{sub}")

    def close(self) -> None:
        """Nothing buffered: every batch is already a complete file."""


DataWriterRegistry.register("ParquetDataWriter", ParquetDataWriter)
