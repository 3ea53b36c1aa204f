"""The fsspec storage under a store: one root, errors that name the URI, whole-file writes.

A reader must never see part of a file, so every write goes under a temporary name and is
then moved into place; an unreachable endpoint must read as that, not as "no taxonomy".
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class TaxonomyStoreError(RuntimeError):
    """A snapshot is missing, unreadable, corrupt, foreign or too new, or a writer conflicts."""


# Connection failures of the clients fsspec uses (botocore, urllib3, aiohttp), by name so
# that none of them has to be installed.
_UNREACHABLE = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "NewConnectionError",
        "MaxRetryError",
        "ProxyConnectionError",
        "ClientConnectorError",
        "ServerTimeoutError",
        "ServerDisconnectedError",
    }
)


def storage_unreachable(e: BaseException) -> bool:
    """True when `e`, or an exception that led to it, says the storage cannot be reached
    (refused, timed out, unknown host) rather than that a file is missing or bad."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if (
            isinstance(cur, ConnectionError | TimeoutError | socket.gaierror)
            or type(cur).__name__ in _UNREACHABLE
        ):
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


class StorageRoot:
    """One storage_uri opened through fsspec: the base of the store and of its writer lease,
    so both read and write the same root the same way."""

    def __init__(self, storage_uri: str, storage_options: dict[str, Any] | None = None):
        if not storage_uri or not isinstance(storage_uri, str):
            raise ValueError(f"storage_uri must be a non-empty string, got {storage_uri!r}")
        self.uri = storage_uri.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise TaxonomyStoreError(f"cannot open storage {self.uri!r}: {e}") from e
        self._local = isinstance(self.fs, LocalFileSystem)  # atomic rename and link

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


def _write_durably(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(uri: str, obj: Any, storage_options: dict[str, Any] | None = None) -> str:
    """`obj` as JSON at `uri` (any fsspec URI), its folder made if missing; returns `uri`.
    For the small plan files a curation run hands to MDF operators."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(obj, f)
    return uri
