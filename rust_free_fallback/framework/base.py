"""DataLoader / DataWriter interfaces (MDF-compatible surface)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any


class DataLoader(ABC):  # noqa: B024 - MDF declares no abstract methods here
    """Reads records. Constructed in the driver and pickled into loader actors.

    ``get_file_list`` runs once in the driver; each loader actor then gets a
    contiguous chunk of that list and iterates ``load_files`` over it. Keep
    heavy state (clients, open files) out of ``__init__``.
    """

    def get_file_list(self, max_samples: int | None = None, num_workers: int = 1) -> list[str]:
        """Shards (files, URLs, ...) to read; runs in the driver."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_file_list")

    def load_files(
        self,
        file_list: list[str],
        worker_id: int | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield records of ``file_list``; runs inside a loader actor."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_files")

    def create_checkpoint(self, shard_id: str, records_processed: int) -> dict[str, Any]:
        """Resume point for a shard (the fallback executor records but never resumes)."""
        return {"shard_id": shard_id, "records_processed": records_processed}


class DataWriter(ABC):
    """Receives the records that survive the last stage."""

    @abstractmethod
    def write(self, data: list[dict[str, Any]]) -> None:
        """Persist one batch of records."""

    def close(self) -> None:  # noqa: B027 - optional hook, intentionally a no-op
        """Flush/release resources; called by ``Executor.shutdown``."""
