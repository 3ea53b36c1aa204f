"""Semantic dedup over labelled Parquet, read in this process: rows grouped by node, the
exact search of `semdedup` per node (and across node boundaries on request), every input
column written back with the dedup fields.

Memory: input that is Hive-partitioned by the top level (`taxonomy_l1=7/`, the layout of
PartitionedParquetWriter) is read one top node at a time; other input is read whole. A
node's rows are put in id order before anything is computed, so the results depend only
on the node's rows, never on the file order or the batch split.

Across boundaries (`cross_boundary_margin`): a row whose margin at the dedup level (its
runner-up sibling's distance minus its own node's, in the tree's metric, computed in
float64 from the centroids; at the leaves this is taxonomy_margin) is below the option is
also paired with every row of that runner-up sibling. Such a pair enters the rule like a
pair within a node: the two rows are ordered by (rank key, id) across both nodes, and the
later one may be the duplicate of the earlier one, whichever of the two crossed.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mdf_taxonomy.curation.semdedup import (
    DTYPES,
    RANKINGS,
    earlier_max_similarity,
    is_duplicate,
    rank_keys,
    unit_rows,
)
from mdf_taxonomy.curation.semdedup_boundary import runner_up
from mdf_taxonomy.model.config import check_parameter
from mdf_taxonomy.model.sampling import rows_by_key, sample_priorities
from mdf_taxonomy.model.taxonomy import Taxonomy
from mdf_taxonomy.passes.input_report import ITEM_SEP
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.parquet_sink import ParquetSink
from mdf_taxonomy.passes.records import parse_arrow
from mdf_taxonomy.passes.staged_output import StagedOutput

SIMILARITY_FIELD = "dedup_max_similarity"
DUPLICATE_OF_FIELD = "dedup_duplicate_of"
DUPLICATE_FIELD = "is_duplicate"
DEDUP_FIELDS = (SIMILARITY_FIELD, DUPLICATE_OF_FIELD, DUPLICATE_FIELD)


@dataclass(frozen=True)
class _Run:
    """The settings of one dedup run, checked once."""

    tax: Taxonomy
    level: int
    eps: float
    ranking: str
    seed: int
    cross: float | None
    id_field: str
    node_field: str
    device: torch.device
    dtype: torch.dtype
    block_rows: int


@dataclass
class _Node:
    """One node's rows in rank order, with the running best per row."""

    rows: np.ndarray  # positions in the table
    ids: np.ndarray
    keys: np.ndarray
    unit: torch.Tensor
    raw: np.ndarray | None  # float32 rows as read, kept where the l2 margin needs them
    best_val: np.ndarray
    best_id: np.ndarray
    crossed: np.ndarray  # the best came from a pair across a boundary


def dedup_parquet(
    tax: Taxonomy,
    input: str | list[str],  # noqa: A002 - the engine's name
    output: str,
    eps: float,
    *,
    level: int | None = None,
    ranking: str = "hard",
    seed: int = 0,
    cross_boundary_margin: float | None = None,
    id_field: str = "id",
    field_prefix: str = "taxonomy_",
    embedding_field: str | None = None,
    storage_options: dict[str, Any] | None = None,
    compute_dtype: str = "float32",
    device: str = "auto",
    block_rows: int = 4096,
    partition_by: list[str] | None = None,
    on_bad_file: str = "fail",
    overwrite: bool = False,
) -> dict[str, Any]:
    """SemDeDup over labelled Parquet at `input`, written to `output` (whole or not at all,
    refused if it holds data unless `overwrite`: a StagedOutput); returns a summary.

    Every input column is written with `dedup_max_similarity` (float32: the largest cosine
    similarity to an earlier-ranked row of the node; -inf for a node's first row, NaN for
    a row not compared), `dedup_duplicate_of` (int64: that row's `id_field`, -1 if none)
    and `is_duplicate` (similarity >= 1 - eps). A row with a bad embedding, a null id or
    no node is written uncompared and counted by reason in the summary's `skipped`.
    `level`: the level whose nodes are deduped (None: the leaves). `ranking`: "hard"
    (furthest from the node centroid first), "easy" or "random" (content hash, `seed`).
    `partition_by`: output Hive columns (None: the input's top-level partitioning, if any).
    `compute_dtype`/`device`/`block_rows`: how the search runs; the results are the same.
    """
    started = time.perf_counter()
    run = _settings(
        tax,
        eps=eps,
        level=level,
        ranking=ranking,
        seed=seed,
        cross=cross_boundary_margin,
        id_field=id_field,
        prefix=field_prefix,
        dtype=compute_dtype,
        device=device,
        block_rows=block_rows,
    )
    src = ParquetInput(
        input,
        embedding_field=embedding_field,
        storage_options=storage_options,
        on_bad_file=on_bad_file,
    )
    items = src.get_file_list()
    top_field = f"{field_prefix}l1"
    groups = _groups_by_top_node(items, top_field)
    if partition_by is None:
        partition_by = [top_field] if groups is not None else []
    if groups is None or (run.level == 1 and run.cross is not None):
        groups = [items]  # the siblings of a top node are the other top nodes
    totals: Counter = Counter()
    skipped: Counter = Counter()
    with StagedOutput(output, storage_options, overwrite) as staged:
        sink = ParquetSink(staged.staging_uri, partition_by, storage_options=storage_options)
        try:
            for group in groups:
                batches = [b for _, bs in src.read_items(group) for b in bs]
                if not batches or not any(b.num_rows for b in batches):
                    continue
                table = pa.Table.from_batches(batches)
                sink.write(_dedup_table(table, src.embedding_field, run, totals, skipped))
        finally:
            files = [staged.final_path(f) for f in sink.close()]
    return {
        "rows": totals["rows"],
        "compared": totals["compared"],
        "nodes": totals["nodes"],
        "largest_node": totals["largest_node"],
        "duplicates": totals["duplicates"],
        "duplicates_across_nodes": totals["duplicates_across_nodes"],
        "cross_boundary_rows": totals["cross_rows"],
        "cross_boundary_node_pairs": totals["cross_pairs"],
        "skipped": dict(skipped),
        "eps": run.eps,
        "level": run.level,
        "ranking": run.ranking,
        "cross_boundary_margin": run.cross,
        "compute_dtype": compute_dtype,
        "device": str(run.device),
        "output": output,
        "files": files,
        "seconds": time.perf_counter() - started,
    }


def _settings(
    tax: Taxonomy, *, eps, level, ranking, seed, cross, id_field, prefix, dtype, device, block_rows
) -> _Run:
    """The run's settings, checked before anything is read."""
    where = "dedup"
    level = tax.n_levels if level is None else level
    if not tax.state.complete or not tax.levels:
        raise ValueError(f"{where}: the taxonomy is not fitted (phase {tax.state.phase!r})")
    if not (isinstance(level, int) and 1 <= level <= tax.n_levels):
        raise ValueError(f"{where}: level must be 1..{tax.n_levels}, got {level!r}")
    if not (isinstance(eps, int | float) and math.isfinite(eps) and 0 <= eps <= 2):
        raise ValueError(f"{where}: eps must be a number in [0, 2], got {eps!r}")
    if ranking not in RANKINGS:
        raise ValueError(f"{where}: ranking must be one of {RANKINGS}, got {ranking!r}")
    if cross is not None and not (isinstance(cross, int | float) and cross >= 0):
        raise ValueError(f"{where}: cross_boundary_margin must be None or >= 0, got {cross!r}")
    if dtype not in DTYPES:
        raise ValueError(f"{where}: compute_dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not (isinstance(block_rows, int) and block_rows >= 1):
        raise ValueError(f"{where}: block_rows must be an int >= 1, got {block_rows!r}")
    check_parameter("device", device, where)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _Run(
        tax=tax,
        level=level,
        eps=float(eps),
        ranking=ranking,
        seed=int(seed),
        cross=cross,
        id_field=id_field,
        node_field=f"{prefix}l{level}",
        device=torch.device(device),
        dtype=DTYPES[dtype],
        block_rows=block_rows,
    )


def _groups_by_top_node(items: list[str], top_field: str) -> list[list[str]] | None:
    """The items per `top_field=` Hive folder, in value order; None unless every item's
    path has one."""
    pattern = re.compile(rf"(?:^|/){re.escape(top_field)}=([^/]+)/")
    groups: dict[str, list[str]] = {}
    for item in items:
        found = pattern.search(item.rsplit(ITEM_SEP, 1)[0])
        if found is None:
            return None
        groups.setdefault(found[1], []).append(item)
    return [groups[k] for k in sorted(groups, key=lambda v: (len(v), v))] if groups else None


def _int_column(table: pa.Table, name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(values as int64 with nulls as -1, null mask) of an integer column."""
    if name not in table.column_names:
        raise ValueError(f"dedup: no {what} column {name!r} (columns: {table.column_names})")
    col = table.column(name)
    if pa.types.is_dictionary(col.type):  # a partition column may come dictionary-encoded
        col = col.cast(col.type.value_type)
    if not pa.types.is_integer(col.type):
        raise ValueError(f"dedup: the {what} column {name!r} is {col.type}, not integers")
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    values = pc.fill_null(pc.cast(col, pa.int64()), -1).to_numpy(zero_copy_only=False)
    return values.astype(np.int64, copy=False), nulls


def _dedup_table(
    table: pa.Table, field: str, run: _Run, totals: Counter, skipped: Counter
) -> pa.Table:
    """The table with the dedup fields of its rows (one top node, or all of the input)."""
    n = table.num_rows
    parsed = parse_arrow(table.column(field), field, run.tax.dim, metric="cosine")
    skipped.update(parsed.reasons())
    ids, id_null = _int_column(table, run.id_field, "id")
    node, node_null = _int_column(table, run.node_field, "node")
    where = np.full(n, -1, np.int64)
    where[parsed.valid] = np.arange(len(parsed.valid))
    ok = where >= 0
    for reason, bad in (
        ("missing_id", ok & id_null),
        ("unlabelled", ok & ~id_null & (node_null | (node < 0))),
        ("unknown_node", ok & ~id_null & (node >= run.tax.levels[run.level - 1].n_nodes)),
    ):
        if bad.any():
            skipped[reason] += int(bad.sum())
            ok &= ~bad
    valid = _first_of_each_id(np.flatnonzero(ok), ids, node, parsed.x, where, skipped)
    nodes = {
        key: _node(table_rows, ids, where, parsed.x, key, run)
        for key, table_rows in ((k, valid[i]) for k, i in rows_by_key(node[valid]))
    }
    for nd in nodes.values():
        pos = np.arange(len(nd.ids), dtype=np.int64)
        nd.best_val, nd.best_id = _search(nd.unit, pos, nd.unit, pos, nd.ids, run)
    if run.cross is not None:
        _cross_boundaries(nodes, run, totals)
    max_sim = np.full(n, np.nan, np.float32)
    duplicate_of = np.full(n, -1, np.int64)
    crossed = np.zeros(n, bool)
    for nd in nodes.values():
        max_sim[nd.rows] = nd.best_val
        duplicate_of[nd.rows] = nd.best_id
        crossed[nd.rows] = nd.crossed
    flags = is_duplicate(max_sim, run.eps)
    totals.update(
        rows=n,
        compared=len(valid),
        nodes=len(nodes),
        duplicates=int(flags.sum()),
        duplicates_across_nodes=int((flags & crossed).sum()),
    )
    largest = max((len(nd.ids) for nd in nodes.values()), default=0)
    totals["largest_node"] = max(totals["largest_node"], largest)
    table = table.drop_columns([c for c in DEDUP_FIELDS if c in table.column_names])
    for name, values in zip(DEDUP_FIELDS, (max_sim, duplicate_of, flags), strict=True):
        table = table.append_column(name, pa.array(values))
    return table


def _first_of_each_id(
    valid: np.ndarray,
    ids: np.ndarray,
    node: np.ndarray,
    x: np.ndarray,
    where: np.ndarray,
    skipped: Counter,
) -> np.ndarray:
    """`valid` without the repeats of an id within a node (ids break ranking ties): of
    equal ids the row of the smallest content hash is kept, whatever the read order, and
    the others are counted as duplicate_id."""
    order = np.lexsort((ids[valid], node[valid]))
    v = valid[order]
    repeat = (ids[v][1:] == ids[v][:-1]) & (node[v][1:] == node[v][:-1])
    if not repeat.any():
        return valid
    priority = sample_priorities(x[where[valid]], 0, 0)
    v = valid[np.lexsort((priority, ids[valid], node[valid]))]
    repeat = (ids[v][1:] == ids[v][:-1]) & (node[v][1:] == node[v][:-1])
    skipped["duplicate_id"] += int(repeat.sum())
    return np.sort(np.setdiff1d(valid, v[1:][repeat]))


def _node(
    rows: np.ndarray, ids: np.ndarray, where: np.ndarray, x: np.ndarray, key: int, run: _Run
) -> _Node:
    """A node's rows, normalised and ranked; put in id order first, so nothing after
    depends on the order they were read in."""
    rows = rows[np.argsort(ids[rows], kind="stable")]
    node_ids = ids[rows]
    raw = x[where[rows]]
    unit = unit_rows(raw, run.device)
    centroid = run.tax.levels[run.level - 1].centroids[key]
    keys = rank_keys(unit, centroid, run.ranking, raw=raw, seed=run.seed)
    order = np.lexsort((node_ids, keys))
    n = len(rows)
    return _Node(
        rows[order],
        node_ids[order],
        keys[order],
        unit[torch.as_tensor(order, device=unit.device)],
        raw[order] if run.cross is not None and run.tax.config.metric == "l2" else None,
        np.full(n, -np.inf, np.float32),
        np.full(n, -1, np.int64),
        np.zeros(n, bool),
    )


def _search(
    q: torch.Tensor,
    q_pos: np.ndarray,
    c: torch.Tensor,
    c_pos: np.ndarray,
    c_ids: np.ndarray,
    run: _Run,
) -> tuple[np.ndarray, np.ndarray]:
    """earlier_max_similarity with the run's settings, results on the host."""
    val, eid = earlier_max_similarity(
        q, q_pos, c, c_pos, c_ids, block_rows=run.block_rows, compute_dtype=run.dtype
    )
    return val.cpu().numpy(), eid.cpu().numpy()


def _fold(nd: _Node, at: np.ndarray, val: np.ndarray, eid: np.ndarray) -> None:
    """Merge cross-boundary results into a node's bests: larger value, then smaller id."""
    bv, bi = nd.best_val[at], nd.best_id[at]
    better = (val > bv) | ((val == bv) & (eid < bi) & (eid >= 0))
    nd.best_val[at[better]], nd.best_id[at[better]] = val[better], eid[better]
    nd.crossed[at[better]] = True


def _cross_boundaries(nodes: dict[int, _Node], run: _Run, totals: Counter) -> None:
    """Pair each row whose margin is below run.cross with its runner-up sibling's rows,
    both ways, ordered by (rank key, id) across the two nodes."""
    for key, nd in nodes.items():
        other, margin = runner_up(run.tax, run.level, key, nd.unit, nd.raw)
        crossing = (margin < run.cross) & (other >= 0)
        for target, idx in rows_by_key(other[crossing]):
            if target not in nodes:
                continue
            rows = np.flatnonzero(crossing)[idx]  # ascending: in rank order
            m = nodes[target]
            keys = np.concatenate([nd.keys[rows], m.keys])
            pos = np.empty(len(keys), np.int64)
            pos[np.lexsort((np.concatenate([nd.ids[rows], m.ids]), keys))] = np.arange(len(keys))
            q = nd.unit[torch.as_tensor(rows, device=nd.unit.device)]
            q_pos, m_pos = pos[: len(rows)], pos[len(rows) :]
            _fold(nd, rows, *_search(q, q_pos, m.unit, m_pos, m.ids, run))
            _fold(m, np.arange(len(m.ids)), *_search(m.unit, m_pos, q, q_pos, nd.ids[rows], run))
            totals.update(cross_rows=len(rows), cross_pairs=1)
