"""Name -> class registries for operators, loaders and writers.

Registration must happen in the driver: objects are built there and pickled
into actors, so workers only need to be able to import the classes.
"""

from __future__ import annotations

from typing import Any, ClassVar


def _register(entries: dict[str, type], kind: str, name: str, klass: type) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if not isinstance(klass, type):
        raise TypeError(f"register {kind} {name!r}: expected a class, got {klass!r}")
    entries[name] = klass


def _lookup(entries: dict[str, type], kind: str, name: str) -> type:
    try:
        return entries[name]
    except KeyError:
        known = ", ".join(sorted(entries)) or "(none)"
        raise ValueError(
            f"Unknown {kind} {name!r}. Registered {kind}s: {known}. "
            "Register it in the driver before building the Executor."
        ) from None


def _create(entries: dict[str, type], kind: str, name: str, params: dict[str, Any] | None) -> Any:
    klass = _lookup(entries, kind, name)
    try:
        return klass(**(params or {}))
    except TypeError as exc:
        raise TypeError(
            f"Cannot create {kind} {name!r} ({klass.__name__}) with params "
            f"{sorted(params or {})}: {exc}"
        ) from exc


class OperatorRegistry:
    """Operators by name; YAML snake_case names map via OperatorConfig.get_class_name()."""

    _operators: ClassVar[dict[str, type]] = {}

    @classmethod
    def register(cls, name: str, operator_class: type) -> None:
        _register(cls._operators, "operator", name, operator_class)

    @classmethod
    def get(cls, name: str) -> type:
        return _lookup(cls._operators, "operator", name)

    @classmethod
    def create(cls, name: str, params: dict[str, Any] | None = None) -> Any:
        """Instantiate ``name`` with ``params`` as keyword arguments."""
        return _create(cls._operators, "operator", name, params)

    @classmethod
    def list_operators(cls) -> list[str]:
        return sorted(cls._operators)


class DataLoaderRegistry:
    """Loaders by ``data_loader.type`` (looked up as written)."""

    _loaders: ClassVar[dict[str, type]] = {}

    @classmethod
    def register(cls, name: str, loader_class: type) -> None:
        _register(cls._loaders, "data loader", name, loader_class)

    @classmethod
    def get(cls, name: str) -> type:
        return _lookup(cls._loaders, "data loader", name)

    @classmethod
    def create(cls, name: str, params: dict[str, Any] | None = None) -> Any:
        return _create(cls._loaders, "data loader", name, params)

    @classmethod
    def list_loaders(cls) -> list[str]:
        return sorted(cls._loaders)


class DataWriterRegistry:
    """Writers by ``data_writer.type`` (looked up as written)."""

    _writers: ClassVar[dict[str, type]] = {}

    @classmethod
    def register(cls, name: str, writer_class: type) -> None:
        _register(cls._writers, "data writer", name, writer_class)

    @classmethod
    def get(cls, name: str) -> type:
        return _lookup(cls._writers, "data writer", name)

    @classmethod
    def create(cls, name: str, params: dict[str, Any] | None = None) -> Any:
        return _create(cls._writers, "data writer", name, params)

    @classmethod
    def list_writers(cls) -> list[str]:
        return sorted(cls._writers)
