"""The loader MDF lacks: Parquet embeddings from any fsspec URI through pyarrow.dataset.

Work is split by row group ("file::rg"), so one big file still feeds many loader
actors. Columns are projected and `filter` is pushed down to the Parquet reader.
Embeddings come out as float32 numpy rows (views into one buffer per record batch),
which MDF's writers keep as list<float>.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from mdf_taxonomy._mdf import DataLoader

_SEP = "::rg="


class InputError(ValueError):
    """The input cannot be read as Parquet embeddings; the message names the URI or column."""


class ParquetEmbeddingLoader(DataLoader):
    """path: a file, a glob, or a (Hive-partitioned) directory, on any fsspec storage.

    filter: pushdown predicate in pyarrow's DNF form, e.g. [["kingdom", "==", "Animalia"]]
    (a list of lists means OR of ANDs), or a pyarrow Expression.
    """

    def __init__(self, path: str | list[str], embedding_field: str = "embedding",
                 columns: list[str] | None = None, filter: Any = None,  # noqa: A002 - MDF name
                 partitioning: str | None = "hive", batch_rows: int = 4096,
                 storage_options: dict[str, Any] | None = None):
        if not path:
            raise InputError("ParquetEmbeddingLoader: path is required")
        self.path = path
        self.embedding_field = embedding_field
        self.columns = columns
        self.filter = filter
        self.partitioning = partitioning
        self.batch_rows = batch_rows
        self.storage_options = storage_options

    # -- driver ----------------------------------------------------------------
    def dataset(self) -> ds.Dataset:
        paths = self.path if isinstance(self.path, list) else [self.path]
        try:
            fs, _ = fsspec.core.url_to_fs(paths[0], **(self.storage_options or {}))
            resolved: list[str] = []
            for p in paths:
                _, root = fsspec.core.url_to_fs(p, **(self.storage_options or {}))
                if any(ch in root for ch in "*?["):
                    resolved += sorted(fs.glob(root))
                elif fs.isdir(root):
                    resolved.append(root)
                elif fs.exists(root):
                    resolved.append(root)
                else:
                    raise InputError(f"input {p!r} does not exist")
            if not resolved:
                raise InputError(f"input {self.path!r} matches no files")
            source = resolved[0] if len(resolved) == 1 else resolved
            dset = ds.dataset(source, format="parquet", filesystem=fs,
                              partitioning=self.partitioning if len(resolved) == 1 else None)
        except InputError:
            raise
        except Exception as e:  # pyarrow/fsspec raise many kinds
            raise InputError(f"cannot read Parquet input {self.path!r}: {e}") from e
        if self.embedding_field not in dset.schema.names:
            raise InputError(
                f"input {self.path!r} has no column {self.embedding_field!r} "
                f"(columns: {dset.schema.names})"
            )
        return dset

    def get_file_list(self, max_samples: int | None = None, num_workers: int = 1) -> list[str]:
        """One entry per row group, in a stable (sorted) order."""
        items: list[str] = []
        for frag in sorted(self.dataset().get_fragments(), key=lambda f: f.path):
            for rg in range(frag.metadata.num_row_groups):
                items.append(f"{frag.path}{_SEP}{rg}")
        return items

    def describe_input(self, items: list[str]) -> dict[str, Any]:
        """What identifies this input for a fit's fingerprint: its content, not its spelling.

        Per file: its path within the input (so the same data read through another
        relative path, or copied elsewhere, is the same fit), size, rows and a hash of
        its Parquet footer (which changes when the file is rewritten); then the filter,
        the projected columns and the row groups taken.
        """
        paths = self.path if isinstance(self.path, list) else [self.path]
        fs, _ = fsspec.core.url_to_fs(paths[0], **(self.storage_options or {}))
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

    def count_rows(self) -> int:
        return self.dataset().count_rows(filter=self._expression())

    def _expression(self) -> ds.Expression | None:
        if self.filter is None or isinstance(self.filter, ds.Expression):
            return self.filter
        try:
            return pq.filters_to_expression(self.filter)
        except Exception as e:
            raise InputError(f"bad filter {self.filter!r}: {e}") from e

    # -- loader actors -------------------------------------------------------------
    def load_files(self, file_list: list[str], worker_id: int | None = None,
                   checkpoint: dict | None = None) -> Iterator[dict]:
        dset = self.dataset()
        by_path = {f.path: f for f in dset.get_fragments()}
        columns = None if self.columns is None else list(
            dict.fromkeys([*self.columns, self.embedding_field]))
        expression = self._expression()
        for item in file_list:
            path, rg = item.rsplit(_SEP, 1)
            frag = by_path[path].subset(row_group_ids=[int(rg)])
            scanner = ds.Scanner.from_fragment(
                frag, schema=dset.schema, columns=columns, filter=expression,
                batch_size=self.batch_rows)
            for batch in scanner.to_batches():
                yield from self.batch_to_records(batch)

    def batch_to_records(self, batch: pa.RecordBatch) -> Iterator[dict]:
        emb = embeddings_to_numpy(batch.column(self.embedding_field), self.embedding_field)
        others = batch.drop_columns([self.embedding_field]).to_pylist()
        for rec, row in zip(others, emb, strict=True):
            rec[self.embedding_field] = row
            yield rec


def embeddings_to_numpy(column: pa.Array, name: str = "embedding") -> list[np.ndarray | None]:
    """Rows of a list/large_list/fixed_size_list float column as float32 arrays (None for null).

    Rows keep their own length, so a wrong-length row reaches the operator, which
    rejects it with a reason rather than the loader failing the whole batch.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise InputError(f"column {name!r} has type {t}, expected a list of floats")
    if not pa.types.is_floating(t.value_type) and not pa.types.is_integer(t.value_type):
        raise InputError(f"column {name!r} holds {t.value_type}, expected floats")
    values = column.flatten() if column.null_count == 0 else pc.list_flatten(column)
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if pa.types.is_fixed_size_list(t):
        lengths = np.where(column.is_null().to_numpy(zero_copy_only=False), 0, t.list_size)
    else:
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    if not nulls.any() and len(lengths) and (lengths == lengths[0]).all():
        return list(flat.reshape(len(lengths), int(lengths[0])))
    return [None if nulls[i] else flat[starts[i]:starts[i + 1]] for i in range(len(lengths))]
