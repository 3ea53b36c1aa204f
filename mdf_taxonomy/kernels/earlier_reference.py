"""Torch references of SemDeDup's within-node searches (`Assigner.assign_earlier`,
`Assigner.earlier_above`): float64 scores, a block of rows at a time; the oracle of the
Triton kernels (`earlier_kernels`) and the CPU path.
"""

from __future__ import annotations

import torch

from .reference import _INF, _rows_per_chunk


def assign_earlier_torch(
    x: torch.Tensor, *, with_second: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row's nearest earlier row by cosine (unit rows; ``Assigner.assign_earlier``):
    exact float64 scores, the lowest id on ties; row 0 gets id -1 and distance +inf."""
    if x.dim() != 2:
        raise ValueError(f"bad shape x={tuple(x.shape)}")
    n, dev = x.shape[0], x.device
    xf = x.to(torch.float64)
    ids = torch.full((n,), -1, dtype=torch.int64, device=dev)
    best = torch.full((n,), -_INF, dtype=torch.float64, device=dev)
    second = best.clone()
    step = _rows_per_chunk(n, 8)
    for a in range(1, n, step):
        b = min(a + step, n)
        s = xf[a:b] @ xf[:b].T
        later = torch.arange(b, device=dev)[None, :] >= torch.arange(a, b, device=dev)[:, None]
        s.masked_fill_(later, -_INF)
        top, arg = s.max(dim=1)  # the first maximum: the lowest id
        best[a:b], ids[a:b] = top, arg
        if with_second:
            second[a:b] = s.scatter_(1, arg[:, None], -_INF).amax(dim=1)
    dist = (1.0 - best).to(torch.float32)
    return ids, dist, (1.0 - second).to(torch.float32) if with_second else None


def earlier_above_torch(
    x: torch.Tensor, positions: torch.Tensor, thresholds: torch.Tensor, cap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Assigner.earlier_above`` on float64 scores, a block of rows at a time."""
    m, dev = positions.shape[0], x.device
    count = torch.zeros(m, dtype=torch.int64, device=dev)
    cand = torch.full((m, cap), -1, dtype=torch.int64, device=dev)
    xf = x.to(torch.float64)
    thr = thresholds.to(device=dev, dtype=torch.float32).double()
    pos = positions.to(device=dev, dtype=torch.int64)
    step = _rows_per_chunk(x.shape[0], 8)
    for a in range(0, m, step):
        p = pos[a : a + step]
        s = xf.index_select(0, p) @ xf.T
        hit = (s >= thr[a : a + step, None]) & (
            torch.arange(x.shape[0], device=dev)[None, :] < p[:, None]
        )
        count[a : a + step] = hit.sum(1)
        r, c = torch.nonzero(hit, as_tuple=True)  # row-major: each row's columns ascending
        slot = torch.arange(r.numel(), device=dev) - torch.searchsorted(r, r)
        keep = slot < cap
        cand[a + r[keep], slot[keep]] = c[keep]
    return count, cand
