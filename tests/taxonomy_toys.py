"""Helpers for the determinism / resume / S3 tests; Ray workers import this module too.

Keep it free of pytest and conftest imports: loader actors unpickle KillingLoader
from here (the `ray_session` fixture puts tests/ on the workers' PYTHONPATH).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.dataset as ds

from mdf_taxonomy.model import Level, Taxonomy, TaxonomyConfig
from mdf_taxonomy.operators import ParquetEmbeddingLoader

FIT_BUCKET_0 = "mdf_taxonomy_fit_bucket_0"


class KillingLoader(ParquetEmbeddingLoader):
    """A ParquetEmbeddingLoader that kills actors mid-pass: one per pass attempt.

    On starting its 2nd work item it kills the first of `actor_name` (a name or a list
    of names) not killed yet; a marker file per victim (`marker`, then `marker.1`, ...,
    created atomically, so only one loader ever fires per victim) records the kills.
    """

    def __init__(
        self, *args: Any, marker: str, actor_name: str | list[str] = FIT_BUCKET_0, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.marker = marker
        self.victims = [actor_name] if isinstance(actor_name, str) else list(actor_name)

    def markers(self) -> list[str]:
        return [self.marker if i == 0 else f"{self.marker}.{i}" for i in range(len(self.victims))]

    def _fire_once(self) -> None:
        for name, marker in zip(self.victims, self.markers(), strict=True):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            import ray

            ray.kill(ray.get_actor(name), no_restart=True)
            return

    def load_files(
        self, file_list: list[str], worker_id: int | None = None, checkpoint: dict | None = None
    ) -> Iterator[dict]:
        for n, item in enumerate(file_list, start=1):
            if n == 2 and not all(os.path.exists(m) for m in self.markers()):
                self._fire_once()
            yield from super().load_files([item], worker_id, checkpoint)


def small_taxonomy() -> Taxonomy:
    """A 2-level tree (3 x 2 children, dim 4) for the artifact tests."""
    rng = np.random.default_rng(0)
    cfg = TaxonomyConfig(n_levels=2, branching_factor=[3, 2], dim=4)
    l1 = Level(rng.normal(size=(3, 4)), np.zeros(3))
    l2 = Level(rng.normal(size=(6, 4)), np.repeat(np.arange(3), 2))
    return Taxonomy(config=cfg, dim=4, levels=[l1, l2], fingerprint="abc")


def tree_arrays(tax: Any) -> list[tuple[bytes, bytes]]:
    """Every level's centroids and parents as raw bytes (bit-for-bit comparison)."""
    return [(lv.centroids.tobytes(), lv.parents.tobytes()) for lv in tax.levels]


def assert_same_tree(got: Any, want: Any) -> None:
    """Same shape, same config, bit-identical centroids and parents on every level."""
    assert [lv.centroids.shape for lv in got.levels] == [lv.centroids.shape for lv in want.levels]
    assert got.config.to_dict() == want.config.to_dict()
    assert got.state.complete and want.state.complete
    for i, ((gc, gp), (wc, wp)) in enumerate(
        zip(tree_arrays(got), tree_arrays(want), strict=True), start=1
    ):
        assert gp == wp, f"level {i}: parents differ"
        assert gc == wc, (
            f"level {i}: centroids differ (max abs diff "
            f"{abs(got.levels[i - 1].centroids - want.levels[i - 1].centroids).max():.3g})"
        )


def labels_by_id(path: Any, n_levels: int) -> dict[int, tuple]:
    """id -> (taxonomy_path, l1..lN, taxonomy_error) from a labelled Parquet output."""
    table = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    cols = [
        "id",
        "taxonomy_path",
        *[f"taxonomy_l{i}" for i in range(1, n_levels + 1)],
        "taxonomy_error",
    ]
    rows = table.select(cols).to_pylist()
    out = {r["id"]: tuple(r[c] for c in cols[1:]) for r in rows}
    assert len(out) == len(rows), "a record was written more than once"
    return out
