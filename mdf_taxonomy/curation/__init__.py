"""What curators do with a tree: balanced sampling and semantic dedup within nodes.

Built on model/ and passes/ (the same batch arithmetic as labelling); the MDF operators
that face it live in operators/, the engine and CLI drive its passes.
"""

from mdf_taxonomy.curation.sampling import (
    REPEAT_FIELD,
    STRATEGIES,
    LeafCandidates,
    SamplePlan,
    allocate,
    repeats,
)
from mdf_taxonomy.curation.sampling_passes import build_plan, sample_parquet
from mdf_taxonomy.curation.semdedup import is_duplicate, node_max_similarity
from mdf_taxonomy.curation.semdedup_parquet import DEDUP_FIELDS, dedup_parquet

__all__ = [
    "DEDUP_FIELDS",
    "REPEAT_FIELD",
    "STRATEGIES",
    "LeafCandidates",
    "SamplePlan",
    "allocate",
    "build_plan",
    "dedup_parquet",
    "is_duplicate",
    "node_max_similarity",
    "repeats",
    "sample_parquet",
]
