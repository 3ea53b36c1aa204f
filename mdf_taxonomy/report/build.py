"""build_report: the taxonomy artifact and a bounded sample of its labelled rows to one
self-contained HTML file, the same facts as JSON, and the 2-D map's points as Parquet."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mdf_taxonomy.model import Taxonomy, TaxonomyStore
from mdf_taxonomy.report import facts, quality
from mdf_taxonomy.report.sample import LabelledSample, read_sample

log = logging.getLogger(__name__)

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
MAP_PARQUET = "map.parquet"


def compute_facts(
    tax: Taxonomy,
    sample: LabelledSample | None,
    max_children: int = 30,
    max_nodes: int = 5000,
) -> dict[str, Any]:
    """Every fact the report shows, as plain JSON-able data (the HTML renders only this)."""
    t0 = time.perf_counter()
    sizes = facts.level_sizes(tax, None if sample is None else sample.leaf_counts)
    shown, rest, depth = facts.shown_nodes(tax, sizes, max_children, max_nodes)
    x = None
    if sample is not None and len(sample.emb):
        x = tax.prepare(sample.emb).numpy()
    out: dict[str, Any] = {
        "taxonomy": {
            "version": tax.version,
            "metric": tax.config.metric,
            "dim": tax.dim,
            "branching_factor": list(tax.config.branching_factor),
            "nodes_per_level": [lv.n_nodes for lv in tax.levels],
            "complete": tax.state.complete,
        },
        "sizes_from": "labelled rows (exact counts)" if sample else "node counts (no --data)",
        "depth_shown": depth,
        "nodes": facts.node_facts(tax, sizes, shown, rest, sample, x),
        "hidden": [
            {
                "level": i + 1,
                "nodes": int(len(s) - (len(shown[i]) if i < len(shown) else 0)),
                "rows": int(s.sum() - (s[shown[i]].sum() if i < len(shown) else 0)),
            }
            for i, s in enumerate(sizes)
        ],
        "balance": facts.balance(sizes),
        "convergence": facts.convergence(tax),
    }
    if sample is not None:
        out["data"] = {
            "rows": sample.rows,
            "labelled": int(sample.leaf_counts.sum()),
            "rejected": sample.rejected,
            "sampled": len(sample.ids),
            "cap_per_leaf": sample.cap_per_leaf,
            "id_field": sample.id_field,
            "image_field": sample.image_field,
            "label_fields": list(sample.labels),
            "unlabelled": {
                c: int(sum(v is None or v == "" for v in vals)) for c, vals in sample.labels.items()
            },
        }
        out["sampling"] = quality.sampling_targets(tax, sample.leaf_counts)
    if x is not None:
        if sample.labels:
            out["agreement"] = quality.agreement(tax, sample.paths, x, sample.labels)
            out["landing"] = quality.landing(sample.paths, sample.labels)
        out["dedup"] = quality.near_duplicates(
            x, sample.paths[:, -1], sample.dedup_similarity, sample.paths
        )
        xy, method = quality.project_2d(x)
        out["map"] = {
            "method": method,
            "x": np.round(xy[:, 0], 4).tolist(),
            "y": np.round(xy[:, 1], 4).tolist(),
            "l1": sample.paths[:, 0].tolist(),
            "ids": sample.ids,
        }
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def build_report(
    taxonomy_uri: str,
    out_dir: str,
    data: str | None = None,
    labels: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    max_rows: int = 50_000,
    snapshot: str | None = None,
) -> dict[str, Any]:
    """Write report.html, report.json and (with `data`) map.parquet to `out_dir`; returns
    the facts. `data`: the labelled Parquet (read: one leaf-id column in full, at most
    `max_rows` rows of the projected columns); `labels`: the label columns to score."""
    t0 = time.perf_counter()
    tax = TaxonomyStore(taxonomy_uri, storage_options).load(snapshot)
    if not tax.state.complete:
        raise ValueError(f"{taxonomy_uri}: the taxonomy is not fitted to the end yet")
    sample = None
    if data is not None:
        sample = read_sample(
            data,
            tax.n_levels,
            tax.levels[-1].n_nodes,
            tax.dim,
            tax.config.embedding_field,
            labels,
            max_rows,
            storage_options,
        )
    out = compute_facts(tax, sample)
    out["inputs"] = {"taxonomy": taxonomy_uri, "data": data, "max_rows": max_rows}
    os.makedirs(out_dir, exist_ok=True)
    if "map" in out:
        paths = sample.paths
        pq.write_table(
            pa.table(
                {
                    "id": sample.ids,
                    "taxonomy_path": ["/".join(map(str, p)) for p in paths.tolist()],
                    "x": pa.array(out["map"]["x"], pa.float32()),
                    "y": pa.array(out["map"]["y"], pa.float32()),
                }
            ),
            os.path.join(out_dir, MAP_PARQUET),
        )
    from mdf_taxonomy.report.html import render

    out["seconds_total"] = round(time.perf_counter() - t0, 3)
    with open(os.path.join(out_dir, REPORT_JSON), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(out_dir, REPORT_HTML), "w") as f:
        f.write(render(out))
    log.info("report: %s (%.1fs)", os.path.join(out_dir, REPORT_HTML), out["seconds_total"])
    return out
