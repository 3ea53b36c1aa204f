"""mdf-taxonomy: deterministic hierarchical k-means taxonomies as Mega-Data-Factory operators.

Importing the package registers its operators, loader and writer with MDF's
registries (the real ones when mega_data_factory is installed, else
rust_free_fallback's); `register()` does it again, idempotently.
"""

from __future__ import annotations

__version__ = "0.1.0"

OPERATOR_NAMES = ("KMeansLevelRefiner", "TaxonomyPathRefiner")


def mdf_key(name: str) -> str:
    """How MDF spells a class after its snake-case YAML name: KMeansLevelRefiner ->
    kmeans_level_refiner -> KmeansLevelRefiner."""
    import re

    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    return "".join(part.capitalize() for part in snake.split("_"))


def register() -> None:
    """Register the operators under their class names and MDF's derived keys."""
    from mdf_taxonomy import _mdf, operators

    for name in OPERATOR_NAMES:
        cls = getattr(operators, name)
        _mdf.OperatorRegistry.register(name, cls)
        _mdf.OperatorRegistry.register(mdf_key(name), cls)
    _mdf.DataLoaderRegistry.register("ParquetEmbeddingLoader", operators.ParquetEmbeddingLoader)
    _mdf.DataLoaderRegistry.register("SyntheticEmbeddingLoader",
                                     operators.SyntheticEmbeddingLoader)
    _mdf.DataWriterRegistry.register("DiscardWriter", operators.DiscardWriter)


def __getattr__(name: str):
    if name == "TaxonomyEngine":  # lazy: the engine pulls in Ray and the executor
        from mdf_taxonomy.engine import TaxonomyEngine

        return TaxonomyEngine
    raise AttributeError(name)


register()
