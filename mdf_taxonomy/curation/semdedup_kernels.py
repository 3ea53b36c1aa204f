"""SemDeDup's within-node search on the fused assignment kernels (`Assigner.assign_earlier`).

The maximum similarity to an earlier row is a nearest-neighbour search over the lower
triangle: with the node's unit rows sorted by rank, one kernel launch compares each row
with the rows before it and keeps the top-2 scores (tiled GEMM on tensor cores, the
epilogue in registers), so the N x N similarity matrix is never written. The kernel is
exact only on its own rounded arithmetic, so its answer is used only where it is provably
the canonical one (`semdedup`'s module doc):

* every pair's score is within its row's bound of the exact similarity (`row_tolerances`:
  from the rows' actual 16-bit rounding errors, ~3x tighter than the worst case
  `kernel_tolerance`); the top-2 is kept over score + bound, an upper bound on each pair;
* the chosen pair's canonical value c is recomputed (`canonical_dot`, float32);
* if the runner-up's upper bound < c - 2^-20, every other pair's exact value is below
  c - 2^-20, so its canonical float32 value is strictly below c: the chosen pair is the
  unique maximum and (c, its id) is what `earlier_max_similarity` stores; no tie can occur.

The other rows ("uncertain": exact copies, near-ties, a wide tolerance) are settled by a
second launch over those rows only (`Assigner.earlier_above`): it lists every earlier
column whose score can reach c (>= c - the row's bound - 2^-19); those pairs are
recomputed canonically and merged as `semdedup` does (the larger value, then the smaller
id). A row with more than `_CANDIDATES` such columns goes through a dense low-precision
GEMM instead (`similarity_tolerance`'s window). So the stored (max_sim, earlier_id) are
bit-identical to `earlier_max_similarity`'s for every row and compute dtype. 11-12% of
the rows are uncertain at fp16 and dim 1024 on benchmarks/bench_dedup.py's node, 50-58%
at bf16 (8x coarser rounding), so prefer float16 (the same tensor-core rate).

Assumptions, those of `similarity_tolerance`: 16-bit products are exact in float32 and the
float32 accumulation errs by at most 1.2 * dim * 2^-24 of sum |x_k y_k|. float32 inputs
run as 3xTF32 (error ~2^-21 + accumulation), bounded by the float16 worst case (which
holds even for one plain TF32 product: 2^-11 unit roundoff). 2^-20 more covers the
kernel's float32 `1 - x.c` distance.

Top-level imports: numpy, torch and `mdf_taxonomy.kernels` (Triton loads when a kernel
runs); `semdedup`'s helpers are imported where used.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mdf_taxonomy.kernels import make_assigner, triton_available

__all__ = ["assigner_max_similarity", "kernel_available", "kernel_tolerance", "row_tolerances"]

_STEP = 2.0**-20  # canonical vs exact and float32 roundings (semdedup._SLACK)
_CANDIDATES = 64  # earlier columns the kernel lists per uncertain row
_FALLBACK_ELEMENTS = 1 << 26  # scores per GEMM chunk of the rows with more
_PAIR_ELEMENTS = 1 << 26  # values of the candidate pairs' rows gathered at once


def kernel_available(device: torch.device | str) -> bool:
    """Whether the kernel path serves tensors on `device`: CUDA with Triton importable."""
    return torch.device(device).type == "cuda" and triton_available()


def kernel_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Bound on |kernel similarity - exact| for unit rows in `dtype` (see the module doc)."""
    from mdf_taxonomy.curation.semdedup_exact import similarity_tolerance

    grade = torch.float16 if dtype == torch.float32 else dtype
    return similarity_tolerance(grade, dim) + _STEP


def row_tolerances(unit: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per row i, a bound on |kernel score(i, p) - exact similarity| valid for every row p
    (float64).

    From the rows' own rounding errors d = ||unit - low|| (T: their max over the node):
    |x~.y~ - x.y| <= d_i ||y|| + (||x|| + d_i) T, products of 16-bit values are exact in
    float32 and its accumulation adds at most 1.2 * dim * 2^-24 ||x~|| ||y~|| (the
    assumption of `similarity_tolerance`). For float32 (3xTF32 kernels) the uniform
    `kernel_tolerance`. Typically 2-3x tighter than the worst case `kernel_tolerance`.
    """
    n, dim = unit.shape
    if dtype == torch.float32:
        return torch.full(
            (n,), kernel_tolerance(dtype, dim), dtype=torch.float64, device=unit.device
        )
    d = torch.empty(n, dtype=torch.float64, device=unit.device)
    step = max(1, (1 << 23) // dim)
    for i in range(0, n, step):
        e = unit[i : i + step].double() - low[i : i + step].double()
        d[i : i + step] = e.mul_(e).sum(1).sqrt_()
    d *= 1 + 2.0**-30  # the float64 norm's own rounding
    big = float(d.max())
    one = 1 + 2.0**-23  # ||unit row||: float32 roundings of a float64 unit vector
    mag = (one + big) ** 2  # bounds ||x~|| ||y~||
    return d * one + (one + d) * big + 1.2 * dim * 2.0**-24 * mag + 2 * _STEP


def _first_pass(unit, low, tol, assigner, clock):
    """(canonical best of the kernel's choice, its column, certain) per sorted row. The
    top-2 is kept over upper bounds (score + the row's tolerance) of the exact values."""
    from mdf_taxonomy.curation.semdedup_exact import canonical_dot

    n = unit.shape[0]
    with clock("kernel"):
        out = assigner.assign_earlier(low, with_second=True)
    with clock("canonical"):
        one = torch.ones((), dtype=torch.float64, device=unit.device)
        second = one - out.second.double() + tol  # -inf for rows 0 and 1; exact: near 1
        col = out.ids
        val = torch.full((n,), -math.inf, dtype=torch.float32, device=unit.device)
        val[1:] = canonical_dot(unit[1:], unit.index_select(0, col[1:])).float()
        certain = second < val.double() - _STEP  # every other pair's exact value is below
        certain[0] = True
    return val, col, certain


def _merge_pairs(unit, pos, local, cols, ids_t, best_val, best_id, stats) -> None:
    """Recompute the pairs (row at sorted position pos[local], column) canonically and fold
    them into the rows' running best (`best_*`, indexed by `local`)."""
    from mdf_taxonomy.curation.semdedup_exact import _merge, canonical_dot

    stats["rechecked_pairs"] += int(local.numel())
    step = max(1, _PAIR_ELEMENTS // unit.shape[1])
    for k in range(0, local.numel(), step):
        qr, qc = local[k : k + step], cols[k : k + step]
        exact = canonical_dot(unit.index_select(0, pos[qr]), unit.index_select(0, qc))
        _merge(best_val, best_id, qr, exact.float(), ids_t[qc])


def _second_pass(unit, low, rows, lower, tk, assigner, dtype, val, eid, ids_t, stats):
    """Settle `rows` (sorted positions) exactly: every pair within reach of `lower` (a
    canonical value each row attains) recomputed canonically, merged by (value, -id).

    The kernel (`Assigner.earlier_above`) lists each row's earlier columns whose score is
    >= lower - the row's tolerance - 2^-19, the first `_CANDIDATES`; a row with more (many
    copies, bf16's wide bound) goes through a dense low-precision GEMM instead."""
    from mdf_taxonomy.curation.semdedup_exact import similarity_tolerance

    dev = unit.device
    best_val = torch.full((rows.numel(),), -math.inf, dtype=torch.float32, device=dev)
    best_id = torch.full((rows.numel(),), -1, dtype=torch.int64, device=dev)
    thr = (lower.double() - tk[rows] - 2 * _STEP).clamp(min=-2.0)
    thr32 = thr.float()  # rounded down, so that no score at the threshold is lost
    thr32 = torch.where(thr32.double() > thr, torch.nextafter(thr32, thr32 - 1), thr32)
    counts, cand = assigner.earlier_above(low, rows, thr32, _CANDIDATES)
    listed = counts <= _CANDIDATES
    local, slot = torch.nonzero((cand >= 0) & listed[:, None], as_tuple=True)
    _merge_pairs(unit, rows, local, cand[local, slot], ids_t, best_val, best_id, stats)
    over = torch.nonzero(~listed, as_tuple=True)[0]
    stats["dense_rows"] += int(over.numel())
    if over.numel():
        tol = similarity_tolerance(dtype, unit.shape[1])
        _dense_pass(unit, low, rows, over, lower, tol, ids_t, best_val, best_id, stats)
    val[rows] = best_val
    eid[rows] = best_id


def _dense_pass(unit, low, rows, over, lower, tol, ids_t, best_val, best_id, stats):
    """The rows `rows[over]` against all their earlier rows by low-precision GEMMs in
    chunks, every pair within reach of `lower` recomputed (`_merge_pairs`)."""
    thr = (lower.double() - tol - 2 * _STEP).clamp(min=-2.0)
    over_np = rows[over].cpu().numpy()
    i = 0
    while i < len(over_np):
        m = max(1, _FALLBACK_ELEMENTS // max(1, int(over_np[i])))
        j = min(i + m, len(over_np))
        end, start = int(over_np[j - 1]), int(over_np[i])  # columns before the last row
        idx = over[i:j]
        r = rows[idx]
        s = low.index_select(0, r) @ low[:end].T
        # in the scores' dtype: rounding to nearest never passes a value of that dtype,
        # so a score >= the threshold is >= its rounding: no candidate is lost
        keep = s >= thr[idx, None].to(s.dtype)
        del s
        cols = torch.arange(start, end, device=unit.device)  # before `start`: all earlier
        keep[:, start:] &= cols[None, :] < r[:, None]
        pr, pc = torch.nonzero(keep, as_tuple=True)
        del keep
        _merge_pairs(unit, rows, idx[pr], pc, ids_t, best_val, best_id, stats)
        i = j


def assigner_max_similarity(
    unit: torch.Tensor,
    ids: np.ndarray,
    *,
    compute_dtype: torch.dtype | str = torch.float32,
    stats: dict | None = None,
    assigner=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`earlier_max_similarity(unit, pos, unit, pos, ids)` (pos = 0..n-1) on the kernels:
    for each of the rank-sorted unit rows (`unit_rows`), the largest canonical similarity
    (float32) to an earlier row and that row's id (the smallest among equal values); -inf
    and -1 for the first row. The same bits as `earlier_max_similarity` (module doc).

    `assigner`: an exact `Assigner` (default: the Triton one). `stats`, if given, gets
    counts: kernel calls, uncertain rows, rows settled by the dense GEMM (dense_rows),
    pairs recomputed in the second pass; with
    stats["timing"] true, also seconds per phase (tolerances, kernel, canonical,
    second_pass; the device synchronised around each).
    """
    from mdf_taxonomy.curation.semdedup_exact import (
        _UNIT_ROUNDOFF,
        DTYPES,
        Clock,
        _exact_matmul,
        _low,
    )

    dtype = DTYPES.get(compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    if dtype not in _UNIT_ROUNDOFF:
        raise ValueError(f"compute_dtype must be one of {list(DTYPES)}, got {compute_dtype!r}")
    stats = stats if stats is not None else {}
    for key in ("kernel_calls", "uncertain_rows", "dense_rows", "rechecked_pairs"):
        stats.setdefault(key, 0)
    n, dim = unit.shape
    dev = unit.device
    val = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    eid = torch.full((n,), -1, dtype=torch.int64, device=dev)
    if n < 2:
        return val, eid
    ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=dev)
    assigner = assigner if assigner is not None else make_assigner("triton")
    clock = Clock(stats, dev)
    with _exact_matmul(), torch.no_grad():
        low = _low(unit, dtype)
        with clock("tolerances"):
            tol = row_tolerances(unit, low, dtype)
        val, col, certain = _first_pass(unit, low, tol, assigner, clock)
        stats["kernel_calls"] += 1
        eid[1:] = ids_t.index_select(0, col[1:])
        rows = torch.nonzero(~certain, as_tuple=True)[0]
        stats["uncertain_rows"] += int(rows.numel())
        if rows.numel():
            with clock("second_pass"):
                lower = val[rows]
                _second_pass(unit, low, rows, lower, tol, assigner, dtype, val, eid, ids_t, stats)
    return val, eid
