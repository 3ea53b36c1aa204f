"""`mdf-taxonomy report`: one self-contained HTML page (and its facts as JSON) about a
stored tree, from the artifact and a bounded sample of its labelled rows."""

from __future__ import annotations

import argparse
import os

from mdf_taxonomy.cli.options import CliError


def cmd_report(args: argparse.Namespace) -> int:
    """Build the report, as mdf_taxonomy.report.build_report does."""
    from mdf_taxonomy.cli.options import _storage_options
    from mdf_taxonomy.report import build_report

    labels = [c.strip() for c in args.labels.split(",") if c.strip()] if args.labels else None
    if labels and args.data is None:
        raise CliError("--labels needs --data (the labelled records hold the label columns)")
    if args.max_rows < 1:
        raise CliError(f"--max-rows must be >= 1, got {args.max_rows}")
    facts = build_report(
        args.taxonomy_uri,
        args.out,
        data=args.data,
        labels=labels,
        storage_options=_storage_options(args.storage_option),
        max_rows=args.max_rows,
        snapshot=args.snapshot,
    )
    data = facts.get("data")
    if data:
        print(
            f"report data: {data['rows']} rows, {data['labelled']} labelled, "
            f"{data['rows'] - data['labelled']} rejected, {data['sampled']} sampled"
        )
    print(f"report: {os.path.join(args.out, 'report.html')} ({facts['seconds_total']:.1f}s)")
    return 0


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """The `report` subcommand and its flags."""
    sp = sub.add_parser("report", help="write an HTML report (and JSON facts) of a stored tree")
    sp.add_argument("taxonomy_uri", help="where the taxonomy lives (its storage_uri)")
    sp.add_argument("--data", default=None, help="labelled Parquet (file, glob or directory)")
    sp.add_argument(
        "--labels", default=None, help="label columns to score against, e.g. class,order"
    )
    sp.add_argument("--out", required=True, help="folder for report.html, report.json, map.parquet")
    sp.add_argument(
        "--max-rows", type=int, default=50_000, help="most labelled rows sampled (50000)"
    )
    sp.add_argument("--snapshot", default=None, help="snapshot version (default: the latest)")
    sp.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option for the taxonomy and the data (repeatable)",
    )
    sp.set_defaults(func=cmd_report)
