"""Labelled output partitioned by node: Parquet files that grow by appended tables, in
Hive folders (`taxonomy_l1=7/part-....parquet`).

A sink keeps one open file per partition value and starts a new one after
`max_rows_per_file` rows, so the files of a partition are bounded by the rows one writer
saw, not by its batches (MDF's ParquetDataWriter writes a file per batch and value, which
makes millions of small files on a crawl). The partition columns are left out of the
files, as Hive readers (pyarrow.dataset, Spark, DuckDB) expect: the folder names hold them,
and a filter on them reads only the matching folders.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # pyarrow's and Hive's folder name for a null


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary pages: those whose values repeat (paths, ids, labels), never
    vectors or floats, which only pay for a dictionary they then drop."""
    return [
        f.name
        for f in schema
        if not (
            pa.types.is_nested(f.type)
            or pa.types.is_fixed_size_binary(f.type)
            or pa.types.is_floating(f.type)
        )
    ]


@dataclass
class _OpenFile:
    path: str
    handle: Any
    writer: pq.ParquetWriter
    rows: int = 0


class ParquetSink:
    """Appends Arrow tables to Parquet files under `uri`, split into Hive folders by
    `partition_by`; `close()` finishes every file and returns their paths.

    Parameters
    ----------
    uri : str
        The output folder, on any fsspec storage.
    partition_by : sequence of str, default=()
        Columns whose values name the folders (none: every file directly under `uri`).
    storage_options : dict or None, default=None
        fsspec options for `uri`.
    max_rows_per_file : int, default=1048576
        Rows after which a partition's file is finished and the next one started.
    compression : str, default='snappy'
        Parquet compression codec.
    """

    def __init__(
        self,
        uri: str,
        partition_by: Sequence[str] = (),
        storage_options: dict[str, Any] | None = None,
        max_rows_per_file: int = 1 << 20,
        compression: str = "snappy",
    ):
        if max_rows_per_file < 1:
            raise ValueError(f"max_rows_per_file must be >= 1, got {max_rows_per_file}")
        self.fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.partition_by = list(partition_by)
        self.max_rows_per_file = max_rows_per_file
        self.compression = compression
        self.files: list[str] = []
        self._open: dict[str, _OpenFile] = {}
        self._name = f"part-{os.getpid()}-{uuid.uuid4().hex[:12]}"  # unique per writer

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if not self.partition_by:
            self._append("", table)
            return
        missing = [c for c in self.partition_by if c not in table.column_names]
        if missing:
            raise KeyError(
                f"partition_by column(s) {missing} not in the output (columns: "
                f"{table.column_names})"
            )
        for folder, part in self._split(table):
            self._append(folder, part.drop_columns(self.partition_by))

    def _split(self, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """The table's rows grouped by their partition values, in first-seen order."""
        codes = np.zeros(table.num_rows, dtype=np.int64)
        dictionaries = []
        for name in self.partition_by:
            encoded = pc.dictionary_encode(table.column(name)).combine_chunks()
            index = encoded.indices.fill_null(len(encoded.dictionary)).to_numpy()
            codes = codes * (len(encoded.dictionary) + 1) + index
            dictionaries.append(encoded.dictionary.to_pylist())
        _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))[:-1]
        groups = sorted(zip(first, np.split(order, bounds), strict=True), key=lambda g: g[0])
        out = []
        for row, rows in groups:
            segments = []
            for name in self.partition_by:
                value = table.column(name)[int(row)].as_py()
                text = HIVE_NULL if value is None else quote(str(value), safe="")
                segments.append(f"{name}={text}")
            out.append(("/".join(segments), table.take(rows)))
        return out

    def _append(self, folder: str, table: pa.Table) -> None:
        current = self._open.get(folder)
        if current is not None:
            table = self._conform(current, table)
            full = current.rows >= self.max_rows_per_file
            if full or not table.schema.equals(current.writer.schema):
                self._finish(folder)
                current = None
        if current is None:
            current = self._start(folder, table.schema)
        current.writer.write_table(table)
        current.rows += table.num_rows

    @staticmethod
    def _conform(current: _OpenFile, table: pa.Table) -> pa.Table:
        """`table` in the open file's schema where a cast keeps its values (a batch whose
        values were all null has a null-typed column); else `table` as it is."""
        schema = current.writer.schema
        if table.schema.equals(schema) or set(table.column_names) != set(schema.names):
            return table  # another set of columns: a new file, never a dropped column
        try:
            return table.select(schema.names).cast(schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            log.info("output schema changed in %s: starting a new file", current.path)
            return table

    def _start(self, folder: str, schema: pa.Schema) -> _OpenFile:
        directory = f"{self.root}/{folder}" if folder else self.root
        self.fs.makedirs(directory, exist_ok=True)
        path = f"{directory}/{self._name}-{len(self.files):06d}.parquet"
        handle = self.fs.open(path, "wb")
        writer = pq.ParquetWriter(
            handle,
            schema,
            compression=self.compression,
            use_dictionary=dictionary_columns(schema),
        )
        self.files.append(path)
        self._open[folder] = opened = _OpenFile(path, handle, writer)
        return opened

    def _finish(self, folder: str) -> None:
        current = self._open.pop(folder)
        current.writer.close()
        current.handle.close()

    def close(self) -> list[str]:
        """Finish every open file; the paths of all files written."""
        for folder in list(self._open):
            self._finish(folder)
        return list(self.files)
