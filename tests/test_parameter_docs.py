"""Every public parameter is documented where it is declared, scikit-learn style
(`name : type, default=...` and its meaning), and the CLI's --help is read from it."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from mdf_taxonomy import cli
from mdf_taxonomy.model.config import RunConfig, TaxonomyConfig, parameter_docs, parameter_help
from mdf_taxonomy.operators import ParquetEmbeddingLoader, registry
from mdf_taxonomy.passes.parquet_input import ParquetInput
from mdf_taxonomy.passes.parquet_sink import ParquetSink

# every component the registry lists, the parameter tables, and the classes below them
DOCUMENTED = [
    *registry.OPERATORS,
    *(c for c in registry.LOADERS if c is not ParquetEmbeddingLoader),  # ParquetInput's
    *registry.WRITERS,
    TaxonomyConfig,
    RunConfig,
    ParquetInput,
    ParquetSink,
]


def _parameters(cls: type) -> list[inspect.Parameter]:
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [
        p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in skip
    ]


def _default(cls: type, p: inspect.Parameter) -> object:
    if dataclasses.is_dataclass(cls):
        f = cls.__dataclass_fields__[p.name]
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
    return p.default


@pytest.mark.parametrize("cls", DOCUMENTED, ids=lambda c: c.__name__)
def test_every_init_parameter_has_a_typed_entry_with_its_default(cls):
    docs = parameter_docs(cls)
    params = _parameters(cls)
    assert [p.name for p in params if p.name not in docs] == []
    for p in params:
        spec, meaning = docs[p.name]
        kind, sep, default = spec.rpartition(", default=")
        assert meaning, f"{cls.__name__}.{p.name}: no meaning"
        if p.default is inspect.Parameter.empty:
            assert not sep and spec, f"{cls.__name__}.{p.name} is required: no default to state"
            continue
        assert sep and kind, f"{cls.__name__}.{p.name}: `type, default=...` expected, got {spec}"
        assert ast.literal_eval(default) == _default(cls, p), f"{cls.__name__}.{p.name}"
    # no entry for a parameter that does not exist
    assert sorted(set(docs) - {p.name for p in params}) == []


def test_the_parquet_loader_points_to_the_class_that_declares_its_parameters():
    assert "__init__" not in vars(ParquetEmbeddingLoader)
    assert ParquetEmbeddingLoader.__init__ is ParquetInput.__init__
    assert "ParquetInput" in ParquetEmbeddingLoader.__doc__


def test_fit_and_predict_help_shows_every_parameter_flag_with_its_meaning():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    helps = {**parameter_help(TaxonomyConfig), **parameter_help(RunConfig)}
    for command in ("fit", "predict"):
        actions = {a.dest: a for a in subparsers[command]._actions}
        for name in cli.CLI_FIT_PARAMETERS + cli.CLI_RUN_PARAMETERS:
            assert helps[name]
            assert actions[name].help.startswith(helps[name] + " (default: "), (command, name)
