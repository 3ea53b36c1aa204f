"""mdf-taxonomy: deterministic hierarchical k-means taxonomies as Mega-Data-Factory operators.

Importing the package does nothing but define it. ``register()`` puts the operators,
loaders and writer into MDF's registries (the real ones when mega_data_factory is
installed, else rust_free_fallback's); MDF's plugin entry point, our CLI and the engine
call it, and calling it again changes nothing.
"""

from __future__ import annotations

from mdf_taxonomy._version import __version__

__all__ = ["TaxonomyEngine", "__version__", "register"]


def register() -> None:
    """Register the operators under their class names and MDF's derived keys."""
    from mdf_taxonomy.operators.registry import register as register_components

    register_components()


def __getattr__(name: str):
    if name == "TaxonomyEngine":  # lazy: the engine pulls in Ray and the executor
        from mdf_taxonomy.engine import TaxonomyEngine

        return TaxonomyEngine
    raise AttributeError(name)
