"""Stateful Ray actors that hold fit partials between batches."""

from mdf_taxonomy.backend.combiner import PartialsCombiner
from mdf_taxonomy.backend.fit_backend import FitBackend, FitBucket, bottom_k, rows_by_key

__all__ = ["FitBackend", "FitBucket", "PartialsCombiner", "bottom_k", "rows_by_key"]
