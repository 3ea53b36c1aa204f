"""SemDeDup's searches within a rank-sorted node as Triton kernels: each row against the
rows before it (`Assigner.assign_earlier`: the top-2 over the lower triangle) and the
earlier rows over a per-row threshold (`Assigner.earlier_above`: the exact recheck's
candidates). Both reuse the assignment kernel's tiles (`assign_kernels._tile_dot`) and
never write the N x N score matrix; the host side sits here too.

Imports Triton: ``mdf_taxonomy.kernels`` loads it only when a Triton kernel runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .assign_kernels import _tile_dot, _top2_update, store_rows
from .launch import DEFAULT_TUNING, KernelTuning, n_sms, use_ws
from .metrics import finish_distance
from .triton_dispatch import empty_out, kernel_input


@triton.jit
def _self_dot(
    x_rows,
    x_ptr,
    c0,
    c_hi,
    offs_n,
    offs_k,
    stride_x,
    D: tl.constexpr,
    EVEN_D: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The rows against the column tile [c0, c0 + BLOCK_N) of their own matrix (columns
    clamped below c_hi; pointer loads, no descriptors)."""
    return _tile_dot(
        x_rows, x_ptr, x_ptr, x_ptr, 0, c0, c_hi, offs_n, offs_k, stride_x, D, EVEN_D, IS_FP32,
        False, False, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit
def _earlier_tiles(
    x_rows,
    x_ptr,
    rows,
    c_lo,
    c_hi,
    offs_n,
    offs_k,
    stride_x,
    best,
    best_id,
    second,
    second_id,
    D: tl.constexpr,
    EVEN_D: tl.constexpr,
    IS_FP32: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Fold the column tiles [c_lo, c_hi) of score -x.c into the running top-2; MASKED:
    tiles that meet the diagonal, where only columns < the row count."""
    for c0 in range(c_lo, c_hi, BLOCK_N):
        acc = _self_dot(
            x_rows, x_ptr, c0, c_hi, offs_n, offs_k, stride_x, D, EVEN_D, IS_FP32, BLOCK_M,
            BLOCK_N, BLOCK_K,
        )  # fmt: skip
        s = -acc
        if MASKED:
            s = tl.where((c0 + offs_n)[None, :] < rows[:, None], s, float("inf"))
        best, best_id, second, second_id = _top2_update(
            s, c0, c_hi, offs_n, best, best_id, second, second_id, EVEN_N, True, False
        )
    return best, best_id, second, second_id


@triton.jit
def _assign_earlier_kernel(
    x_ptr,
    ids_ptr,
    dist_ptr,
    sec_ptr,
    N,
    stride_x,
    split_cols,
    D: tl.constexpr,
    IS_FP32: tl.constexpr,
    EVEN_D: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per row i of unit rows x: the nearest of the rows j < i (cosine: 1 - x_i.x_j) and
    the runner-up. Row block b compares with columns [0, end of b): the later blocks, which
    have the most tiles, are started first so that the short ones fill the tail. SPLIT:
    program (b, s) takes columns [s * split_cols, (s + 1) * split_cols) only and stores raw
    scores at row s * N + i (merged on the host), so that small nodes fill the GPU."""
    block = tl.num_programs(0) - 1 - tl.program_id(0)
    r0 = block * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = r0 + offs_m
    row_mask = rows < N
    rows = tl.minimum(rows, N - 1).to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_x
    best = tl.full((BLOCK_M,), float("inf"), tl.float32)
    best_id = tl.full((BLOCK_M,), -1, tl.int32)
    second = tl.full((BLOCK_M,), float("inf"), tl.float32)
    second_id = tl.full((BLOCK_M,), -1, tl.int32)
    end = tl.minimum(r0 + BLOCK_M, N)
    c_lo = 0
    if SPLIT:
        c_lo = tl.program_id(1) * split_cols
        end = tl.minimum(end, c_lo + split_cols)
    clear = tl.maximum(tl.minimum((r0 // BLOCK_N) * BLOCK_N, end), c_lo)  # before row r0
    best, best_id, second, second_id = _earlier_tiles(
        x_rows, x_ptr, rows, c_lo, clear, offs_n, offs_k, stride_x, best, best_id, second,
        second_id, D, EVEN_D, IS_FP32, False, True, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    best, best_id, second, second_id = _earlier_tiles(
        x_rows, x_ptr, rows, clear, end, offs_n, offs_k, stride_x, best, best_id, second,
        second_id, D, EVEN_D, IS_FP32, True, False, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if SPLIT:
        out = tl.program_id(1).to(tl.int64) * N + rows
        tl.store(ids_ptr + out, best_id.to(tl.int64), mask=row_mask)
        tl.store(dist_ptr + out, best, mask=row_mask)
        tl.store(sec_ptr + out, second, mask=row_mask)
    else:
        store_rows(
            ids_ptr, dist_ptr, sec_ptr, rows, row_mask, best, best_id, second, best, False, True
        )


def launch_assign_earlier(
    x: torch.Tensor, ids, dist, sec, conf: dict, splits: int = 1, split_cols: int = 0
) -> None:
    """One ``_assign_earlier_kernel`` launch over the rows of ``x`` (16-bit or fp32);
    ``splits`` > 1: column ranges of ``split_cols`` per program, raw scores out."""
    n, d = x.shape
    bm, bn, bk = conf["BLOCK_M"], conf["BLOCK_N"], conf["BLOCK_K"]
    _assign_earlier_kernel[(triton.cdiv(n, bm), splits)](
        x,
        ids,
        dist,
        sec,
        n,
        x.stride(0),
        split_cols,
        d,
        IS_FP32=x.dtype == torch.float32,
        EVEN_D=d % bk == 0,
        SPLIT=splits > 1,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=conf["num_warps"],
        num_stages=conf["num_stages"],
    )


@triton.jit
def _earlier_above_kernel(
    x_ptr,
    pos_ptr,
    thr_ptr,
    cand_ptr,
    count_ptr,
    M,
    stride_x,
    D: tl.constexpr,
    IS_FP32: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For the rows at ascending positions pos (of x's rows), the columns j < pos whose
    score x_pos.x_j >= thr: the first CAP in column order (no atomics: a prefix sum per
    tile gives each hit its slot, so the output is deterministic) and how many there are."""
    block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest blocks first
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    g = block * BLOCK_M + offs_m
    g_mask = g < M
    g = tl.minimum(g, M - 1)
    rows = tl.load(pos_ptr + g)
    thr = tl.load(thr_ptr + g)
    x_rows = x_ptr + rows[:, None] * stride_x
    end = tl.load(pos_ptr + tl.minimum(block * BLOCK_M + BLOCK_M, M) - 1)  # the block's last
    count = tl.zeros((BLOCK_M,), tl.int32)
    out = cand_ptr + g.to(tl.int64)[:, None] * CAP
    for c0 in range(0, end, BLOCK_N):
        acc = _self_dot(
            x_rows, x_ptr, c0, end, offs_n, offs_k, stride_x, D, EVEN_D, IS_FP32, BLOCK_M,
            BLOCK_N, BLOCK_K,
        )  # fmt: skip
        cols = c0 + offs_n
        hit = ((acc >= thr[:, None]) & (cols[None, :] < rows[:, None])).to(tl.int32)
        if tl.max(tl.max(hit, axis=1), axis=0) > 0:  # rare: most tiles hold no candidate
            slot = count[:, None] + tl.cumsum(hit, axis=1) - 1
            keep = (hit > 0) & (slot < CAP) & g_mask[:, None]
            tl.store(out + slot, cols[None, :].to(tl.int64) + 0 * slot, mask=keep)
            count += tl.sum(hit, axis=1)
    tl.store(count_ptr + g, count, mask=g_mask)


def launch_earlier_above(x: torch.Tensor, pos, thr, cand, count, conf: dict) -> None:
    """One ``_earlier_above_kernel`` launch over the gathered rows ``pos``."""
    m, d = pos.shape[0], x.shape[1]
    bm, bn, bk = conf["BLOCK_M"], conf["BLOCK_N"], conf["BLOCK_K"]
    _earlier_above_kernel[(triton.cdiv(m, bm),)](
        x,
        pos,
        thr,
        cand,
        count,
        m,
        x.stride(0),
        d,
        IS_FP32=x.dtype == torch.float32,
        EVEN_D=d % bk == 0,
        CAP=cand.shape[1],
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=conf["num_warps"],
        num_stages=conf["num_stages"],
    )


def assign_earlier_triton(
    x: torch.Tensor,
    *,
    with_second: bool = False,
    tuning: KernelTuning | None = None,
    split_cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row's nearest earlier row (cosine; ``Assigner.assign_earlier``), one fused
    launch over the lower triangle: (ids, dist, second or None).

    A node too small to fill the GPU with row blocks also splits the columns into ranges
    of ``split_cols`` (default: what gives ~2 programs per multiprocessor), merged by the
    exact top-2 merge (lowest id on ties), so the split never changes a bit.

    16-bit rows on sm90 with TMA (``launch.use_ws``) run the warp-specialised Gluon kernel
    (``gluon_earlier``: the same bits, faster); ``tuning.warp_specialized=False`` or a
    fixed ``tuning.assign`` keeps this module's tl kernel.
    """
    if x.dim() != 2:
        raise ValueError(f"bad shape x={tuple(x.shape)}")
    x = kernel_input(x)
    n, d = x.shape
    tuning = tuning or DEFAULT_TUNING
    if n >= 2 and use_ws(x, x, "cosine", 0, tuning):  # k=0: no centroid side to bound
        from .gluon_earlier import assign_earlier_ws

        ids, dist, sec = assign_earlier_ws(x, split_cols=split_cols)
        return ids, dist, sec if with_second else None
    ids, dist, sec = empty_out(n, x.device, True, filled=True)
    if n < 2:
        return ids, dist, sec if with_second else None
    conf = tuning.assign_config(x.dtype, d, n, x.device)
    bm, bn = conf["BLOCK_M"], conf["BLOCK_N"]
    row_blocks = triton.cdiv(n, bm)
    sms = n_sms(x.device)
    if split_cols is None:  # ~8 programs per SM, about half of them below the diagonal
        split_cols = (
            n if row_blocks >= 2 * sms else triton.cdiv(n, triton.cdiv(8 * sms, row_blocks))
        )
    split_cols = triton.cdiv(max(1, split_cols), bn) * bn  # whole column tiles
    splits = triton.cdiv(n, split_cols)
    if splits == 1:
        launch_assign_earlier(x, ids, dist, sec, conf)
        return ids, dist, sec if with_second else None
    pids = torch.full((splits, n), -1, dtype=torch.int64, device=x.device)
    pbest = torch.full((splits, n), float("inf"), dtype=torch.float32, device=x.device)
    psec = torch.full_like(pbest, float("inf"))
    launch_assign_earlier(x, pids, pbest, psec, conf, splits, split_cols)
    b, arg = pbest.min(dim=0)  # the lowest split (the lowest ids) on ties
    ids = pids.gather(0, arg[None])[0]
    others = pbest.scatter(0, arg[None], float("inf")).min(dim=0).values
    sec = torch.minimum(psec.gather(0, arg[None])[0], others)
    dist = finish_distance(b, None, "cosine")
    return ids, dist, finish_distance(sec, None, "cosine") if with_second else None


def earlier_above_triton(
    x: torch.Tensor,
    positions: torch.Tensor,
    thresholds: torch.Tensor,
    cap: int,
    *,
    tuning: KernelTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Assigner.earlier_above`` in one fused launch: (counts, candidates)."""
    x = kernel_input(x)
    m = positions.shape[0]
    count = torch.zeros(m, dtype=torch.int32, device=x.device)
    cand = torch.full((m, cap), -1, dtype=torch.int64, device=x.device)
    if m and cap:
        conf = (tuning or DEFAULT_TUNING).assign_config(x.dtype, x.shape[1], x.shape[0], x.device)
        pos = positions.to(device=x.device, dtype=torch.int64).contiguous()
        thr = thresholds.to(device=x.device, dtype=torch.float32).contiguous()
        launch_earlier_above(x, pos, thr, cand, count, conf)
    return count.long(), cand
