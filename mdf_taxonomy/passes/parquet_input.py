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
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mdf_taxonomy.model.config import ON_BAD_FILE
from mdf_taxonomy.model.storage import one_line, storage_unreachable
from mdf_taxonomy.passes.input_report import ITEM_SEP, report_entry, tell_input_report
from mdf_taxonomy.passes.records import parse_arrow

log = logging.getLogger(__name__)

_SEP = ITEM_SEP
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = "*?["
_FOOTER_THREADS = 16  # footers are small reads; remote stores answer them in parallel


class InputError(ValueError):
    """The input cannot be read as Parquet embeddings; the message names the URI or column."""


@dataclass
class _Listing:
    """What get_file_list learnt, pickled with the loader to its actors."""

    files: list[str]  # readable files, sorted
    base: str  # the folder partition paths are relative to
    schema: pa.Schema  # the files' columns, unified, then the partition columns
    partitioning: Any  # a finished pyarrow Partitioning, or None
    rows: dict[str, list[int]]  # rows per row group, from the footers


class ParquetInput:
    """path: a file, a glob, or a (Hive-partitioned) directory, or a list of them, on any
    fsspec storage.

    filter: pushdown predicate in pyarrow's DNF form, e.g. [["kingdom", "==", "Animalia"]]
    (a list of lists means OR of ANDs), or a pyarrow Expression.
    on_bad_file: "fail" or "skip" a file or row group that cannot be read (module doc).
    report_name: the InputReport actor the driver opened for this pass, if any.
    """

    def __init__(self, path: str | list[str], embedding_field: str = "embedding",
                 columns: list[str] | None = None, filter: Any = None,  # noqa: A002 - MDF name
                 partitioning: Any = "hive", batch_rows: int = 4096,
                 storage_options: dict[str, Any] | None = None, on_bad_file: str = "fail",
                 report_name: str | None = None):
        if not path:
            raise InputError("ParquetEmbeddingLoader: path is required")
        if on_bad_file not in ON_BAD_FILE:
            raise InputError(f"ParquetEmbeddingLoader: on_bad_file must be one of "
                             f"{ON_BAD_FILE}, got {on_bad_file!r}")
        self.path = path
        self.embedding_field = embedding_field
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

    # -- driver ----------------------------------------------------------------
    def get_file_list(self, max_samples: int | None = None, num_workers: int = 1) -> list[str]:
        """One entry per non-empty row group, in a stable (sorted) order.

        Files found unreadable here are raised or, with on_bad_file="skip", left out and
        listed in `listing_skipped` (and told to the input report).
        """
        listing = self._list()
        return [f"{path}{_SEP}{rg}" for path in listing.files
                for rg, n in enumerate(listing.rows[path]) if n > 0]

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
                total += ds.Scanner.from_fragment(frag, schema=listing.schema, columns=[],
                                                  filter=expression).count_rows()
            except Exception as e:
                raise InputError(f"cannot count the rows of {path}: {one_line(e)}") from e
        return total

    def count_rows(self) -> int:
        return self.expected_rows(self.get_file_list())

    def dataset(self) -> ds.Dataset:
        """The readable files as one pyarrow Dataset, with the unified schema."""
        listing = self._list()
        return ds.dataset(listing.files, schema=listing.schema, format="parquet",
                          filesystem=_arrow_fs(self._fs()), partitioning=listing.partitioning,
                          partition_base_dir=listing.base)

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
            described.append({"file": posixpath.relpath(path, root), "size": size,
                              "footer_sha256": hashlib.sha256(footer).hexdigest()})
        taken = sorted(posixpath.relpath(item, root) for item in items)
        return {"files": described, "row_groups": taken, "filter": str(self._expression()),
                "columns": self.columns}

    def _expression(self) -> ds.Expression | None:
        if self.filter is None or isinstance(self.filter, ds.Expression):
            return self.filter
        try:
            return pq.filters_to_expression(self.filter)
        except Exception as e:
            raise InputError(f"bad filter {self.filter!r}: {e}") from e

    def _fs(self) -> fsspec.AbstractFileSystem:
        paths = self.path if isinstance(self.path, list) else [self.path]
        try:
            return fsspec.core.url_to_fs(paths[0], **(self.storage_options or {}))[0]
        except (ImportError, ValueError) as e:
            raise InputError(f"cannot open storage of {self.path!r}: {one_line(e)}") from e

    def _storage_error(self, e: BaseException, fs: Any = None, path: str | None = None
                       ) -> InputError | None:
        """An InputError when `e` means the storage cannot be reached, else None.

        pyarrow's fsspec bridge reports an unreachable store as a missing file, so on a
        failed read the file is asked about once more through fsspec itself.
        """
        unreachable = storage_unreachable(e)
        if not unreachable and fs is not None and path is not None:
            try:
                fs.invalidate_cache(path)
                fs.info(path)
            except Exception as probe:  # noqa: BLE001 - only its kind matters
                unreachable = storage_unreachable(probe)
                e = probe if unreachable else e
        if not unreachable:
            return None
        return InputError(f"cannot reach the storage of {self.path!r}: {one_line(e)}")

    def _resolve(self) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
        """(filesystem, sorted files, base folder) of the input paths."""
        fs = self._fs()
        paths = self.path if isinstance(self.path, list) else [self.path]
        files: list[str] = []
        bases: list[str] = []
        ignored: list[str] = []
        try:
            for p in paths:
                root = fsspec.core.url_to_fs(p, **(self.storage_options or {}))[1].rstrip("/")
                if any(ch in root for ch in _GLOB_CHARS):
                    prefix = root[:min(root.index(ch) for ch in _GLOB_CHARS if ch in root)]
                    bases.append(prefix.rsplit("/", 1)[0] if "/" in prefix else "")
                    for match, info in sorted(fs.glob(root, detail=True).items()):
                        if info.get("type") == "directory":
                            files += _parquet_files(fs, match, ignored)
                        else:
                            files.append(match)
                elif fs.isdir(root):
                    bases.append(root)
                    files += _parquet_files(fs, root, ignored)
                else:
                    fs.info(root)  # FileNotFoundError when it does not exist
                    bases.append(posixpath.dirname(root))
                    files.append(root)
        except FileNotFoundError as e:
            raise InputError(f"input {p!r} does not exist") from e
        except Exception as e:  # fsspec backends raise many kinds
            raise self._storage_error(e) or InputError(
                f"cannot read Parquet input {self.path!r}: {one_line(e)}") from e
        if ignored:
            log.info("input %r: ignored %d file(s) without a Parquet extension %s: %s",
                     self.path, len(ignored), PARQUET_SUFFIXES, ", ".join(ignored[:5]))
        if not files:
            what = (f"holds no Parquet files (named *{', *'.join(PARQUET_SUFFIXES)}); ignored: "
                    f"{', '.join(ignored[:5])}") if ignored else "matches no files"
            raise InputError(f"input {self.path!r} {what}")
        base = bases[0] if len(set(bases)) == 1 else posixpath.commonpath(bases)
        return fs, sorted(set(files)), base

    def _list(self) -> _Listing:
        """Read every file's footer, set aside the unreadable and the foreign ones, and
        unify the rest into one schema (with the partition columns)."""
        fs, files, base = self._resolve()
        afs = _arrow_fs(fs)
        with ThreadPoolExecutor(min(_FOOTER_THREADS, len(files))) as pool:
            footers = list(pool.map(lambda p: _footer_or_error(afs, p), files))
        self.listing_skipped = []
        readable: dict[str, tuple[list[int], pa.Schema]] = {}
        for path, (found, error) in zip(files, footers, strict=True):
            if error is None:
                readable[path] = found
                continue
            raise_now = self._storage_error(error, fs, path)
            if raise_now is not None:
                raise raise_now from error
            self._bad(path, None, f"not Parquet, or its footer is unreadable: {one_line(error)}",
                      stage="listing")
        schema, good = self._unify(readable)
        part = None
        if self.partitioning is not None and good:
            one_per_folder = list({posixpath.dirname(p): p for p in good}.values())
            try:
                part = ds.dataset(one_per_folder, format="parquet", filesystem=afs,
                                  partitioning=self.partitioning,
                                  partition_base_dir=base).partitioning
            except Exception as e:
                raise InputError(f"input {self.path!r}: cannot read its partitioning "
                                 f"{self.partitioning!r}: {one_line(e)}") from e
            if part is not None:
                try:
                    schema = pa.unify_schemas([schema, part.schema])
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise InputError(f"input {self.path!r}: a partition column clashes with a "
                                     f"column of the files: {one_line(e)}") from e
        self._listing = _Listing(files=good, base=base, schema=schema, partitioning=part,
                                 rows={p: readable[p][0] for p in good})
        return self._listing

    def _unify(self, readable: dict[str, tuple[list[int], pa.Schema]]
               ) -> tuple[pa.Schema, list[str]]:
        """(schema, files that fit it). The most common schema among the files with a
        usable embedding column is the reference; a file that cannot join it is foreign."""
        usable = [s for _, s in readable.values() if self._embedding_problem(s) is None]
        if not usable:
            names = next(iter(readable.values()))[1].names if readable else []
            if not readable:
                raise InputError(f"input {self.path!r}: no readable Parquet file")
            problem = self._embedding_problem(next(iter(readable.values()))[1])
            if self.embedding_field in names:
                raise InputError(f"input {self.path!r}: {problem}")
            raise InputError(f"input {self.path!r} has no column {self.embedding_field!r} "
                             f"(columns: {names})")
        counts = Counter(_schema_key(s) for s in usable)
        top = counts.most_common(1)[0][0]
        schema = next(s for s in usable if _schema_key(s) == top)
        good = []
        for path, (rows, s) in readable.items():
            problem = self._embedding_problem(s)
            if problem is None:
                try:
                    schema = pa.unify_schemas([schema, s])
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    problem = _type_clash(schema, s)
            if problem is None:
                good.append(path)
            else:
                self._bad(path, sum(rows), f"foreign schema: {problem}", stage="listing")
        return schema, good

    def _embedding_problem(self, schema: pa.Schema) -> str | None:
        """Why the embedding column of `schema` cannot be read, or None."""
        name = self.embedding_field
        if name not in schema.names:
            return f"no column {name!r} (columns: {schema.names})"
        return _list_type_problem(schema.field(name).type, name)

    def _bad(self, item: str, rows: int | None, cause: str, stage: str) -> None:
        """An item that cannot be read: raise (on_bad_file="fail") or log and report it."""
        path, _, rg = item.partition(_SEP)
        what = f"{path} row group {rg}" if rg else path
        if self.on_bad_file == "fail":
            msg = f"cannot read {what}: {cause} (on_bad_file='skip' would skip it)"
            tell_input_report(self.report_name, item, rows, msg, action="failed", stage=stage)
            raise InputError(msg)
        reason = f"cannot read {what}: {cause}"
        log.warning("skipped %s (%s rows): %s", what, "unknown" if rows is None else rows, cause)
        told = tell_input_report(self.report_name, item, rows, reason, stage=stage)
        if not told and self.report_name is not None:
            log.warning("no input report %r to tell: the skip is only logged", self.report_name)
        skipped = self.listing_skipped if stage == "listing" else self.load_skipped
        skipped.append(report_entry(item, rows, reason, stage=stage))

    def _fragment(self, afs: pafs.FileSystem, listing: _Listing, path: str) -> ds.Fragment:
        """One file as a fragment carrying its partition values."""
        expr = None
        if listing.partitioning is not None:  # parse() drops the last part, the file name
            rel = posixpath.relpath(path, listing.base) if listing.base else path
            expr = listing.partitioning.parse(f"/{rel}")
        return ds.ParquetFileFormat().make_fragment(path, filesystem=afs,
                                                    partition_expression=expr)

    # -- loader actors -------------------------------------------------------------
    def load_files(self, file_list: list[str], worker_id: int | None = None,
                   checkpoint: dict | None = None) -> Iterator[dict]:
        """The records of each item in turn; a bad item is raised or skipped on its own."""
        for _, batches in self.read_items(file_list):
            for batch in batches:
                yield from self.batch_to_records(batch)

    def read_items(self, file_list: list[str], columns: list[str] | None = None
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
                    log.info("reading %s failed (attempt %d of 2): %s", item, attempt,
                             one_line(e))
            if batches is None:
                path, rg = _split(item)
                storage = self._storage_error(error, fs, path)
                if storage is not None:
                    tell_input_report(self.report_name, item, None, str(storage),
                                      action="failed")
                    raise storage from error
                rows = listing.rows.get(path, [])
                self._bad(item, rows[rg] if rg < len(rows) else None, one_line(error),
                          stage="load")
                continue
            yield item, batches

    def item_rows(self, item: str) -> int:
        """Rows of one item per its footer (before any filter): for balancing work."""
        path, rg = _split(item)
        listing = self._listing or self._list()
        return listing.rows.get(path, [0] * (rg + 1))[rg]

    def _read_item(self, afs: pafs.FileSystem, listing: _Listing, item: str,
                   frags: dict[str, ds.Fragment], columns: list[str] | None = None
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
        columns = None if columns is None else list(
            dict.fromkeys([*columns, self.embedding_field]))
        scanner = ds.Scanner.from_fragment(
            frag.subset(row_group_ids=[rg]), schema=listing.schema, columns=columns,
            filter=self._expression(), batch_size=self.batch_rows,
            fragment_scan_options=ds.ParquetFragmentScanOptions(
                page_checksum_verification=True))
        return list(scanner.to_batches())

    def batch_to_records(self, batch: pa.RecordBatch) -> Iterator[dict]:
        emb = embeddings_to_numpy(batch.column(self.embedding_field), self.embedding_field)
        others = batch.drop_columns([self.embedding_field]).to_pylist()
        for rec, row in zip(others, emb, strict=True):
            rec[self.embedding_field] = row
            yield rec


def _split(item: str) -> tuple[str, int]:
    path, sep, rg = item.rpartition(_SEP)
    if not sep or not rg.isdigit():
        raise InputError(f"work item {item!r} is not 'path{_SEP}N'")
    return path, int(rg)


def _arrow_fs(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow face of an fsspec filesystem (pyarrow's own for local files)."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _parquet_files(fs: fsspec.AbstractFileSystem, root: str, ignored: list[str]) -> list[str]:
    """Files under `root` with a Parquet extension; the others are added to `ignored`."""
    found = []
    for path in sorted(fs.find(root)):
        rel = posixpath.relpath(path, root)
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        if path.lower().endswith(PARQUET_SUFFIXES):
            found.append(path)
        else:
            ignored.append(rel)
    return found


def _footer(afs: pafs.FileSystem, path: str) -> tuple[list[int], pa.Schema]:
    """(rows per row group, Arrow schema) from a file's footer."""
    frag = ds.ParquetFileFormat().make_fragment(path, filesystem=afs)
    md = frag.metadata
    rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    return rows, frag.physical_schema.remove_metadata()


def _footer_or_error(afs: pafs.FileSystem, path: str
                     ) -> tuple[tuple[list[int], pa.Schema] | None, Exception | None]:
    """_footer, tried twice; the second error is returned rather than raised."""
    try:
        return _footer(afs, path), None
    except Exception:  # noqa: BLE001 - once more, then judged by the caller
        try:
            return _footer(afs, path), None
        except Exception as e:  # noqa: BLE001
            return None, e


def _schema_key(schema: pa.Schema) -> str:
    return schema.to_string(show_field_metadata=False, show_schema_metadata=False)


def _list_type_problem(t: pa.DataType, name: str) -> str | None:
    if pa.types.is_null(t):
        return None  # every row null: each is rejected with a reason downstream
    if pa.types.is_fixed_size_binary(t):
        if t.byte_width % 4:
            return f"column {name!r} has type {t}: not a whole number of float32 values"
        return None  # little-endian float32 values
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return f"column {name!r} has type {t}, expected a list of numbers"
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return f"column {name!r} holds {t.value_type}, expected numbers"
    return None


def _type_clash(schema: pa.Schema, other: pa.Schema) -> str:
    """Which columns of `other` have another type than in `schema`."""
    clashes = [f"column {f.name!r} is {f.type} here, {schema.field(f.name).type} in the other "
               "files" for f in other if f.name in schema.names
               and not f.type.equals(schema.field(f.name).type)]
    return "; ".join(clashes) or "its columns cannot be unified with the other files'"


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
    return [None if nulls[i] else flat[starts[i]:starts[i + 1]] for i in range(len(lengths))]
