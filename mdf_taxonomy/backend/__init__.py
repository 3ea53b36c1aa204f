"""Stateful Ray actors that hold fit partials between batches."""

from mdf_taxonomy.backend.combiner import PartialsCombiner
from mdf_taxonomy.backend.fit_backend import BottomK, FitBackend, FitBucket, rows_by_key

__all__ = ["BottomK", "FitBackend", "FitBucket", "PartialsCombiner", "rows_by_key"]
