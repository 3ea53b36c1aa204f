"""The fit's parameters, validated once, in the spirit of scikit-learn's KMeans."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

METRICS = ("l2", "cosine")


@dataclass(frozen=True)
class TaxonomyConfig:
    """Everything that decides the shape of the tree; two fits with equal configs,
    equal data and equal seeds give the same tree bit for bit.

    branching_factor: children per node, one number for every level or one per level.
    tol: a level stops when the relative drop of inertia between passes is below it.
    sample_per_child: init sample rows per child (bottom-k by content hash, so the
        sample does not depend on batch or file order); capped by max_sample_per_node.
    init_iters: Lloyd iterations run in memory on the sample after k-means++.
    """

    n_levels: int = 1
    branching_factor: int | tuple[int, ...] = 16
    dim: int | None = None
    metric: str = "l2"
    seed: int = 0
    max_iter: int = 20
    tol: float = 1e-4
    sample_per_child: int = 64
    max_sample_per_node: int = 65536
    init_iters: int = 10
    embedding_field: str = "embedding"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.branching_factor, list):
            object.__setattr__(self, "branching_factor", tuple(self.branching_factor))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, value: Any, rule: str) -> None:
            if not ok:
                raise ValueError(f"TaxonomyConfig.{name}={value!r}: {rule}")

        need(_is_int(self.n_levels) and self.n_levels >= 1, "n_levels", self.n_levels,
             "must be an integer >= 1")
        bf = self.branching_factor
        if isinstance(bf, tuple):
            need(len(bf) == self.n_levels, "branching_factor", bf,
                 f"a list must have one entry per level ({self.n_levels})")
            need(all(_is_int(b) and b >= 1 for b in bf), "branching_factor", bf,
                 "entries must be integers >= 1")
        else:
            need(_is_int(bf) and bf >= 1, "branching_factor", bf, "must be an integer >= 1")
        need(self.dim is None or (_is_int(self.dim) and self.dim >= 1), "dim", self.dim,
             "must be a positive integer or null")
        need(self.metric in METRICS, "metric", self.metric, f"must be one of {METRICS}")
        need(_is_int(self.seed), "seed", self.seed, "must be an integer")
        need(_is_int(self.max_iter) and self.max_iter >= 1, "max_iter", self.max_iter,
             "must be an integer >= 1")
        need(isinstance(self.tol, int | float) and self.tol >= 0, "tol", self.tol, "must be >= 0")
        need(_is_int(self.sample_per_child) and self.sample_per_child >= 1, "sample_per_child",
             self.sample_per_child, "must be an integer >= 1")
        need(_is_int(self.max_sample_per_node) and self.max_sample_per_node >= 1,
             "max_sample_per_node", self.max_sample_per_node, "must be an integer >= 1")
        need(_is_int(self.init_iters) and self.init_iters >= 0, "init_iters", self.init_iters,
             "must be an integer >= 0")
        need(isinstance(self.embedding_field, str) and bool(self.embedding_field),
             "embedding_field", self.embedding_field, "must be a non-empty string")

    def branching(self, level: int) -> int:
        """Children per node at `level` (1-based)."""
        bf = self.branching_factor
        return bf[level - 1] if isinstance(bf, tuple) else bf

    def sample_size(self, level: int) -> int:
        return min(self.max_sample_per_node, self.sample_per_child * self.branching(level))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        if isinstance(d["branching_factor"], tuple):
            d["branching_factor"] = list(d["branching_factor"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaxonomyConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown taxonomy parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def same_tree(self, other: TaxonomyConfig) -> bool:
        """True when `other` describes the same fit (so a stored fit may be resumed)."""
        return self.to_dict() == other.to_dict()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
