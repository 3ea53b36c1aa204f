"""The engine: drives levels x passes of an MDF pipeline, with checkpoints and resume.

A fit is a loop over passes of the same pipeline (fit_driver); a labelling run is one
run of it (running), its output staged and committed whole (staging); what a pipeline
may do is read from its config first (plan), and its input is accounted for row by row
(inputs). YAML pipelines (`mdf-taxonomy run`) and the Python API (TaxonomyEngine, api)
take the same path.
"""

from __future__ import annotations

from mdf_taxonomy.engine.api import TaxonomyEngine
from mdf_taxonomy.engine.fit_driver import PipelineFit
from mdf_taxonomy.engine.inputs import (
    InputAccount,
    NothingLabelled,
    PassIncomplete,
    describe_input,
    fingerprint_of,
    input_differences,
    input_fingerprint,
)
from mdf_taxonomy.engine.plan import (
    check_sections,
    columnar_plan,
    fit_operators,
    pinned,
    validate_pipeline,
)
from mdf_taxonomy.engine.running import (
    ensure_ray,
    label_counts,
    label_summary,
    record_run,
    run_pipeline,
)
from mdf_taxonomy.engine.staging import OutputExists, StagedOutput, check_labelled, staged_run
from mdf_taxonomy.engine.totals import LabelCounts, PassRecord, PassTotals

__all__ = [
    "InputAccount",
    "LabelCounts",
    "NothingLabelled",
    "OutputExists",
    "PassIncomplete",
    "PassRecord",
    "PassTotals",
    "PipelineFit",
    "StagedOutput",
    "TaxonomyEngine",
    "check_labelled",
    "check_sections",
    "columnar_plan",
    "describe_input",
    "ensure_ray",
    "fingerprint_of",
    "fit_operators",
    "input_differences",
    "input_fingerprint",
    "label_counts",
    "label_summary",
    "pinned",
    "record_run",
    "run_pipeline",
    "staged_run",
    "validate_pipeline",
]
