"""A fit survives losing a backend actor or the driver, and refuses bad or foreign state.

Every finished pass is a snapshot; a pass whose backend lost rows is re-run from
the same snapshot; a killed driver resumes from LATEST. In every case the final
tree must equal an uninterrupted fit's, bit for bit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as ds
import pytest
from conftest import ROOT, blobs, write_embeddings
from taxonomy_toys import FIT_BUCKET_0, KillingLoader, assert_same_tree

from mdf_taxonomy import _mdf
from mdf_taxonomy.engine import PipelineFit, TaxonomyEngine
from mdf_taxonomy.model import TaxonomyStore, TaxonomyStoreError

DIM = 8
# one Lloyd pass a level: every kill below lands on the first pass, the rest only adds passes
PARAMS = dict(
    n_levels=2, branching_factor=[3, 2], dim=DIM, seed=3, max_iter=1, batch_size=64, progress=False
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 rows: 3 files of one 100-row row group each (3 work items)."""
    root = tmp_path_factory.mktemp("resume-data")
    x, _ = blobs(300, DIM, 6, seed=8)
    for i in range(3):
        sl = slice(i * 100, (i + 1) * 100)
        write_embeddings(
            root / "in" / f"part-{i}.parquet", x[sl], ids=np.arange(300)[sl], row_group_size=100
        )
    return root / "in"


@pytest.fixture(scope="module")
def reference(ray_session, data, tmp_path_factory):
    """An uninterrupted fit: (storage_uri, its final taxonomy)."""
    uri = str(tmp_path_factory.mktemp("resume-ref") / "tax")
    tax = TaxonomyEngine(storage_uri=uri, **PARAMS).fit(str(data))
    assert tax.state.complete and [lv.n_nodes for lv in tax.levels] == [3, 6]
    return uri, TaxonomyStore(uri).load()


# -- (a) a backend bucket actor dies mid-pass -------------------------------------------

VICTIMS = [
    FIT_BUCKET_0,  # a backend bucket
    "pipeline_loader_0",  # the loader itself, mid-stream: its rows are missing
    "pipeline_stage_taxonomy_0",
]  # the stage worker: its batches are lost


def test_actors_killed_mid_pass_are_rerun(reference, data, tmp_path, caplog):
    """A bucket, the loader and the stage worker die in turn, one per attempt at a pass;
    each lost attempt is detected and re-run, and the tree is the uninterrupted one."""
    _, ref = reference
    marker = tmp_path / "killed"
    _mdf.DataLoaderRegistry.register("KillingLoader", KillingLoader)
    engine = TaxonomyEngine(storage_uri=str(tmp_path / "tax"), **PARAMS)
    config = engine._pipeline(str(data), None, fit=True)
    config.data_loader.type = "KillingLoader"
    config.data_loader.params = {
        **config.data_loader.params,
        "marker": str(marker),
        "actor_name": VICTIMS,
    }
    with caplog.at_level(logging.WARNING, logger="mdf_taxonomy.engine"):
        tax = PipelineFit(config, progress=False, max_pass_retries=len(VICTIMS)).run()
    killed = [m for m in (marker, *(f"{marker}.{i}" for i in (1, 2))) if os.path.exists(m)]
    assert len(killed) == 3, "not every victim was reached"
    assert caplog.text.count("incomplete") >= 3, "a lost attempt was not detected and re-run"
    assert_same_tree(tax, ref)
    assert_same_tree(TaxonomyStore(str(tmp_path / "tax")).load(), ref)
    assert tax.state.history == ref.state.history
    assert tax.version == ref.version  # the failed attempts left no snapshot behind


# -- (b) the driver (and its local Ray) is SIGKILLed ------------------------------------


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH")] if p)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _fit_cmd(data, uri, *extra: str, max_iter: int = 3) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mdf_taxonomy.cli",
        "-q",
        "fit",
        "--input",
        str(data),
        "--storage-uri",
        str(uri),
        "--n-levels",
        "2",
        "--branching-factor",
        "3,2",
        "--max-iter",
        str(max_iter),
        *extra,
    ]


def _start(cmd, log) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _latest(uri) -> int:
    try:
        return int((uri / "LATEST").read_text().strip())
    except (FileNotFoundError, ValueError):  # not there yet, or being rewritten
        return -1


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the subprocess's whole session group (driver, raylet, workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # fate-shared Ray processes go down with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return


def test_driver_killed_then_rerun_gives_the_same_tree(data, tmp_path):
    ref_uri, uri = tmp_path / "ref", tmp_path / "tax"
    with open(tmp_path / "ref.log", "wb") as ref_log, open(tmp_path / "run.log", "wb") as log:
        ref_proc = _start(_fit_cmd(data, ref_uri), ref_log)  # uninterrupted, alongside
        victim = _start(_fit_cmd(data, uri), log)
        try:
            deadline = time.monotonic() + 240
            while _latest(uri) < 3:
                assert victim.poll() is None, (
                    f"the fit ended (rc {victim.returncode}) before it could be killed: "
                    + (tmp_path / "run.log").read_text()[-3000:]
                )
                assert time.monotonic() < deadline, "no snapshot 3 within 240s"
                time.sleep(0.05)
            _kill_group(victim)
            assert victim.returncode == -signal.SIGKILL
            killed_at = TaxonomyStore(str(uri)).load()  # the last complete snapshot reads
            assert not killed_at.state.complete and int(killed_at.version) >= 3

            rerun = subprocess.run(
                _fit_cmd(data, uri),
                cwd=ROOT,
                env=_cli_env(),
                capture_output=True,
                text=True,
                timeout=300,
                start_new_session=True,
            )
            assert rerun.returncode == 0, rerun.stdout + rerun.stderr
            assert ref_proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
        finally:
            for p in (victim, ref_proc):
                if p.poll() is None:
                    _kill_group(p)
    got, want = TaxonomyStore(str(uri)).load(), TaxonomyStore(str(ref_uri)).load()
    assert_same_tree(got, want)
    assert got.state.history == want.state.history
    assert got.version == want.version  # resumed from LATEST, did not start over


# -- (c) a corrupt snapshot is refused ------------------------------------------------------


def test_corrupted_snapshot_is_refused(reference, data, tmp_path):
    ref_uri, _ = reference
    uri = tmp_path / "tax"
    shutil.copytree(ref_uri, uri)
    latest = (uri / "LATEST").read_text().strip()
    victim = uri / "snapshots" / latest / "level_2_centroids.npy"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x10  # one bit of one centroid value; the .npy stays loadable
    victim.write_bytes(bytes(raw))
    engine = TaxonomyEngine(storage_uri=str(uri), **PARAMS)
    with pytest.raises(TaxonomyStoreError, match="checksum") as err:
        engine.fit(str(data))
    assert "level_2_centroids.npy" in str(err.value)
    assert (uri / "LATEST").read_text().strip() == latest  # nothing was written over it


# -- (d) resuming with other parameters or other data is refused ---------------------------


@pytest.mark.parametrize(
    "name,value", [("seed", 4), ("max_iter", 3), ("branching_factor", [3, 3]), ("metric", "cosine")]
)
def test_resume_with_other_parameters_is_refused(reference, data, name, value):
    ref_uri, ref = reference
    engine = TaxonomyEngine(storage_uri=ref_uri, **{**PARAMS, name: value})
    with pytest.raises(ValueError, match=name) as err:
        engine.fit(str(data))
    named = [
        k
        for k in ("n_levels", "seed", "max_iter", "branching_factor", "metric", "tol")
        if f"'{k}'" in str(err.value)
    ]
    assert named == [name]  # only the parameter that differs
    assert TaxonomyStore(ref_uri).latest_version() == ref.version


def test_resume_on_other_data_is_refused(reference, data):
    ref_uri, ref = reference
    engine = TaxonomyEngine(storage_uri=ref_uri, **PARAMS)
    with pytest.raises(ValueError, match="other input data"):
        engine.fit(str(data / "part-0.parquet"))
    assert TaxonomyStore(ref_uri).latest_version() == ref.version


def test_driver_killed_mid_labelling_then_rerun_writes_every_row_once(reference, data, tmp_path):
    """Labelled records are staged beside the output and moved there at the end, so a
    run killed while writing leaves no partial output and its rerun adds no duplicates.
    The fit is the reference's, finished: the run goes straight to labelling. Both faces
    stage through the same StagedOutput; the record path (batches of 8) labels slowly
    enough to be killed mid-way, the columnar pass finishes 300 rows before a poll."""
    uri, out = tmp_path / "tax", tmp_path / "out"
    shutil.copytree(reference[0], uri)
    flags = f"--dim {DIM} --seed 3 --batch-size 8 --no-columnar".split()
    cmd = _fit_cmd(data, uri, *flags, "--output", str(out), max_iter=PARAMS["max_iter"])
    with open(tmp_path / "run.log", "wb") as log:
        victim = _start(cmd, log)
        try:
            deadline = time.monotonic() + 300
            while not list(tmp_path.glob("out.staging-*/**/*.parquet")):
                assert victim.poll() is None, (
                    f"the run ended (rc {victim.returncode}) before it was killed: "
                    + (tmp_path / "run.log").read_text()[-3000:]
                )
                assert time.monotonic() < deadline, "labelling never started within 300s"
                time.sleep(0.02)
            _kill_group(victim)
        finally:
            if victim.poll() is None:
                _kill_group(victim)
    assert not out.exists(), "a killed run must not leave a partial output"
    rerun = subprocess.run(
        cmd,
        cwd=ROOT,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "labelled: 300 of 300" in rerun.stdout
    assert not list(tmp_path.glob("out.staging-*")), "the crashed run's staging was not cleared"
    table = ds.dataset(str(out), format="parquet").to_table()
    assert sorted(table["id"].to_pylist()) == list(range(300))
    # and a third run refuses to append to the finished output
    again = subprocess.run(
        cmd,
        cwd=ROOT,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_actors_killed_mid_labelling_are_rerun_and_every_row_written_once(
    reference, data, tmp_path, caplog
):
    from mdf_taxonomy.engine import StagedOutput, pinned, staged_run

    ref_uri, ref = reference
    marker, out = tmp_path / "killed", tmp_path / "out"
    _mdf.DataLoaderRegistry.register("KillingLoader", KillingLoader)
    engine = TaxonomyEngine(storage_uri=ref_uri, **PARAMS)
    config = pinned(engine._pipeline(str(data), str(out), fit=False), ref, fit_pass=False)
    config.data_loader.type = "KillingLoader"
    config.data_loader.params = {
        **config.data_loader.params,
        "marker": str(marker),
        "actor_name": VICTIMS[1:],
    }
    with caplog.at_level(logging.WARNING, logger="mdf_taxonomy.engine"):
        result = staged_run(config, StagedOutput(str(out)), progress=False, desc="label")
    assert marker.exists() and os.path.exists(f"{marker}.1"), "not every victim was reached"
    assert caplog.text.count("incomplete") >= 2, "the lost rows were not detected"
    assert result["labelling"] == {"seen": 300, "labelled": 300, "rejected": {}}
    table = ds.dataset(str(out), format="parquet").to_table()
    assert sorted(table["id"].to_pylist()) == list(range(300))
