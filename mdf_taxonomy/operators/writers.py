"""A writer for passes whose records are not kept (the fit's intermediate passes)."""

from __future__ import annotations

from mdf_taxonomy._mdf import DataWriter


class DiscardWriter(DataWriter):
    """Counts what it is given and keeps nothing; MDF needs some writer per pipeline.

    It takes no parameters (a YAML's `params: {}`); `records` counts the records seen.
    """

    def __init__(self) -> None:
        self.records = 0

    def write(self, data: list[dict]) -> None:
        self.records += len(data)

    def close(self) -> None:
        pass
