"""The arithmetic of one batch, whatever face calls it.

The MDF operators (a list of records) and the columnar pass (an Arrow column) both
parse into a ParsedBatch and then call these functions, so the same rows give the
same tree and the same labels bit for bit on either path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mdf_taxonomy.kernels import Assigner
from mdf_taxonomy.model import Taxonomy
from mdf_taxonomy.model.balance import sample_sizes
from mdf_taxonomy.model.fitting import inertia_to_fixed
from mdf_taxonomy.model.sampling import BottomK, rows_by_key, sample_priorities, size_of
from mdf_taxonomy.model.taxonomy import Labels
from mdf_taxonomy.passes.records import ERROR_FIELD, FIELD_PREFIX, ParsedBatch

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LabelFields:
    """The names of the fields labelling adds: `prefix` + path, l1..lN, distance, margin,
    error (a prefix keeps a second taxonomy's labels apart from the first's)."""

    prefix: str = FIELD_PREFIX

    @property
    def path(self) -> str:
        return f"{self.prefix}path"

    def level(self, level: int) -> str:
        return f"{self.prefix}l{level}"

    @property
    def distance(self) -> str:
        return f"{self.prefix}distance"

    @property
    def margin(self) -> str:
        return f"{self.prefix}margin"

    @property
    def error(self) -> str:
        return f"{self.prefix}error"


LABEL_FIELDS = LabelFields()


def level_field(level: int) -> str:
    return LABEL_FIELDS.level(level)


def label_schema(n_levels: int, fields: LabelFields = LABEL_FIELDS) -> dict[str, pa.DataType]:
    """The fields a labelled record gets: path, one node id per level, distance, margin,
    error."""
    schema = {fields.path: pa.string()}
    schema.update({fields.level(i): pa.int32() for i in range(1, n_levels + 1)})
    schema[fields.distance] = pa.float32()
    schema[fields.margin] = pa.float32()
    schema[fields.error] = pa.string()
    return schema


def fit_schema(n_levels: int) -> dict[str, pa.DataType]:
    """The fields a record gets in a fit pass: the ids of the levels fitted so far."""
    schema = {level_field(i): pa.int32() for i in range(1, n_levels + 1)}
    schema[ERROR_FIELD] = pa.string()
    return schema


def fit_depth(tax: Taxonomy) -> int:
    """Levels a fit pass walks: all of them, except in a sampling pass (the new level has
    no centroids yet)."""
    st = tax.state
    return tax.n_levels if st.phase != "sample" else st.level - 1


def walk(
    tax: Taxonomy, x: torch.Tensor, assigner: Assigner
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(paths so far, deepest node per row, distance to it) for a fit pass."""
    paths, last = tax.walk(x, fit_depth(tax), assigner)
    return paths, last.ids, last.distance


def lloyd_partials(
    tax: Taxonomy, x: torch.Tensor, nodes: torch.Tensor, distance: torch.Tensor, assigner: Assigner
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fixed-point sums and counts per node of the level being refined, and the batch's
    inertia in fixed point: exact, so any split of the rows adds up to the same bits."""
    n_nodes = tax.levels[tax.state.level - 1].n_nodes
    sums, counts = assigner.partial_sums(x, nodes, n_nodes)
    return sums, counts, inertia_to_fixed(distance)


@dataclass
class SampleOffer:
    """The rows of a batch that can still enter their parent's bottom-k sample."""

    parent_rows: dict[int, int]  # rows per parent in the batch
    parents: np.ndarray
    priorities: np.ndarray
    vectors: np.ndarray


def sample_offer(
    tax: Taxonomy, x: torch.Tensor, parents: torch.Tensor, cut: dict[int, int]
) -> SampleOffer:
    """Each parent's local bottom-k, less the rows above a known cut-off (`cut`: parent
    -> the k-th priority of its sample so far)."""
    cfg, level = tax.config, tax.state.level
    rows = x.float().cpu().numpy()
    prio = sample_priorities(rows, cfg.seed, level)
    par = parents.cpu().numpy()
    k = sample_sizes(tax)
    keep, parent_rows = [], {}
    for p, idx in rows_by_key(par):
        parent_rows[p] = len(idx)
        if p in cut:
            idx = idx[prio[idx] < np.uint64(cut[p])]
        keep.append(idx[BottomK.smallest(prio[idx], size_of(k, p))])
    idx = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    return SampleOffer(parent_rows, par[idx], prio[idx], rows[idx])


def path_strings(paths: np.ndarray) -> pa.Array:
    """ "12/305/77" per row of node ids, built column-wise."""
    if paths.shape[1] == 0:
        return pa.array([""] * len(paths), pa.string())
    parts = [pc.cast(pa.array(paths[:, i]), pa.string()) for i in range(paths.shape[1])]
    if len(parts) == 1:
        return parts[0]
    return pc.binary_join_element_wise(*parts, "/")


def label_columns(
    n_levels: int,
    n_rows: int,
    parsed: ParsedBatch,
    labels: Labels | None = None,
    fields: LabelFields = LABEL_FIELDS,
) -> dict[str, pa.Array]:
    """The label fields of a batch as Arrow columns, blank where a row was rejected:
    path "", node ids -1, distance and margin NaN, and the reason in the error field (no
    labels: every row blank)."""
    ids = np.full((n_rows, n_levels), -1, dtype=np.int32)
    dist = np.full(n_rows, np.nan, dtype=np.float32)
    margin = np.full(n_rows, np.nan, dtype=np.float32)
    if labels is not None:
        ids[parsed.valid] = labels.paths
        dist[parsed.valid] = labels.distance
        margin[parsed.valid] = labels.margin
    good = np.zeros(n_rows, dtype=bool)
    good[parsed.valid] = labels is not None
    strings = path_strings(ids)
    if not good.all():
        strings = pc.if_else(pa.array(good), strings, "")
    columns = {fields.path: strings}
    columns.update({fields.level(i + 1): pa.array(ids[:, i]) for i in range(n_levels)})
    columns[fields.distance] = pa.array(dist)
    columns[fields.margin] = pa.array(margin)
    columns[fields.error] = error_column(n_rows, parsed)
    return columns


def all_rejected(n_rows: int, reason: str) -> ParsedBatch:
    """A batch in which every row is rejected for `reason` (a whole batch that failed)."""
    return ParsedBatch(
        np.zeros((0, 0), np.float32), np.zeros(0, np.int64), dict.fromkeys(range(n_rows), reason)
    )


def error_column(n_rows: int, parsed: ParsedBatch) -> pa.Array:
    errors = [""] * n_rows
    for i, reason in parsed.errors.items():
        errors[i] = reason
    return pa.array(errors, pa.string())


def fit_columns(
    n_levels: int, n_rows: int, parsed: ParsedBatch, paths: np.ndarray | None = None
) -> dict[str, pa.Array]:
    """A fit pass's fields: the node ids of the levels walked so far (-1 beyond them and
    for rejected rows), and the reason of each rejected row."""
    if paths is None:
        paths = np.zeros((0, 0), np.int32)
    ids = np.full((n_rows, n_levels), -1, dtype=np.int32)
    ids[parsed.valid, : paths.shape[1]] = paths
    columns = {level_field(i + 1): pa.array(ids[:, i]) for i in range(n_levels)}
    columns[ERROR_FIELD] = error_column(n_rows, parsed)
    return columns
