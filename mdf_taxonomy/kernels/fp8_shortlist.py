"""The fp8 shortlist: opt-in, and NOT exact.

Why: e4m3 tensor cores run at twice the bf16 rate. Every centroid is ranked in fp8 (per-row
scales) keeping the two best ids, then ``_rerank_kernel`` decides between those two with
exact distances from the original inputs. Labels equal the exact kernels' except where fp8
rounding pushes the true nearest centroid out of the top two (near-ties at fp8 resolution);
``second`` is then an upper bound of the true second-best. Where the exact path would run
torch, or the GPU has no fp8 tensor cores (with a warning), the exact result is computed.

Imports Triton: ``mdf_taxonomy.kernels.make_assigner`` loads it only when Triton imports.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .assign_kernels import INTERPRET, launch_assign
from .assigners import (
    Assigner,
    Assignment,
    DelegatingAssigner,
    exact_assigner,
    resolve_backend,
)
from .launch import DEFAULT_TUNING, KernelTuning, capability
from .triton_dispatch import assign_triton, cached_for, empty_out, prep, with_oom_retry

FP8_MAX = 448.0  # largest finite float8 e4m3fn value (literal in the kernel below)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    N,
    stride_x,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One read of x, e4m3 out: scale = max|row| / 448 and q = x / scale, both IEEE
    round-to-nearest divisions so the result equals the torch reference bit for bit."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    m = (rows[:, None] < N) & (cols[None, :] < D)
    rows64 = rows.to(tl.int64)
    v = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
    v = v.to(tl.float32)
    sc = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=1), 1e-30), 448.0)
    q = tl.math.div_rn(v, sc[:, None]).to(tl.float8e4nv)
    tl.store(q_ptr + rows64[:, None] * D + cols[None, :], q, mask=m)
    tl.store(scale_ptr + rows, sc, mask=rows < N)


@triton.jit
def _rerank_kernel(
    x_ptr,
    c_ptr,
    cn_ptr,
    cand_ptr,
    cand2_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    N,
    stride_x,
    stride_c,
    D: tl.constexpr,
    L2: tl.constexpr,
    WITH_SECOND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Exact distances to a row's two shortlisted candidates; the nearer one wins (the
    lower id on a tie). Memory-bound: x and two centroid rows per row, fp32 sums."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1).to(tl.int64)
    i0 = tl.load(cand_ptr + rows)
    i1 = tl.load(cand2_ptr + rows)
    c0_rows = c_ptr + tl.maximum(i0, 0)[:, None] * stride_c
    c1_rows = c_ptr + tl.maximum(i1, 0)[:, None] * stride_c
    x_rows = x_ptr + rows[:, None] * stride_x
    dot0 = tl.zeros((BLOCK_M,), tl.float32)
    dot1 = tl.zeros((BLOCK_M,), tl.float32)
    xn = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, D, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        km = kk[None, :] < D
        xv = tl.load(x_rows + kk[None, :], mask=km, other=0.0).to(tl.float32)
        a = tl.load(c0_rows + kk[None, :], mask=km, other=0.0).to(tl.float32)
        b = tl.load(c1_rows + kk[None, :], mask=km, other=0.0).to(tl.float32)
        dot0 += tl.sum(xv * a, axis=1)
        dot1 += tl.sum(xv * b, axis=1)
        xn += tl.sum(xv * xv, axis=1)
    if L2:
        d0 = tl.maximum(tl.load(cn_ptr + tl.maximum(i0, 0)) - 2.0 * dot0 + xn, 0.0)
        d1 = tl.maximum(tl.load(cn_ptr + tl.maximum(i1, 0)) - 2.0 * dot1 + xn, 0.0)
    else:
        d0 = 1.0 - dot0
        d1 = 1.0 - dot1
    d0 = tl.where(i0 >= 0, d0, float("inf"))
    d1 = tl.where(i1 >= 0, d1, float("inf"))
    first = (d0 < d1) | ((d0 == d1) & (i0 <= i1))
    tl.store(ids_ptr + rows, tl.where(first, i0, i1), mask=row_mask)
    tl.store(dist_ptr + rows, tl.where(first, d0, d1), mask=row_mask)
    if WITH_SECOND:
        tl.store(sec_ptr + rows, tl.where(first, d1, d0), mask=row_mask)


def to_fp8_rows(t: torch.Tensor, chunk: int = 1 << 16):
    """Rows quantised to e4m3 with a per-row scale (row max |value| -> 448): (q, scale),
    t ~= q * scale[:, None]. The Triton kernel on CUDA (one pass); torch elsewhere, which
    is the reference (the interpreter's fp8 cast rounds wrongly across binades)."""
    n, d = t.shape
    q = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device=t.device)
    scale = torch.empty(n, dtype=torch.float32, device=t.device)
    if t.device.type == "cuda" and n and d <= 8192:
        bd = triton.next_power_of_2(d)
        bm = max(1, 4096 // bd)
        _quantize_rows_kernel[(triton.cdiv(n, bm),)](
            t, q, scale, n, t.stride(0), d, BLOCK_M=bm, BLOCK_D=bd, num_warps=4
        )
        return q, scale
    for i in range(0, n, chunk):  # bounded fp32 temporaries
        v = t[i : i + chunk].float()
        sc = v.abs().amax(1).clamp_min(1e-30) / FP8_MAX
        q[i : i + chunk] = (v / sc[:, None]).to(torch.float8_e4m3fn)
        scale[i : i + chunk] = sc
    return q, scale


def _fp8_centroids(centroids: torch.Tensor, c: torch.Tensor):
    """The cast centroids quantised to e4m3 with their scales (cached like the cast)."""
    return cached_for(centroids, ("fp8", str(c.device)), lambda: to_fp8_rows(c))


def fp8_supported(device: torch.device) -> bool:
    """fp8 tensor cores: compute capability >= 8.9 (the interpreter emulates them)."""
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRET
    return capability(device) >= (8, 9)


def assign_shortlist_triton(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    metric: str = "l2",
    with_second: bool = False,
    tuning: KernelTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp8 (e4m3) top-2 shortlist over all centroids, then exact re-ranking of the two
    candidates in the input precision.

    Labels equal the exact kernel's except where fp8 rounding pushes the true nearest
    centroid out of the top two (near-ties at fp8 resolution); distances are exact for
    the returned ids; ``second`` is the exact distance of the runner-up candidate (an
    upper bound of the true second-best). Never splits the centroid axis, so a row's
    result does not depend on the batch.
    """
    if not fp8_supported(x.device):
        warnings.warn(
            "fp8_shortlist needs fp8 tensor cores (compute capability >= 8.9); "
            "running the exact kernel instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return assign_triton(x, centroids, metric=metric, with_second=with_second, tuning=tuning)
    tuning = tuning or DEFAULT_TUNING
    x, c, cn = prep(x, centroids, metric)
    c8, c_scale = _fp8_centroids(centroids, c)
    k, d = c.shape

    def run(xs: torch.Tensor):
        n = xs.shape[0]
        ids, dist, sec = empty_out(n, xs.device, with_second)
        if n == 0 or k == 0:
            return ids, dist, sec
        x8, x_scale = to_fp8_rows(xs)
        cand2 = torch.empty_like(ids)
        conf = tuning.fp8_config(d, k, xs.device)
        launch_assign(
            (triton.cdiv(n, conf["BLOCK_M"]),),
            x8,
            c8,
            cn,
            ids,
            dist,
            None,
            conf,
            metric=metric,
            with_second=False,
            k=k,
            scaled=(x_scale, c_scale, cand2),
        )
        bm = 16 if xs.device.type == "cuda" else 4
        _rerank_kernel[(triton.cdiv(n, bm),)](
            xs,
            c,
            cn,
            ids,
            cand2,
            ids,
            dist,
            sec if with_second else dist,
            n,
            xs.stride(0),
            c.stride(0),
            d,
            L2=metric == "l2",
            WITH_SECOND=with_second,
            BLOCK_M=bm,
            BLOCK_D=min(triton.next_power_of_2(d), 256),
            num_warps=4,
        )
        return ids, dist, sec

    return with_oom_retry(run, x)


class Fp8ShortlistAssigner(DelegatingAssigner):
    """The fp8 shortlist where ``kernel_backend`` resolves to Triton, the exact assigner of
    that backend everywhere else (torch tensors, grouped levels, partial sums). Not exact:
    see the module docstring. ``x_sqnorm`` is not used by the shortlist pass."""

    exact = False

    def __init__(self, kernel_backend: str = "auto", tuning: KernelTuning | None = None):
        self.kernel_backend = kernel_backend
        self.tuning = tuning
        self.name = f"{kernel_backend}+fp8"
        self._exact = exact_assigner(kernel_backend, tuning)

    def _for(self, x: torch.Tensor) -> Assigner:
        return self._exact  # grouped levels and partial sums: the exact kernels

    def assign(self, x, centroids, *, metric="l2", with_second=False, x_sqnorm=None):
        if resolve_backend(self.kernel_backend, x.device) != "triton":
            return super().assign(
                x, centroids, metric=metric, with_second=with_second, x_sqnorm=x_sqnorm
            )
        return Assignment(
            *assign_shortlist_triton(
                x, centroids, metric=metric, with_second=with_second, tuning=self.tuning
            )
        )

    def __repr__(self) -> str:
        return f"Fp8ShortlistAssigner({self.kernel_backend!r}, tuning={self.tuning!r})"
