"""MDF's face of the Parquet input: the loader MDF lacks, for `data_loader:` in a YAML."""

from __future__ import annotations

from mdf_taxonomy._mdf import DataLoader
from mdf_taxonomy.passes.parquet_input import ParquetInput


class ParquetEmbeddingLoader(ParquetInput, DataLoader):
    """Parquet embeddings from any fsspec URI, split by row group; see ParquetInput for
    its parameters and for what is read and what is skipped."""
