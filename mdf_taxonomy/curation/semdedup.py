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

On CUDA with Triton the search runs on the fused assignment kernels instead, with the
same bits (`semdedup_kernels`; `node_max_similarity(kernels=...)`).

Memory is O(block_rows^2) per GEMM block plus a bounded buffer of group maxima (one value
per row and `GROUP` columns), whatever the node's size. Imports numpy and torch only: the
benchmark runs this module on a GPU machine that has nothing else.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mdf_taxonomy.curation.semdedup_exact import (
    _RECHECK_ELEMENTS,
    _SLACK,
    _UNIT_ROUNDOFF,
    DTYPES,
    Clock,
    _exact_matmul,
    _low,
    _merge,
    _tree_sum,
    canonical_dot,
    similarity_tolerance,
)

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

RANKINGS = ("hard", "easy", "random")
GROUP = 8  # columns per kept maximum: the recheck recomputes whole groups
_G_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}  # group maxima per row block and pass
_RANDOM_SALT = 0x5EDD  # the `level` of sample_priorities: another order than the fit's


def is_duplicate(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """The decision for `eps`: max similarity to an earlier row >= 1 - eps (in float64;
    NaN, a row that was not compared, is never a duplicate)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(max_sim, dtype=np.float64) >= 1.0 - float(eps)


def unit_rows(
    x: np.ndarray | torch.Tensor, device: str | torch.device | None = None
) -> torch.Tensor:
    """Rows scaled to unit norm in float64 (fixed-tree norm), as float32 on `device`; the
    same bits for a row whatever rows come with it. Zero or non-finite rows raise."""
    t = torch.as_tensor(x)
    t = t.to(device if device is not None else t.device)
    out = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    ok = torch.ones((), dtype=torch.bool, device=t.device)
    step = max(1, _RECHECK_ELEMENTS // max(1, t.shape[1]))
    for i in range(0, t.shape[0], step):
        x64 = t[i : i + step].double()
        norm = _tree_sum(x64 * x64).sqrt()
        ok &= (torch.isfinite(norm) & (norm > 0)).all()  # checked once: one sync
        out[i : i + step] = (x64 / norm[:, None]).float()
    if not bool(ok):
        raise ValueError("rows must be finite and nonzero to be compared by cosine")
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


def _kernel_search(device: torch.device, kernels: bool | None):
    """`semdedup_kernels.assigner_max_similarity` where it is asked for (`kernels`) or,
    for None, where it serves `device`; else None (also where it does not import: this
    file loaded on its own). Asked for and missing: an error."""
    if kernels is False:
        return None
    try:
        from mdf_taxonomy.curation import semdedup_kernels
    except ImportError:
        semdedup_kernels = None
    if kernels and (semdedup_kernels is None or not semdedup_kernels.triton_available()):
        raise RuntimeError("kernels=True needs mdf_taxonomy.kernels and Triton")
    if semdedup_kernels is None or not (kernels or semdedup_kernels.kernel_available(device)):
        return None
    return semdedup_kernels.assigner_max_similarity


def node_max_similarity(
    x: np.ndarray | torch.Tensor,
    ids: np.ndarray,
    rank_scores: np.ndarray,
    *,
    block_rows: int = 4096,
    compute_dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    stats: dict | None = None,
    kernels: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup within one node: each row's maximum cosine similarity to an earlier-ranked
    row, and that row's id.

    Rows are ranked by (`rank_scores` ascending, `ids`); `ids` must be unique. Returns
    (max_sim float32, earlier_id int64) in the input's row order, -inf and -1 for the
    first-ranked row. Exact (see the module doc) for any `block_rows` and
    `compute_dtype` (float32, bfloat16, float16: bf16/fp16 GEMMs on CUDA; on CPU their
    rounding, multiplied in float32). `block_rows`: the torch search's GEMM blocks (the
    kernels tile on their own). `device`: None keeps `x`'s. `kernels`: search on the
    fused assignment kernels (`semdedup_kernels`, the same bits); None: where they serve
    the device (CUDA with Triton), else the blocked torch search below. `stats`: see the
    searches; with stats["timing"], also the seconds to sort and normalise (prepare) and
    to bring the results back (results).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique within a node: they break ranking ties")
    t = torch.as_tensor(x)
    clock = Clock(stats, torch.device(device) if device is not None else t.device)
    with clock("prepare"):
        order = np.lexsort((ids, np.asarray(rank_scores)))
        unit = unit_rows(t[torch.as_tensor(order, device=t.device)], device)
    pos = np.arange(len(ids), dtype=np.int64)
    search = _kernel_search(unit.device, kernels)
    if search is not None:
        val, eid = search(unit, ids[order], compute_dtype=compute_dtype, stats=stats)
    else:
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
    with clock("results"):
        max_sim = np.empty(len(ids), dtype=np.float32)
        earlier_id = np.empty(len(ids), dtype=np.int64)
        max_sim[order] = val.cpu().numpy()
        earlier_id[order] = eid.cpu().numpy()
    return max_sim, earlier_id
