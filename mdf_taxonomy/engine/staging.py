"""A pipeline run's output, written whole or not at all (StagedOutput), and a run that lost
rows repeated from empty."""

from __future__ import annotations

import copy
import logging
from typing import Any

from mdf_taxonomy.engine.inputs import NothingLabelled, PassIncomplete
from mdf_taxonomy.engine.running import run_pipeline
from mdf_taxonomy.model import Taxonomy
from mdf_taxonomy.passes.staged_output import OutputExists, StagedOutput

__all__ = ["OutputExists", "StagedOutput", "check_labelled", "staged_run"]

log = logging.getLogger(__name__)


def check_labelled(result: dict[str, Any]) -> None:
    """Fail a run that read nothing, or labelled none of the records it was asked to."""
    lab = result["labelling"]
    if result["rows_in"] == 0:
        raise NothingLabelled("the run read no records: check the input path and filter", result)
    if lab["seen"] and not lab["labelled"]:
        raise NothingLabelled(
            f"labelled none of {lab['seen']} records (rejected "
            f"{lab['rejected']}): check embedding_field, dim and the taxonomy",
            result,
        )


def staged_run(
    config: Any,
    staged: StagedOutput | None,
    progress: bool = True,
    desc: str = "run",
    retries: int = 2,
    columnar: bool = True,
    taxonomy: Taxonomy | None = None,
) -> dict[str, Any]:
    """run_pipeline with the writer pointed at `staged`'s folder, committed on success.

    A run that lost rows (a loader or worker died) is run again from an empty staging
    folder, so the committed output holds every row once.
    """
    if staged is not None:
        config = copy.deepcopy(config)
        config.data_writer.params = {**config.data_writer.params, "output_path": staged.staging_uri}
    try:
        for attempt in range(retries + 1):
            try:
                result = run_pipeline(
                    config, progress=progress, desc=desc, columnar=columnar, taxonomy=taxonomy
                )
                break
            except PassIncomplete as e:
                log.warning(
                    "%s run incomplete (%s); attempt %d of %d", desc, e, attempt + 1, retries + 1
                )
                if attempt == retries:
                    raise
                if staged is not None:
                    staged.reset()
        check_labelled(result)
    except BaseException:
        if staged is not None:
            staged.abort()
        raise
    if staged is not None:
        staged.commit()
    return result
