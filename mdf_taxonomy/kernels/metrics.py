"""The metrics every kernel knows, their one check, and how a ranking score ends as a distance.

The kernels rank by a score that leaves out the row's constant: ``||c||^2 - 2 x.c`` for l2
(squared distance minus ``||x||^2``), ``-x.c`` for cosine (``1 - x.c`` minus 1).
"""

from __future__ import annotations

import torch

METRICS: tuple[str, ...] = ("l2", "cosine")


def check_metric(metric: str) -> None:
    """Refuse a metric the kernels do not implement."""
    if metric not in METRICS:
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")


def finish_distance(
    score: torch.Tensor, x_sqnorm: torch.Tensor | None, metric: str
) -> torch.Tensor:
    """A ranking score as a distance: ``score + ||x||^2`` clamped at 0 (l2; rounding can take
    a near-zero distance below 0) or ``score + 1`` (cosine). The fp32 ops of the Triton
    kernels' epilogue (``_store_rows``), so a host-side finish gives the kernel's bits."""
    if metric == "l2":
        return (score + x_sqnorm).clamp_min_(0.0)
    return score + 1.0
