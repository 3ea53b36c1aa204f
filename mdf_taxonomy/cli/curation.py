"""`mdf-taxonomy sample`, `dedup` and `label-capped`: the curation steps over a stored
tree, as the engine's methods of those names run them."""

from __future__ import annotations

import argparse

from mdf_taxonomy.cli.options import CliError, _engine


def cmd_sample(args: argparse.Namespace) -> int:
    """A balanced subset of --input over the stored tree, as TaxonomyEngine.sample."""
    if args.output is None:
        raise CliError("sample needs --output (where the selected rows go)")
    summary = _engine(args).sample(
        args.input,
        args.output,
        args.target_size,
        multiplier=args.multiplier,
        strategy=args.strategy,
        seed=args.seed,
        plan_uri=args.plan_uri,
        overwrite=args.overwrite,
    )
    print(
        f"sampled: {summary['selected_rows']} rows ({summary['selected_total']} with repeats) "
        f"of {summary['valid_rows']}, target {summary['target_size']}, "
        f"{summary['leaves_sampled']} of {summary['leaves']} leaves, rejected "
        f"{summary['rejected'] or 0}"
    )
    print(f"sampled records: {args.output}")
    if summary.get("plan_uri"):
        print(f"sample plan: {summary['plan_uri']}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    """Semantic dedup within nodes of labelled --input, as TaxonomyEngine.dedup."""
    if args.output is None:
        raise CliError("dedup needs --output (where the rows with their dedup fields go)")
    summary = _engine(args).dedup(
        args.input,
        args.output,
        args.eps,
        level=args.level,
        ranking=args.ranking,
        seed=args.seed,
        cross_boundary_margin=args.cross_boundary_margin,
        id_field=args.id_field,
        overwrite=args.overwrite,
    )
    print(
        f"deduplicated: {summary['duplicates']} duplicate(s) of {summary['rows']} rows at "
        f"eps {summary['eps']} ({summary['duplicates_across_nodes']} across nodes), "
        f"{summary['nodes']} nodes, skipped {summary['skipped'] or 0}"
    )
    print(f"records with dedup fields: {args.output}")
    return 0


def cmd_label_capped(args: argparse.Namespace) -> int:
    """Label --input with at most --capacity rows per node, as TaxonomyEngine.label_capped."""
    if args.output is None:
        raise CliError("label-capped needs --output (where the labelled Parquet goes)")
    summary = _engine(args).label_capped(
        args.input,
        args.output,
        args.capacity,
        level=args.level,
        max_passes=args.max_passes,
        plan_uri=args.plan_uri,
        overwrite=args.overwrite,
    )
    print(
        f"labelled: {summary['rows']} rows, at most {summary['max_node_rows']} per node of "
        f"level {summary['level']} (nearest: {summary['max_node_rows_nearest']}), "
        f"{summary['moved_rows']} moved to a sibling, {summary['passes']} passes, rejected "
        f"{summary['rejected'] or 0}"
    )
    print(f"labelled records: {args.output}")
    if summary.get("plan_uri"):
        print(f"capacity plan: {summary['plan_uri']}")
    return 0


def add_curation_flags(sp: argparse.ArgumentParser, name: str) -> None:
    """The flags of `sample` and `dedup` beyond the shared ones."""
    if name == "sample":
        sp.add_argument("--target-size", type=int, required=True, help="rows to select")
        sp.add_argument("--multiplier", type=int, default=1, help="most times a row is taken (1)")
        sp.add_argument(
            "--strategy",
            default="random",
            help="how a leaf's quota is filled: random (by content hash), closest or "
            "furthest (to the leaf centroid); --seed: the tree's by default",
        )
        sp.add_argument("--plan-uri", default=None, help="also save the plan here")
    if name == "dedup":
        sp.add_argument("--eps", type=float, required=True, help="duplicate: similarity >= 1 - eps")
        sp.add_argument("--level", type=int, default=None, help="node level (the leaves)")
        sp.add_argument("--ranking", default="hard", help="hard (furthest first), easy or random")
        sp.add_argument(
            "--cross-boundary-margin",
            type=float,
            default=None,
            help="also compare rows this close to a sibling node with its rows",
        )
        sp.add_argument("--id-field", default="id", help="the column naming each row")
    if name == "label-capped":
        sp.add_argument("--capacity", type=int, required=True, help="most rows in a node")
        sp.add_argument("--level", type=int, default=None, help="the capped level (the leaves)")
        sp.add_argument("--max-passes", type=int, default=64, help="counting passes at most (64)")
        sp.add_argument("--plan-uri", default=None, help="also save the thresholds here")
