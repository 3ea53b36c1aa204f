"""The fixed-point conventions: the one place that says how floats become exact integers.

Why fixed point: integer adds are associative, so a sum of quantised values is the same
whatever the row order, the batch split or the number of workers (the fit's determinism).
Two quantities are summed this way, each with its own scale and rounding, kept as they are
so that every stored tree keeps its bits:

- per-cluster coordinate sums: ``floor(x * 2**FIXED_POINT_BITS + 0.5)`` (2**24; halves
  round up), computed exactly in fp32 here and in the Triton partial-sum kernel;
- inertia (the sum of distances): ``round(d * 2**INERTIA_FIXED_POINT_BITS)`` (2**16; halves
  round to even, torch.round), in fp64, clamped at 0.
"""

from __future__ import annotations

import torch

FIXED_POINT_BITS: int = 24
_SCALE = float(2**FIXED_POINT_BITS)

INERTIA_FIXED_POINT_BITS: int = 16
INERTIA_SCALE: float = float(2**INERTIA_FIXED_POINT_BITS)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Fixed point: floor(x * 2**FIXED_POINT_BITS + 0.5), exactly, as int64.

    float32/bf16/fp16 inputs are rounded in fp32, as the Triton kernel does: y = x * 2**24
    is exact (a power of two), and so are floor(y) and y - floor(y) wherever the result
    matters, so ``floor(y) + (y - floor(y) >= 0.5)`` equals the fp64 formula bit for bit
    with half the memory traffic. float64 inputs keep the fp64 formula (exact for
    |x| < 2**28).
    """
    if x.dtype == torch.float64:
        return torch.floor(x * _SCALE + 0.5).to(torch.int64)
    y = x.to(torch.float32) * _SCALE
    f = torch.floor(y)
    q = f.to(torch.int64)
    q += y.sub_(f) >= 0.5
    return q


def from_fixed_point(sums: torch.Tensor) -> torch.Tensor:
    """Int64 fixed-point sums back to float64."""
    return sums.to(torch.float64) / _SCALE


def quantize_inertia(distance: torch.Tensor) -> torch.Tensor:
    """Distances in inertia fixed point, flattened: round-half-to-even of
    ``max(d, 0) * 2**INERTIA_FIXED_POINT_BITS`` in float64 (still float64: the caller
    checks the range before it converts to integers)."""
    return torch.round(distance.double().clamp_min(0) * 2**INERTIA_FIXED_POINT_BITS).flatten()


def inertia_from_fixed(total: int) -> float:
    """A fixed-point inertia sum back to a float."""
    return total / INERTIA_SCALE
