"""The exact arithmetic semantic dedup stands on, shared by its torch and kernel searches:
the canonical similarity of a pair, the rounding bound of a low-precision one, and the
rule that folds candidates into each row's best (see `semdedup`'s module doc).

Imports torch only.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_SLACK = 2.0**-20  # canonical vs exact (< 1e-14), float32 roundings of the windows
_NO_ID = torch.iinfo(torch.int64).max
_RECHECK_ELEMENTS = 1 << 23  # values per recheck chunk (64 MiB in float64)


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
    at_top = torch.where(vals == top[rows], ids, _NO_ID)  # no boolean indexing: no sync
    low = torch.full_like(best_id, _NO_ID).scatter_reduce(0, rows, at_top, "amin")
    better = (top > best_val) | ((top == best_val) & (low < best_id))
    best_val.copy_(torch.where(better, top, best_val))
    best_id.copy_(torch.where(better, low, best_id))


class Clock:
    """Per-phase seconds into `stats` (synchronising the device) when stats["timing"]."""

    def __init__(self, stats: dict | None, device: torch.device):
        self.stats = stats if stats is not None else {}
        self.on = bool(self.stats.get("timing"))
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.on:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        key = f"{name}_s"
        self.stats[key] = self.stats.get(key, 0.0) + time.perf_counter() - t0
