"""Which input items a pass could not read, told by loader actors to the driver.

Loader actors run in other processes and MDF gives them no channel back, so a skipped
(or failed) file or row group is recorded in a small named Ray actor that the driver
creates before a pass and reads after it. Where there is no such actor (the stock
`mdf run`), the loader only logs. Ray is imported only when a report is opened or read.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

_PREFIX = "mdf_taxonomy_input_report:"
ITEM_SEP = "::rg="  # a work item is "path::rg=N"
_OPEN: dict[str, Any] = {}  # the driver's handles: Ray ends a named actor nobody holds


def actor_name(report_name: str) -> str:
    """The Ray actor name behind a loader's `report_name`."""
    return f"{_PREFIX}{report_name}"


class InputReport:
    """The entries of one pass: dicts with item, file, row_group, rows, reason, stage, action.

    stage is "listing" (found by get_file_list in the driver) or "load" (a loader actor);
    action is "skipped" (on_bad_file="skip") or "failed" (on_bad_file="fail", the loader
    raised). An item reported twice (a restarted loader actor) is kept once.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], dict[str, Any]] = {}

    def report(
        self, item: str, rows: int | None, reason: str, action: str = "skipped", stage: str = "load"
    ) -> None:
        self._entries.setdefault((item, action), report_entry(item, rows, reason, action, stage))

    def skipped(self) -> list[dict[str, Any]]:
        return [e for e in self._entries.values() if e["action"] == "skipped"]

    def failed(self) -> list[dict[str, Any]]:
        return [e for e in self._entries.values() if e["action"] == "failed"]

    def clear(self) -> None:
        self._entries.clear()


def report_entry(
    item: str, rows: int | None, reason: str, action: str = "skipped", stage: str = "load"
) -> dict[str, Any]:
    """One report entry; `item` is a file ("path") or a row group ("path::rg=N")."""
    file, _, rg = item.partition(ITEM_SEP)
    return {
        "item": item,
        "file": file,
        "row_group": int(rg) if rg else None,
        "rows": rows,
        "reason": reason,
        "stage": stage,
        "action": action,
    }


def open_input_report(name: str) -> Any:
    """Create (or find and empty) the report actor `name`; the driver calls it before a pass
    and holds it (also in this module) until close_input_report."""
    import ray

    handle = (
        ray.remote(num_cpus=0)(InputReport)
        .options(name=actor_name(name), get_if_exists=True)
        .remote()
    )
    ray.get(handle.clear.remote())
    _OPEN[name] = handle
    return handle


def _handle(name: str) -> Any:
    import ray

    try:
        return ray.get_actor(actor_name(name))
    except ValueError:
        return None


def read_input_report(name: str) -> list[dict[str, Any]]:
    """The items skipped in the pass, or [] when there is no report `name`."""
    import ray

    handle = _handle(name)
    return [] if handle is None else ray.get(handle.skipped.remote())


def read_input_failures(name: str) -> list[dict[str, Any]]:
    """The items a loader failed on (on_bad_file="fail"); the driver raises the first one's
    reason, since the runtime may have swallowed the loader's exception."""
    import ray

    handle = _handle(name)
    return [] if handle is None else ray.get(handle.failed.remote())


def close_input_report(name: str) -> None:
    """End the report actor `name` (after the last pass), if it exists."""
    import ray

    _OPEN.pop(name, None)
    handle = _handle(name)
    if handle is not None:
        ray.kill(handle)


def tell_input_report(
    name: str | None,
    item: str,
    rows: int | None,
    reason: str,
    action: str = "skipped",
    stage: str = "load",
) -> bool:
    """Record an entry in the report `name`; False where there is none to tell.

    Never starts Ray: outside a Ray session (a loader used in-process) it only returns.
    """
    ray = sys.modules.get("ray")
    if name is None or ray is None or not ray.is_initialized():
        return False
    handle = _handle(name)
    if handle is None:
        return False
    try:
        ray.get(handle.report.remote(item, rows, reason, action, stage), timeout=60)
    except Exception as e:  # noqa: BLE001 - the loader has logged the entry already
        log.warning("could not record %s in the input report %r: %s", item, name, e)
        return False
    return True
