"""Fit, label and predict against S3 (moto's server as a real process on loopback).

Input, snapshots and labelled output all go through fsspec with explicit
storage_options; nothing may reach real AWS (dummy credentials, and a dead
default endpoint so anything that forgets storage_options fails fast).
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import blobs, write_embeddings
from taxonomy_toys import assert_same_tree, labels_by_id

from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.model import TaxonomyStore

pytestmark = pytest.mark.filterwarnings("ignore:Your installed version of s3fs:UserWarning")

BUCKET = "taxo-bucket"
DIM = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def aws_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SECURITY_TOKEN", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: never real AWS
        mp.delenv("AWS_PROFILE", raising=False)
        for var in ("NO_PROXY", "no_proxy"):  # loopback never through a proxy
            mp.setenv(var, "127.0.0.1,localhost")
        yield


@pytest.fixture(scope="module")
def moto_url(aws_env, tmp_path_factory):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the handle
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (
                f"moto server exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
            )
            try:
                urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    url, timeout=1
                ).close()
                break
            except urllib.error.HTTPError:  # it answers HTTP: up
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not answer in 60s"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def opts(moto_url):
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_url}}


@pytest.fixture(scope="module")
def s3_data(moto_url, tmp_path_factory):
    """200 rows in 2 Parquet files under s3://BUCKET/data/."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=BUCKET)
    x, _ = blobs(200, DIM, 4, seed=21)
    ids = np.arange(500, 700)
    local = tmp_path_factory.mktemp("s3src")
    for i in range(2):
        sl = slice(i * 100, (i + 1) * 100)
        path = write_embeddings(local / f"part-{i}.parquet", x[sl], ids=ids[sl], row_group_size=50)
        s3.upload_file(str(path), BUCKET, f"data/part-{i}.parquet")
    return f"s3://{BUCKET}/data/", x, ids


@pytest.fixture(scope="module")
def s3_fit(ray_session, s3_data, opts, tmp_path_factory):
    uri, x, ids = s3_data
    out = tmp_path_factory.mktemp("s3out") / "labelled"
    engine = TaxonomyEngine(
        n_levels=2,
        branching_factor=[2, 2],
        storage_uri=f"s3://{BUCKET}/tax",
        storage_options=opts,
        max_iter=1,
        batch_size=64,
        progress=False,
    )
    tax = engine.fit(uri, output=str(out))
    return engine, tax, out


def test_fit_on_s3_stores_snapshots_in_the_bucket(s3_fit, opts):
    import s3fs

    engine, tax, _ = s3_fit
    assert tax.state.complete and [lv.n_nodes for lv in tax.levels] == [2, 4]
    fs = s3fs.S3FileSystem(**opts)
    files = set(fs.find(f"{BUCKET}/tax"))
    latest = fs.cat_file(f"{BUCKET}/tax/LATEST").decode().strip()
    assert latest == tax.version
    for name in (
        "manifest.json",
        "level_1_centroids.npy",
        "level_1_parents.npy",
        "level_2_centroids.npy",
        "level_2_parents.npy",
    ):
        assert f"{BUCKET}/tax/snapshots/{latest}/{name}" in files
    assert f"{BUCKET}/tax/snapshots/000000/manifest.json" in files  # every pass kept
    raw = fs.cat_file(f"{BUCKET}/tax/snapshots/{latest}/level_2_centroids.npy")
    assert np.load(io.BytesIO(raw)).tobytes() == tax.levels[1].centroids.tobytes()
    assert_same_tree(TaxonomyStore(f"s3://{BUCKET}/tax", opts).load(), tax)
    assert_same_tree(engine.load(), tax)


def test_predict_from_s3_matches_the_labelled_output(s3_fit, s3_data):
    engine, tax, out = s3_fit
    uri, x, ids = s3_data
    labels = labels_by_id(out, 2)
    assert sorted(labels) == ids.tolist()
    assert all(v[-1] == "" for v in labels.values())
    paths = engine.predict(uri)  # read from S3 in this process, labelled in memory
    assert paths.shape == (len(ids), 2) and paths.dtype == np.int32
    # the in-memory rows come in file / row-group order: ids 500..699
    want = np.array([[labels[i][1], labels[i][2]] for i in ids.tolist()], dtype=np.int32)
    assert np.array_equal(paths, want)
    assert [labels[i][0] for i in ids.tolist()] == [f"{a}/{b}" for a, b in paths]
    assert np.array_equal(engine.predict(x), want)


def test_labelled_output_to_s3(s3_fit, s3_data, opts):
    import s3fs

    engine, _, _ = s3_fit
    uri, _, ids = s3_data
    target = f"s3://{BUCKET}/labelled"
    assert engine.predict(uri, output=target) == target
    fs = s3fs.S3FileSystem(**opts)
    files = [f for f in fs.find(f"{BUCKET}/labelled") if f.endswith(".parquet")]
    assert files
    got = sorted(i for f in files for i in pq.read_table(f, filesystem=fs)["id"].to_pylist())
    assert got == ids.tolist()
