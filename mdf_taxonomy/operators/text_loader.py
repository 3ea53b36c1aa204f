"""Real text that an installed module ships, as MDF records: for offline demos and tests.

The default is the standard library's ``pydoc_data.topics`` (the help texts of Python's
~80 language topics), so there is real text to clean, embed and cluster on any machine
with no download.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterator
from typing import Any

from mdf_taxonomy._mdf import DataLoader


class PackagedTextLoader(DataLoader):
    """Records ``{id_field: key, text_field: text}`` from a module attribute that holds texts.

    One work item per text, so any number of loaders can share them; the input is
    identified by its content (`describe_input`), so a fit resumed over other text (say,
    another Python's help topics) is refused.

    Parameters
    ----------
    module : str, default='pydoc_data.topics'
        The module to import.
    attribute : str, default='topics'
        Its attribute holding the texts: a dict (ids are its keys, sorted) or a list or
        tuple (ids are the positions, as strings).
    max_records : int or None, default=None
        Read at most this many texts, the first in id order (None: all).
    id_field : str, default='id'
        The record field of the id.
    text_field : str, default='text'
        The record field of the text.
    """

    def __init__(
        self,
        module: str = "pydoc_data.topics",
        attribute: str = "topics",
        max_records: int | None = None,
        id_field: str = "id",
        text_field: str = "text",
    ):
        if max_records is not None and max_records < 1:
            raise ValueError(f"PackagedTextLoader: max_records must be >= 1, got {max_records}")
        self.module, self.attribute, self.max_records = module, attribute, max_records
        self.id_field, self.text_field = id_field, text_field
        self.texts()  # a wrong module or attribute fails the pipeline's build

    def texts(self) -> dict[str, Any]:
        """Every text by id, in id order."""
        held = getattr(importlib.import_module(self.module), self.attribute)
        if isinstance(held, dict):
            return {str(k): held[k] for k in sorted(held, key=str)}
        if isinstance(held, list | tuple):
            return {str(i): v for i, v in enumerate(held)}
        raise ValueError(
            f"PackagedTextLoader: {self.module}.{self.attribute} is a {type(held).__name__}, "
            "not a dict, list or tuple of texts"
        )

    def get_file_list(self, max_samples: int | None = None, num_workers: int = 1) -> list[str]:
        caps = [n for n in (self.max_records, max_samples) if n is not None]
        ids = list(self.texts())
        return ids[: min(caps)] if caps else ids

    def load_files(
        self, file_list: list[str], worker_id: int | None = None, checkpoint: dict | None = None
    ) -> Iterator[dict]:
        texts = self.texts()
        for item in file_list:
            yield {self.id_field: item, self.text_field: texts[item]}

    def describe_input(self, items: list[str]) -> dict[str, Any]:
        """The items' content, hashed: what identifies a fit's input (engine.inputs)."""
        texts = self.texts()
        digest = hashlib.sha256()
        for item in sorted(items):
            digest.update(repr((item, texts[item])).encode())
        source = f"{self.module}.{self.attribute}"
        return {"files": [{"file": source, "records": len(items), "sha256": digest.hexdigest()}]}
