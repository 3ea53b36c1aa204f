"""Exact per-cluster partial sums on the GPU: rows sorted by cluster, int64 fixed-point sums
per (cluster, chunk of rows), merged by int64 atomics.

Integer adds are associative, so the sums are the same bits whatever the row order, the
chunking or the atomics' order, and equal the torch reference's (``fixed_point``).

Imports Triton: ``mdf_taxonomy.kernels`` loads it only when Triton is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .assign_kernels import INTERPRET
from .fixed_point import FIXED_POINT_BITS
from .launch import DEFAULT_TUNING, KernelTuning
from .triton_dispatch import read_later, work_items


@triton.jit
def _partial_sums_kernel(
    x_ptr,
    perm_ptr,
    item_key_ptr,
    item_pos_ptr,
    item_end_ptr,
    sums_ptr,
    D,
    stride_x,
    SCALE,
    CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """One (cluster, chunk of <= CHUNK sorted rows, column block): int64 sum + atomic add.

    BLOCK_D spans up to 1024 columns so the warps split the columns and the row
    reduction stays inside each thread (no shared-memory reduction per step).
    """
    pid = tl.program_id(0)
    key = tl.load(item_key_ptr + pid) - 1  # key 0 = skipped rows (id < 0)
    if key >= 0:
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        pos0 = tl.load(item_pos_ptr + pid)
        pos_end = tl.minimum(tl.load(item_end_ptr + pid), pos0 + CHUNK)
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.int64)
        for p in tl.range(pos0, pos_end, BLOCK_R, num_stages=NUM_STAGES):
            pos = p + tl.arange(0, BLOCK_R)
            pm = pos < pos_end
            rows = tl.load(perm_ptr + pos, mask=pm, other=0).to(tl.int64)
            v = tl.load(
                x_ptr + rows[:, None] * stride_x + cols[None, :],
                mask=pm[:, None] & col_mask[None, :],
                other=0.0,
            )
            # floor(y + 0.5) with y = v * 2**B, exactly, in fp32: y, floor(y) and
            # y - floor(y) are all exact, so this equals the reference's fp64 rounding.
            y = v.to(tl.float32) * SCALE
            f = tl.floor(y)
            acc += f.to(tl.int64) + ((y - f) >= 0.5).to(tl.int64)
        tl.atomic_add(sums_ptr + key.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=col_mask)


def partial_sums_triton(
    x: torch.Tensor, ids: torch.Tensor, n_clusters: int, *, tuning: KernelTuning | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows by id; per (cluster, chunk of rows) int64 sums merged by int64 atomics."""
    n, d = x.shape
    dev = x.device
    if x.stride(1) != 1:
        x = x.contiguous()
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (
        INTERPRET and x.dtype == torch.bfloat16  # the interpreter mis-handles bf16
    ):
        x = x.float()
    ids = ids.to(device=dev, dtype=torch.int64)
    sums = torch.zeros((n_clusters, d), dtype=torch.int64, device=dev)
    if n == 0 or n_clusters == 0:
        return sums, torch.zeros((n_clusters,), dtype=torch.int64, device=dev)
    id_max = read_later(ids.max())  # checked once everything is enqueued (below)
    keys = ids.clamp_min(-1) + 1  # key 0 = skipped rows
    cuda = dev.type == "cuda"
    ps = (tuning or DEFAULT_TUNING).partial_sums_config(n_clusters, dev)
    # ids >= n_clusters fall past the last segment bound: never summed, so validating
    # after the launch is safe, and the host never stalls the GPU before the work
    perm, ik, ipos, iend, counts = work_items(keys, n_clusters + 1, ps["CHUNK"])
    block_d = min(triton.next_power_of_2(d), 1024) if cuda else 32
    _partial_sums_kernel[(ik.numel(), triton.cdiv(d, block_d))](
        x,
        perm,
        ik,
        ipos,
        iend,
        sums,
        d,
        x.stride(0),
        float(2**FIXED_POINT_BITS),
        BLOCK_D=block_d,
        **ps,
    )
    if id_max() >= n_clusters:
        raise ValueError("ids must be < n_clusters")
    return sums, counts[1:]
