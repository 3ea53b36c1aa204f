"""Finding the Parquet files of an input and reading their footers: the driver's half of
ParquetInput (see passes/parquet_input.py for what is read and how bad input is handled).

Footers give every row group's row count before any data is read, so work is split by row
group and a pass is accounted against the input exactly; a file whose footer or schema is
unusable is set aside here, once, rather than by every loader.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from mdf_taxonomy.model.storage import one_line, storage_unreachable
from mdf_taxonomy.passes.arrow_rows import find_embedding_field
from mdf_taxonomy.passes.input_report import ITEM_SEP, report_entry, tell_input_report

# ParquetInput's logger: what the listing finds or skips is news about the input
log = logging.getLogger("mdf_taxonomy.passes.parquet_input")

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


class ListingMixin:
    """The listing, footers and bad-file handling of ParquetInput, which sets these
    attributes (documented there) in its __init__."""

    path: str | list[str]
    embedding_field: str
    _embedding_field: str | None
    filter: Any
    partitioning: Any
    storage_options: dict[str, Any] | None
    on_bad_file: str
    report_name: str | None
    listing_skipped: list[dict[str, Any]]
    load_skipped: list[dict[str, Any]]
    _listing: _Listing | None

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

    def _storage_error(
        self, e: BaseException, fs: Any = None, path: str | None = None
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
                    prefix = root[: min(root.index(ch) for ch in _GLOB_CHARS if ch in root)]
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
                f"cannot read Parquet input {self.path!r}: {one_line(e)}"
            ) from e
        if ignored:
            log.info(
                "input %r: ignored %d file(s) without a Parquet extension %s: %s",
                self.path,
                len(ignored),
                PARQUET_SUFFIXES,
                ", ".join(ignored[:5]),
            )
        if not files:
            what = (
                (
                    f"holds no Parquet files (named *{', *'.join(PARQUET_SUFFIXES)}); ignored: "
                    f"{', '.join(ignored[:5])}"
                )
                if ignored
                else "matches no files"
            )
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
            self._bad(
                path,
                None,
                f"not Parquet, or its footer is unreadable: {one_line(error)}",
                stage="listing",
            )
        schema, good = self._unify(readable)
        part = None
        if self.partitioning is not None and good:
            one_per_folder = list({posixpath.dirname(p): p for p in good}.values())
            try:
                part = ds.dataset(
                    one_per_folder,
                    format="parquet",
                    filesystem=afs,
                    partitioning=self.partitioning,
                    partition_base_dir=base,
                ).partitioning
            except Exception as e:
                raise InputError(
                    f"input {self.path!r}: cannot read its partitioning "
                    f"{self.partitioning!r}: {one_line(e)}"
                ) from e
            if part is not None:
                try:
                    schema = pa.unify_schemas([schema, part.schema])
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise InputError(
                        f"input {self.path!r}: a partition column clashes with a "
                        f"column of the files: {one_line(e)}"
                    ) from e
        self._listing = _Listing(
            files=good,
            base=base,
            schema=schema,
            partitioning=part,
            rows={p: readable[p][0] for p in good},
        )
        return self._listing

    def _unify(
        self, readable: dict[str, tuple[list[int], pa.Schema]]
    ) -> tuple[pa.Schema, list[str]]:
        """(schema, files that fit it). The most common schema among the files with a
        usable embedding column is the reference; a file that cannot join it is foreign."""
        if self._embedding_field is None and readable:
            self._embedding_field = self._find_embedding_field(readable)
        usable = [s for _, s in readable.values() if self._embedding_problem(s) is None]
        if not usable:
            names = next(iter(readable.values()))[1].names if readable else []
            if not readable:
                raise InputError(f"input {self.path!r}: no readable Parquet file")
            problem = self._embedding_problem(next(iter(readable.values()))[1])
            if self.embedding_field in names:
                raise InputError(f"input {self.path!r}: {problem}")
            raise InputError(
                f"input {self.path!r} has no column {self.embedding_field!r} (columns: {names})"
            )
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

    def _find_embedding_field(self, readable: dict[str, tuple[list[int], pa.Schema]]) -> str:
        """The column of float vectors most files have (embedding_field=None); files that
        disagree evenly, or have none or several, are an error that names them."""
        found: dict[str, list[str]] = {}
        problems = []
        for path, (_, schema) in readable.items():
            try:
                found.setdefault(find_embedding_field(schema), []).append(path)
            except ValueError as e:
                problems.append(f"{path}: {e}")
        ranked = sorted(found.items(), key=lambda kv: -len(kv[1]))
        if not ranked:
            raise InputError(f"input {self.path!r}: {problems[0]}")
        if len(ranked) > 1 and len(ranked[0][1]) == len(ranked[1][1]):
            said = "; ".join(
                f"{name!r} in {paths[0]} and {len(paths) - 1} more" for name, paths in ranked
            )
            raise InputError(
                f"input {self.path!r}: the files disagree on the embedding column ({said}): "
                "set embedding_field"
            )
        name = ranked[0][0]
        log.info("input %r: embedding_field %r (the one column of float vectors)", self.path, name)
        return name

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
        return ds.ParquetFileFormat().make_fragment(path, filesystem=afs, partition_expression=expr)


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


def _footer_or_error(
    afs: pafs.FileSystem, path: str
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
    clashes = [
        f"column {f.name!r} is {f.type} here, {schema.field(f.name).type} in the other files"
        for f in other
        if f.name in schema.names and not f.type.equals(schema.field(f.name).type)
    ]
    return "; ".join(clashes) or "its columns cannot be unified with the other files'"
