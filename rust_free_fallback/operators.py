"""MDF's two text operators, re-implemented so MDF-written YAMLs run on the fallback.

``text_length_filter`` and ``text_exact_deduplicator`` are the usual first stages of
an MDF text pipeline. They take MDF's parameters with MDF's defaults and keep the
same records; importing this module registers them in the fallback's
``OperatorRegistry`` under MDF's keys (``rust_free_fallback.framework`` does so).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable
from typing import Any

from rust_free_fallback.framework.operator import Deduplicator, Filter
from rust_free_fallback.framework.registry import OperatorRegistry

try:  # optional, as in MDF: "auto" prefers it when installed
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None

Record = dict[str, Any]


class TextLengthFilter(Filter):
    """Keeps records with ``min_length <= length <= max_length`` (``None``: no upper bound).

    The length is ``record[text_length_field]`` when that is a number (loaders that
    precompute it save a ``len`` per record), else ``len`` of the str/bytes text;
    missing or non-text text counts as length 0, so ``min_length > 0`` drops it.
    """

    def __init__(
        self,
        min_length: int = 0,
        max_length: int | None = None,
        text_field: str = "text",
        text_length_field: str = "text_length",
    ):
        super().__init__()
        self.min_length = min_length
        self.max_length = max_length
        self.text_field = text_field
        self.text_length_field = text_length_field

    def text_length(self, record: Record) -> int | float:
        """The record's length; NaN when the precomputed length is not finite."""
        length = record.get(self.text_length_field)
        if isinstance(length, numbers.Real):
            # MDF crashes on int(nan)/int(inf); NaN here makes the record fail both bounds.
            return int(length) if math.isfinite(length) else math.nan
        text = record.get(self.text_field)
        return len(text) if isinstance(text, str | bytes) else 0

    def should_keep_batch(self, records: list[Record]) -> list[bool]:
        keep = []
        for record in records:
            n = self.text_length(record)
            ok = n >= self.min_length  # False for NaN
            if self.max_length is not None:
                ok = ok and n <= self.max_length
            keep.append(ok)
        return keep


def _xxh64(data: bytes) -> str:
    return xxhash.xxh64(data).hexdigest()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_DIGESTS: dict[str, Callable[[bytes], str]] = {"xxhash": _xxh64, "md5": _md5, "sha256": _sha256}
HASH_ALGORITHMS = ("auto", *_DIGESTS)


class TextExactDeduplicator(Deduplicator):
    """Keeps the first record of each (normalised) text, through the shared DedupBackend.

    The key is a hex digest of the text, whitespace-collapsed and lowercased by
    default, prefixed with ``"{url}|"`` when ``include_url`` and the URL is set.
    A record without usable text (missing, empty, not a str) is keyed by its ``id``
    instead, so such records are kept once per id, and only the first of those
    lacking an id too.
    """

    def __init__(
        self,
        text_field: str = "text",
        hash_algorithm: str = "auto",
        normalize_whitespace: bool = True,
        lowercase: bool = True,
        include_url: bool = False,
        url_field: str = "url",
    ):
        super().__init__()
        if hash_algorithm not in HASH_ALGORITHMS:
            raise ValueError(
                f"hash_algorithm must be one of {list(HASH_ALGORITHMS)}, got {hash_algorithm!r}"
            )
        if hash_algorithm in ("auto", "xxhash"):
            # MDF also falls back to md5 when xxhash is asked for but not installed.
            hash_algorithm = "xxhash" if xxhash is not None else "md5"
        self.text_field = text_field
        self.hash_algorithm = hash_algorithm
        self.normalize_whitespace = normalize_whitespace
        self.lowercase = lowercase
        self.include_url = include_url
        self.url_field = url_field

    def normalize(self, text: str) -> str:
        """The text as hashed: whitespace runs to one space (ends trimmed), then lowercased."""
        if self.normalize_whitespace:
            text = " ".join(text.split())
        if self.lowercase:
            text = text.lower()
        return text

    def dedup_key(self, record: Record) -> str:
        """The record's key in the seen-set (a hex digest, or its id without text)."""
        text = record.get(self.text_field)
        if not isinstance(text, str) or not text:
            rid = record.get(self.representative_id_field)
            return "" if rid is None else str(rid)
        content = self.normalize(text)
        if self.include_url:
            url = record.get(self.url_field)
            if url:
                content = f"{url}|{content}"
        return _DIGESTS[self.hash_algorithm](content.encode("utf-8", errors="ignore"))

    def get_dedup_keys_batch(self, records: list[Record]) -> list[str]:
        return [self.dedup_key(r) for r in records]


OperatorRegistry.register("TextLengthFilter", TextLengthFilter)
OperatorRegistry.register("TextExactDeduplicator", TextExactDeduplicator)
