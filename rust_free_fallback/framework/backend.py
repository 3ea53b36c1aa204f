"""DedupBackend: a seen-set sharded over named Ray actors.

The backend object is pickled into every stage replica; the state lives in
one named actor per bucket, so all replicas (and later runs in the same Ray
session that use the same ``name_prefix``) share it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import ray


class _DedupBucket:
    """One shard of the seen-set: key -> representative id (or None)."""

    def __init__(self) -> None:
        self._seen: dict[str, Any] = {}

    def batch_mark_seen(self, keys: list[str]) -> list[bool]:
        out = []
        for k in keys:
            new = k not in self._seen
            if new:
                self._seen[k] = None
            out.append(new)
        return out

    def batch_mark_seen_with_ids(self, keys: list[str], ids: list[Any]) -> list[tuple[bool, Any]]:
        out = []
        for k, rid in zip(keys, ids, strict=True):
            if k in self._seen:
                out.append((False, self._seen[k]))
            else:
                self._seen[k] = rid
                out.append((True, None))
        return out

    def is_seen(self, key: str) -> bool:
        return key in self._seen

    def size(self) -> int:
        return len(self._seen)

    def reset(self) -> None:
        self._seen.clear()


# num_cpus=0: bookkeeping actors must not eat the CPU budget of loaders/stages.
_RemoteBucket = ray.remote(num_cpus=0)(_DedupBucket)

_ALREADY_EXISTS: tuple[type[BaseException], ...] = (ValueError,)
if hasattr(ray.exceptions, "ActorAlreadyExistsError"):
    _ALREADY_EXISTS = (ValueError, ray.exceptions.ActorAlreadyExistsError)


def stable_key_hash(key: Any) -> int:
    """Process-independent hash (Python's str hash is salted per process)."""
    data = key if isinstance(key, bytes) else str(key).encode("utf-8")
    return zlib.crc32(data)


class DedupBackend:
    """Distributed seen-set with one named Ray actor per bucket.

    Keys route to ``crc32(key) % num_buckets`` (or ``bucket_id_getter(key) %
    num_buckets``). Batch calls send one remote call per bucket in parallel and
    return results in input order.
    """

    def __init__(
        self,
        num_buckets: int = 2,
        name_prefix: str = "pipeline_dedup_backend",
        bucket_id_getter: Callable[[str], int] | None = None,
        track_representative: bool = False,
    ):
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        self.num_buckets = num_buckets
        self.name_prefix = name_prefix
        self.bucket_id_getter = bucket_id_getter
        self.track_representative = track_representative
        self._handles: list[Any] | None = None
        self._actors()  # create (or attach to) the buckets now, in the driver

    # Handles are re-resolved by name after unpickling: works with plain pickle too.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = None
        return state

    def actor_names(self) -> list[str]:
        return [f"{self.name_prefix}_bucket_{i}" for i in range(self.num_buckets)]

    def _actors(self) -> list[Any]:
        if self._handles is None:
            self._handles = [self._get_or_create(n) for n in self.actor_names()]
        return self._handles

    @staticmethod
    def _get_or_create(name: str) -> Any:
        try:
            return ray.get_actor(name)
        except ValueError:
            pass
        try:
            return _RemoteBucket.options(name=name).remote()
        except _ALREADY_EXISTS:  # another process created it between our two calls
            return ray.get_actor(name)

    def _bucket(self, key: str) -> int:
        if self.bucket_id_getter is not None:
            return int(self.bucket_id_getter(key)) % self.num_buckets
        return stable_key_hash(key) % self.num_buckets

    def _scatter(self, keys: list[str], extra: list[Any] | None, method: str) -> list[Any]:
        groups: dict[int, list[int]] = {}
        for pos, key in enumerate(keys):
            groups.setdefault(self._bucket(key), []).append(pos)
        actors = self._actors()
        refs = {}
        for b, positions in groups.items():
            args: list[Any] = [[keys[p] for p in positions]]
            if extra is not None:
                args.append([extra[p] for p in positions])
            refs[b] = getattr(actors[b], method).remote(*args)
        results: list[Any] = [None] * len(keys)
        for b, values in zip(refs, ray.get(list(refs.values())), strict=True):
            for pos, value in zip(groups[b], values, strict=True):
                results[pos] = value
        return results

    def batch_mark_seen(self, keys: list[str]) -> list[bool]:
        """Mark keys seen; True where the key is new (first occurrence wins)."""
        return self._scatter(list(keys), None, "batch_mark_seen") if keys else []

    def batch_mark_seen_with_ids(
        self, keys: list[str], representative_ids: list[str]
    ) -> list[tuple[bool, str | None]]:
        """Like batch_mark_seen, plus the representative id stored for duplicates."""
        if len(keys) != len(representative_ids):
            raise ValueError("keys and representative_ids differ in length")
        if not keys:
            return []
        out = self._scatter(list(keys), list(representative_ids), "batch_mark_seen_with_ids")
        return [tuple(x) for x in out]

    def mark_seen(self, key: str) -> bool:
        return self.batch_mark_seen([key])[0]

    def is_seen(self, key: str) -> bool:
        return ray.get(self._actors()[self._bucket(key)].is_seen.remote(key))

    def size(self) -> int:
        """Number of distinct keys held over all buckets."""
        return sum(ray.get([a.size.remote() for a in self._actors()]))

    def reset(self) -> None:
        """Clear every bucket."""
        ray.get([a.reset.remote() for a in self._actors()])

    def kill(self) -> None:
        """Kill the bucket actors (frees their names)."""
        for a in self._actors():
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self._handles = None
