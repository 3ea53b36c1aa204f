"""What every `mdf-taxonomy` subcommand shares: the user error, the parameter flags read
from the tables, and the engine they build."""

from __future__ import annotations

import argparse
import json
from typing import Any


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


#: The fit and run parameters `fit` and `predict` take as flags (--n-levels, ...).
CLI_FIT_PARAMETERS = (
    "n_levels",
    "branching_factor",
    "dim",
    "metric",
    "seed",
    "max_iter",
    "tol",
    "sample_per_child",
    "init_iters",
    "max_node_size",
    "min_node_size",
    "balance_factor",
    "centroid_search",
    "coarse_min_children",
    "coarse_probe",
    "embedding_field",
)
CLI_RUN_PARAMETERS = (
    "batch_size",
    "num_replicas",
    "device",
    "kernel_backend",
    "compute_dtype",
    "cache_bytes",
    "columnar",
    "on_bad_file",
)


def _per_level(text: str) -> int | list[int]:
    """`64` or `64,16,8`: one value for every level, or one per level."""
    values = [int(b) for b in text.split(",")]
    return values[0] if len(values) == 1 else values


def _add_parameter_flags(
    sp: argparse.ArgumentParser,
    fit: tuple[str, ...] = CLI_FIT_PARAMETERS,
    run: tuple[str, ...] = CLI_RUN_PARAMETERS,
    default: str | None = None,
) -> None:
    """One flag per table entry, its type, choices, default and help from model/config
    (`default`: what an unset flag leaves, where that is not the table's default)."""
    from mdf_taxonomy.model.config import (
        PARAMETER_CONSTRAINTS,
        RUN_PARAMETER_CONSTRAINTS,
        Bool,
        FiniteAtLeast,
        OneOf,
        OrNone,
        PerLevel,
        RunConfig,
        TaxonomyConfig,
        parameter_help,
    )

    for names, cls, table in (
        (fit, TaxonomyConfig, PARAMETER_CONSTRAINTS),
        (run, RunConfig, RUN_PARAMETER_CONSTRAINTS),
    ):
        helps = parameter_help(cls)
        for name in names:
            rule = table[name]
            unset = cls.__dataclass_fields__[name].default if default is None else default
            flags = ["--" + name.replace("_", "-")] + (
                ["--replicas"] if name == "num_replicas" else []
            )
            kw: dict[str, Any] = {
                "dest": name,
                "default": None,
                "help": f"{helps.get(name, '')} (default: {unset})",
            }
            inner = rule.inner if isinstance(rule, OrNone) else rule
            if isinstance(rule, Bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif isinstance(rule, OneOf):
                kw["choices"] = list(rule.options)
            elif isinstance(rule, PerLevel):
                kw["type"] = _per_level
            elif isinstance(inner, FiniteAtLeast):
                kw["type"] = float
            elif hasattr(inner, "lo"):
                kw["type"] = int
            sp.add_argument(*flags, **kw)


def _engine(args: argparse.Namespace) -> Any:
    """The TaxonomyEngine of fit/predict's flags; unset flags leave the tables' defaults."""
    from mdf_taxonomy.engine import TaxonomyEngine

    params = {
        name: getattr(args, name, None)
        for name in CLI_FIT_PARAMETERS + CLI_RUN_PARAMETERS
        if getattr(args, name, None) is not None
    }
    return TaxonomyEngine(
        storage_uri=args.storage_uri,
        progress=not args.quiet,
        storage_options=_storage_options(args.storage_option),
        **params,
    )


def _storage_options(pairs: list[str]) -> dict[str, Any] | None:
    """KEY=VALUE pairs (VALUE parsed as JSON where it is JSON, e.g. true, 3, {"a": 1})."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--storage-option {pair!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options or None
