"""The taxonomy as data: per level, the centroids of its nodes and each node's parent.

Nodes of a level are numbered 0..n-1 and sorted by parent, so the children of a
parent form one contiguous block; that block structure is what the grouped
assignment kernel consumes, and the same code labels rows during the fit and
after it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mdf_taxonomy import kernels
from mdf_taxonomy.model.config import TaxonomyConfig


@dataclass
class Level:
    centroids: np.ndarray  # (n_nodes, dim) float32
    parents: np.ndarray  # (n_nodes,) int64, node id in the level above (0 = root for level 1)
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.parents = np.ascontiguousarray(self.parents, dtype=np.int64)
        if self.centroids.ndim != 2 or self.parents.shape != (self.centroids.shape[0],):
            raise ValueError(
                f"level arrays disagree: centroids {self.centroids.shape}, "
                f"parents {self.parents.shape}"
            )
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
        return {"centroids": self.centroids, "parents": self.parents, "_on_device": {}}


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
        `assigner`: the kernels (None: `kernels.AutoAssigner()`). `x_sqnorm`: the rows'
        norms from the level above (see `kernels.Assignment`)."""
        lv = self.levels[level - 1]
        n_parents = 1 if level == 1 else self.levels[level - 2].n_nodes
        centroids, offsets = lv.on_device(x.device, n_parents)
        return (assigner or kernels.AutoAssigner()).grouped_assign(
            x,
            parents,
            centroids,
            offsets,
            metric=self.config.metric,
            with_second=with_second,
            x_sqnorm=x_sqnorm,
        )

    def walk(
        self, x: torch.Tensor, upto: int, assigner: kernels.Assigner | None = None
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Descend `upto` levels from the root for prepared rows.

        Returns (paths (N, upto) int32 node ids, deepest node ids, kernel distance to
        them); with upto=0 every row sits at the root (id 0, distance 0).
        """
        n = x.shape[0]
        ids = torch.zeros(n, dtype=torch.int64, device=x.device)
        distance = torch.zeros(n, dtype=torch.float32, device=x.device)
        per_level = []
        x_sqnorm = None  # computed by the first level, reused by the next ones
        assigner = assigner or kernels.AutoAssigner()
        for level in range(1, upto + 1):
            a = self.assign_level(x, ids, level, assigner=assigner, x_sqnorm=x_sqnorm)
            ids, distance, x_sqnorm = a.ids, a.distance, a.x_sqnorm
            per_level.append(ids)
        # one copy to the host at the end: the GPU labels the next level meanwhile
        paths = torch.stack(per_level, 1) if per_level else ids.new_zeros((n, 0))
        return paths.to(torch.int32).cpu().numpy(), ids, distance

    def assign_paths(
        self,
        x: np.ndarray | torch.Tensor,
        upto: int | None = None,
        assigner: kernels.Assigner | None = None,
        device: str | torch.device = "cpu",
        prepared: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Node id per level for every row, and the distance to the deepest centroid.

        Returns (paths (N, upto) int32, distance (N,) float32); the distance is
        Euclidean for "l2" and 1 - cosine similarity for "cosine". `prepared` rows
        have been through `prepare` already; `assigner` as for `walk`.
        """
        upto = self.n_levels if upto is None else upto
        paths, _, distance = self.walk(x if prepared else self.prepare(x, device), upto, assigner)
        distance = distance.float().cpu().numpy()
        if self.config.metric == "l2":
            distance = np.sqrt(np.maximum(distance, 0.0))
        return paths, distance.astype(np.float32)


def format_path(path_row: np.ndarray) -> str:
    return "/".join(str(int(v)) for v in path_row)
