"""The fit's phases, one name for the strings a manifest stores."""

from enum import StrEnum


class Phase(StrEnum):
    """Where a level's fit stands; a str (str() and f-strings give the value) so manifests,
    logs and comparisons with plain strings stay as they were."""

    SAMPLE = "sample"
    LLOYD = "lloyd"
    DONE = "done"
