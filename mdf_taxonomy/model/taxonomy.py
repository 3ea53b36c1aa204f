"""The taxonomy as data: per level, the centroids of its nodes and each node's parent.

Nodes of a level are numbered 0..n-1 and sorted by parent, so the children of a
parent form one contiguous block; that block structure is what the grouped
assignment kernel consumes, and the same code labels rows during the fit and
after it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.model.config import TaxonomyConfig


@dataclass
class Level:
    centroids: np.ndarray  # (n_nodes, dim) float32
    parents: np.ndarray  # (n_nodes,) int64, node id in the level above (0 = root for level 1)
    # (n_nodes,) int64 rows the level's latest Lloyd pass assigned to each node; None before
    # the first pass (and in snapshots written before sizes were stored)
    sizes: np.ndarray | None = None
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.parents = np.ascontiguousarray(self.parents, dtype=np.int64)
        if self.centroids.ndim != 2 or self.parents.shape != (self.centroids.shape[0],):
            raise ValueError(
                f"level arrays disagree: centroids {self.centroids.shape}, "
                f"parents {self.parents.shape}"
            )
        if self.sizes is not None:
            self.sizes = np.ascontiguousarray(self.sizes, dtype=np.int64)
            if self.sizes.shape != self.parents.shape:
                raise ValueError(f"level sizes {self.sizes.shape} != nodes {self.parents.shape}")
        if self.parents.size and np.any(np.diff(self.parents) < 0):
            raise ValueError("level nodes must be sorted by parent")

    @property
    def n_nodes(self) -> int:
        return int(self.centroids.shape[0])

    def child_offsets(self, n_parents: int) -> np.ndarray:
        """(n_parents + 1,) offsets: children of parent p are nodes offsets[p]:offsets[p+1]."""
        return np.searchsorted(self.parents, np.arange(n_parents + 1), side="left").astype(np.int64)

    def on_device(self, device: torch.device, n_parents: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(centroids, child offsets) as tensors on `device`, made once per device so that
        batches neither re-copy them nor miss the kernels' per-tensor caches."""
        key = (str(device), n_parents)
        if key not in self._on_device:
            self._on_device[key] = (
                torch.from_numpy(self.centroids).to(device),
                torch.from_numpy(self.child_offsets(n_parents)).to(device),
            )
        return self._on_device[key]

    def __getstate__(self) -> dict:
        return {
            "centroids": self.centroids,
            "parents": self.parents,
            "sizes": self.sizes,
            "_on_device": {},
        }


@dataclass
class FitState:
    """Where a fit stands; stored in every snapshot so a killed fit resumes from it.

    phase "sample": levels[:level-1] are final and the next pass draws the init
    sample for `level`; phase "lloyd": levels[level-1] holds the centroids being
    refined, `iteration` passes done; phase "done": the tree is complete.
    """

    level: int = 1
    phase: str = "sample"
    iteration: int = 0
    inertia: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.phase == "done"


@dataclass
class Taxonomy:
    config: TaxonomyConfig
    dim: int
    levels: list[Level] = field(default_factory=list)
    state: FitState = field(default_factory=FitState)
    fingerprint: str = ""
    version: str | None = field(default=None, compare=False)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def prepare(
        self,
        x: np.ndarray | torch.Tensor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Rows as the metric sees them (unit norm for cosine), on `device`, in `dtype`
        (bf16/fp16 halve the bytes the GPU kernels read; the CPU path wants float32)."""
        if isinstance(x, np.ndarray) and not x.flags.writeable:  # a view on Arrow's buffer:
            with warnings.catch_warnings():  # read, never written, so no copy is needed
                warnings.simplefilter("ignore", UserWarning)
                t = torch.as_tensor(x)
        else:
            t = torch.as_tensor(x)
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise ValueError(f"expected rows of {self.dim} values, got shape {tuple(t.shape)}")
        t = t.to(device)
        if self.config.metric == "cosine":
            t = torch.nn.functional.normalize(t.float(), dim=1)
        return t.to(dtype)

    def assign_level(
        self,
        x: torch.Tensor,
        parents: torch.Tensor,
        level: int,
        assigner: kernels.Assigner | None = None,
        with_second: bool = False,
        x_sqnorm: torch.Tensor | None = None,
    ) -> kernels.Assignment:
        """Nearest child of each row's parent at `level` (1-based); rows already prepared.
        `assigner`: the kernels (None: `kernels.AutoAssigner()`), under the tree's own
        centroid_search, whoever calls. `x_sqnorm`: the rows' norms from the level above
        (see `kernels.Assignment`)."""
        lv = self.levels[level - 1]
        n_parents = 1 if level == 1 else self.levels[level - 2].n_nodes
        centroids, offsets = lv.on_device(x.device, n_parents)
        cfg = self.config
        search = kernels.with_centroid_search(
            assigner or kernels.AutoAssigner(),
            cfg.centroid_search,
            cfg.coarse_min_children,
            cfg.coarse_probe,
        )
        return search.grouped_assign(
            x,
            parents,
            centroids,
            offsets,
            metric=self.config.metric,
            with_second=with_second,
            x_sqnorm=x_sqnorm,
        )

    def walk(
        self,
        x: torch.Tensor,
        upto: int,
        assigner: kernels.Assigner | None = None,
        with_second: bool = False,
    ) -> tuple[np.ndarray, kernels.Assignment]:
        """Descend `upto` levels from the root for prepared rows.

        Returns (paths (N, upto) int32 node ids, the deepest level's Assignment: node
        ids, kernel distance and, `with_second`, the second-best sibling's distance);
        with upto=0 every row sits at the root (id 0, distance 0).
        """
        n = x.shape[0]
        last = kernels.Assignment(
            torch.zeros(n, dtype=torch.int64, device=x.device),
            torch.zeros(n, dtype=torch.float32, device=x.device),
            None,
        )
        per_level = []
        assigner = assigner or kernels.AutoAssigner()
        for level in range(1, upto + 1):
            last = self.assign_level(  # norms from the level above are reused
                x,
                last.ids,
                level,
                assigner=assigner,
                with_second=with_second and level == upto,
                x_sqnorm=last.x_sqnorm,
            )
            per_level.append(last.ids)
        # one copy to the host at the end: the GPU labels the next level meanwhile
        paths = torch.stack(per_level, 1) if per_level else last.ids.new_zeros((n, 0))
        return paths.to(torch.int32).cpu().numpy(), last

    def assign_paths(
        self,
        x: np.ndarray | torch.Tensor,
        upto: int | None = None,
        assigner: kernels.Assigner | None = None,
        device: str | torch.device = "cpu",
        prepared: bool = False,
    ) -> Labels:
        """Node id per level for every row, its distance to the deepest centroid, and how
        far the runner-up among that centroid's siblings is behind it.

        Distances are Euclidean for "l2" and 1 - cosine similarity for "cosine"; the
        margin (second-best minus best, in the same unit) is +inf for an only child and 0
        for a tie. `prepared` rows have been through `prepare` already; `assigner` as for
        `walk`.
        """
        upto = self.n_levels if upto is None else upto
        x = x if prepared else self.prepare(x, device)
        paths, last = self.walk(x, upto, assigner, with_second=upto > 0)
        distance = last.distance.float().cpu().numpy()
        second = distance if last.second is None else last.second.float().cpu().numpy()
        if self.config.metric == "l2":
            distance, second = (np.sqrt(np.maximum(d, 0.0)) for d in (distance, second))
        with np.errstate(invalid="ignore"):
            margin = second - distance
        return Labels(paths, distance.astype(np.float32), margin.astype(np.float32))


class Labels(NamedTuple):
    """What labelling gives per row (see `Taxonomy.assign_paths`)."""

    paths: np.ndarray  # (N, levels) int32 node ids
    distance: np.ndarray  # (N,) float32, to the deepest centroid
    margin: np.ndarray  # (N,) float32, runner-up sibling's distance minus `distance`


def format_path(path_row: np.ndarray) -> str:
    return "/".join(str(int(v)) for v in path_row)
