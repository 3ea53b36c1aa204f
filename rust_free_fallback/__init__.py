"""Rust-free, MDF-compatible runtime on Ray.

Mega-Data-Factory (MDF) is not on PyPI and needs a Rust toolchain; this package
reproduces the part of its framework API that plugins use (see
``rust_free_fallback.framework``) so pipelines run with only Ray + PyArrow.
"""

__all__ = ["framework"]
