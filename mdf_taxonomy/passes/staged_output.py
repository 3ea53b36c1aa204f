"""An output written whole or not at all: records go to a staging folder beside it that is
moved into place when the work ends. Every face that writes (a pipeline run, sampling,
dedup) refuses a non-empty output the same way."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)


class OutputExists(ValueError):
    """The output already holds data; replacing it must be asked for (`overwrite`)."""


class StagedOutput:
    """A run's records go to a staging folder beside `uri`, moved there when the run ends.

    So a re-run, or a retry after a crash, never adds rows to an earlier output: an
    existing non-empty output is refused unless `overwrite`, and a crashed run leaves
    only its staging folder, which the next run over the same output clears. Checked
    when built, before any pass: the output's storage must take a file.
    """

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, overwrite: bool = False
    ):
        self.uri = uri.rstrip("/")
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
            if (
                self.fs.exists(self.path)
                and not overwrite
                and (not self.fs.isdir(self.path) or self.fs.ls(self.path))
            ):
                raise OutputExists(
                    f"output {self.uri!r} exists and is not empty: pass "
                    "--overwrite (overwrite=True) to replace it"
                )
            for stale in self.fs.glob(f"{self.path}.staging-*"):
                log.warning("removing %s, left by an earlier run that did not finish", stale)
                self.fs.rm(stale, recursive=True)
            self.staging = f"{self.path}.staging-{os.getpid()}-{time.time_ns():x}"
            self.fs.makedirs(self.staging, exist_ok=True)
            self.fs.pipe_file(f"{self.staging}/.write-test", b"")
            self.fs.rm(f"{self.staging}/.write-test")
        except OutputExists:
            raise
        except Exception as e:  # noqa: BLE001 - any storage error: one line naming the URI
            raise OutputExists(
                f"output {self.uri!r} is not writable: {type(e).__name__}: {e}"
            ) from e
        self.staging_uri = self.fs.unstrip_protocol(self.staging)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, kind: type | None, *_: Any) -> None:
        """Commit what was written, or, on an error, drop it and keep the output as it was."""
        if kind is None:
            self.commit()
        else:
            self.abort()

    def final_path(self, staged_path: str) -> str:
        """Where a file written under the staging folder lies once committed."""
        return self.path + staged_path[len(self.staging) :]

    def commit(self) -> None:
        """Make the staged records the output: one rename on a local disk; on object
        stores, which have no rename, a copy of each file, then the staging removed."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        if isinstance(self.fs, LocalFileSystem):
            os.replace(self.staging, self.path)
            return
        for src in self.fs.find(self.staging):
            self.fs.copy(src, self.path + src[len(self.staging) :])
        self.fs.rm(self.staging, recursive=True)

    def reset(self) -> None:
        """Empty the staging folder (a run is about to be repeated)."""
        self.fs.rm(self.staging, recursive=True)
        self.fs.makedirs(self.staging, exist_ok=True)

    def abort(self) -> None:
        """Drop the staged records of a failed run; the output is left as it was."""
        try:
            self.fs.rm(self.staging, recursive=True)
        except Exception as e:  # noqa: BLE001 - the next run clears it anyway
            log.warning("could not remove %s: %s", self.staging, e)
