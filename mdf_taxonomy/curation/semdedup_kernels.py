"""SemDeDup's within-node search on the fused assignment kernels (`TritonAssigner`).

The maximum similarity to an earlier row is a nearest-centroid search: with the node's unit
rows sorted by rank, row block [s, s + B) searches the rows before it, U[:s], as
"centroids" (cosine, with the top-2 scores), so the N x N similarity matrix is never
written; the B x B diagonal block, where only j < i counts, is one small masked matmul.
The kernels run at GEMM speed but are exact only on their own rounded arithmetic, so
their answer is used only where it is provably the canonical one (`semdedup`'s module doc):

* every pair's kernel score is within `tol` of its exact similarity (`kernel_tolerance`);
* the chosen pair's canonical value c is recomputed (`canonical_dot`, float32);
* if the runner-up score + `tol` < c - 2^-20, every other pair's exact value is below
  c - 2^-20, so its canonical float32 value is strictly below c: the chosen pair is the
  unique maximum and (c, its id) is what `earlier_max_similarity` stores; ties cannot occur.

The other rows ("uncertain": exact duplicates, near-ties, a wide tolerance) are settled by
a second pass: a low-precision GEMM of those rows against the earlier rows, every pair
whose score can reach c (>= c - tol' - 2^-20, tol' the GEMM's `similarity_tolerance`)
recomputed canonically and merged as `semdedup` does (the larger value, then the smaller
id). So the stored (max_sim, earlier_id) are bit-identical to `earlier_max_similarity`'s
for every row, compute dtype and block size. The pass costs a dense GEMM per uncertain
row: cheap for float16 (tolerance 0.0015 at dim 1024), nearly the whole triangle again for
bfloat16 (0.0119: most rows are near-ties at that resolution), so prefer float16.

Tolerance of the kernels (`kernel_tolerance`): bf16/fp16 inputs are multiplied on tensor
cores into float32, as cuBLAS does, so `similarity_tolerance(dtype, dim)` holds; float32
inputs run as 3xTF32, whose error (~2^-21 + float32 accumulation) is bounded here by the
float16 tolerance (which holds even for one plain TF32 product: 2^-11 unit roundoff, no
subnormals). One more 2^-20 covers the kernel's float32 `1 - x.c` distance.

Top-level imports: numpy, torch and `mdf_taxonomy.kernels` (Triton loads when a kernel
runs); `semdedup`'s helpers are imported where used.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mdf_taxonomy.kernels import make_assigner, triton_available

__all__ = ["DIAGONAL_ROWS", "assigner_max_similarity", "kernel_available", "kernel_tolerance"]

DIAGONAL_ROWS = 1024  # rows per kernel call and per diagonal block (at most block_rows)
_STEP = 2.0**-20  # canonical vs exact and float32 roundings (semdedup._SLACK)
_FALLBACK_ELEMENTS = 1 << 25  # scores per second-pass GEMM chunk
_PAIR_CHUNK = 1 << 22  # candidate pairs recomputed per canonical_dot call


def kernel_available(device: torch.device | str) -> bool:
    """Whether the kernel path serves tensors on `device`: CUDA with Triton importable."""
    return torch.device(device).type == "cuda" and triton_available()


def kernel_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Bound on |kernel similarity - exact| for unit rows in `dtype` (see the module doc)."""
    from mdf_taxonomy.curation.semdedup import similarity_tolerance

    grade = torch.float16 if dtype == torch.float32 else dtype
    return similarity_tolerance(grade, dim) + _STEP


def _diagonal_top2(low: torch.Tensor, a: int, b: int):
    """Best and second score of rows [a, b) against the earlier rows of [a, b), and the
    best's column (global); -inf where there are none."""
    s = (low[a:b] @ low[a:b].T).float()
    s.masked_fill_(torch.ones_like(s, dtype=torch.bool).triu_(), -math.inf)
    if b - a == 1:
        return s[:, 0], torch.full_like(s[:, 0], -math.inf), torch.zeros_like(s[:, 0]).long()
    top, arg = s.topk(2, dim=1)
    return top[:, 0], top[:, 1], arg[:, 0] + a


def _kernel_top2(assigner, low: torch.Tensor, a: int, b: int):
    """Best and second kernel score of rows [a, b) against rows [0, a), the best's id."""
    out = assigner.assign(low[a:b], low[:a], metric="cosine", with_second=True)
    one = torch.ones((), dtype=torch.float64, device=low.device)
    best = one - out.distance.double()  # exact: the distance is a float32 near 1
    second = one - out.second.double() if a > 1 else torch.full_like(best, -math.inf)
    return best, second, out.ids


def _first_pass(unit, low, block, tol, assigner, stats):
    """(canonical best of the kernel's choice, its column, certain) per sorted row."""
    from mdf_taxonomy.curation.semdedup import canonical_dot

    n = unit.shape[0]
    dev = unit.device
    col = torch.full((n,), -1, dtype=torch.int64, device=dev)
    runner = torch.full((n,), -math.inf, dtype=torch.float64, device=dev)
    for a in range(0, n, block):
        b = min(a + block, n)
        best, second, arg = _diagonal_top2(low, a, b)
        best, second = best.double(), second.double()
        if a > 0:
            kb, ks, kid = _kernel_top2(assigner, low, a, b)
            stats["kernel_calls"] += 1
            take = kb >= best  # the larger wins; an equal score is a near-tie anyway
            second = torch.where(take, torch.maximum(ks, best), torch.maximum(second, kb))
            arg = torch.where(take, kid, arg)
        col[a:b] = arg
        runner[a:b] = second
    col[0] = -1
    val = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    rows = torch.arange(1, n, device=dev)
    val[1:] = canonical_dot(unit[1:], unit.index_select(0, col[1:])).float()
    certain = runner + tol < val.double() - _STEP
    certain[0] = True
    return val, col, certain


def _second_pass(unit, low, rows, lower, tol, val, eid, ids_t, stats):
    """Settle `rows` (sorted positions) exactly: every pair within reach of `lower` (a
    canonical value each row attains) recomputed canonically, merged by (value, -id)."""
    from mdf_taxonomy.curation.semdedup import _merge, canonical_dot

    best_val = torch.full((rows.numel(),), -math.inf, dtype=torch.float32, device=unit.device)
    best_id = torch.full((rows.numel(),), -1, dtype=torch.int64, device=unit.device)
    thr = (lower.double() - tol - _STEP).clamp(min=-2.0)
    rows_np = rows.cpu().numpy()
    i = 0
    while i < len(rows_np):
        end = int(rows_np[i])  # the columns before the chunk's last row
        m = max(1, _FALLBACK_ELEMENTS // max(1, end))
        j = min(i + m, len(rows_np))
        end = int(rows_np[j - 1])
        r = rows[i:j]
        s = (low.index_select(0, r) @ low[:end].T).float()
        cols = torch.arange(end, device=unit.device)
        keep = (cols[None, :] < r[:, None]) & (s.double() >= thr[i:j, None])
        pr, pc = torch.nonzero(keep, as_tuple=True)
        stats["rechecked_pairs"] += int(pr.numel())
        for k in range(0, pr.numel(), _PAIR_CHUNK):
            qr, qc = pr[k : k + _PAIR_CHUNK], pc[k : k + _PAIR_CHUNK]
            exact = canonical_dot(unit.index_select(0, r[qr]), unit.index_select(0, qc))
            _merge(best_val, best_id, qr + i, exact.float(), ids_t[qc])
        i = j
    val[rows] = best_val
    eid[rows] = best_id


def assigner_max_similarity(
    unit: torch.Tensor,
    ids: np.ndarray,
    *,
    block_rows: int = 4096,
    compute_dtype: torch.dtype | str = torch.float32,
    stats: dict | None = None,
    assigner=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`earlier_max_similarity(unit, pos, unit, pos, ids)` (pos = 0..n-1) on the kernels:
    for each of the rank-sorted unit rows (`unit_rows`), the largest canonical similarity
    (float32) to an earlier row and that row's id (the smallest among equal values); -inf
    and -1 for the first row. The same bits as `earlier_max_similarity` (module doc).

    `block_rows`: rows per kernel call, at most DIAGONAL_ROWS (the diagonal blocks are
    dense). `assigner`: an exact `Assigner` (default: the Triton one). `stats`, if given,
    gets counts: kernel calls, uncertain rows, pairs recomputed in the second pass.
    """
    from mdf_taxonomy.curation.semdedup import (
        _UNIT_ROUNDOFF,
        DTYPES,
        _exact_matmul,
        _low,
        similarity_tolerance,
    )

    dtype = DTYPES[compute_dtype] if isinstance(compute_dtype, str) else compute_dtype
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got {compute_dtype!r}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    stats = stats if stats is not None else {}
    for key in ("kernel_calls", "uncertain_rows", "rechecked_pairs"):
        stats.setdefault(key, 0)
    n, dim = unit.shape
    dev = unit.device
    val = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    eid = torch.full((n,), -1, dtype=torch.int64, device=dev)
    if n < 2:
        return val, eid
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=dev)
    assigner = assigner if assigner is not None else make_assigner("triton")
    block = min(block_rows, DIAGONAL_ROWS)
    with _exact_matmul(), torch.no_grad():
        low = _low(unit, dtype)
        val, col, certain = _first_pass(
            unit, low, block, kernel_tolerance(dtype, dim), assigner, stats
        )
        eid[1:] = ids_t.index_select(0, col[1:])
        rows = torch.nonzero(~certain, as_tuple=True)[0]
        stats["uncertain_rows"] += int(rows.numel())
        if rows.numel():
            tol = similarity_tolerance(dtype, dim)
            _second_pass(unit, low, rows, val[rows], tol, val, eid, ids_t, stats)
    return val, eid
