"""Clustered embeddings generated inside the loader actors, for scaling runs and demos.

Work item i always yields the same rows (seeded by seed and i), so a run is
reproducible and any number of loaders can share the work without data on disk.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mdf_taxonomy._mdf import DataLoader


class SyntheticEmbeddingLoader(DataLoader):
    """Rows near random unit-length centres; each record holds id, centre and the vector.

    Parameters
    ----------
    rows : int
        Rows in all (before max_samples); required.
    dim : int, default=1024
        Embedding length.
    n_centres : int, default=1024
        Cluster centres the rows are drawn around.
    rows_per_item : int, default=65536
        Rows per work item, the unit loaders share out.
    noise : float, default=0.3
        Root-mean-square length of a row's offset from its centre (centres have length 1).
    seed : int, default=0
        Decides the centres and every item's rows.
    embedding_field : str, default='embedding'
        The record field the vector goes into.
    """

    def __init__(
        self,
        rows: int,
        dim: int = 1024,
        n_centres: int = 1024,
        rows_per_item: int = 65536,
        noise: float = 0.3,
        seed: int = 0,
        embedding_field: str = "embedding",
    ):
        if rows < 1 or dim < 1 or n_centres < 1 or rows_per_item < 1:
            raise ValueError("rows, dim, n_centres and rows_per_item must be >= 1")
        self.rows, self.dim, self.n_centres = rows, dim, n_centres
        self.rows_per_item, self.noise, self.seed = rows_per_item, noise, seed
        self.embedding_field = embedding_field

    def centres(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0])
        c = rng.standard_normal((self.n_centres, self.dim), dtype=np.float32)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def get_file_list(self, max_samples: int | None = None, num_workers: int = 1) -> list[str]:
        rows = min(self.rows, max_samples or self.rows)
        return [f"block:{i}" for i in range(-(-rows // self.rows_per_item))]

    def load_files(
        self, file_list: list[str], worker_id: int | None = None, checkpoint: dict | None = None
    ) -> Iterator[dict]:
        centres = self.centres()
        for item in file_list:
            i = int(item.split(":")[1])
            n = min(self.rows_per_item, self.rows - i * self.rows_per_item)
            rng = np.random.default_rng([self.seed, 1, i])
            labels = rng.integers(0, self.n_centres, n)
            x = centres[labels] + self.noise / np.sqrt(self.dim) * rng.standard_normal(
                (n, self.dim), dtype=np.float32
            )
            first = i * self.rows_per_item
            for j in range(n):
                yield {"id": first + j, "centre": int(labels[j]), self.embedding_field: x[j]}
