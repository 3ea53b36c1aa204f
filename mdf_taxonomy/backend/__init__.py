"""Stateful Ray actors that hold fit partials between batches."""

from mdf_taxonomy.backend.fit_backend import FitBackend, FitBucket, bottom_k

__all__ = ["FitBackend", "FitBucket", "bottom_k"]
