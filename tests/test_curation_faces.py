"""The curation steps through the engine and the CLI, end to end on labelled output: fit,
label partitioned by node, dedup; the same marks from either face."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
from conftest import blobs, write_embeddings

from mdf_taxonomy import cli
from mdf_taxonomy.engine import TaxonomyEngine


def _marks(path) -> dict[int, bool]:
    out = ds.dataset(str(path), format="parquet", partitioning="hive").to_table()
    return dict(zip(out["id"].to_pylist(), out["is_duplicate"].to_pylist(), strict=True))


def test_dedup_through_engine_and_cli_marks_the_planted_copies(ray_session, tmp_path, capsys):
    x, _ = blobs(300, 16, 4, seed=3)
    rng = np.random.default_rng(0)
    copies = x[:20] + rng.normal(scale=1e-3, size=(20, 16)).astype(np.float32)
    ids = np.arange(320)
    write_embeddings(tmp_path / "in" / "a.parquet", np.concatenate([x, copies]), ids=ids)
    engine = TaxonomyEngine(
        2,
        [3, 2],
        16,
        str(tmp_path / "tax"),
        metric="cosine",
        max_iter=3,
        partition_by=["taxonomy_l1"],
        progress=False,
    )
    engine.fit(input=str(tmp_path / "in"), output=str(tmp_path / "labelled"))
    summary = engine.dedup(str(tmp_path / "labelled"), str(tmp_path / "engine"), eps=1e-3)
    marks = _marks(tmp_path / "engine")
    assert len(marks) == 320
    # each planted copy or its original is marked (whichever ranks later), nothing else
    marked = {i for i, dup in marks.items() if dup}
    assert all((i in marked) != (i + 300 in marked) for i in range(20))
    assert marked <= {*range(20), *range(300, 320)} and summary["duplicates"] == 20
    argv = ["-q", "dedup", "--input", str(tmp_path / "labelled"), "--storage-uri"]
    argv += [str(tmp_path / "tax"), "--output", str(tmp_path / "cli"), "--eps", "0.001"]
    assert cli.main(argv) == 0
    assert _marks(tmp_path / "cli") == marks
    assert f"records with dedup fields: {tmp_path / 'cli'}" in capsys.readouterr().out
    assert cli.main(argv) == 2  # never appended to: a second run is refused
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0 and _marks(tmp_path / "cli") == marks
