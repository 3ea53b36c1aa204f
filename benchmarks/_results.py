"""The header and the file of a benchmark's result, in one place for the scripts here.

Every script writes one JSON under benchmarks/results/ (or $OUT, which the device machine
sets and hands back), headed by the device, the date and the versions it ran with. These
helpers build those pieces the way the scripts already did, so the committed results keep
their keys, formats and names; which format a script uses stays the script's choice (the
older CPU scripts date in local ISO time, the newer ones in UTC minutes).

Standard library only at import: scripts that run with torch alone (or without torch,
bench_report.py) import this too; torch is imported where a CUDA name is asked for.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import time
from typing import Any

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def utc_date() -> str:
    """Now in UTC to the minute ("2026-12-02 06:27 UTC"): comparable across machines."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def local_date() -> str:
    """Now in local time, ISO to the second: the older CPU scripts' date."""
    return datetime.datetime.now().isoformat(timespec="seconds")


def device_name(device: str) -> str:
    """The CUDA device's name for a "cuda..." device, else "cpu: <processor> x<cores>"."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def device_slug(name: str | None) -> str:
    """A file-name tag: "cpu" without a CUDA device name, else the name lower-cased, "_"
    for spaces ("NVIDIA H200" -> "nvidia_h200", as the committed files are named)."""
    return "cpu" if name is None else name.lower().replace(" ", "_")


def versions(**named: str | None) -> dict[str, str | None]:
    """The versions given, in their order, then python's (last in every committed file)."""
    return {**named, "python": platform.python_version()}


def run_info(device: str, *, extra_versions: dict[str, Any] | None = None, **extra: Any) -> dict:
    """The common header: device name, UTC date, versions (torch, `extra_versions`,
    python), then `extra` in the order given."""
    import torch

    return {
        "device": device_name(device),
        "date": utc_date(),
        "versions": versions(torch=torch.__version__, **(extra_versions or {})),
        **extra,
    }


def result_path(name: str, device_slug: str | None = None) -> pathlib.Path:
    """results/<name>[_<device_slug>].json, in $OUT when it is set (the device machine
    returns only what is written there); the folder is made if missing."""
    out_dir = pathlib.Path(os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / (f"{name}_{device_slug}.json" if device_slug else f"{name}.json")


def write_json(path: pathlib.Path, result: dict, **dumps: Any) -> None:
    """`result` as indented JSON (indent 1, as every committed file is written)."""
    path.write_text(json.dumps(result, indent=1, **dumps))


def write_result(
    path: pathlib.Path, info: dict, rows: Any, *, rows_key: str = "rows", **more: Any
) -> None:
    """{"info": info, <rows_key>: rows, **more}: the shape most results have. Scripts call
    it after each measurement too, so a run cut short keeps what it had."""
    write_json(path, {"info": info, rows_key: rows, **more})
