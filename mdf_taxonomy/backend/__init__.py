"""Stateful Ray actors that hold fit partials between batches."""

from mdf_taxonomy.backend.combiner import PartialsCombiner
from mdf_taxonomy.backend.fit_backend import FitBackend, FitBucket, bucket_of
from mdf_taxonomy.model.sampling import BottomK, rows_by_key  # callers import them here too

__all__ = ["BottomK", "FitBackend", "FitBucket", "PartialsCombiner", "bucket_of", "rows_by_key"]
