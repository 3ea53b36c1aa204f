"""`mdf-taxonomy`: run an MDF YAML with taxonomy stages, or fit / predict / sample / dedup /
label-capped
directly.

`run -c CONFIG` is a drop-in for `mdf run` (same flags) that imports this plugin
first and, when the YAML holds a kmeans_level_refiner, runs the fit passes before
the pipeline as written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from mdf_taxonomy._version import __version__
from mdf_taxonomy.cli.curation import add_curation_flags, cmd_dedup, cmd_label_capped, cmd_sample
from mdf_taxonomy.cli.options import (
    CLI_FIT_PARAMETERS,
    CLI_RUN_PARAMETERS,
    CliError,
    _add_parameter_flags,
    _engine,
)
from mdf_taxonomy.cli.report import add_report_parser

FLAGS = (CLI_FIT_PARAMETERS, CLI_RUN_PARAMETERS)  # fit's and predict's parameter flags

__all__ = ["CLI_FIT_PARAMETERS", "CLI_RUN_PARAMETERS", "CliError", "build_parser", "main"]


def _load_config(path: str) -> Any:
    """The YAML as MDF reads it, its unknown top-level sections named (MDF ignores them)."""
    import yaml

    from mdf_taxonomy import _mdf
    from mdf_taxonomy.engine import check_sections

    try:
        with open(path) as f:
            check_sections(yaml.safe_load(f), path)
        return _mdf.PipelineConfig.from_yaml(path)
    except FileNotFoundError as e:
        raise CliError(f"config {path!r} not found") from e
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"bad config {path}: {e}") from e
    except Exception as e:  # yaml errors and the like
        raise CliError(f"cannot read config {path}: {type(e).__name__}: {e}") from e


def cmd_run(args: argparse.Namespace) -> int:
    """`mdf run` with the fit passes first, when the YAML holds a kmeans_level_refiner."""
    from mdf_taxonomy import _mdf
    from mdf_taxonomy.engine import (
        NothingLabelled,
        PipelineFit,
        StagedOutput,
        ensure_ray,
        fit_operators,
        label_summary,
        pinned,
        record_run,
        staged_run,
        validate_pipeline,
    )

    _mdf.load_host_components()
    config = _load_config(args.config)
    if args.max_samples is not None:
        config.executor.max_samples = args.max_samples
    if args.batch_size is not None:
        config.executor.batch_size = args.batch_size
    try:
        validate_pipeline(config)
    except ValueError as e:
        raise CliError(f"bad config {args.config}: {e}") from e
    writer = config.data_writer
    staged = (
        StagedOutput(
            writer.params["output_path"], writer.params.get("storage_options"), args.overwrite
        )
        if writer.type != "DiscardWriter" and writer.params.get("output_path")
        else None
    )
    ensure_ray(config.executor.num_cpus)
    summary: dict[str, Any] = {"command": "run", "config": args.config, "runtime": _mdf.MDF_FLAVOUR}
    fit = PipelineFit(config, progress=not args.quiet) if fit_operators(config) else None
    if fit is not None:
        tax = fit.run()
        summary["fit"] = fit.summary
        config = pinned(config, tax, fit_pass=False)
        print(f"taxonomy: {tax.n_levels} level(s), snapshot {tax.version}")
    try:
        result = staged_run(config, staged, progress=not args.quiet)
    except NothingLabelled as e:
        _report(summary, e.result, config)
        raise
    summary["label"] = label_summary(result)
    if fit is not None:
        summary["summary_uri"] = record_run(fit.storage_uri, fit.storage_options, summary)
    _report(summary, result, config)
    return 0


def _report(summary: dict[str, Any], result: dict[str, Any], config: Any) -> None:
    """The run summary: records in/out, what the fit did, what was labelled and rejected."""
    rate = result["rows_in"] / max(result["seconds"], 1e-9)
    print(
        f"records in: {result['rows_in']}, out: {result['rows_out']}, "
        f"{result['seconds']:.1f}s ({rate:.0f} rows/s)"
    )
    fit = summary.get("fit")
    if fit:
        print(
            f"fit: {fit['passes_run']} pass(es) run{' (resumed)' if fit['resumed'] else ''}, "
            f"rows seen {fit['rows_seen']}, fitted {fit['rows_fitted']}, "
            f"rejected {fit['rejected'] or 0}, {fit['seconds']:.1f}s"
        )
    lab = result["labelling"]
    if lab["seen"]:
        print(f"labelled: {lab['labelled']} of {lab['seen']}, rejected {lab['rejected'] or 0}")
    _print_skipped(result.get("skipped"))
    out = config.data_writer.params.get("output_path")
    if out:
        print(f"labelled records: {out}")
    uris = {
        op.params["storage_uri"]
        for stage in config.stages
        for op in stage.operators
        if op.enabled and op.params.get("storage_uri")
    }
    for uri in sorted(uris):
        print(f"taxonomy artifact: {uri}")
    if summary.get("summary_uri"):
        print(f"run summary: {summary['summary_uri']}")
    print("operator stats: " + json.dumps(result["stats"], default=str)[:2000])


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit (or resume) through TaxonomyEngine, as the Python API does."""
    engine = _engine(args)
    tax = engine.fit(
        args.input, output=args.output, overwrite=args.overwrite, warm_start=args.warm_start
    )
    fit = engine.last_summary["fit"]
    print(
        f"taxonomy artifact: {args.storage_uri} (snapshot {tax.version}, "
        f"{[lv.n_nodes for lv in tax.levels]} nodes per level)"
    )
    print(
        f"fit: {fit['passes_run']} pass(es) run, rows seen {fit['rows_seen']}, "
        f"fitted {fit['rows_fitted']}, rejected {fit['rejected'] or 0}, {fit['seconds']:.1f}s"
    )
    for lv in fit.get("id_changes", {}).get("levels", []):
        print(
            f"level {lv['level']} ids: {lv['kept']} kept, {lv['born']} born, {lv['retired']} "
            f"retired, {len(lv['drifted'])} drifted, centroid shift max {lv['shift_max']:.4g}"
        )
    _print_labelling(engine.last_summary)
    if args.output:
        print(f"labelled records: {args.output}")
    if engine.last_summary.get("summary_uri"):
        print(f"run summary: {engine.last_summary['summary_uri']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Label Parquet with a stored taxonomy; the output is required (records go there)."""
    if args.output is None:
        raise CliError("predict needs --output (where the labelled Parquet goes)")
    engine = _engine(args)
    out = engine.predict(args.input, output=args.output, overwrite=args.overwrite)
    _print_labelling(engine.last_summary)
    print(f"labelled records: {out}")
    return 0


def _print_labelling(summary: dict[str, Any]) -> None:
    """What was labelled and rejected, and the input items skipped."""
    lab = summary.get("label", {}).get("labelling")
    if lab:
        print(f"labelled: {lab['labelled']} of {lab['seen']}, rejected {lab['rejected'] or 0}")
    _print_skipped(summary.get("label", {}).get("skipped"))


def _print_skipped(skipped: list[dict[str, Any]] | None) -> None:
    """Input items skipped under on_bad_file=skip: never silent."""
    for entry in skipped or []:
        print(f"skipped input: {entry['item']} ({entry['rows']} rows): {entry['reason']}")


def _add_warm_start_flag(sp: argparse.ArgumentParser) -> None:
    """--warm-start (TaxonomyEngine.fit's warm_start; the engine is not imported here, so
    that building the parser stays cheap)."""
    sp.add_argument(
        "--warm-start",
        default=None,
        metavar="STORAGE_URI",
        help="refit from this fitted tree, keeping its node ids (TaxonomyEngine.fit's "
        "warm_start; default: none, a cold fit)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; fit/predict's parameter flags are read from the tables."""
    p = argparse.ArgumentParser(prog="mdf-taxonomy", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"mdf-taxonomy {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an MDF pipeline YAML (drop-in for `mdf run`)")
    run.add_argument("-c", "--config", required=True, help="the pipeline YAML")
    run.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="read at most this many records (default: the config's executor's)",
    )
    _add_parameter_flags(
        run, fit=(), run=("batch_size",), default="the config's executor.batch_size"
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the writer's output if it holds data (else refused)",
    )
    run.set_defaults(func=cmd_run)

    curation = ("seed", "embedding_field")  # the tree is stored: no fit parameter but these
    for name, func, what, fit, run_flags in (
        ("fit", cmd_fit, "fit a taxonomy on Parquet embeddings", *FLAGS),
        ("predict", cmd_predict, "label Parquet embeddings with a stored taxonomy", *FLAGS),
        (
            "sample",
            cmd_sample,
            "draw a balanced subset over a stored taxonomy",
            curation,
            ("batch_size", "device", "kernel_backend"),
        ),
        (
            "dedup",
            cmd_dedup,
            "mark near-duplicates within the nodes of labelled Parquet",
            curation,
            ("device", "compute_dtype", "on_bad_file"),
        ),
        (
            "label-capped",
            cmd_label_capped,
            "label Parquet with at most --capacity rows per node",
            ("embedding_field",),
            ("batch_size", "device", "kernel_backend"),
        ),
    ):
        sp = sub.add_parser(name, help=what)
        sp.add_argument("--input", required=True, help="file, glob or directory (any fsspec URI)")
        sp.add_argument("--storage-uri", required=True, help="where the taxonomy lives")
        sp.add_argument("--output", default=None, help="where the records go")
        _add_parameter_flags(sp, fit, run_flags)
        sp.add_argument(
            "--overwrite",
            action="store_true",
            help="replace --output if it holds data (else refused)",
        )
        sp.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="fsspec storage option for input, output and taxonomy "
            '(repeatable), e.g. client_kwargs=\'{"endpoint_url": "..."}\'',
        )
        sp.set_defaults(func=func)
        add_curation_flags(sp, name)
        if name == "fit":
            _add_warm_start_flag(sp)
    add_report_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The console script: 1 for a run that lost or labelled nothing, 2 for a user error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from mdf_taxonomy.engine import NothingLabelled, PassIncomplete
    from mdf_taxonomy.model import TaxonomyStoreError
    from mdf_taxonomy.operators import InputError

    try:
        return args.func(args)
    except (NothingLabelled, PassIncomplete) as e:
        print(f"mdf-taxonomy: error: {e}", file=sys.stderr)
        return 1
    except (CliError, InputError, TaxonomyStoreError, ValueError, FileExistsError) as e:
        print(f"mdf-taxonomy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
