"""Versioned taxonomy snapshots on any fsspec storage (local path, s3://, hdfs://, gs://...).

Layout under storage_uri:
    snapshots/000007/manifest.json          format, version, config, state, checksums
    snapshots/000007/level_1_centroids.npy  arrays as .npy, loaded with allow_pickle=False
    LATEST                                  name of the newest complete snapshot
    LOCK                                    the writer lease, while a writer holds one

Every file is written under a temporary name and then moved into place: the arrays,
then the manifest, then LATEST, so a reader never sees a half-written file and a
writer killed half way leaves the previous snapshot current. LATEST only moves
forward. Nothing read back is trusted: LATEST must be a version, a manifest may name
only plain files of its own folder, sizes and types must agree before an array is
read, and the arrays must form a tree. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy

log = logging.getLogger(__name__)

FORMAT = "mdf-taxonomy"
FORMAT_VERSION = 1
LOCK_FORMAT = "mdf-taxonomy-lock"
PHASES = ("sample", "lloyd", "done")
DTYPES = {"centroids": "float32", "parents": "int64"}  # what save() writes (see Level)

_VERSION = re.compile(r"[0-9]{6,18}")  # f"{n:06d}"
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")  # no separator, no "..", no "/"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_LATEST_BYTES = 64
_MAX_MANIFEST_BYTES = 64 << 20
_MAX_LOCK_BYTES = 64 << 10
_NPY_HEAD_BYTES = 16 << 10  # numpy itself refuses headers over 10000 bytes


class TaxonomyStoreError(RuntimeError):
    """A snapshot is missing, unreadable, corrupt, foreign or too new, or a writer conflicts."""


# Connection failures of the clients fsspec uses (botocore, urllib3, aiohttp), by name so
# that none of them has to be installed.
_UNREACHABLE = frozenset({
    "EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
    "ReadTimeoutError", "NewConnectionError", "MaxRetryError", "ProxyConnectionError",
    "ClientConnectorError", "ServerTimeoutError", "ServerDisconnectedError",
})


def storage_unreachable(e: BaseException) -> bool:
    """True when `e`, or an exception that led to it, says the storage cannot be reached
    (refused, timed out, unknown host) rather than that a file is missing or bad."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if (isinstance(cur, ConnectionError | TimeoutError | socket.gaierror)
                or type(cur).__name__ in _UNREACHABLE):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def one_line(e: BaseException, limit: int = 300) -> str:
    """`e` as one short line for an error message: never a traceback (pyarrow puts the
    Python traceback of a failed filesystem call into its own message)."""
    text = str(e).split("Traceback (most recent call last)")[0]
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@dataclasses.dataclass
class WriterLease:
    """The single-writer lock held on one store; see `TaxonomyStore.writer_lease`."""

    owner: str  # "host:pid:token" (or "label:token"), as written in LOCK
    acquired_at: float  # unix time
    stale_after_s: float
    took_over: dict[str, Any] | None = None  # the stale LOCK record this lease replaced
    lost: str | None = None  # why, once a heartbeat found LOCK no longer names this lease
    _store: TaxonomyStore | None = dataclasses.field(default=None, repr=False, compare=False)

    def refresh(self) -> bool:
        """Write a new heartbeat if LOCK still names this lease; False (and `lost` set) if not."""
        if self.lost is not None or self._store is None:
            return False
        return self._store._beat(self)


class TaxonomyStore:
    """The snapshots of one storage_uri (see the module docstring for the layout)."""

    def __init__(self, storage_uri: str, storage_options: dict[str, Any] | None = None):
        if not storage_uri or not isinstance(storage_uri, str):
            raise ValueError(f"storage_uri must be a non-empty string, got {storage_uri!r}")
        self.uri = storage_uri.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise TaxonomyStoreError(f"cannot open storage {self.uri!r}: {e}") from e
        self._local = isinstance(self.fs, LocalFileSystem)  # atomic rename and link
        self._lease: WriterLease | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lease": None}  # a copy elsewhere does not hold the lease

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @contextlib.contextmanager
    def _reach(self) -> Iterator[None]:
        """Around storage calls: an unreachable endpoint is one line naming the URI."""
        try:
            yield
        except TaxonomyStoreError:
            raise
        except Exception as e:
            if storage_unreachable(e):
                raise self._unreachable(e) from e
            raise

    def _unreachable(self, e: BaseException) -> TaxonomyStoreError:
        return TaxonomyStoreError(f"cannot reach the storage of {self.uri!r}: {one_line(e)}")

    def _check_reachable(self) -> None:
        """Raise if the storage cannot be reached; any other answer (even "missing") is fine.
        Some fsspec layers report an unreachable store as a missing file, which must not
        read as "no taxonomy"."""
        if self._local:
            return
        try:
            self.fs.info(self.root)
        except Exception as e:  # noqa: BLE001 - only an unreachable store matters here
            if storage_unreachable(e):
                raise self._unreachable(e) from e

    # -- reading ---------------------------------------------------------------
    def latest_version(self) -> str | None:
        """The version LATEST names, or None when there is no LATEST yet."""
        where = f"{self.uri}/LATEST"
        try:
            raw = self._read_small(self._path("LATEST"), _MAX_LATEST_BYTES, where)
        except FileNotFoundError:
            self._check_reachable()
            return None
        except OSError as e:
            raise TaxonomyStoreError(f"cannot read {where}: {e}") from e
        version = raw.decode("utf-8", errors="replace").strip()
        _check_version(version, where)
        return version

    def load(self, version: str | None = None) -> Taxonomy:
        """Load a snapshot (the latest by default), verifying format, sizes, checksums and
        that its arrays form a tree."""
        manifest = self.manifest(version)
        version = manifest["version"]
        arrays = {
            name: self._read_array(version, meta) for name, meta in manifest["arrays"].items()
        }
        levels, n_parents = [], 1
        for i in range(1, manifest["n_levels_stored"] + 1):
            centroids, parents = arrays[f"level_{i}_centroids"], arrays[f"level_{i}_parents"]
            where = f"{self.uri}/snapshots/{version}/level_{i}"
            finite = np.isfinite(centroids)
            if not finite.all():
                raise TaxonomyStoreError(
                    f"{where}_centroids.npy: level {i} centroids hold "
                    f"{int(finite.size - finite.sum())} non-finite values (NaN or inf)"
                )
            if parents.size and (parents.min() < 0 or parents.max() >= n_parents):
                raise TaxonomyStoreError(
                    f"{where}_parents.npy: level {i} parents span {parents.min()}..{parents.max()}"
                    f", out of range 0..{n_parents - 1} (the nodes of the level above)"
                )
            if np.any(np.diff(parents) < 0):
                raise TaxonomyStoreError(
                    f"{where}_parents.npy: level {i} parents are not sorted "
                    "(a level's nodes are grouped by parent)"
                )
            levels.append(Level(centroids, parents))
            n_parents = levels[-1].n_nodes
        return Taxonomy(
            config=TaxonomyConfig.from_dict(manifest["config"]),
            dim=manifest["dim"],
            levels=levels,
            state=FitState(**manifest["state"]),
            fingerprint=manifest["fingerprint"],
            version=version,
        )

    def manifest(self, version: str | None = None) -> dict[str, Any]:
        """The verified manifest of a snapshot (the latest by default), without its arrays."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise TaxonomyStoreError(
                    f"no taxonomy at {self.uri!r} (no LATEST file): fit one first, or check the URI"
                )
        _check_version(version, f"{self.uri}: snapshot")
        where = f"{self.uri}/snapshots/{version}/manifest.json"
        try:
            raw = self._read_small(
                self._path("snapshots", version, "manifest.json"), _MAX_MANIFEST_BYTES, where
            )
            manifest = json.loads(raw)
        except FileNotFoundError as e:
            raise TaxonomyStoreError(f"{where}: missing") from e
        except (OSError, ValueError) as e:
            raise TaxonomyStoreError(f"{where}: unreadable ({e})") from e
        _check_manifest(manifest, version, where)
        return manifest

    def _read_small(self, path: str, limit: int, where: str) -> bytes:
        """A small file, refused without reading it when it is larger than `limit`."""
        too_big = TaxonomyStoreError(f"{where}: more than {limit} bytes, not a file of this store")
        with self._reach():
            self.fs.invalidate_cache(path)
            if self.fs.size(path) > limit:
                raise too_big
            raw = self.fs.cat_file(path)
        if len(raw) > limit:  # replaced by a larger file since
            raise too_big
        return raw

    def _read_array(self, version: str, meta: dict[str, Any]) -> np.ndarray:
        """One array whose header, manifest entry and real size agree before its data is read."""
        path = self._path("snapshots", version, meta["file"])
        where = f"{self.uri}/snapshots/{version}/{meta['file']}"
        try:
            with self._reach():
                self.fs.invalidate_cache(path)
                size = self.fs.size(path)
                head = (self.fs.cat_file(path, start=0, end=min(size, _NPY_HEAD_BYTES))
                        if size else b"")
        except OSError as e:
            raise TaxonomyStoreError(f"{where}: cannot read ({e})") from e
        shape, dtype, offset = _npy_header(head, where)
        if list(shape) != meta["shape"] or str(dtype) != meta["dtype"]:
            raise TaxonomyStoreError(
                f"{where}: shape/dtype differ from manifest (file {list(shape)} {dtype}, "
                f"manifest {meta['shape']} {meta['dtype']})"
            )
        want = offset + math.prod(shape) * dtype.itemsize
        if size != want:
            raise TaxonomyStoreError(
                f"{where}: {size} bytes, but shape {list(shape)} {dtype} needs {want}: "
                f"{'truncated' if size < want else 'padded'}, the snapshot is corrupt"
            )
        try:
            with self._reach():
                raw = self.fs.cat_file(path)
        except OSError as e:
            raise TaxonomyStoreError(f"{where}: cannot read ({e})") from e
        if len(raw) != size:
            raise TaxonomyStoreError(f"{where}: changed while being read")
        if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            raise TaxonomyStoreError(f"{where}: checksum mismatch, the snapshot is corrupt")
        try:
            return np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as e:
            raise TaxonomyStoreError(f"{where}: not a plain .npy ({e})") from e

    # -- writing ---------------------------------------------------------------
    def save(self, tax: Taxonomy) -> str:
        """Write `tax` as the next snapshot and make it LATEST; returns its version.

        Under `writer_lease` it first checks that LOCK still names the lease (at the start
        and again before moving LATEST); without one, it refuses while another writer
        holds a live lease. LATEST never moves back: if another writer moved it to this
        version or past it meanwhile, TaxonomyStoreError names both and LATEST stays.
        """
        self._check_writer()
        previous = self.latest_version()
        version = f"{0 if previous is None else int(previous) + 1:06d}"
        arrays: dict[str, np.ndarray] = {}
        for i, lv in enumerate(tax.levels, start=1):
            arrays[f"level_{i}_centroids"] = lv.centroids
            arrays[f"level_{i}_parents"] = lv.parents
        meta = {}
        try:
            with self._reach():
                self.fs.makedirs(self._path("snapshots", version), exist_ok=True)
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, arr, allow_pickle=False)
                raw = buf.getvalue()
                self._put(self._path("snapshots", version, f"{name}.npy"), raw)
                meta[name] = {
                    "file": f"{name}.npy",
                    "sha256": hashlib.sha256(raw).hexdigest(),
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                }
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "version": version,
                "created_unix": time.time(),
                "config": tax.config.to_dict(),
                "dim": tax.dim,
                "fingerprint": tax.fingerprint,
                "n_levels_stored": len(tax.levels),
                "state": dataclasses.asdict(tax.state),
                "arrays": meta,
            }
            self._put(
                self._path("snapshots", version, "manifest.json"),
                json.dumps(manifest, indent=1, sort_keys=True).encode(),
            )
            self._check_writer()
            current = self.latest_version()
            if current is not None and int(current) >= int(version):
                raise TaxonomyStoreError(
                    f"{self.uri}/LATEST is {current}, not older than snapshot {version} being "
                    f"saved: another writer moved it meanwhile; LATEST stays at {current}"
                )
            self._put(self._path("LATEST"), version.encode())
        except OSError as e:
            raise TaxonomyStoreError(f"cannot write snapshot {version} to {self.uri!r}: {e}") from e
        tax.version = version
        return version

    def _put(self, path: str, data: bytes) -> None:
        """Write `data` so that readers of `path` see the old file or the new one, never a
        part: under a temporary name, then renamed (local) or moved (s3 and others)."""
        tmp = f"{path}.{secrets.token_hex(6)}.tmp"
        if not self._local:
            with self._reach():
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            return
        try:
            _write_durably(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # -- the writer lease --------------------------------------------------------
    @contextlib.contextmanager
    def writer_lease(
        self,
        owner: str | None = None,
        stale_after_s: float = 300.0,
        heartbeat_s: float | None = None,
    ) -> Iterator[WriterLease]:
        """Hold the single-writer lock of this storage_uri for the `with` block.

        One writer per store keeps two fits from interleaving snapshots. A fit driver
        wraps the whole fit, resume included, and saves through the same store object:

            with store.writer_lease():
                tax = store.load() if store.latest_version() else new_taxonomy
                ...
                store.save(tax)  # after every pass; refused if the lease was lost

        `owner` labels the writer in LOCK (default "host:pid"); a random token is appended.
        A daemon thread rewrites LOCK's heartbeat every `heartbeat_s` (default a third of
        `stale_after_s`). Another acquirer gets TaxonomyStoreError naming the holder and
        since when, unless the holder's heartbeat is older than `stale_after_s`, or it was
        a process of this machine (same boot and PID namespace) that is gone: then the
        lease is taken over, with a warning. On exit LOCK is removed if it still names
        this lease. Clocks of hosts sharing a store must agree to well within
        `stale_after_s`.
        """
        if not (0 < stale_after_s < math.inf):
            raise ValueError(f"stale_after_s must be a positive number, got {stale_after_s!r}")
        interval = stale_after_s / 3 if heartbeat_s is None else heartbeat_s
        if not (0 < interval < stale_after_s):
            raise ValueError(f"heartbeat_s must be in (0, stale_after_s), got {heartbeat_s!r}")
        if self._lease is not None:
            raise TaxonomyStoreError(
                f"{self.uri}/LOCK: this store object already holds the lease {self._lease.owner}"
            )
        lease = self._acquire(owner, stale_after_s)
        self._lease = lease
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(lease, stop, interval), name="taxonomy-lease", daemon=True
        )
        beat.start()
        try:
            yield lease
        finally:
            stop.set()
            beat.join()
            self._lease = None
            self._release(lease)

    @property
    def _lock(self) -> str:
        return self._path("LOCK")

    def _acquire(self, owner: str | None, stale_after_s: float) -> WriterLease:
        now = time.time()
        label = owner or f"{socket.gethostname()}:{os.getpid()}"
        lease = WriterLease(f"{label}:{secrets.token_hex(8)}", now, stale_after_s, _store=self)
        record = {
            "format": LOCK_FORMAT,
            "owner": lease.owner,
            "pid": os.getpid(),
            "process_space": _process_space(),
            "acquired_at": now,
            "heartbeat_at": now,
            "stale_after_s": stale_after_s,
        }
        raw = json.dumps(record, sort_keys=True).encode()
        try:
            with self._reach():
                self.fs.makedirs(self.root, exist_ok=True)
            for _ in range(3):  # a lock seen but gone on the next read: try again
                if self._create_lock(raw):
                    return lease
                held = self._read_lock()
                if held is None:
                    continue
                why = _stale(held[1], stale_after_s)
                if why is None:
                    raise TaxonomyStoreError(
                        f"{self.uri}/LOCK: another writer holds this store: {_describe(held[1])}"
                        "; wait for it to finish (or remove LOCK if you know it is gone)"
                    )
                if self._remove_lock_if(held[0].__eq__) and self._create_lock(raw):
                    log.warning(
                        "%s/LOCK: took over the writer lease of %s (%s)",
                        self.uri,
                        held[1]["owner"],
                        why,
                    )
                    lease.took_over = held[1]
                    return lease
        except OSError as e:
            raise TaxonomyStoreError(f"{self.uri}/LOCK: cannot take the writer lease: {e}") from e
        raise TaxonomyStoreError(f"{self.uri}/LOCK: other writers contend for it; try again")

    def _create_lock(self, raw: bytes) -> bool:
        """Create LOCK holding `raw` unless it exists: atomic where the filesystem allows."""
        if self._local:  # link() fails if LOCK exists, and LOCK appears complete
            tmp = f"{self._lock}.{secrets.token_hex(6)}.tmp"
            _write_durably(tmp, raw)
            try:
                os.link(tmp, self._lock)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self._read_lock() is not None:  # no create-if-absent here: write, then read back
            return False
        self._put(self._lock, raw)
        held = self._read_lock()
        return held is not None and held[0] == raw

    def _remove_lock_if(self, ours: Callable[[bytes], bool]) -> bool:
        """Remove LOCK if `ours(its bytes)`. Locally it is moved aside first (atomic), so a
        lock that turns out not to be ours is put back rather than lost."""
        if not self._local:
            held = self._read_lock()
            if held is None or not ours(held[0]):
                return False
            with self._reach():
                self.fs.rm(self._lock)
            return True
        aside = f"{self._lock}.{secrets.token_hex(6)}.aside"
        try:
            os.rename(self._lock, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                if ours(f.read(_MAX_LOCK_BYTES + 1)):
                    return True
            with contextlib.suppress(FileExistsError):  # not ours: put it back
                os.link(aside, self._lock)
            return False
        finally:
            os.unlink(aside)

    def _read_lock(self) -> tuple[bytes, dict[str, Any]] | None:
        """(bytes, record) of LOCK, or None when there is none."""
        where = f"{self.uri}/LOCK"
        try:
            raw = self._read_small(self._lock, _MAX_LOCK_BYTES, where)
        except FileNotFoundError:
            return None
        record = _lock_record(raw)
        if record is None:
            raise TaxonomyStoreError(
                f"{where}: not a writer lock of mdf-taxonomy ({raw[:100]!r}); "
                "remove it if no writer is running"
            )
        return raw, record

    def _beat(self, lease: WriterLease) -> bool:
        held = self._read_lock()
        if held is None or held[1]["owner"] != lease.owner:
            lease.lost = f"LOCK now names {_describe(held[1]) if held else 'nobody'}"
            log.error(
                "%s/LOCK: the writer lease %s was lost: %s", self.uri, lease.owner, lease.lost
            )
            return False
        record = {**held[1], "heartbeat_at": time.time()}
        self._put(self._lock, json.dumps(record, sort_keys=True).encode())
        return True

    def _heartbeat(self, lease: WriterLease, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                if not lease.refresh():
                    return
            except (OSError, TaxonomyStoreError) as e:  # others judge staleness; keep trying
                log.warning("%s/LOCK: heartbeat of %s failed: %s", self.uri, lease.owner, e)

    def _release(self, lease: WriterLease) -> None:
        try:
            if not self._remove_lock_if(lambda b: _lock_owner(b) == lease.owner):
                log.warning(
                    "%s/LOCK: no longer names the lease %s; left as it is", self.uri, lease.owner
                )
        except (OSError, TaxonomyStoreError) as e:
            log.warning("%s/LOCK: could not release the lease %s: %s", self.uri, lease.owner, e)

    def _check_writer(self) -> None:
        """Refuse to write unless this object holds the lease, or nobody holds a live one."""
        held = self._read_lock()
        lease = self._lease
        if lease is not None:
            if lease.lost is None and held is not None and held[1]["owner"] == lease.owner:
                return
            now = _describe(held[1]) if held else "nobody"
            raise TaxonomyStoreError(
                f"{self.uri}/LOCK: the writer lease {lease.owner} was lost (LOCK names {now}); "
                "not writing"
            )
        if held is not None and _stale(held[1], held[1]["stale_after_s"]) is None:
            raise TaxonomyStoreError(
                f"{self.uri}/LOCK: another writer holds this store: {_describe(held[1])}; "
                "write through its lease or wait for it"
            )


# -- validation helpers ------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_version(version: Any, where: str) -> None:
    if not (
        isinstance(version, str)
        and _VERSION.fullmatch(version)
        and f"{int(version):06d}" == version
    ):
        raise TaxonomyStoreError(
            f"{where}: {version!r} is not a snapshot version (six or more digits, e.g. '000007')"
        )


def _check_manifest(m: Any, version: str, where: str) -> None:
    """Types and cross-references of a manifest, before anything it names is read."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TaxonomyStoreError(f"{where}: not an {FORMAT} manifest (foreign artifact?)")
    fv = m.get("format_version")
    if not _is_int(fv) or fv < 1:
        raise TaxonomyStoreError(f"{where}: format_version {fv!r} is not a valid format version")
    if fv > FORMAT_VERSION:
        raise TaxonomyStoreError(
            f"{where}: format_version {fv!r} is newer than this mdf-taxonomy reads "
            f"({FORMAT_VERSION}); upgrade mdf-taxonomy"
        )

    def need(ok: Any, key: str, rule: str) -> None:
        if not ok:
            raise TaxonomyStoreError(f"{where}: {key} {m.get(key)!r} {rule}")

    need(m.get("version") == version, "version", f"does not match its folder {version!r}")
    need(_is_int(m.get("dim")) and m["dim"] >= 1, "dim", "must be an integer >= 1")
    need(isinstance(m.get("fingerprint"), str), "fingerprint", "must be a string")
    n = m.get("n_levels_stored")
    need(_is_int(n) and n >= 0, "n_levels_stored", "must be an integer >= 0")
    need(isinstance(m.get("config"), dict), "config", "must be an object")
    try:
        config = TaxonomyConfig.from_dict(m["config"])
    except (TypeError, ValueError) as e:
        raise TaxonomyStoreError(f"{where}: config is not valid ({e})") from e
    need(n <= config.n_levels, "n_levels_stored", f"exceeds the config's {config.n_levels} levels")
    st = m.get("state")
    need(isinstance(st, dict), "state", "must be an object")
    try:
        state = FitState(**st)
    except TypeError as e:
        raise TaxonomyStoreError(f"{where}: state is not valid ({e})") from e
    need(
        _is_int(state.level)
        and state.level >= 1
        and state.phase in PHASES
        and _is_int(state.iteration)
        and state.iteration >= 0
        and (state.inertia is None or _is_number(state.inertia))
        and isinstance(state.history, list),
        "state",
        f"is not a fit state (level >= 1, phase in {PHASES}, iteration >= 0, finite inertia)",
    )
    arrays = m.get("arrays")
    expected = [f"level_{i}_{kind}" for i in range(1, n + 1) for kind in DTYPES]
    need(
        isinstance(arrays, dict) and sorted(arrays) == sorted(expected),
        "arrays",
        f"must hold exactly {expected}",
    )
    for i in range(1, n + 1):
        for kind in DTYPES:
            name = f"level_{i}_{kind}"
            _check_entry(arrays[name], name, kind, m["dim"], arrays[f"level_{i}_centroids"], where)


def _check_entry(e: Any, name: str, kind: str, dim: int, centroids: Any, where: str) -> None:
    """One manifest array entry: a plain file of its folder, and the shape and dtype save()
    writes (centroids (n, dim), parents (n,) with the same n)."""
    if not isinstance(e, dict):
        raise TaxonomyStoreError(f"{where}: array {name!r} entry {e!r} is not an object")

    def need(ok: Any, key: str, rule: str) -> None:
        if not ok:
            raise TaxonomyStoreError(f"{where}: array {name!r} {key} {e.get(key)!r} {rule}")

    f = e.get("file")
    need(
        isinstance(f, str) and _FILE_NAME.fullmatch(f) and ".." not in f,
        "file",
        "is not a plain file name inside its snapshot folder",
    )
    sha = e.get("sha256")
    need(isinstance(sha, str) and _SHA256.fullmatch(sha), "sha256", "is not a sha256 hex digest")
    need(e.get("dtype") == DTYPES[kind], "dtype", f"is not {DTYPES[kind]!r}")
    shape = e.get("shape")
    need(
        isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape),
        "shape",
        "is not a list of non-negative integers",
    )
    if kind == "centroids":
        need(len(shape) == 2 and shape[1] == dim, "shape", f"is not [n_nodes, dim={dim}]")
    else:
        n_nodes = centroids["shape"][0]
        need(shape == [n_nodes], "shape", f"is not [{n_nodes}], the node count of its centroids")


def _npy_header(head: bytes, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from the start of a .npy file, refusing object dtypes."""
    fp = io.BytesIO(head)
    try:
        npy_version = np.lib.format.read_magic(fp)
        reader = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(npy_version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {npy_version}")
        shape, fortran_order, dtype = reader(fp)
    except (ValueError, OSError, SyntaxError) as e:
        raise TaxonomyStoreError(f"{where}: not a plain .npy ({e})") from e
    if dtype.hasobject:
        raise TaxonomyStoreError(f"{where}: not a plain .npy (object dtype, it would need pickle)")
    if fortran_order:
        raise TaxonomyStoreError(f"{where}: not a plain .npy (Fortran order, not as saved here)")
    return shape, dtype, fp.tell()


# -- lock helpers --------------------------------------------------------------------
def _lock_record(raw: bytes) -> dict[str, Any] | None:
    """The parsed LOCK record, or None when it is not one."""
    try:
        r = json.loads(raw)
    except ValueError:
        return None
    ok = (
        isinstance(r, dict)
        and r.get("format") == LOCK_FORMAT
        and isinstance(r.get("owner"), str)
        and _is_int(r.get("pid"))
        and (r.get("process_space") is None or isinstance(r["process_space"], str))
        and all(_is_number(r.get(k)) for k in ("acquired_at", "heartbeat_at", "stale_after_s"))
    )
    return r if ok else None


def _lock_owner(raw: bytes) -> str | None:
    record = _lock_record(raw)
    return None if record is None else record["owner"]


def _describe(record: dict[str, Any]) -> str:
    since = datetime.datetime.fromtimestamp(record["acquired_at"], datetime.UTC)
    age = time.time() - record["heartbeat_at"]
    return (
        f"{record['owner']} since {since.isoformat(timespec='seconds')} "
        f"(last heartbeat {age:.0f} s ago)"
    )


def _stale(record: dict[str, Any], stale_after_s: float) -> str | None:
    """Why the lease in `record` may be taken over, or None while it is live."""
    age = time.time() - record["heartbeat_at"]
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f} s old, stale after {stale_after_s:g} s"
    space = record.get("process_space")
    if space is not None and space == _process_space() and not _pid_alive(record["pid"]):
        return f"its process {record['pid']} on this machine is gone"
    return None


def _process_space() -> str | None:
    """This machine's boot and PID namespace: where a lock's pid can be checked (Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never signal a process group; assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _write_durably(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
