"""The tree's own facts: node sizes, the nodes the report shows, and per shown node its
cohesion, nearest siblings, nearest members and top labels.

A tree may have a million leaves: the report shows, under each shown node, its largest
`max_children` children (8x that under the root) and one '+N rows in M nodes' entry for
the rest, level by level while the shown nodes stay under `max_nodes`; what is not shown
is counted, never dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mdf_taxonomy.model import Taxonomy
from mdf_taxonomy.report.sample import LabelledSample

CHUNK = 8192


def level_sizes(tax: Taxonomy, leaf_counts: np.ndarray | None) -> list[np.ndarray]:
    """Rows per node at every level, summed up from the leaves (None: one per leaf, so a
    tree without data is shown by node count)."""
    leaves = tax.levels[-1].n_nodes
    sizes = [np.ones(leaves, np.int64) if leaf_counts is None else leaf_counts.astype(np.int64)]
    for i in range(tax.n_levels - 1, 0, -1):
        sizes.insert(0, np.bincount(tax.levels[i].parents, sizes[0], tax.levels[i - 1].n_nodes))
        sizes[0] = sizes[0].astype(np.int64)
    return sizes


def distances(tax: Taxonomy, x: np.ndarray, level: int, nodes: np.ndarray) -> np.ndarray:
    """Each prepared row's distance to its node's centroid at `level` (1 - cos or l2)."""
    c = tax.levels[level - 1].centroids
    out = np.empty(len(x), np.float32)
    for s in range(0, len(x), CHUNK):
        cx, xs = c[nodes[s : s + CHUNK]], x[s : s + CHUNK]
        if tax.config.metric == "cosine":
            cn = cx / np.maximum(np.linalg.norm(cx, axis=1, keepdims=True), 1e-30)
            out[s : s + CHUNK] = 1.0 - (cn * xs).sum(1)
        else:
            out[s : s + CHUNK] = np.linalg.norm(xs - cx, axis=1)
    return out


def centroid_distance(tax: Taxonomy, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances between centroids a (k, dim) and b (m, dim) in the tree's metric."""
    if tax.config.metric == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
        bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
        return 1.0 - an @ bn.T
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def shown_nodes(
    tax: Taxonomy, sizes: list[np.ndarray], max_children: int = 30, max_nodes: int = 5000
) -> tuple[list[np.ndarray], list[list[dict[str, Any]]], int]:
    """Per level the node ids shown, the '+N rows in M nodes' entries for the rest (one
    per parent), and the depth shown (levels below it are summarised by their parents)."""
    shown: list[np.ndarray] = []
    rest: list[list[dict[str, Any]]] = []
    parents_shown = np.array([0])
    total = 0
    for i, lv in enumerate(tax.levels):
        offsets = lv.child_offsets(1 if i == 0 else tax.levels[i - 1].n_nodes)
        keep, more = [], []
        for p in parents_shown:
            kids = np.arange(offsets[p], offsets[p + 1])
            order = kids[np.argsort(-sizes[i][kids], kind="stable")]
            most = max_children * 8 if i == 0 else max_children  # the first screen: wider
            keep.append(order[:most])
            if len(order) > most:
                hidden = order[most:]
                more.append(
                    {"parent": int(p), "nodes": len(hidden), "rows": int(sizes[i][hidden].sum())}
                )
        ids = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
        if i > 0 and total + len(ids) > max_nodes:
            return shown, rest, i
        shown.append(ids)
        rest.append(more)
        total += len(ids)
        parents_shown = ids
    return shown, rest, tax.n_levels


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def top_labels(values: list[Any], nodes: np.ndarray, which: np.ndarray, k: int = 3) -> dict:
    """Per node in `which`: its top k label values (share), purity and entropy in bits,
    over the sampled rows that have a label (None counts as unlabelled)."""
    vals = np.array(["" if v is None else str(v) for v in values], dtype=object)
    labelled = np.array([v is not None and v != "" for v in values], dtype=bool)
    out: dict[int, dict[str, Any]] = {}
    if not labelled.any():
        return out
    names, codes = np.unique(vals[labelled], return_inverse=True)
    node_l = nodes[labelled]
    wanted = np.isin(node_l, which)
    key = node_l[wanted].astype(np.int64) * len(names) + codes[wanted]
    uniq, cnt = np.unique(key, return_counts=True)
    node_of = uniq // len(names)
    for n in np.unique(node_of):
        sel = node_of == n
        c, lab = cnt[sel], uniq[sel] % len(names)
        order = np.argsort(-c, kind="stable")[:k]
        tot = int(c.sum())
        out[int(n)] = {
            "top": [[str(names[lab[j]]), round(float(c[j] / tot), 4)] for j in order],
            "purity": round(float(c.max() / tot), 4),
            "entropy": round(_entropy(c), 4),
            "n": tot,
        }
    return out


def node_facts(
    tax: Taxonomy,
    sizes: list[np.ndarray],
    shown: list[np.ndarray],
    rest: list[list[dict[str, Any]]],
    sample: LabelledSample | None,
    x: np.ndarray | None,
    n_members: int = 6,
    n_siblings: int = 3,
) -> list[dict[str, Any]]:
    """One record per shown node (and per '+N rows in M nodes' entry), parents first."""
    nodes: list[dict[str, Any]] = []
    path_of: dict[tuple[int, int], str] = {}
    have = sample is not None and x is not None and len(x) > 0
    for i, ids in enumerate(shown):
        level, lv = i + 1, tax.levels[i]
        parent_sizes = sizes[i - 1] if i else np.array([sizes[0].sum()])
        if have:
            col = sample.paths[:, i].astype(np.int64)
            d = distances(tax, x, level, col)
            n_in = np.bincount(col, minlength=lv.n_nodes)
            cohesion = np.bincount(col, d, minlength=lv.n_nodes) / np.maximum(n_in, 1)
            order = np.lexsort((d, col))
            first = np.searchsorted(col[order], np.arange(lv.n_nodes + 1))
            labels = {c: top_labels(v, col, ids) for c, v in sample.labels.items()}
        offsets = lv.child_offsets(1 if i == 0 else tax.levels[i - 1].n_nodes)
        n_kids = (
            np.diff(tax.levels[i + 1].child_offsets(lv.n_nodes))
            if level < tax.n_levels
            else np.zeros(lv.n_nodes, np.int64)
        )
        for n in ids:
            n = int(n)
            p = int(lv.parents[n])
            path = f"{path_of[(level - 1, p)]}/{n}" if level > 1 else str(n)
            path_of[(level, n)] = path
            sib = np.arange(offsets[p], offsets[p + 1])
            sib = sib[sib != n]
            rec: dict[str, Any] = {
                "id": f"{level}:{n}",
                "parent": f"{level - 1}:{p}" if level > 1 else "",
                "level": level,
                "node": n,
                "path": path,
                "size": int(sizes[i][n]),
                "share": round(float(sizes[i][n] / max(parent_sizes[p], 1)), 4),
                "children": int(n_kids[n]),
            }
            if len(sib):
                dd = centroid_distance(tax, lv.centroids[[n]], lv.centroids[sib])[0]
                near = np.argsort(dd, kind="stable")[:n_siblings]
                rec["siblings"] = [[int(sib[j]), round(float(dd[j]), 4)] for j in near]
            else:
                rec["siblings"] = []
            if have:
                rec["sampled"] = int(n_in[n])
                rec["cohesion"] = round(float(cohesion[n]), 4) if n_in[n] else None
                rows = order[first[n] : first[n] + n_members]
                rec["members"] = [sample.ids[r] for r in rows]
                if sample.image_urls is not None:
                    rec["images"] = [sample.image_urls[r] for r in rows]
                rec["labels"] = {c: v.get(n) for c, v in labels.items()}
            nodes.append(rec)
        for m in rest[i]:
            parent = f"{level - 1}:{m['parent']}" if level > 1 else ""
            nodes.append(
                {
                    "id": f"{level}:more:{m['parent']}",
                    "parent": parent,
                    "level": level,
                    "node": None,
                    "path": (path_of[(level - 1, m["parent"])] + "/…") if level > 1 else "…",
                    "size": m["rows"],
                    "more_nodes": m["nodes"],
                    "label": f"+{m['rows']} rows in {m['nodes']} nodes",
                    "children": 0,
                }
            )
    return nodes


def gini(sizes: np.ndarray) -> float:
    """Gini coefficient of node sizes (0: all equal, near 1: one node holds everything)."""
    s = np.sort(sizes.astype(np.float64))
    if s.sum() == 0:
        return 0.0
    n = len(s)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(s) / (n * s.sum()))


def balance(sizes: list[np.ndarray]) -> list[dict[str, Any]]:
    """Per level: node count, empty nodes, min / median / max size and Gini."""
    return [
        {
            "level": i + 1,
            "nodes": len(s),
            "empty": int((s == 0).sum()),
            "min": int(s.min()) if len(s) else 0,
            "median": float(np.median(s)) if len(s) else 0.0,
            "max": int(s.max(initial=0)),
            "gini": round(gini(s), 4),
            **_histogram(s),
        }
        for i, s in enumerate(sizes)
    ]


def _histogram(s: np.ndarray) -> dict[str, list]:
    counts, edges = np.histogram(s, bins=min(30, max(1, len(s))))
    return {"histogram": counts.tolist(), "histogram_edges": [round(float(e), 2) for e in edges]}


def convergence(tax: Taxonomy) -> list[dict[str, Any]]:
    """Per level from the stored fit history: inertia per Lloyd pass, passes, repairs and
    the parents that got fewer children than asked."""
    out = []
    for level in range(1, tax.n_levels + 1):
        hist = [h for h in tax.state.history if h.get("level") == level]
        lloyd = [h for h in hist if h.get("phase") == "lloyd"]
        start = next((h for h in hist if h.get("phase") == "sample"), {})
        inertia = [h.get("inertia") for h in lloyd]
        out.append(
            {
                "level": level,
                "passes": len(lloyd) + (1 if start else 0),
                "lloyd_passes": len(lloyd),
                "inertia": [None if v is None or not math.isfinite(v) else v for v in inertia],
                "repaired": int(sum(h.get("repaired", 0) for h in lloyd)),
                "empty_last_pass": int(lloyd[-1].get("empty", 0)) if lloyd else 0,
                "capped_parents": int(start.get("capped_parents", 0)),
                "capped_children": int(start.get("capped_children", 0)),
            }
        )
    return out


__all__ = ["balance", "convergence", "level_sizes", "node_facts", "shown_nodes"]
