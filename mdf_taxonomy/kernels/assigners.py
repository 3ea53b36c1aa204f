"""One interface for every way of assigning rows to centroids, as FAISS's ``Clustering``
takes an ``Index``: the model and the passes hold an ``Assigner`` and never ask which
kernels run behind it.

``TorchAssigner`` is the exact reference and the CPU path; ``TritonAssigner`` runs the
fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); ``AutoAssigner`` picks
Triton for CUDA tensors when Triton imports, else torch, per call from the tensor's device.
The fp8 shortlist (``fp8_shortlist.Fp8ShortlistAssigner``) is the one that is not exact.
Triton is imported only when a Triton kernel runs, so building any of these needs none.
"""

from __future__ import annotations

import abc
import functools
from typing import NamedTuple

import torch

from .earlier_reference import assign_earlier_torch, earlier_above_torch
from .launch import KernelTuning
from .reference import assign_torch, grouped_assign_torch, partial_sums_torch

KERNEL_BACKENDS = ("auto", "torch", "triton")


class Assignment(NamedTuple):
    """Nearest centroid per row: global ids, distance, optional second-best distance.

    ``x_sqnorm``: the rows' fp32 ``||x||^2`` as the Triton kernels computed them (l2; None
    on the torch backend and for cosine). Passing it back as ``x_sqnorm=`` on later calls
    for the same rows (the levels of a tree walk) spares those kernels their norm pass,
    one extra read of every row, with the same bits.
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


def check_backend(backend: str) -> None:
    """Refuse a kernel backend name that is not one of KERNEL_BACKENDS."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' -> 'triton' on CUDA tensors (if Triton imports), else 'torch'."""
    check_backend(backend)
    if backend != "auto":
        if backend == "triton" and not triton_available():
            raise RuntimeError("backend='triton' requested but triton is not importable")
        return backend
    dev = torch.device(device)
    if dev.type == "cuda" and triton_available():
        return "triton"
    return "torch"


class Assigner(abc.ABC):
    """Nearest-centroid assignment and per-cluster partial sums over tensors.

    ``exact``: ids are the exact argmin (lowest id on ties) and distances those of the
    chosen ids; an inexact assigner may differ at near-ties. Partial sums are exact int64
    fixed point for every assigner.
    """

    name: str
    exact: bool

    @abc.abstractmethod
    def assign(
        self,
        x: torch.Tensor,
        centroids: torch.Tensor,
        *,
        metric: str = "l2",
        with_second: bool = False,
        x_sqnorm: torch.Tensor | None = None,
    ) -> Assignment:
        """Nearest centroid (and distance) per row of ``x``; never builds the N x K matrix.

        Distances: squared L2 for ``metric="l2"``, ``1 - <x, c>`` for ``"cosine"`` (callers
        pass L2-normalised inputs for cosine). ``x_sqnorm``: see ``Assignment``.
        """

    @abc.abstractmethod
    def grouped_assign(
        self,
        x: torch.Tensor,
        groups: torch.Tensor,
        centroids: torch.Tensor,
        child_offsets: torch.Tensor,
        *,
        metric: str = "l2",
        with_second: bool = False,
        x_sqnorm: torch.Tensor | None = None,
    ) -> Assignment:
        """Row i compared only with ``centroids[child_offsets[p]:child_offsets[p+1]]``,
        p = groups[i]. ids are global rows of ``centroids``; a parent without children gives
        id -1 and distance +inf; with a single child, second = +inf."""

    @abc.abstractmethod
    def partial_sums(
        self, x: torch.Tensor, ids: torch.Tensor, n_clusters: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_clusters, D) int64 fixed-point sums and (n_clusters,) int64 counts; id < 0
        skipped. Exact integer arithmetic: identical whatever the row order or batch split."""

    def assign_earlier(self, x: torch.Tensor, *, with_second: bool = False) -> Assignment:
        """Each row's nearest among the rows before it, by cosine (unit rows: distance
        ``1 - <x_i, x_j>``, j < i): SemDeDup's search within a rank-sorted node, the lower
        triangle only, never the N x N matrix. Row 0 has none: id -1, distance +inf."""
        raise NotImplementedError(f"{type(self).__name__} has no assign_earlier")

    def earlier_above(
        self, x: torch.Tensor, positions: torch.Tensor, thresholds: torch.Tensor, cap: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For the rows of ``x`` at ascending ``positions``, the earlier rows j < position
        whose score ``<x_p, x_j>`` is >= the row's threshold: (counts (M,) int64, the first
        ``cap`` such j per row in ascending order, -1 after them (M, cap) int64). The
        candidates SemDeDup's exact recheck needs, without the rows x N score matrix."""
        raise NotImplementedError(f"{type(self).__name__} has no earlier_above")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TorchAssigner(Assigner):
    """The torch reference: the oracle of the tests and the CPU path (exact; computes its
    own norms in fp64, so ``x_sqnorm`` is not used and never returned)."""

    name = "torch"
    exact = True

    def assign(self, x, centroids, *, metric="l2", with_second=False, x_sqnorm=None):
        return Assignment(*assign_torch(x, centroids, metric=metric, with_second=with_second))

    def grouped_assign(
        self, x, groups, centroids, child_offsets, *, metric="l2", with_second=False, x_sqnorm=None
    ):
        return Assignment(
            *grouped_assign_torch(
                x, groups, centroids, child_offsets, metric=metric, with_second=with_second
            )
        )

    def partial_sums(self, x, ids, n_clusters):
        return partial_sums_torch(x, ids, n_clusters)

    def assign_earlier(self, x, *, with_second=False):
        return Assignment(*assign_earlier_torch(x, with_second=with_second))

    def earlier_above(self, x, positions, thresholds, cap):
        return earlier_above_torch(x, positions, thresholds, _check_cap(cap))


def _check_cap(cap: int) -> int:
    if not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an int >= 1, got {cap!r}")
    return cap


def _dispatch():
    from . import triton_dispatch

    return triton_dispatch


def _earlier_kernels():
    from . import earlier_kernels

    return earlier_kernels


def _partial_sums_triton():
    from . import triton_partial_sums

    return triton_partial_sums


class TritonAssigner(Assigner):
    """The fused Triton kernels (exact ids; fp32 accumulation of the input precision).
    ``tuning``: launch choices fixed by the caller (``KernelTuning``); None: the table's.
    Raises at call time, not when built, where Triton does not import (an assigner built
    on a driver without Triton still runs on the GPU workers it is shipped to)."""

    name = "triton"
    exact = True

    def __init__(self, tuning: KernelTuning | None = None):
        self.tuning = tuning

    def _ready(self, x: torch.Tensor) -> None:
        resolve_backend("triton", x.device)

    def assign(self, x, centroids, *, metric="l2", with_second=False, x_sqnorm=None):
        self._ready(x)
        return Assignment(
            *_dispatch().assign_triton(
                x,
                centroids,
                metric=metric,
                with_second=with_second,
                x_sqnorm=x_sqnorm,
                tuning=self.tuning,
            )
        )

    def grouped_assign(
        self, x, groups, centroids, child_offsets, *, metric="l2", with_second=False, x_sqnorm=None
    ):
        self._ready(x)
        return Assignment(
            *_dispatch().grouped_assign_triton(
                x,
                groups,
                centroids,
                child_offsets,
                metric=metric,
                with_second=with_second,
                x_sqnorm=x_sqnorm,
                tuning=self.tuning,
            )
        )

    def partial_sums(self, x, ids, n_clusters):
        self._ready(x)
        return _partial_sums_triton().partial_sums_triton(x, ids, n_clusters, tuning=self.tuning)

    def assign_earlier(self, x, *, with_second=False):
        self._ready(x)
        kernels = _earlier_kernels()
        return Assignment(
            *kernels.assign_earlier_triton(x, with_second=with_second, tuning=self.tuning)
        )

    def earlier_above(self, x, positions, thresholds, cap):
        self._ready(x)
        return _earlier_kernels().earlier_above_triton(
            x, positions, thresholds, _check_cap(cap), tuning=self.tuning
        )

    def __repr__(self) -> str:
        return f"TritonAssigner(tuning={self.tuning!r})"


class DelegatingAssigner(Assigner):
    """Hands every call to the assigner ``_for(x)`` picks; subclasses override ``_for``
    and the calls they serve themselves."""

    def _for(self, x: torch.Tensor) -> Assigner:
        raise NotImplementedError

    def assign(self, x, centroids, *, metric="l2", with_second=False, x_sqnorm=None):
        return self._for(x).assign(
            x, centroids, metric=metric, with_second=with_second, x_sqnorm=x_sqnorm
        )

    def grouped_assign(
        self, x, groups, centroids, child_offsets, *, metric="l2", with_second=False, x_sqnorm=None
    ):
        return self._for(x).grouped_assign(
            x,
            groups,
            centroids,
            child_offsets,
            metric=metric,
            with_second=with_second,
            x_sqnorm=x_sqnorm,
        )

    def partial_sums(self, x, ids, n_clusters):
        return self._for(x).partial_sums(x, ids, n_clusters)

    def assign_earlier(self, x, *, with_second=False):
        return self._for(x).assign_earlier(x, with_second=with_second)

    def earlier_above(self, x, positions, thresholds, cap):
        return self._for(x).earlier_above(x, positions, thresholds, cap)


class AutoAssigner(DelegatingAssigner):
    """Triton for CUDA tensors when Triton imports, else torch, decided per call from the
    tensor's device (both exact)."""

    name = "auto"
    exact = True

    def __init__(self, tuning: KernelTuning | None = None):
        self.tuning = tuning
        self._torch = TorchAssigner()
        self._triton = TritonAssigner(tuning)

    def _for(self, x: torch.Tensor) -> Assigner:
        return self._triton if resolve_backend("auto", x.device) == "triton" else self._torch

    def __repr__(self) -> str:
        return f"AutoAssigner(tuning={self.tuning!r})"


def exact_assigner(kernel_backend: str = "auto", tuning: KernelTuning | None = None) -> Assigner:
    """The exact assigner that a ``kernel_backend`` name stands for."""
    check_backend(kernel_backend)
    if kernel_backend == "torch":
        return TorchAssigner()
    if kernel_backend == "triton":
        return TritonAssigner(tuning)
    return AutoAssigner(tuning)
