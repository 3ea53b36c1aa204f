"""The taxonomy as data: config, tree, snapshots on fsspec storage, fit arithmetic."""

from mdf_taxonomy.model.config import TaxonomyConfig
from mdf_taxonomy.model.store import TaxonomyStore, TaxonomyStoreError, WriterLease
from mdf_taxonomy.model.taxonomy import FitState, Level, Taxonomy, format_path

__all__ = [
    "FitState",
    "Level",
    "Taxonomy",
    "TaxonomyConfig",
    "TaxonomyStore",
    "TaxonomyStoreError",
    "WriterLease",
    "format_path",
]
