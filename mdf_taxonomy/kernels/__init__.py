"""Assignment and partial-sum kernels with one dispatching API.

``backend="torch"`` is the reference and the CPU path; ``backend="triton"`` runs the fused
Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``"auto"`` picks Triton for
CUDA tensors when Triton imports, else torch. Triton is imported lazily so this module
imports on machines without CUDA or Triton.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .reference import (
    FIXED_POINT_BITS,
    assign_torch,
    from_fixed_point,
    grouped_assign_torch,
    partial_sums_torch,
)

__all__ = [
    "KERNEL_BACKENDS",
    "FIXED_POINT_BITS",
    "Assignment",
    "assign",
    "grouped_assign",
    "partial_sums",
    "from_fixed_point",
    "resolve_backend",
    "triton_available",
]


class Assignment(NamedTuple):
    """Nearest centroid per row: global ids, distance, optional second-best distance.

    ``x_sqnorm``: the rows' fp32 ``||x||^2`` as the Triton kernels computed them (l2; None
    on the torch backend and for cosine). Passing it back as ``x_sqnorm=`` on later calls
    for the same rows (the levels of a tree walk) spares those kernels their norm pass,
    one extra read of every row (measured 10% of a bucketed level), with the
    same bits.
    """

    ids: torch.Tensor
    distance: torch.Tensor
    second: torch.Tensor | None
    x_sqnorm: torch.Tensor | None = None


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (checked once)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


KERNEL_BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' -> 'triton' on CUDA tensors (if Triton imports), else 'torch'."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend != "auto":
        if backend == "triton" and not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        return backend
    dev = torch.device(device)
    if dev.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def _tk():
    from . import triton_kernels

    return triton_kernels


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    metric: str = "l2",
    backend: str = "auto",
    with_second: bool = False,
    fp8_shortlist: bool = False,
    x_sqnorm: torch.Tensor | None = None,
) -> Assignment:
    """Nearest centroid (and distance) per row of ``x``; never builds the N x K matrix.

    Distances: squared L2 for ``metric="l2"``, ``1 - <x, c>`` for ``"cosine"`` (callers
    pass L2-normalised inputs for cosine). ``fp8_shortlist``: on the Triton backend, rank
    all centroids in fp8 (e4m3, twice the bf16 tensor-core rate), then re-rank the top
    two exactly; ids can differ from the exact ones only at fp8-resolution near-ties and
    ``second`` is then an upper bound. The torch backend, and GPUs without fp8 tensor cores
    (with a warning), compute the exact result. ``x_sqnorm``: see ``Assignment`` (used by
    the exact Triton kernels; the torch reference computes its own in fp64).
    """
    if resolve_backend(backend, x.device) == "triton":
        if fp8_shortlist:
            return Assignment(*_tk().assign_shortlist_triton(
                x, centroids, metric=metric, with_second=with_second))
        return Assignment(*_tk().assign_triton(
            x, centroids, metric=metric, with_second=with_second, x_sqnorm=x_sqnorm))
    return Assignment(*assign_torch(x, centroids, metric=metric, with_second=with_second))


def grouped_assign(
    x: torch.Tensor,
    groups: torch.Tensor,
    centroids: torch.Tensor,
    child_offsets: torch.Tensor,
    *,
    metric: str = "l2",
    backend: str = "auto",
    with_second: bool = False,
    x_sqnorm: torch.Tensor | None = None,
) -> Assignment:
    """Row i compared only with ``centroids[child_offsets[p]:child_offsets[p+1]]``, p=groups[i].

    ids are global rows of ``centroids``; a parent without children gives id -1 and
    distance +inf; with a single child, second = +inf. ``x_sqnorm``: see ``Assignment``.
    """
    if resolve_backend(backend, x.device) == "triton":
        return Assignment(*_tk().grouped_assign_triton(
            x, groups, centroids, child_offsets, metric=metric, with_second=with_second,
            x_sqnorm=x_sqnorm))
    return Assignment(*grouped_assign_torch(
        x, groups, centroids, child_offsets, metric=metric, with_second=with_second))


def partial_sums(
    x: torch.Tensor, ids: torch.Tensor, n_clusters: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_clusters, D) int64 fixed-point sums and (n_clusters,) int64 counts; id < 0 skipped.

    Exact integer arithmetic: identical whatever the row order or batch split.
    """
    if resolve_backend(backend, x.device) == "triton":
        return _tk().partial_sums_triton(x, ids, n_clusters)
    return partial_sums_torch(x, ids, n_clusters)
