"""Assignment and partial-sum kernels behind one interface, ``Assigner`` (``assigners``).

``make_assigner(kernel_backend)`` turns the user's ``kernel_backend`` choice into an
assigner once: ``"torch"`` is the reference and the CPU path, ``"triton"`` runs the fused
Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"auto"`` picks Triton for
CUDA tensors when Triton imports, else torch. ``with_centroid_search`` puts a tree's
approximate search for huge levels (``coarse_search``, not exact) over any of them. The
module functions ``assign``, ``grouped_assign`` and ``partial_sums`` (``backend=``) are
shorthands over it. Triton is
imported only when a Triton kernel runs, so this package imports on machines without CUDA
or Triton.
"""

from __future__ import annotations

import torch

from .assigners import (
    KERNEL_BACKENDS,
    Assigner,
    Assignment,
    AutoAssigner,
    TorchAssigner,
    TritonAssigner,
    check_backend,
    exact_assigner,
    resolve_backend,
    triton_available,
)
from .coarse_search import CENTROID_SEARCHES, CoarseSearchAssigner, with_centroid_search
from .fixed_point import FIXED_POINT_BITS, from_fixed_point
from .launch import KernelTuning
from .metrics import METRICS, check_metric

__all__ = [
    "CENTROID_SEARCHES",
    "KERNEL_BACKENDS",
    "FIXED_POINT_BITS",
    "METRICS",
    "Assigner",
    "Assignment",
    "AutoAssigner",
    "CoarseSearchAssigner",
    "KernelTuning",
    "TorchAssigner",
    "TritonAssigner",
    "assign",
    "check_metric",
    "grouped_assign",
    "make_assigner",
    "partial_sums",
    "from_fixed_point",
    "resolve_backend",
    "triton_available",
    "with_centroid_search",
]


def make_assigner(
    kernel_backend: str = "auto", *, fp8_shortlist: bool = False, tuning: KernelTuning | None = None
) -> Assigner:
    """The assigner for a ``kernel_backend`` name (one of KERNEL_BACKENDS).

    ``fp8_shortlist``: where the backend resolves to Triton, rank in fp8 and re-rank the
    top two exactly (``fp8_shortlist.Fp8ShortlistAssigner``, not exact); without Triton
    nothing would run it, so the exact assigner is returned. ``tuning``: launch choices
    for the Triton kernels (``KernelTuning``; the torch reference has none).
    """
    check_backend(kernel_backend)
    if fp8_shortlist and triton_available():
        from .fp8_shortlist import Fp8ShortlistAssigner

        return Fp8ShortlistAssigner(kernel_backend, tuning)
    return exact_assigner(kernel_backend, tuning)


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
    """``make_assigner(backend, fp8_shortlist=...).assign(...)``: see ``Assigner.assign``.

    ``fp8_shortlist``: on the Triton backend, rank all centroids in fp8 (e4m3, twice the
    bf16 tensor-core rate), then re-rank the top two exactly; ids can differ from the exact
    ones only at fp8-resolution near-ties and ``second`` is then an upper bound. The torch
    backend, and GPUs without fp8 tensor cores (with a warning), compute the exact result.
    ``x_sqnorm``: see ``Assignment`` (used by the exact Triton kernels; the torch reference
    computes its own in fp64).
    """
    return make_assigner(backend, fp8_shortlist=fp8_shortlist).assign(
        x, centroids, metric=metric, with_second=with_second, x_sqnorm=x_sqnorm
    )


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
    """``make_assigner(backend).grouped_assign(...)``: see ``Assigner.grouped_assign``."""
    return make_assigner(backend).grouped_assign(
        x,
        groups,
        centroids,
        child_offsets,
        metric=metric,
        with_second=with_second,
        x_sqnorm=x_sqnorm,
    )


def partial_sums(
    x: torch.Tensor, ids: torch.Tensor, n_clusters: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_assigner(backend).partial_sums(...)``: see ``Assigner.partial_sums``."""
    return make_assigner(backend).partial_sums(x, ids, n_clusters)
