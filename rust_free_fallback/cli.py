"""``run -c FILE [--max-samples N] [--batch-size N]``: the fallback's ``mdf run``.

Unlike the stock ``mdf run`` it can import plugins: ``--plugin MODULE[:FUNC]``
(repeatable) and every ``mega_data_factory.plugins`` entry point are loaded
in the driver before the pipeline is built, so their registrations apply.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from rust_free_fallback.autoload import PLUGIN_GROUP, load_plugins
from rust_free_fallback.framework import Executor, PipelineConfig

logger = logging.getLogger(__name__)


def format_operator_stats(stats: dict[str, Any]) -> str:
    """Human-readable table of ``Executor.get_operator_stats()``."""
    lines = []
    for stage, ops in stats.items():
        lines.append(f"Stage {stage}:")
        for name, s in ops.items():
            lines.append(
                f"  {name}: in={s['input_records']} out={s['output_records']} "
                f"pass={s['pass_rate']:.1f}% time={s['total_time']:.3f}s "
                f"p50={s['p50_latency'] * 1e3:.3f}ms p99={s['p99_latency'] * 1e3:.3f}ms "
                f"throughput={s['throughput']:.1f}/s dropped_batches={s.get('dropped_batches', 0)}"
            )
    return "\n".join(lines)


def run_pipeline(
    config: PipelineConfig | str,
    max_samples: int | None = None,
    batch_size: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Build an Executor, run it to completion, shut it down; return the stats.

    ``config`` is a PipelineConfig or a YAML path; overrides apply to
    ``executor.max_samples`` / ``executor.batch_size``.
    """
    if isinstance(config, str):
        config = PipelineConfig.from_yaml(config)
    if max_samples is not None:
        config.executor.max_samples = max_samples
    if batch_size is not None:
        config.executor.batch_size = batch_size
    executor = Executor(config)
    try:
        start = time.perf_counter()
        n_in = n_out = 0
        for batch_in, batch_out in executor.execute():
            n_in += batch_in
            n_out += batch_out
            if verbose:
                print(f"\rprocessed {n_in} records, kept {n_out}", end="", flush=True)
        if verbose:
            print(f"\ndone in {time.perf_counter() - start:.1f}s")
        op_stats = executor.get_operator_stats()
        pipe_stats = executor.get_pipeline_stats()
        if verbose:
            print(format_operator_stats(op_stats))
            if pipe_stats["dropped_batches"]:
                print(
                    f"WARNING: {pipe_stats['dropped_batches']} batch(es) "
                    f"({pipe_stats['dropped_records']} records) dropped by operator errors"
                )
    finally:
        executor.shutdown()
    return {"operators": op_stats, "pipeline": pipe_stats}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="rust-free-mdf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline from a YAML config")
    run.add_argument("-c", "--config", required=True, help="pipeline YAML file")
    run.add_argument("--max-samples", type=int, default=None)
    run.add_argument("--batch-size", type=int, default=None)
    run.add_argument(
        "-p",
        "--plugin",
        action="append",
        default=[],
        help="module[:function] to import (and call) before building the pipeline",
    )
    run.add_argument(
        "--no-entry-points", action="store_true", help=f"do not load '{PLUGIN_GROUP}' entry points"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    load_plugins(args.plugin, None if args.no_entry_points else PLUGIN_GROUP)
    run_pipeline(args.config, max_samples=args.max_samples, batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
