"""Registration of our components with MDF's registries: the one place that lists them."""

from __future__ import annotations

from mdf_taxonomy import _mdf
from mdf_taxonomy.operators.balanced_sample_filter import BalancedSampleFilter
from mdf_taxonomy.operators.kmeans_level_refiner import KMeansLevelRefiner
from mdf_taxonomy.operators.parquet_loader import ParquetEmbeddingLoader
from mdf_taxonomy.operators.semantic_dedup_filter import SemanticDedupFilter
from mdf_taxonomy.operators.synthetic_loader import SyntheticEmbeddingLoader
from mdf_taxonomy.operators.taxonomy_path_refiner import TaxonomyPathRefiner
from mdf_taxonomy.operators.text_embedding_refiner import TextEmbeddingRefiner
from mdf_taxonomy.operators.text_loader import PackagedTextLoader
from mdf_taxonomy.operators.writers import DiscardWriter, PartitionedParquetWriter

OPERATORS = (
    KMeansLevelRefiner,
    TaxonomyPathRefiner,
    TextEmbeddingRefiner,
    BalancedSampleFilter,
    SemanticDedupFilter,
)
LOADERS = (ParquetEmbeddingLoader, SyntheticEmbeddingLoader, PackagedTextLoader)
WRITERS = (DiscardWriter, PartitionedParquetWriter)


def register() -> None:
    """Operators under their class names and MDF's derived keys, loaders and writers under
    their class names; idempotent."""
    for cls in OPERATORS:
        _mdf.OperatorRegistry.register(cls.__name__, cls)
        _mdf.OperatorRegistry.register(_mdf.mdf_key(cls.__name__), cls)
    for cls in LOADERS:
        _mdf.DataLoaderRegistry.register(cls.__name__, cls)
    for cls in WRITERS:
        _mdf.DataWriterRegistry.register(cls.__name__, cls)
