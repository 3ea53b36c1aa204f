"""MDF faces of the taxonomy: the two refiners, the Parquet loader, a discard writer."""

from mdf_taxonomy.operators.parquet_loader import InputError, ParquetEmbeddingLoader
from mdf_taxonomy.operators.records import ERROR_FIELD, parse_embeddings
from mdf_taxonomy.operators.refiners import KMeansLevelRefiner, TaxonomyPathRefiner, level_field
from mdf_taxonomy.operators.synthetic_loader import SyntheticEmbeddingLoader
from mdf_taxonomy.operators.writers import DiscardWriter

__all__ = [
    "ERROR_FIELD",
    "DiscardWriter",
    "InputError",
    "KMeansLevelRefiner",
    "ParquetEmbeddingLoader",
    "SyntheticEmbeddingLoader",
    "TaxonomyPathRefiner",
    "level_field",
    "parse_embeddings",
]
