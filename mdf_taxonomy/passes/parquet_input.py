"""Parquet embeddings from any fsspec URI through pyarrow.dataset: listing, row counts,
bad files. The columnar pass reads through it, and MDF's face of it is
operators.ParquetEmbeddingLoader.

Work is split by row group ("file::rg=N"), so one big file still feeds many loader
actors. Columns are projected and `filter` is pushed down to the Parquet reader.
Every column passes through with its own type: embeddings come out as numpy rows of
the column's value type (views into one buffer per record batch); the operators
convert them for their arithmetic.

What is read:
- a directory, recursively: files named *.parquet, *.parq or *.pq. Names starting with
  "_" or "." (_SUCCESS, .crc) are passed over as pyarrow does; other files (README.md)
  are ignored by extension and logged. A file or a glob is taken as given.
- Hive partition columns (`kingdom=Animalia/`) of the paths below the input's base
  folder: the directory itself, a glob's fixed prefix, or the common folder of several
  paths.
- the union of the files' columns; a column missing from a file is null in its rows.

Bad input (`on_bad_file`): a file or row group that cannot be read (truncated, corrupt
page, not Parquet, a foreign schema without the embedding column or with other types)
is retried once, then fails the job ("fail", the default) with one line naming it and
the cause, or is skipped ("skip"): logged at WARNING with its rows, kept in
`listing_skipped` when found by get_file_list, and told to the driver's InputReport
actor when `report_name` names one. A storage that cannot be reached is never skipped.
A row group is read whole before its records are handed out, so a skipped item gives
no rows and `expected_rows` accounts for it exactly.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from mdf_taxonomy.model.config import ON_BAD_FILE
from mdf_taxonomy.model.storage import one_line
from mdf_taxonomy.passes.input_report import tell_input_report
from mdf_taxonomy.passes.parquet_listing import (
    _SEP,
    InputError,
    ListingMixin,
    _arrow_fs,
    _footer,
    _list_type_problem,
    _Listing,
    _split,
    _type_clash,
)
from mdf_taxonomy.passes.records import parse_arrow

__all__ = ["ON_BAD_FILE", "InputError", "ParquetInput", "embeddings_to_numpy"]

log = logging.getLogger(__name__)


class ParquetInput(ListingMixin):
    """Parquet embeddings from any fsspec storage, read by row group: one reader for the
    columnar pass and for MDF's loader, so both see the same rows and the same bad files.

    Parameters
    ----------
    path : str or list of str
        A file, a glob, or a (Hive-partitioned) directory, or a list of them, on any
        fsspec storage; required.
    embedding_field : str or None, default=None
        The column holding the vectors; it is always read, whatever `columns` says. None:
        the one column of float vectors (list, large_list or fixed_size_list of floats,
        or fixed_size_binary of float32), found in the files and logged; none or several
        is an error that lists the columns.
    columns : list of str or None, default=None
        The columns to read besides the embedding (None: every column).
    filter : list or pyarrow Expression or None, default=None
        Pushdown predicate in pyarrow's DNF form, e.g. [["kingdom", "==", "Animalia"]] (a
        list of lists means OR of ANDs), or a pyarrow Expression; None reads every row.
    partitioning : str or pyarrow Partitioning or None, default='hive'
        How folder names below the input's base give columns (None: they give none).
    batch_rows : int, default=4096
        Rows per record batch handed out of a row group.
    storage_options : dict or None, default=None
        Passed to fsspec to open the storage (credentials, endpoint).
    on_bad_file : str, default='fail'
        "fail" or "skip" a file or row group that cannot be read (see the module doc).
    report_name : str or None, default=None
        The InputReport actor the driver opened for this pass, told of every skip.
    """

    def __init__(
        self,
        path: str | list[str],
        embedding_field: str | None = None,
        columns: list[str] | None = None,
        filter: Any = None,  # noqa: A002 - MDF name
        partitioning: Any = "hive",
        batch_rows: int = 4096,
        storage_options: dict[str, Any] | None = None,
        on_bad_file: str = "fail",
        report_name: str | None = None,
    ):
        paths = [path] if isinstance(path, str) else path
        if not isinstance(paths, list | tuple) or not all(isinstance(p, str) for p in paths):
            raise InputError(
                "ParquetEmbeddingLoader: path must be a storage URI or a list of them, got "
                f"{type(path).__name__} (write an array to Parquet first to fit it)"
            )
        if not paths or not all(paths):
            raise InputError("ParquetEmbeddingLoader: path is required")
        if on_bad_file not in ON_BAD_FILE:
            raise InputError(
                f"ParquetEmbeddingLoader: on_bad_file must be one of "
                f"{ON_BAD_FILE}, got {on_bad_file!r}"
            )
        self.path = path
        self._embedding_field = embedding_field
        self.columns = columns
        self.filter = filter
        self.partitioning = partitioning
        self.batch_rows = batch_rows
        self.storage_options = storage_options
        self.on_bad_file = on_bad_file
        self.report_name = report_name
        self.listing_skipped: list[dict[str, Any]] = []  # by get_file_list, in this process
        self.load_skipped: list[dict[str, Any]] = []  # by load_files, in this process
        self._listing: _Listing | None = None

    @property
    def embedding_field(self) -> str:
        """The column read as the embedding: as given, or found when the files are listed."""
        if self._embedding_field is None:
            self._list()
        return self._embedding_field

    # -- driver ----------------------------------------------------------------
    def get_file_list(self, max_samples: int | None = None, num_workers: int = 1) -> list[str]:
        """One entry per non-empty row group, in a stable (sorted) order.

        Files found unreadable here are raised or, with on_bad_file="skip", left out and
        listed in `listing_skipped` (and told to the input report).
        """
        listing = self._list()
        return [
            f"{path}{_SEP}{rg}"
            for path in listing.files
            for rg, n in enumerate(listing.rows[path])
            if n > 0
        ]

    def expected_rows(self, items: list[str]) -> int:
        """Rows `items` hold per their Parquet footers; with a `filter`, the rows that pass it
        (counted by pyarrow). The driver checks a pass against it: rows the loaders gave ==
        expected_rows(items that were not skipped)."""
        by_file: dict[str, list[int]] = {}
        for item in items:
            path, rg = _split(item)
            by_file.setdefault(path, []).append(rg)
        expression = self._expression()
        if expression is None:
            known = self._listing.rows if self._listing is not None else {}
            afs = None
            total = 0
            for path, rgs in by_file.items():
                rows = known.get(path)
                if rows is None:
                    afs = afs or _arrow_fs(self._fs())
                    try:
                        rows = _footer(afs, path)[0]
                    except Exception as e:
                        raise InputError(f"cannot read the footer of {path}: {one_line(e)}") from e
                total += sum(rows[rg] for rg in rgs)
            return total
        listing = self._listing or self._list()
        afs = _arrow_fs(self._fs())
        total = 0
        for path, rgs in by_file.items():
            try:
                frag = self._fragment(afs, listing, path).subset(row_group_ids=sorted(rgs))
                total += ds.Scanner.from_fragment(
                    frag, schema=listing.schema, columns=[], filter=expression
                ).count_rows()
            except Exception as e:
                raise InputError(f"cannot count the rows of {path}: {one_line(e)}") from e
        return total

    def count_rows(self) -> int:
        return self.expected_rows(self.get_file_list())

    def dataset(self) -> ds.Dataset:
        """The readable files as one pyarrow Dataset, with the unified schema."""
        listing = self._list()
        return ds.dataset(
            listing.files,
            schema=listing.schema,
            format="parquet",
            filesystem=_arrow_fs(self._fs()),
            partitioning=listing.partitioning,
            partition_base_dir=listing.base,
        )

    def describe_input(self, items: list[str]) -> dict[str, Any]:
        """What identifies this input for a fit's fingerprint: its content, not its spelling.

        Per file: its path within the input (so the same data read through another
        relative path, or copied elsewhere, is the same fit), size, rows and a hash of
        its Parquet footer (which changes when the file is rewritten); then the filter,
        the projected columns and the row groups taken.
        """
        fs = self._fs()
        files = sorted({item.rsplit(_SEP, 1)[0] for item in items})
        root = posixpath.dirname(files[0]) if len(files) == 1 else posixpath.commonpath(files)
        described = []
        for path in files:
            size = int(fs.size(path))
            tail = fs.cat_file(path, start=max(0, size - 8), end=size)
            footer_len = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
            footer = fs.cat_file(path, start=max(0, size - 8 - footer_len), end=size)
            described.append(
                {
                    "file": posixpath.relpath(path, root),
                    "size": size,
                    "footer_sha256": hashlib.sha256(footer).hexdigest(),
                }
            )
        taken = sorted(posixpath.relpath(item, root) for item in items)
        return {
            "files": described,
            "row_groups": taken,
            "filter": str(self._expression()),
            "columns": self.columns,
        }

    # -- loader actors -------------------------------------------------------------
    def load_files(
        self, file_list: list[str], worker_id: int | None = None, checkpoint: dict | None = None
    ) -> Iterator[dict]:
        """The records of each item in turn; a bad item is raised or skipped on its own."""
        for _, batches in self.read_items(file_list):
            for batch in batches:
                yield from self.batch_to_records(batch)

    def read_items(
        self, file_list: list[str], columns: list[str] | None = None
    ) -> Iterator[tuple[str, list[pa.RecordBatch]]]:
        """(item, its record batches) for each readable item, in order; a bad item is
        retried once, then raised or skipped (on_bad_file). `columns` overrides the
        projection (the embedding column is always read)."""
        listing = self._listing or self._list()
        fs = self._fs()
        afs = _arrow_fs(fs)
        frags: dict[str, ds.Fragment] = {}  # the current file's, its footer read once
        for item in file_list:
            batches = None
            for attempt in (1, 2):
                try:
                    batches = self._read_item(afs, listing, item, frags, columns)
                    break
                except Exception as e:  # noqa: BLE001 - retried once, then fail or skip
                    frags.clear()
                    error = e
                    log.info("reading %s failed (attempt %d of 2): %s", item, attempt, one_line(e))
            if batches is None:
                path, rg = _split(item)
                storage = self._storage_error(error, fs, path)
                if storage is not None:
                    tell_input_report(self.report_name, item, None, str(storage), action="failed")
                    raise storage from error
                rows = listing.rows.get(path, [])
                self._bad(item, rows[rg] if rg < len(rows) else None, one_line(error), stage="load")
                continue
            yield item, batches

    def item_rows(self, item: str) -> int:
        """Rows of one item per its footer (before any filter): for balancing work."""
        path, rg = _split(item)
        listing = self._listing or self._list()
        return listing.rows.get(path, [0] * (rg + 1))[rg]

    def _read_item(
        self,
        afs: pafs.FileSystem,
        listing: _Listing,
        item: str,
        frags: dict[str, ds.Fragment],
        columns: list[str] | None = None,
    ) -> list[pa.RecordBatch]:
        """All batches of one row group (read whole, so a failure gives no rows)."""
        path, rg = _split(item)
        frag = frags.get(path)
        if frag is None:
            frags.clear()
            frag = frags[path] = self._fragment(afs, listing, path)
        problem = self._embedding_problem(frag.physical_schema)
        if problem is None:
            try:
                pa.unify_schemas([listing.schema, frag.physical_schema])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                problem = _type_clash(listing.schema, frag.physical_schema)
        if problem is not None:
            raise InputError(f"foreign schema: {problem}")
        if rg >= frag.num_row_groups:
            raise InputError(f"the file has {frag.num_row_groups} row groups now")
        columns = columns if columns is not None else self.columns
        columns = None if columns is None else list(dict.fromkeys([*columns, self.embedding_field]))
        scanner = ds.Scanner.from_fragment(
            frag.subset(row_group_ids=[rg]),
            schema=listing.schema,
            columns=columns,
            filter=self._expression(),
            batch_size=self.batch_rows,
            fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True),
        )
        return list(scanner.to_batches())

    def batch_to_records(self, batch: pa.RecordBatch) -> Iterator[dict]:
        emb = embeddings_to_numpy(batch.column(self.embedding_field), self.embedding_field)
        others = batch.drop_columns([self.embedding_field]).to_pylist()
        for rec, row in zip(others, emb, strict=True):
            rec[self.embedding_field] = row
            yield rec


def embeddings_to_numpy(column: pa.Array, name: str = "embedding") -> list[np.ndarray | None]:
    """Rows of a list/large_list/fixed_size_list numeric column as numpy arrays of the
    column's own value type (None for null).

    Rows keep their own length, so a wrong-length row reaches the operator, which
    rejects it with a reason rather than the loader failing the whole batch.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if pa.types.is_null(t):
        return [None] * len(column)
    problem = _list_type_problem(t, name)
    if problem is not None:
        raise InputError(problem)
    if pa.types.is_fixed_size_binary(t):
        parsed = parse_arrow(column, name, t.byte_width // 4)
        rows: list[np.ndarray | None] = [None] * len(column)
        for j, i in enumerate(parsed.valid):
            rows[i] = parsed.x[j]
        for i, reason in parsed.errors.items():  # keep bad values for the operator to name
            if not reason.startswith("missing_embedding"):
                rows[i] = np.frombuffer(column[i].as_py(), dtype="<f4")
        return rows
    values = column.flatten() if column.null_count == 0 else pc.list_flatten(column)
    flat = values.to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(t):
        lengths = np.where(column.is_null().to_numpy(zero_copy_only=False), 0, t.list_size)
    else:
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    if not nulls.any() and len(lengths) and (lengths == lengths[0]).all():
        return list(flat.reshape(len(lengths), int(lengths[0])))
    return [None if nulls[i] else flat[starts[i] : starts[i + 1]] for i in range(len(lengths))]
