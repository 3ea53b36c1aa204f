"""Semantic dedup within a node (SemDeDup's rule), exact, in blocks on GEMM kernels.

The rule: a node's rows are ranked by (rank key, id); a row is a duplicate when its cosine
similarity to any earlier-ranked row is >= 1 - eps. Every row gets its maximum similarity
to an earlier row and that row's id, so eps is chosen afterwards: the decision for an eps
is `is_duplicate(max_sim, eps)`, a threshold on the stored value.

What is stored is exact and the same bits for any block size, compute dtype, row order or
device. A pair's similarity is its *canonical* value: the rows normalised in float64 and
rounded to float32 (`unit_rows`), multiplied in float64 (products of float32 values are
exact there) and summed in a fixed pairwise tree (`canonical_dot`), then rounded to
float32. Ties go to the smallest earlier id. The GEMM blocks only find candidates: a
low-precision similarity is within `similarity_tolerance(dtype, dim)` of the exact one,
so every pair whose exact value can reach a row's maximum is within two tolerances of the
row's low-precision maximum; those pairs (and only those) are recomputed canonically.
On GPUs prefer float16 to bfloat16: the same tensor-core rate, a bound 8x tighter
(0.0015 against 0.0119 at dim 1024), so far fewer pairs fall in the window (at dim 1024
in a tight node, ~1.8 rechecked per row against ~45; benchmarks/bench_dedup.py).

Memory is O(block_rows^2) per GEMM block plus a bounded buffer of group maxima (one value
per row and `GROUP` columns), whatever the node's size. Imports numpy and torch only: the
benchmark runs this module on a GPU machine that has nothing else.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DTYPES",
    "GROUP",
    "RANKINGS",
    "canonical_dot",
    "earlier_max_similarity",
    "is_duplicate",
    "node_max_similarity",
    "rank_keys",
    "similarity_tolerance",
    "unit_rows",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANKINGS = ("hard", "easy", "random")
GROUP = 8  # columns per kept maximum: the recheck recomputes whole groups
_UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_SLACK = 2.0**-20  # canonical vs exact (< 1e-14), float32 roundings of the windows
_G_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}  # group maxima per row block and pass
_RECHECK_ELEMENTS = 1 << 23  # values per recheck chunk (64 MiB in float64)
_RANDOM_SALT = 0x5EDD  # the `level` of sample_priorities: another order than the fit's
_NO_ID = torch.iinfo(torch.int64).max


def similarity_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Bound on |low-precision similarity - exact| for unit rows of `dim` values.

    Inputs rounded to `dtype` (unit roundoff u: 2^-8 bf16, 2^-11 fp16, 0 fp32) move a dot
    of unit vectors by <= 2u + u^2; the output rounded to `dtype` by <= u(1 + u)^2; a float32
    accumulation in any order by <= 1.2 * dim * 2^-24. fp16 adds its subnormals (entries
    below 2^-14 lose up to 2^-25 each: 2 * sqrt(dim) * 2^-25). At dim=1024: bf16 0.0119,
    fp16 0.0015, fp32 7.4e-5. Holds for float32 accumulation only: `_exact_matmul` turns
    TF32 and reduced-precision reductions off while a search runs.
    """
    u = _UNIT_ROUNDOFF[dtype]
    tol = 3 * u + 4 * u * u + 1.2 * dim * 2.0**-24 + _SLACK
    if dtype == torch.float16:
        tol += 2 * math.sqrt(dim) * 2.0**-25
    return tol


def is_duplicate(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """The decision for `eps`: max similarity to an earlier row >= 1 - eps (in float64;
    NaN, a row that was not compared, is never a duplicate)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(max_sim, dtype=np.float64) >= 1.0 - float(eps)


def _tree_sum(p: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in a fixed pairwise tree: the same bits on any device."""
    width = 1 << max(0, (p.shape[-1] - 1).bit_length())
    if width != p.shape[-1]:
        p = F.pad(p, (0, width - p.shape[-1]))
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        p = p[..., :half] + p[..., half:]
    return p[..., 0]


def canonical_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise float64 dot of float32 rows: exact products, fixed-tree sum (chunked)."""
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    step = max(1, _RECHECK_ELEMENTS // max(1, a.shape[1]))
    for i in range(0, a.shape[0], step):
        out[i : i + step] = _tree_sum(a[i : i + step].double() * b[i : i + step].double())
    return out


def unit_rows(
    x: np.ndarray | torch.Tensor, device: str | torch.device | None = None
) -> torch.Tensor:
    """Rows scaled to unit norm in float64 (fixed-tree norm), as float32 on `device`; the
    same bits for a row whatever rows come with it. Zero or non-finite rows raise."""
    t = torch.as_tensor(x)
    t = t.to(device if device is not None else t.device)
    out = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    step = max(1, _RECHECK_ELEMENTS // max(1, t.shape[1]))
    for i in range(0, t.shape[0], step):
        x64 = t[i : i + step].double()
        norm = _tree_sum(x64 * x64).sqrt()
        if not bool(torch.isfinite(norm).all() and (norm > 0).all()):
            raise ValueError("rows must be finite and nonzero to be compared by cosine")
        out[i : i + step] = (x64 / norm[:, None]).float()
    return out


def rank_keys(
    unit: torch.Tensor,
    centroid: np.ndarray | torch.Tensor | None,
    ranking: str,
    raw: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Sort keys (ascending = earlier; ties go by id) for a node's unit rows.

    "hard": furthest from the node centroid first (key = -cosine distance), "easy": closest
    first, "random": the content-hash priority of the float32 `raw` rows (model.sampling's
    hash, salted with `seed`), the same for a row wherever it is read.
    """
    if ranking == "random":
        from mdf_taxonomy.model.sampling import sample_priorities  # numpy only, lazily

        if raw is None:
            raise ValueError("ranking='random' hashes the rows as read: pass raw")
        return sample_priorities(np.asarray(raw, dtype=np.float32), seed, _RANDOM_SALT)
    if ranking not in ("hard", "easy"):
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    if centroid is None:
        raise ValueError(f"ranking={ranking!r} needs the node's centroid")
    c = unit_rows(torch.as_tensor(centroid).reshape(1, -1), unit.device)
    distance = 1.0 - canonical_dot(unit, c.expand_as(unit)).cpu().numpy()
    return -distance if ranking == "hard" else distance


@contextlib.contextmanager
def _exact_matmul() -> Iterator[None]:
    """float32 GEMMs in IEEE float32 and bf16/fp16 GEMMs reduced in float32 for the
    duration (the tolerance assumes both); the settings, process-wide, are restored after."""
    m = torch.backends.cuda.matmul
    saved = (
        torch.get_float32_matmul_precision(),
        m.allow_bf16_reduced_precision_reduction,
        m.allow_fp16_reduced_precision_reduction,
    )
    torch.set_float32_matmul_precision("highest")
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        m.allow_bf16_reduced_precision_reduction = saved[1]
        m.allow_fp16_reduced_precision_reduction = saved[2]


def _low(unit: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The GEMM operand: `unit` in `dtype` on CUDA; on CPU the same rounded values in
    float32 (CPU GEMMs gain nothing from bf16, and the bound then holds exactly)."""
    if dtype == torch.float32:
        return unit
    low = unit.to(dtype)
    return low if unit.is_cuda else low.float()


def _merge(
    best_val: torch.Tensor,
    best_id: torch.Tensor,
    rows: torch.Tensor,
    vals: torch.Tensor,
    ids: torch.Tensor,
) -> None:
    """Fold candidate (row, float32 similarity, id) into the running best per row: the
    larger value, then the smaller id (order-free: max and min are exact)."""
    top = torch.full_like(best_val, -math.inf).scatter_reduce(0, rows, vals, "amax")
    at = vals == top[rows]
    low = torch.full_like(best_id, _NO_ID).scatter_reduce(0, rows[at], ids[at], "amin")
    better = (top > best_val) | ((top == best_val) & (low < best_id))
    best_val[better] = top[better]
    best_id[better] = low[better]


class _Search:
    """One search: rows q against rows c, each sorted by its position in one order."""

    def __init__(
        self,
        q: torch.Tensor,
        q_pos: np.ndarray,
        c: torch.Tensor,
        c_pos: np.ndarray,
        c_ids: np.ndarray,
        dtype: torch.dtype,
        block_rows: int,
        stats: dict | None,
    ):
        self.q, self.c = q, c
        self.ql = _low(q, dtype)
        self.cl = self.ql if c is q else _low(c, dtype)
        self.q_pos_np, self.c_pos_np = q_pos, c_pos
        dev = q.device
        self.qp = torch.as_tensor(q_pos, device=dev)
        self.cp = torch.as_tensor(c_pos, device=dev)
        self.ci = torch.as_tensor(c_ids, device=dev)
        self.tol = similarity_tolerance(dtype, q.shape[1])
        self.bn = -(-block_rows // GROUP) * GROUP
        self.bm = block_rows
        budget = _G_ELEMENTS["cuda" if q.is_cuda else "cpu"]  # one pass per row block on GPU
        self.chunk = max(self.bn, (budget // self.bm * GROUP) // self.bn * self.bn)
        self.best_val = torch.full((q.shape[0],), -math.inf, dtype=torch.float32, device=dev)
        self.best_id = torch.full((q.shape[0],), -1, dtype=torch.int64, device=dev)
        self.stats = stats if stats is not None else {}
        for key in ("block_pairs", "candidate_groups", "rechecked_pairs"):
            self.stats.setdefault(key, 0)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        for a in range(0, self.q.shape[0], self.bm):
            b = min(a + self.bm, self.q.shape[0])
            # the columns before the block's last row; later ones are never earlier
            end = int(np.searchsorted(self.c_pos_np, self.q_pos_np[b - 1], side="left"))
            end = min(-(-end // GROUP) * GROUP, len(self.c_pos_np))  # whole groups: masked
            for c0 in range(0, end, self.chunk):
                c1 = min(c0 + self.chunk, end)
                self._recheck(a, c0, c1, self._group_maxima(a, b, c0, c1))
        return self.best_val, self.best_id

    def _group_maxima(self, a: int, b: int, c0: int, c1: int) -> torch.Tensor:
        """(b - a, groups) low-precision maxima over GROUP columns of [c0, c1); pairs
        whose column is not earlier than the row are -inf."""
        n_groups = -(-(c1 - c0) // GROUP)
        g = torch.empty((b - a, n_groups), dtype=self.ql.dtype, device=self.q.device)
        for j0 in range(c0, c1, self.bn):
            j1 = min(j0 + self.bn, c1)
            s = self.ql[a:b] @ self.cl[j0:j1].T
            if self.c_pos_np[j1 - 1] >= self.q_pos_np[a]:  # the block meets the diagonal
                s.masked_fill_(self.cp[None, j0:j1] >= self.qp[a:b, None], -math.inf)
            g0, full = (j0 - c0) // GROUP, (j1 - j0) // GROUP
            g[:, g0 : g0 + full] = s[:, : full * GROUP].view(b - a, full, GROUP).amax(-1)
            if full * GROUP < j1 - j0:  # the node's last, partial group
                g[:, g0 + full] = s[:, full * GROUP :].amax(1)
            self.stats["block_pairs"] += 1
        return g

    def _recheck(self, a: int, c0: int, c1: int, groups: torch.Tensor) -> None:
        """Recompute exactly every pair that can reach its row's maximum: those within
        two tolerances of a lower bound on it (the running exact best, or the block's
        low-precision maximum minus one tolerance)."""
        rows = slice(a, a + groups.shape[0])
        top = groups.amax(1).float()
        window = torch.maximum(self.best_val[rows], top - self.tol - _SLACK) - self.tol - _SLACK
        # compared in the groups' dtype: rounding to nearest never passes a value of that
        # dtype, so no candidate is lost; clamped at -2 (below every similarity): no -inf
        low = window.clamp(min=-2.0).to(groups.dtype)
        r, grp = torch.nonzero(groups >= low[:, None], as_tuple=True)
        self.stats["candidate_groups"] += int(r.numel())
        step = max(1, _RECHECK_ELEMENTS // (GROUP * self.q.shape[1]))
        offsets = torch.arange(GROUP, device=groups.device)
        for i in range(0, r.numel(), step):
            rr, gg = r[i : i + step], grp[i : i + step]
            cols = c0 + gg[:, None] * GROUP + offsets  # (P, GROUP)
            inside = cols < c1
            cols = cols.clamp_max(c1 - 1)
            qrow = rr + a
            lc = self.cl.index_select(0, cols.reshape(-1)).view(*cols.shape, -1)
            v = torch.bmm(self.ql.index_select(0, qrow)[:, None, :], lc.transpose(1, 2))[:, 0]
            keep = inside & (self.cp[cols] < self.qp[qrow, None])
            keep &= v.float() >= window[rr, None]
            pr, pc = torch.nonzero(keep, as_tuple=True)
            self.stats["rechecked_pairs"] += int(pr.numel())
            qsel, csel = qrow[pr], cols[pr, pc]
            exact = canonical_dot(self.q.index_select(0, qsel), self.c.index_select(0, csel))
            _merge(self.best_val, self.best_id, qsel, exact.float(), self.ci[csel])


def earlier_max_similarity(
    q: torch.Tensor,
    q_pos: np.ndarray,
    c: torch.Tensor,
    c_pos: np.ndarray,
    c_ids: np.ndarray,
    *,
    block_rows: int = 4096,
    compute_dtype: torch.dtype | str = torch.float32,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `q`: the largest canonical similarity (float32) to a row of `c`
    whose position is smaller, and that row's id (the smallest among equal values); -inf
    and -1 where no row of `c` is earlier.

    `q`, `c`: unit rows (`unit_rows`) on one device, each sorted by its positions
    `q_pos`, `c_pos` (int64, ascending, in one order shared by both; `c` may be `q`).
    `stats`, if given, is filled with counts: GEMM blocks, candidate groups, pairs
    recomputed exactly.
    """
    dtype = DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got {compute_dtype!r}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    q_pos = np.asarray(q_pos, dtype=np.int64)
    c_pos = np.asarray(c_pos, dtype=np.int64)
    search = _Search(q, q_pos, c, c_pos, np.asarray(c_ids, np.int64), dtype, block_rows, stats)
    if q.shape[0] == 0 or c.shape[0] == 0:
        return search.best_val, search.best_id
    with _exact_matmul(), torch.no_grad():
        return search.run()


def node_max_similarity(
    x: np.ndarray | torch.Tensor,
    ids: np.ndarray,
    rank_scores: np.ndarray,
    *,
    block_rows: int = 4096,
    compute_dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup within one node: each row's maximum cosine similarity to an earlier-ranked
    row, and that row's id.

    Rows are ranked by (`rank_scores` ascending, `ids`); `ids` must be unique. Returns
    (max_sim float32, earlier_id int64) in the input's row order, -inf and -1 for the
    first-ranked row. Exact (see the module doc) for any `block_rows` and
    `compute_dtype` (float32, bfloat16, float16: bf16/fp16 GEMMs on CUDA; on CPU their
    rounding, multiplied in float32). `device`: None keeps `x`'s.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique within a node: they break ranking ties")
    order = np.lexsort((ids, np.asarray(rank_scores)))
    t = torch.as_tensor(x)
    unit = unit_rows(t[torch.as_tensor(order, device=t.device)], device)
    pos = np.arange(len(ids), dtype=np.int64)
    val, eid = earlier_max_similarity(
        unit,
        pos,
        unit,
        pos,
        ids[order],
        block_rows=block_rows,
        compute_dtype=compute_dtype,
        stats=stats,
    )
    max_sim = np.empty(len(ids), dtype=np.float32)
    earlier_id = np.empty(len(ids), dtype=np.int64)
    max_sim[order] = val.cpu().numpy()
    earlier_id[order] = eid.cpu().numpy()
    return max_sim, earlier_id
