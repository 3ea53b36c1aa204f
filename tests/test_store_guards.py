"""The snapshot store trusts nothing it reads back and admits one writer at a time.

Manifests and LATEST may only name files of the store's own snapshot folders; sizes and
types are checked before an array is read; arrays must form a tree; every file is
committed by a rename (arrays, manifest, then LATEST) and LATEST only moves forward;
a LOCK lease keeps a second writer out unless the first is stale or gone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pytest
from taxonomy_toys import small_taxonomy

import mdf_taxonomy.model.lease as lease_mod
from mdf_taxonomy.model import TaxonomyStore, TaxonomyStoreError

ARRAYS = ["level_1_centroids", "level_1_parents", "level_2_centroids", "level_2_parents"]
COMMIT_ORDER = [f"{a}.npy" for a in ARRAYS] + ["manifest.json", "LATEST"]


@pytest.fixture
def saved(tmp_path):
    """A store with one snapshot, and that snapshot's folder."""
    store = TaxonomyStore(str(tmp_path / "tax"))
    version = store.save(small_taxonomy())
    return store, tmp_path / "tax" / "snapshots" / version


def edit_manifest(snap: Path, edit) -> None:
    path = snap / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def npy_bytes(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def forged_npy(shape: tuple[int, ...], descr: str, payload: bytes = b"") -> bytes:
    """A .npy header claiming `shape` followed by `payload` (whatever its length)."""
    buf = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def put_file(snap: Path, name: str, raw: bytes, **meta) -> None:
    """Replace an array's file; its manifest entry gets the new checksum (and `meta`), so
    only the store's own checks can catch what is wrong with it."""
    (snap / f"{name}.npy").write_bytes(raw)

    def edit(m):
        m["arrays"][name].update(sha256=hashlib.sha256(raw).hexdigest(), **meta)

    edit_manifest(snap, edit)


def put_array(snap: Path, name: str, arr: np.ndarray) -> None:
    put_file(snap, name, npy_bytes(arr), shape=list(arr.shape), dtype=str(arr.dtype))


def refusal(store: TaxonomyStore) -> str:
    with pytest.raises(TaxonomyStoreError) as err:
        store.load()
    return str(err.value)


# -- 1. manifests confined to the store ---------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "../../outside.npy",
        "../000000/level_1_centroids.npy",
        "/etc/passwd",
        "sub/level_1_centroids.npy",
        "..",
        ".",
        "",
        ".hidden.npy",
        "a\\..\\b.npy",
        "C:level_1_centroids.npy",
        7,
        None,
    ],
)
def test_array_file_must_be_a_plain_name_in_its_folder(saved, bad):
    store, snap = saved
    # followed, "../../outside.npy" would read a valid copy with the right checksum
    (snap.parent.parent / "outside.npy").write_bytes((snap / "level_1_centroids.npy").read_bytes())
    edit_manifest(snap, lambda m: m["arrays"]["level_1_centroids"].update(file=bad))
    msg = refusal(store)
    assert "manifest.json" in msg and "level_1_centroids" in msg and repr(bad) in msg
    assert "plain file name" in msg


@pytest.mark.parametrize(
    "bad",
    [
        "../../other/snapshots/000000",
        "000000/../../../other/snapshots/000000",
        "/tmp",
        "abc",
        "1",
        "0000001",
        "000001 x",
        "",
        "\uff10\uff10\uff10\uff10\uff10\uff10",  # full-width digits
    ],
)
def test_latest_must_name_a_version_of_this_store(tmp_path, bad):
    root, other = tmp_path / "tax", tmp_path / "other"
    TaxonomyStore(str(root)).save(small_taxonomy())
    TaxonomyStore(str(other)).save(small_taxonomy())  # what "../../other/..." would reach
    (root / "LATEST").write_text(bad, encoding="utf-8")
    store = TaxonomyStore(str(root))
    for read in (store.latest_version, store.load, store.manifest):
        with pytest.raises(TaxonomyStoreError) as err:
            read()
        assert "LATEST" in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.parametrize("bad", ["../other", "0", "000000/..", "/abs/000000"])
def test_an_asked_version_must_be_a_version(saved, bad):
    store, _ = saved
    with pytest.raises(TaxonomyStoreError, match="not a snapshot version") as err:
        store.load(bad)
    assert repr(bad) in str(err.value)


def test_latest_with_a_newline_still_reads(saved):
    store, snap = saved
    (snap.parent.parent / "LATEST").write_text(f"{snap.name}\n")
    assert store.load().version == snap.name


# -- 2. types validated, sizes bounded before any allocation -------------------------------


def _set(key, value):
    return lambda m: m.update({key: value})


def _entry(name, key, value):
    return lambda m: m["arrays"][name].update({key: value})


@pytest.mark.parametrize(
    "edit, words",
    [
        (_set("format_version", "1"), ["'1'", "not a valid format version"]),
        (_set("format_version", True), ["True", "not a valid format version"]),
        (_set("format_version", 0), ["0", "not a valid format version"]),
        (_set("format_version", 1.0), ["1.0", "not a valid format version"]),
        (_set("format_version", 99), ["99", "newer"]),
        (_set("version", "000009"), ["version", "000009", "folder"]),
        (_set("version", 0), ["version", "folder"]),
        (_set("dim", "4"), ["dim", "'4'"]),
        (_set("dim", 0), ["dim"]),
        (_set("fingerprint", 5), ["fingerprint"]),
        (_set("n_levels_stored", "2"), ["n_levels_stored", "'2'"]),
        (_set("n_levels_stored", 3), ["n_levels_stored"]),
        (_set("n_levels_stored", 1), ["arrays", "must hold exactly"]),
        (_set("config", {"n_levels": 0}), ["config", "n_levels"]),
        (_set("config", "abc"), ["config", "object"]),
        (_set("state", {"level": 1, "phase": "bogus"}), ["state", "phase"]),
        (_set("state", {"level": "1"}), ["state"]),
        (_set("state", {"levle": 1}), ["state", "levle"]),
        (_set("state", {"inertia": "NaN"}), ["state", "inertia"]),
        (_set("arrays", []), ["arrays"]),
        (lambda m: m["arrays"].pop("level_2_parents"), ["arrays", "level_2_parents"]),
        (lambda m: m["arrays"].update(extra=m["arrays"]["level_1_parents"]), ["arrays"]),
        (lambda m: m["arrays"].update(level_1_parents="x.npy"), ["level_1_parents", "object"]),
        (_entry("level_1_centroids", "shape", ["3", 4]), ["level_1_centroids", "shape"]),
        (_entry("level_1_centroids", "shape", [-3, 4]), ["level_1_centroids", "shape"]),
        (_entry("level_1_centroids", "shape", [3.0, 4]), ["level_1_centroids", "shape"]),
        (_entry("level_1_centroids", "shape", [3, 4, 1]), ["level_1_centroids", "shape"]),
        (_entry("level_1_centroids", "shape", "3,4"), ["level_1_centroids", "shape"]),
        (_entry("level_1_centroids", "shape", [3, 5]), ["level_1_centroids", "dim=4"]),
        (_entry("level_2_parents", "shape", [5]), ["level_2_parents", "node count"]),
        (_entry("level_1_centroids", "dtype", "float64"), ["level_1_centroids", "'float32'"]),
        (_entry("level_1_parents", "dtype", "int32"), ["level_1_parents", "'int64'"]),
        (_entry("level_1_parents", "dtype", "object"), ["level_1_parents", "dtype"]),
        (_entry("level_1_parents", "sha256", 123), ["level_1_parents", "sha256"]),
        (_entry("level_1_parents", "sha256", "ab"), ["level_1_parents", "sha256"]),
    ],
)
def test_manifest_types_are_validated(saved, edit, words):
    store, snap = saved
    edit_manifest(snap, edit)
    for read in (store.manifest, store.load):
        with pytest.raises(TaxonomyStoreError) as err:
            read()
        msg = str(err.value)
        assert "manifest.json" in msg and all(w in msg for w in words), msg


def test_a_string_format_version_is_not_called_newer(saved):
    store, snap = saved
    edit_manifest(snap, _set("format_version", "1"))
    assert "newer" not in refusal(store)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda raw: raw[:-4], ["truncated"]),
        (lambda raw: raw + b"\0" * 16, ["padded"]),
        (lambda raw: raw[:128], ["truncated"]),  # the header alone
    ],
)
def test_size_must_match_the_claim(saved, make, words):
    store, snap = saved
    f = snap / "level_2_centroids.npy"
    put_file(snap, "level_2_centroids", make(f.read_bytes()))
    msg = refusal(store)
    assert "level_2_centroids.npy" in msg and all(w in msg for w in words), msg


def refusal_and_peak(store: TaxonomyStore) -> tuple[str, int]:
    """The refusal's message and the peak bytes allocated while refusing."""
    tracemalloc.start()
    try:
        msg = refusal(store)
        return msg, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_petabyte_claim_is_refused_without_allocating(saved):
    store, snap = saved
    n = 2**48  # 2**48 x 4 float32 = 4 PiB, consistent in header and manifest
    put_file(snap, "level_1_centroids", forged_npy((n, 4), "<f4", b"\0" * 64), shape=[n, 4])
    put_file(snap, "level_1_parents", forged_npy((n,), "<i8", b"\0" * 64), shape=[n])
    msg, peak = refusal_and_peak(store)
    assert "level_1_centroids.npy" in msg and "truncated" in msg and str(n) in msg
    assert peak < 16 << 20  # nothing near the claimed size was allocated


@pytest.mark.parametrize("name, size", [("LATEST", 65), ("manifest.json", (64 << 20) + 1)])
def test_oversized_latest_or_manifest_is_refused_unread(saved, name, size):
    store, snap = saved
    path = snap.parent.parent / "LATEST" if name == "LATEST" else snap / name
    with open(path, "r+b") as f:
        f.truncate(size)  # sparse: nothing is written, the claimed size is what counts
    msg, peak = refusal_and_peak(store)
    assert name in msg and "more than" in msg and peak < 1 << 20


def test_header_must_agree_with_manifest(saved):
    store, snap = saved
    arr = np.load(snap / "level_1_centroids.npy")
    put_file(snap, "level_1_centroids", npy_bytes(arr.astype(np.float64)))  # manifest: float32
    msg = refusal(store)
    assert "differ from manifest" in msg and "float64" in msg


# -- 6. pickled and corrupt .npy stay refused ------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        npy_bytes(np.array([{"evil": 1}], dtype=object), allow_pickle=True),
        npy_bytes(np.array([{"evil": 1}, {"x": 2}, 3], dtype=object), allow_pickle=True),
        b"not an npy file at all",
        b"",
        npy_bytes(np.zeros(3, np.int64))[:20],  # cut inside the header
        b"\x93NUMPY\x01\x00\xff\x00{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
        b"\x93NUMPY\x09\x00" + b"\0" * 64,  # unknown .npy version
        np.zeros(3, np.int64).tobytes(),  # data without a header
    ],
    ids=[
        "pickled",
        "pickled-3",
        "garbage",
        "empty",
        "cut-header",
        "bad-header-len",
        "npy-v9",
        "raw-bytes",
    ],
)
def test_pickled_or_corrupt_npy_is_refused(saved, raw):
    store, snap = saved
    put_file(snap, "level_1_parents", raw)
    msg = refusal(store)
    assert "level_1_parents.npy" in msg and "not a plain .npy" in msg, msg


def test_a_fortran_order_npy_is_refused(saved):
    store, snap = saved
    arr = np.asfortranarray(np.load(snap / "level_2_centroids.npy"))
    put_file(snap, "level_2_centroids", npy_bytes(arr))
    assert "Fortran order" in refusal(store)


# -- 3. arrays validated on load ------------------------------------------------------------


def _with(arr, index, value):
    arr = arr.copy()
    arr[index] = value
    return arr


@pytest.mark.parametrize(
    "name, make, words",
    [
        ("level_2_centroids", lambda a: _with(a, (1, 2), np.nan), ["level 2 centroids", "1 non"]),
        ("level_1_centroids", lambda a: _with(a, 0, np.inf), ["level 1 centroids", "4 non"]),
        ("level_1_centroids", lambda a: _with(a, (2, 3), -np.inf), ["level 1 centroids"]),
        ("level_2_parents", lambda a: np.array([0, 0, 1, 1, 2, 3]), ["level 2 parents", "0..2"]),
        ("level_2_parents", lambda a: np.array([-1, 0, 1, 1, 2, 2]), ["level 2 parents", "0..2"]),
        ("level_1_parents", lambda a: np.array([0, 0, 1]), ["level 1 parents", "0..0"]),
        ("level_2_parents", lambda a: np.array([0, 1, 0, 1, 2, 2]), ["not sorted"]),
        ("level_2_centroids", lambda a: a[:5], ["level_2_parents", "node count"]),
        ("level_1_centroids", lambda a: a[:, :3], ["level_1_centroids", "dim=4"]),
        ("level_1_parents", lambda a: a.astype(np.int32), ["level_1_parents", "'int64'"]),
    ],
)
def test_arrays_are_validated_on_load(saved, name, make, words):
    store, snap = saved
    put_array(snap, name, make(np.load(snap / f"{name}.npy")))
    msg = refusal(store)
    assert all(w in msg for w in words), msg


# -- 4. atomic writes, LATEST forward only ----------------------------------------------------


def _spy_replace(monkeypatch, before=None):
    """Record every os.replace as (destination name, bytes under the temporary name)."""
    seen, real = [], os.replace

    def spy(src, dst):
        if before is not None:
            before(Path(dst).name)
        seen.append((Path(dst).name, Path(src).read_bytes()))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return seen


def test_every_file_is_committed_by_a_rename_latest_last(tmp_path, monkeypatch):
    root = tmp_path / "tax"
    store = TaxonomyStore(str(root))
    store.save(small_taxonomy())
    seen = _spy_replace(monkeypatch)
    version = store.save(small_taxonomy())
    assert [name for name, _ in seen] == COMMIT_ORDER
    for name, data in seen:  # complete under its temporary name before it got its own
        final = root / "LATEST" if name == "LATEST" else root / "snapshots" / version / name
        assert final.read_bytes() == data
    assert not list(root.rglob("*.tmp"))


@pytest.mark.parametrize("crash_at", COMMIT_ORDER)
def test_a_writer_dying_mid_snapshot_leaves_the_previous_one_current(
    tmp_path, monkeypatch, crash_at
):
    root = tmp_path / "tax"
    store = TaxonomyStore(str(root))
    first = store.save(small_taxonomy())

    def die(name):
        if name == crash_at:
            raise OSError("disk gone")

    _spy_replace(monkeypatch, before=die)
    with pytest.raises(TaxonomyStoreError, match="disk gone"):
        store.save(small_taxonomy())
    monkeypatch.undo()
    assert store.latest_version() == first and store.load().version == first
    new = root / "snapshots" / f"{int(first) + 1:06d}"
    if crash_at != "LATEST":
        assert not (new / crash_at).exists()  # never a half-written file under its name
    assert not list(root.rglob("*.tmp"))


def test_without_rename_files_are_written_then_moved(monkeypatch):
    """On fsspec filesystems other than local (s3, memory, ...), pipe to a temporary name
    and mv: the final names only ever appear by a move, LATEST last."""
    uri = f"memory://guards-{uuid.uuid4().hex}/tax"
    store = TaxonomyStore(uri)
    piped, moved = [], []
    real_pipe, real_mv = store.fs.pipe_file, store.fs.mv
    monkeypatch.setattr(
        store.fs, "pipe_file", lambda p, d, **kw: (piped.append(p), real_pipe(p, d, **kw))
    )
    monkeypatch.setattr(store.fs, "mv", lambda a, b, **kw: (moved.append(b), real_mv(a, b, **kw)))
    try:
        version = store.save(small_taxonomy())
        assert all(p.endswith(".tmp") for p in piped) and len(piped) == len(COMMIT_ORDER)
        assert [p.rsplit("/", 1)[1] for p in moved] == COMMIT_ORDER
        assert TaxonomyStore(uri).load().version == version
    finally:
        monkeypatch.undo()
        store.fs.rm(store.root.rsplit("/", 1)[0], recursive=True)


@pytest.mark.parametrize("others", [1, 2])
def test_latest_never_moves_back(tmp_path, monkeypatch, others):
    uri = str(tmp_path / "tax")
    mine, theirs = TaxonomyStore(uri), TaxonomyStore(uri)
    mine.save(small_taxonomy())
    fired = []

    def meanwhile(name):  # another writer saves as this one commits its manifest
        if name == "manifest.json" and not fired:
            fired.append(name)
            for _ in range(others):
                theirs.save(small_taxonomy())

    _spy_replace(monkeypatch, before=meanwhile)
    with pytest.raises(TaxonomyStoreError) as err:
        mine.save(small_taxonomy())
    current = f"{others:06d}"
    assert f"LATEST is {current}" in str(err.value) and "snapshot 000001" in str(err.value)
    assert mine.latest_version() == current and mine.load().version == current


# -- 5. one writer per storage_uri ------------------------------------------------------------


@pytest.fixture(params=["local", "memory"])
def uri(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "tax")
        return
    name = f"guards-{uuid.uuid4().hex}"
    yield f"memory://{name}/tax"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


def lock_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri)
    return fs, f"{root}/LOCK"


def read_lock(uri: str) -> dict | None:
    fs, path = lock_path(uri)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def write_lock(uri: str, raw: bytes) -> None:
    fs, path = lock_path(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, raw)


def foreign_lock(owner: str = "ghost-host:1:dead", heartbeat_age_s: float = 0.0) -> bytes:
    now = time.time()
    return json.dumps(
        {
            "format": "mdf-taxonomy-lock",
            "owner": owner,
            "pid": 1,
            "process_space": None,
            "acquired_at": now - heartbeat_age_s - 60,
            "heartbeat_at": now - heartbeat_age_s,
            "stale_after_s": 300.0,
        }
    ).encode()


def test_lease_writes_lock_and_removes_it(uri):
    store = TaxonomyStore(uri)
    with store.writer_lease(owner="fit-a") as lease:
        rec = read_lock(uri)
        assert rec["owner"] == lease.owner and lease.owner.startswith("fit-a:")
        assert rec["acquired_at"] == rec["heartbeat_at"] == lease.acquired_at
        assert rec["pid"] == os.getpid() and lease.took_over is None
        assert store.save(small_taxonomy()) == "000000"
    assert read_lock(uri) is None
    assert store.load().version == "000000"


def test_default_owner_is_host_pid_token(uri):
    with TaxonomyStore(uri).writer_lease() as lease:
        host, pid, token = lease.owner.rsplit(":", 2)
        assert (host, pid) == (socket.gethostname(), str(os.getpid())) and len(token) == 16
    with TaxonomyStore(uri).writer_lease() as again:
        assert again.owner != lease.owner  # the token tells two leases of one process apart


def test_a_second_writer_is_refused_naming_the_holder(uri):
    with TaxonomyStore(uri).writer_lease(owner="fit-a") as lease:
        with pytest.raises(TaxonomyStoreError) as err:
            with TaxonomyStore(uri).writer_lease(owner="fit-b"):
                pass
        since = time.strftime("%Y-%m-%dT%H:%M", time.gmtime(lease.acquired_at))
        assert lease.owner in str(err.value) and f"since {since}" in str(err.value)
        assert read_lock(uri)["owner"] == lease.owner  # untouched


@pytest.mark.parametrize("age_s, stale_after_s, taken", [(1000, 60, True), (10, 60, False)])
def test_a_stale_lease_is_taken_over_with_a_warning(uri, caplog, age_s, stale_after_s, taken):
    write_lock(uri, foreign_lock(heartbeat_age_s=age_s))
    store = TaxonomyStore(uri)
    caplog.set_level(logging.WARNING, logger="mdf_taxonomy.model.store")
    if not taken:
        with pytest.raises(TaxonomyStoreError, match="ghost-host:1:dead since"):
            with store.writer_lease(stale_after_s=stale_after_s):
                pass
        assert read_lock(uri)["owner"] == "ghost-host:1:dead"
        return
    with store.writer_lease(stale_after_s=stale_after_s) as lease:
        assert lease.took_over["owner"] == "ghost-host:1:dead"
        assert read_lock(uri)["owner"] == lease.owner
    assert any(
        "took over" in r.message and "ghost-host:1:dead" in r.message for r in caplog.records
    )


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux /proc")
def test_the_lease_of_a_killed_process_on_this_machine_is_taken_over(tmp_path, caplog):
    uri = str(tmp_path / "tax")
    code = (
        "import os, signal; from mdf_taxonomy.model import TaxonomyStore\n"
        f"with TaxonomyStore({uri!r}).writer_lease(owner='victim'):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert read_lock(uri)["owner"].startswith("victim:")  # left behind, heartbeat fresh
    caplog.set_level(logging.WARNING, logger="mdf_taxonomy.model.store")
    with TaxonomyStore(uri).writer_lease(stale_after_s=3600) as lease:
        assert lease.took_over["owner"].startswith("victim:")
    assert any("is gone" in r.message for r in caplog.records)


def test_a_live_process_of_this_machine_keeps_its_lease(tmp_path):
    uri = str(tmp_path / "tax")
    with TaxonomyStore(uri).writer_lease(stale_after_s=3600):  # same process, alive
        with pytest.raises(TaxonomyStoreError, match="another writer holds"):
            with TaxonomyStore(uri).writer_lease(stale_after_s=3600):
                pass


def test_refresh_moves_the_heartbeat(uri, monkeypatch):
    with TaxonomyStore(uri).writer_lease() as lease:
        later = lease.acquired_at + 42.0
        monkeypatch.setattr(lease_mod, "time", SimpleNamespace(time=lambda: later))
        assert lease.refresh() is True
        monkeypatch.undo()
        rec = read_lock(uri)
        assert rec["heartbeat_at"] == later and rec["acquired_at"] == lease.acquired_at
        assert rec["owner"] == lease.owner


def test_the_heartbeat_thread_refreshes_the_lock(uri):
    with TaxonomyStore(uri).writer_lease(stale_after_s=60, heartbeat_s=0.01) as lease:
        deadline = time.monotonic() + 60
        while read_lock(uri)["heartbeat_at"] == lease.acquired_at:
            assert time.monotonic() < deadline, "no heartbeat was written"
            time.sleep(0.01)
        assert read_lock(uri)["owner"] == lease.owner


def test_a_lost_lease_stops_saves_and_is_not_released(uri):
    store = TaxonomyStore(uri)
    with store.writer_lease() as lease:
        store.save(small_taxonomy())
        write_lock(uri, foreign_lock(owner="usurper:2:beef"))  # taken over meanwhile
        with pytest.raises(TaxonomyStoreError, match="lost.*usurper:2:beef"):
            store.save(small_taxonomy())
        assert store.latest_version() == "000000"
        assert lease.refresh() is False and "usurper:2:beef" in lease.lost
    assert read_lock(uri)["owner"] == "usurper:2:beef"  # release leaves another's lock


def test_save_checks_the_lease_again_before_moving_latest(tmp_path, monkeypatch):
    uri = str(tmp_path / "tax")
    store = TaxonomyStore(uri)
    with store.writer_lease():
        store.save(small_taxonomy())

        def usurp(name):
            if name == "manifest.json":
                write_lock(uri, foreign_lock(owner="usurper:2:beef"))

        _spy_replace(monkeypatch, before=usurp)
        with pytest.raises(TaxonomyStoreError, match="usurper"):
            store.save(small_taxonomy())
        monkeypatch.undo()
        assert store.latest_version() == "000000"


def test_without_a_lease_save_is_refused_while_another_holds_one(uri):
    with TaxonomyStore(uri).writer_lease(owner="fit-a") as lease:
        with pytest.raises(TaxonomyStoreError, match="another writer holds") as err:
            TaxonomyStore(uri).save(small_taxonomy())
        assert lease.owner in str(err.value)
    assert TaxonomyStore(uri).save(small_taxonomy()) == "000000"
    write_lock(uri, foreign_lock(heartbeat_age_s=10_000))  # a stale lock does not block
    assert TaxonomyStore(uri).save(small_taxonomy()) == "000001"


def test_the_lease_is_released_when_the_block_raises(uri):
    with pytest.raises(KeyError):
        with TaxonomyStore(uri).writer_lease():
            raise KeyError("boom")
    assert read_lock(uri) is None


def test_one_store_object_holds_one_lease(uri):
    store = TaxonomyStore(uri)
    with store.writer_lease() as lease:
        with pytest.raises(TaxonomyStoreError, match="already holds"):
            with store.writer_lease():
                pass
        assert read_lock(uri)["owner"] == lease.owner


@pytest.mark.parametrize("raw", [b"garbage", b"{}", b'{"format": "mdf-taxonomy-lock"}'])
def test_a_lock_that_is_not_ours_to_read_is_refused(uri, raw):
    write_lock(uri, raw)
    with pytest.raises(TaxonomyStoreError, match="LOCK: not a writer lock") as err:
        with TaxonomyStore(uri).writer_lease():
            pass
    assert repr(raw[:100]) in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stale_after_s": 0},
        {"stale_after_s": -1},
        {"stale_after_s": 10, "heartbeat_s": 10},
        {"stale_after_s": 10, "heartbeat_s": 0},
    ],
)
def test_lease_timings_are_validated(tmp_path, kwargs):
    with pytest.raises(ValueError):
        with TaxonomyStore(str(tmp_path)).writer_lease(**kwargs):
            pass


def test_racing_acquirers_on_a_local_disk_one_wins(tmp_path):
    uri, n = str(tmp_path / "tax"), 8
    start, done = threading.Barrier(n), threading.Barrier(n)
    won, refused = [], []

    def contender():
        store = TaxonomyStore(uri)
        start.wait()
        try:
            with store.writer_lease() as lease:
                won.append(lease.owner)
                done.wait()  # hold it until every contender has tried
                return
        except TaxonomyStoreError as e:
            refused.append(str(e))
        done.wait()

    threads = [threading.Thread(target=contender) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == n - 1
    assert all(won[0] in msg for msg in refused)
