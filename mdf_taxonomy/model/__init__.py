"""The taxonomy as data: config, tree, snapshots on fsspec storage, fit arithmetic."""

from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.lease import WriterLease
from mdf_taxonomy.model.phase import Phase
from mdf_taxonomy.model.storage import TaxonomyStoreError
from mdf_taxonomy.model.store import TaxonomyStore
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy, format_path

__all__ = [
    "FitState",
    "Level",
    "Phase",
    "Taxonomy",
    "TaxonomyConfig",
    "TaxonomyStore",
    "TaxonomyStoreError",
    "WriterLease",
    "format_path",
]
