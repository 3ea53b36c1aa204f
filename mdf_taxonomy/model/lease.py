"""The single-writer lease of a store: the LOCK file, its heartbeat, and when a lease is stale.

One writer per store keeps two fits from interleaving snapshots; a writer that died must
not block the store forever, so a lease whose heartbeat is old, or whose process on this
machine is gone, may be taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mdf_taxonomy.model.manifest import _is_int, _is_number
from mdf_taxonomy.model.storage import StorageRoot, TaxonomyStoreError, _write_durably

# the store's logger: taking over or losing a lease is the store's news
log = logging.getLogger("mdf_taxonomy.model.store")

LOCK_FORMAT = "mdf-taxonomy-lock"
_MAX_LOCK_BYTES = 64 << 10


@dataclasses.dataclass
class WriterLease:
    """The single-writer lock held on one store; see `TaxonomyStore.writer_lease`."""

    owner: str  # "host:pid:token" (or "label:token"), as written in LOCK
    acquired_at: float  # unix time
    stale_after_s: float
    took_over: dict[str, Any] | None = None  # the stale LOCK record this lease replaced
    lost: str | None = None  # why, once a heartbeat found LOCK no longer names this lease
    _store: LeasedStorage | None = dataclasses.field(default=None, repr=False, compare=False)

    def refresh(self) -> bool:
        """Write a new heartbeat if LOCK still names this lease; False (and `lost` set) if not."""
        if self.lost is not None or self._store is None:
            return False
        return self._store._beat(self)


class LeasedStorage(StorageRoot):
    """A storage root that can hold the writer lease; `TaxonomyStore` is one."""

    def __init__(self, storage_uri: str, storage_options: dict[str, Any] | None = None):
        super().__init__(storage_uri, storage_options)
        self._lease: WriterLease | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lease": None}  # a copy elsewhere does not hold the lease

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
