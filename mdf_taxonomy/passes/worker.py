"""One worker of the columnar pass: its share of the row groups, read, cached and folded.

A fit is many passes over the same input, so a worker lives for the whole fit: it holds
its share of the row groups, the device, and, where they fit in `cache_bytes`, the
decoded rows, so a pass after the first costs kernel time only. Reader threads decode
the next row groups while the kernels work. A pass folds into one exact int64 partial
(or one bottom-k per parent), so it sends one message per worker, whatever the rows.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mdf_taxonomy.backend.combiner import PartialsCombiner
from mdf_taxonomy.kernels import make_assigner
from mdf_taxonomy.model import Taxonomy
from mdf_taxonomy.model.balance import sample_sizes
from mdf_taxonomy.model.config import RunConfig
from mdf_taxonomy.model.fitting import mark_overflowed
from mdf_taxonomy.model.phase import Phase
from mdf_taxonomy.model.sampling import BottomK
from mdf_taxonomy.passes import batch
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.parquet_listing import _arrow_fs
from mdf_taxonomy.passes.parquet_sink import ParquetSink, dictionary_columns
from mdf_taxonomy.passes.records import ParsedBatch, parse_arrow

#: Row groups decoded ahead of the kernels, per reader thread.
PREFETCH_PER_READER = 2
#: Cached rows are joined into chunks of at most this many rows (under the fixed-point
#: sums' MAX_ROWS_PER_SUM) and bytes, so a pass from the cache is a few kernel calls.
CHUNK_ROWS = 1 << 21
CHUNK_BYTES = 1 << 30


@dataclass
class _Decoded:
    """One row group, parsed: the prepared rows (None if rejected all) and the reasons."""

    x: torch.Tensor | None
    parsed: ParsedBatch  # x dropped (the tensor above holds the rows)
    rows: int


@dataclass
class WorkerTotals:
    """What one worker gathered in one pass."""

    loaded: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    sums: np.ndarray | None = None
    counts: np.ndarray | None = None
    samples: BottomK = field(default_factory=BottomK)
    parent_rows: dict[int, int] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _add(target: dict, new: dict) -> None:
    for k, v in new.items():
        target[k] = target.get(k, 0) + v


class PassWorker:
    """Reads its share of the row groups and runs each pass's arithmetic over them."""

    def __init__(
        self, source: ParquetInput, items: list[str], index: dict[str, int], run: RunConfig
    ):
        self.source = source
        self.items = items
        self.index = index  # item -> its place in the whole input (output file names)
        self.run = run
        self.assigner = make_assigner(run.kernel_backend)  # the kernels, chosen once
        self.device = _device(run.device)
        self.dtype = batch.COMPUTE_DTYPES[run.compute_dtype]
        # in this process every core decodes; an actor decodes on its own share
        self.readers = max(
            1, int(os.cpu_count() or 1) if run.num_replicas == 1 else int(run.cpus_per_replica or 1)
        )
        self.cache: dict[str, _Decoded] = {}
        self.chunks: list[_Decoded] | None = None  # the cache, joined once complete
        self.cache_budget = (
            _default_cache_bytes(self.device) if run.cache_bytes is None else run.cache_bytes
        )
        self.cache_used = 0
        self.read_wait_s = 0.0  # time the kernels waited for a decoded row group
        self._cache_key: tuple | None = None  # (dim, metric): the rows as prepared

    # -- reading ---------------------------------------------------------------------
    def _decode(
        self, tax: Taxonomy, batches: list[pa.RecordBatch]
    ) -> tuple[_Decoded, pa.Table | None]:
        table = pa.Table.from_batches(batches, schema=batches[0].schema) if batches else None
        field = self.source.embedding_field
        if table is None:
            return _Decoded(
                None, ParsedBatch(np.zeros((0, tax.dim), np.float32), np.zeros(0, np.int64)), 0
            ), table
        parsed = parse_arrow(table.column(field), field, tax.dim, metric=tax.config.metric)
        x = tax.prepare(parsed.x, self.device, self.dtype) if len(parsed.valid) else None
        parsed = ParsedBatch(np.zeros((0, tax.dim), np.float32), parsed.valid, parsed.errors)
        return _Decoded(x, parsed, table.num_rows), table

    def _stream(
        self, tax: Taxonomy, columns: list[str] | None, keep_table: bool
    ) -> Iterator[tuple[str, _Decoded, pa.Table | None]]:
        """(item, decoded rows, table) in item order: cached items first-hand, the rest
        read by the reader threads a few row groups ahead."""
        key = (tax.dim, tax.config.metric, self.run.compute_dtype)
        if key != self._cache_key:
            self.cache.clear()
            self.chunks = None
            self.cache_used = 0
            self._cache_key = key
        if not keep_table and self.chunks is not None:
            for i, chunk in enumerate(self.chunks):
                yield f"chunk-{i}", chunk, None
            return
        todo = [i for i in self.items if keep_table or i not in self.cache]

        def read(item: str) -> tuple[_Decoded, pa.Table | None] | None:
            for _, batches in self.source.read_items([item], columns=columns):
                return self._decode(tax, batches)
            return None  # skipped as a bad item (the source logged and counted it)

        with ThreadPoolExecutor(self.readers) as pool:
            ahead = self.readers * PREFETCH_PER_READER
            pending = deque((i, pool.submit(read, i)) for i in todo[:ahead])
            queued = len(pending)
            for item in self.items:
                if not keep_table and item in self.cache:
                    yield item, self.cache[item], None
                    continue
                _, future = pending.popleft()
                if queued < len(todo):
                    pending.append((todo[queued], pool.submit(read, todo[queued])))
                    queued += 1
                waited = time.perf_counter()
                got = future.result()
                self.read_wait_s += time.perf_counter() - waited
                if got is None:
                    continue
                decoded, table = got
                if not keep_table:
                    self._remember(item, decoded)
                yield item, decoded, table

    def _join_cache(self) -> None:
        """Once every row group is cached, join them into a few large chunks."""
        if self.chunks is not None or any(i not in self.cache for i in self.items):
            return
        chunks: list[_Decoded] = []
        group: list[_Decoded] = []

        def close() -> None:
            xs = [d.x for d in group if d.x is not None]
            x = (torch.cat(xs) if len(xs) > 1 else xs[0]) if xs else None
            errors, offset = {}, 0
            for d in group:
                errors.update({offset + i: r for i, r in d.parsed.errors.items()})
                offset += d.rows
            valid = np.arange(sum(len(d.parsed.valid) for d in group), dtype=np.int64)
            chunks.append(
                _Decoded(x, ParsedBatch(np.zeros((0, 0), np.float32), valid, errors), offset)
            )
            group.clear()

        rows = size = 0
        for item in self.items:
            d = self.cache.pop(item)
            d_size = 0 if d.x is None else d.x.numel() * d.x.element_size()
            if group and (rows + d.rows > CHUNK_ROWS or size + d_size > CHUNK_BYTES):
                close()
                rows = size = 0
            group.append(d)
            rows, size = rows + d.rows, size + d_size
        if group:
            close()
        self.chunks = chunks

    def _remember(self, item: str, decoded: _Decoded) -> None:
        size = 0 if decoded.x is None else decoded.x.numel() * decoded.x.element_size()
        if self.cache_used + size <= self.cache_budget:
            self.cache[item] = decoded
            self.cache_used += size

    # -- passes ----------------------------------------------------------------------
    def fit_pass(self, tax: Taxonomy) -> WorkerTotals:
        """One pass of the fit over this worker's row groups, folded into one partial."""
        out = WorkerTotals()
        st = tax.state
        assigner = self.assigner
        combiner = None
        k = sample_sizes(tax) if st.phase == Phase.SAMPLE else 0
        cut: dict[int, int] = {}
        started = time.perf_counter()
        self.source.load_skipped = []
        for item, dec, _ in self._stream(tax, [self.source.embedding_field], keep_table=False):
            out.loaded += dec.rows
            _add(
                out.totals, {"rows": len(dec.parsed.valid), "rows_rejected": len(dec.parsed.errors)}
            )
            _add(out.rejected, dec.parsed.reasons())
            if dec.x is None:
                continue
            _, nodes, distance = batch.walk(tax, dec.x, assigner)
            if st.phase == Phase.SAMPLE:
                offer = batch.sample_offer(tax, dec.x, nodes, cut)
                _add(out.parent_rows, offer.parent_rows)
                cut.update(out.samples.offer(offer.parents, offer.priorities, offer.vectors, k))
            else:
                sums, counts, inertia = batch.lloyd_partials(tax, dec.x, nodes, distance, assigner)
                if combiner is None:
                    combiner = PartialsCombiner(item, len(counts), tax.dim, sums.device)
                combiner.add(item, sums, counts, {"rows": len(dec.parsed.valid)}, {})
                _add(out.totals, {"inertia_fixed": inertia})
        if combiner is not None:
            mark_overflowed(combiner.sums)
            out.sums = combiner.sums.cpu().numpy()
            out.counts = combiner.counts.cpu().numpy()
        out.skipped = list(self.source.load_skipped)
        self._join_cache()
        cached = self.chunks if self.chunks is not None else self.cache.values()
        out.timings = {
            "seconds": time.perf_counter() - started,
            "cached_rows": sum(d.rows for d in cached),
        }
        return out

    def label_pass(
        self,
        tax: Taxonomy,
        output_uri: str | None,
        storage_options: dict | None,
        partition_by: list[str] | None,
        fields: batch.LabelFields = batch.LABEL_FIELDS,
    ) -> WorkerTotals:
        """Label this worker's row groups under `output_uri` (None: count only): a Parquet
        file per row group, or with `partition_by` Hive folders with one growing file each
        (a ParquetSink). Files are encoded by writer threads while the kernels label the
        next row group (one thread for a sink, so its files keep the input's order)."""
        out = WorkerTotals()
        write, sink = None, None
        if output_uri is not None and partition_by:
            sink = ParquetSink(output_uri, partition_by, storage_options)

            def write(table: pa.Table, name: str) -> None:
                sink.write(table)  # one growing file per partition, whatever the row group
        elif output_uri is not None:
            write = _ParquetParts(output_uri, storage_options)
        self.source.load_skipped = []
        new_names = set(batch.label_schema(tax.n_levels, fields))
        clock = {"assign_s": 0.0, "columns_s": 0.0, "write_wait_s": 0.0}
        self.read_wait_s = 0.0
        started = time.perf_counter()
        threads = 1 if sink is not None else self.readers
        with ThreadPoolExecutor(threads) as writers:
            written = []
            for item, dec, table in self._stream(tax, self.source.columns, keep_table=True):
                t0 = time.perf_counter()
                out.loaded += dec.rows
                _add(
                    out.totals,
                    {"rows": len(dec.parsed.valid), "rows_rejected": len(dec.parsed.errors)},
                )
                _add(out.rejected, dec.parsed.reasons())
                if write is None or table is None or table.num_rows == 0:
                    continue  # counting only, or a row group the filter emptied: no file
                labels = None
                if dec.x is not None:
                    labels = tax.assign_paths(dec.x, assigner=self.assigner, prepared=True)
                t1 = time.perf_counter()
                columns = batch.label_columns(tax.n_levels, dec.rows, dec.parsed, labels, fields)
                table = table.drop_columns([c for c in table.column_names if c in new_names])
                for name, column in columns.items():
                    table = table.append_column(name, column)
                t2 = time.perf_counter()
                written.append(writers.submit(write, table, f"part-{self.index[item]:06d}"))
                while len(written) > 2 * self.readers:  # bound the tables held in memory
                    written.pop(0).result()
                clock["assign_s"] += t1 - t0
                clock["columns_s"] += t2 - t1
                clock["write_wait_s"] += time.perf_counter() - t2
            t3 = time.perf_counter()
            for future in written:
                future.result()
            if sink is not None:
                sink.close()
            clock["write_wait_s"] += time.perf_counter() - t3
        out.skipped = list(self.source.load_skipped)
        out.timings = {
            "seconds": time.perf_counter() - started,
            "read_wait_s": self.read_wait_s,
            **clock,
        }
        return out


class _ParquetParts:
    """Writes one labelled row group as `<name>.parquet` under the output folder."""

    def __init__(self, output_uri: str, storage_options: dict | None):
        import fsspec

        fs, self.root = fsspec.core.url_to_fs(output_uri, **(storage_options or {}))
        self.filesystem = _arrow_fs(fs)

    def __call__(self, table: pa.Table, name: str) -> None:
        pq.write_table(
            table,
            f"{self.root}/{name}.parquet",
            filesystem=self.filesystem,
            use_dictionary=dictionary_columns(table.schema),
        )


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30
