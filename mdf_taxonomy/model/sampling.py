"""The sampling rule, in one place: bottom-k by content-hash priority, per parent.

Each row's priority is a hash of its own float32 bytes, the seed and the level; a parent's
sample is its k rows of smallest priority. A row's priority does not depend on where or
with what it was read, and the union of bottom-k sets is order-free, so workers, bucket
actors and the driver can each keep a bottom-k and merge them in any order: the sample is
the same whatever the batch size, worker count or file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64s: a cheap mixer whose outputs look independent."""
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def sample_priorities(x: np.ndarray, seed: int, level: int) -> np.ndarray:
    """(N,) uint64 priority from each float32 row's bytes: bottom-k of these is the sample."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng([seed, level, 0x5A3])
    weights = rng.integers(1, 2**63, size=x.shape[1], dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        h = (x.view(np.uint32).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return splitmix64(h ^ np.uint64((seed * 1_000_003 + level) & 0xFFFFFFFFFFFFFFFF))


def rows_by_key(keys: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(key, row indices) for each distinct key, ascending: one stable sort instead of a
    scan of all rows per key (a sampling batch can touch thousands of parents)."""
    if keys.size == 0:
        return
    order = np.argsort(keys, kind="stable")
    uniq, starts = np.unique(keys[order], return_index=True)
    for key, idx in zip(uniq, np.split(order, starts[1:]), strict=True):
        yield int(key), idx


class SampleSizes(NamedTuple):
    """Sample rows per parent: `default`, or `larger[p]` for a parent split into more
    children than the branching factor (model/balance.py)."""

    default: int
    larger: dict[int, int]

    def of(self, parent: int) -> int:
        return self.larger.get(parent, self.default)


def size_of(k: int | SampleSizes, parent: int) -> int:
    """The sample size of `parent` under `k` (one size for all, or SampleSizes)."""
    return k.of(parent) if isinstance(k, SampleSizes) else k


class BottomK:
    """Per parent, the rows of the k smallest priorities seen so far (the fit's sample).

    The union of bottom-k sets is order-free, so buckets, workers and the driver can each
    keep one and merge them in any order (equal priorities mean equal rows, so which of
    them is kept changes nothing).
    """

    def __init__(self) -> None:
        self.kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def smallest(priorities: np.ndarray, k: int) -> np.ndarray:
        """Indices of the k smallest priorities, in priority order."""
        return np.argsort(priorities, kind="stable")[:k]

    def offer(
        self,
        parents: np.ndarray,
        priorities: np.ndarray,
        vectors: np.ndarray,
        k: int | SampleSizes,
    ) -> dict[int, int]:
        """Merge candidates; returns the k-th priority of every touched parent whose
        sample is full: rows above it can never enter."""
        cut: dict[int, int] = {}
        for p, mine in rows_by_key(parents):
            prio, vec = priorities[mine], vectors[mine]
            if p in self.kept:
                old_prio, old_vec = self.kept[p]
                prio, vec = np.concatenate([old_prio, prio]), np.concatenate([old_vec, vec])
            kp = size_of(k, p)
            keep = self.smallest(prio, kp)
            self.kept[p] = (prio[keep], vec[keep])
            if len(keep) == kp:
                cut[p] = int(prio[keep[-1]])
        return cut

    def vectors(self) -> dict[int, np.ndarray]:
        """parent -> its sample rows, in priority order."""
        return {p: v for p, (_, v) in self.kept.items()}
