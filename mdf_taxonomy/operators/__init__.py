"""MDF faces of the taxonomy: the two refiners, the Parquet loader, a discard writer."""

from mdf_taxonomy.operators.kmeans_level_refiner import KMeansLevelRefiner
from mdf_taxonomy.operators.parquet_loader import ParquetEmbeddingLoader
from mdf_taxonomy.operators.synthetic_loader import SyntheticEmbeddingLoader
from mdf_taxonomy.operators.taxonomy_path_refiner import TaxonomyPathRefiner
from mdf_taxonomy.operators.writers import DiscardWriter
from mdf_taxonomy.passes.batch import level_field
from mdf_taxonomy.passes.input_report import (
    InputReport,
    close_input_report,
    open_input_report,
    read_input_failures,
    read_input_report,
)
from mdf_taxonomy.passes.parquet_input import ON_BAD_FILE, InputError
from mdf_taxonomy.passes.records import ERROR_FIELD, parse_embeddings

__all__ = [
    "ERROR_FIELD",
    "ON_BAD_FILE",
    "DiscardWriter",
    "InputError",
    "InputReport",
    "KMeansLevelRefiner",
    "ParquetEmbeddingLoader",
    "SyntheticEmbeddingLoader",
    "TaxonomyPathRefiner",
    "close_input_report",
    "level_field",
    "open_input_report",
    "parse_embeddings",
    "read_input_failures",
    "read_input_report",
]
