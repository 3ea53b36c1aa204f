"""Our writers: labelled output partitioned by node, and a writer for passes whose records
are not kept (the fit's intermediate passes)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mdf_taxonomy import _mdf
from mdf_taxonomy._mdf import DataWriter
from mdf_taxonomy.passes.parquet_sink import ParquetSink


class DiscardWriter(DataWriter):
    """Counts what it is given and keeps nothing; MDF needs some writer per pipeline.

    It takes no parameters (a YAML's `params: {}`); `records` counts the records seen.
    """

    def __init__(self) -> None:
        self.records = 0

    def write(self, data: list[dict]) -> None:
        self.records += len(data)

    def close(self) -> None:
        pass


class PartitionedParquetWriter(DataWriter):
    """Labelled records as Parquet in Hive folders by node, with bounded files.

    MDF's ParquetDataWriter writes one file per batch and partition value; this writer
    keeps one growing file per value (a ParquetSink), so a crawl labelled in batches of
    1,024 makes a few files per node, and `pyarrow.dataset(output_path,
    partitioning="hive")` filtered on the partition columns reads only their folders.
    The partition columns live in the folder names, not in the files. Under a runtime
    that never closes its writers (MDF's Executor) every file is finished within the
    write that starts it, so there the files are bounded by batches, as MDF's are; the
    columnar labelling pass, which `mdf-taxonomy run` uses wherever a pipeline allows,
    keeps one growing file per node per worker on either runtime.

    Parameters
    ----------
    output_path : str
        The output folder, on any fsspec storage; required.
    partition_by : str or list of str or None, default=None
        Columns that name the folders, e.g. taxonomy_l1 (None: no folders).
    max_rows_per_file : int, default=1048576
        Rows after which a partition's file is finished and the next one started.
    compression : str, default='snappy'
        Parquet compression codec.
    storage_options : dict or None, default=None
        fsspec options for output_path (credentials, endpoint).
    """

    def __init__(
        self,
        output_path: str,
        partition_by: str | list[str] | None = None,
        max_rows_per_file: int = 1 << 20,
        compression: str = "snappy",
        storage_options: dict[str, Any] | None = None,
    ):
        if not output_path:
            raise ValueError("PartitionedParquetWriter: output_path is required")
        self.output_path = output_path
        self.partition_by = [partition_by] if isinstance(partition_by, str) else partition_by
        self.max_rows_per_file = max_rows_per_file
        self.compression = compression
        self.storage_options = storage_options
        self.records = 0
        self._sink: ParquetSink | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_sink": None}  # a copy in another process opens its own

    def write(self, data: list[dict]) -> None:
        if not data:
            return
        if self._sink is None:
            self._sink = ParquetSink(
                self.output_path,
                self.partition_by or (),
                self.storage_options,
                self.max_rows_per_file,
                self.compression,
            )
        self._sink.write(pa.Table.from_pylist(data))
        self.records += len(data)
        if not _mdf.CLOSES_WRITERS:  # no close() will come: leave no file unfinished
            self.close()

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
