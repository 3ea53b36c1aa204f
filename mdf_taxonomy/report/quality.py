"""What the sample says about the tree: agreement with label columns beside a flat
k-means of the same size, where each label lands, within-node near-duplicates, what a
sampling target keeps, and a 2-D map. All on the bounded sample, so the cost does not
grow with the data."""

from __future__ import annotations

from typing import Any

import numpy as np

from mdf_taxonomy.curation.sampling import allocate
from mdf_taxonomy.model import Taxonomy

MAX_KMEANS_K = 2048
DEDUP_EPS = (0.01, 0.02, 0.05, 0.1, 0.2)
MAX_NN_ROWS = 2000  # rows per node in the near-duplicate sketch


def _codes(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mask of labelled rows, integer codes of their labels)."""
    mask = np.array([v is not None and v != "" for v in values], dtype=bool)
    vals = np.array([str(v) for v, m in zip(values, mask, strict=True) if m], dtype=object)
    codes = np.unique(vals, return_inverse=True)[1] if len(vals) else np.zeros(0, np.int64)
    return mask, codes


def agreement(
    tax: Taxonomy, paths: np.ndarray, x: np.ndarray, labels: dict[str, list[Any]], seed: int = 0
) -> list[dict[str, Any]]:
    """Per level and label column: AMI / NMI / ARI of the tree's nodes and of a flat k-means
    (scikit-learn, fixed seed, the same K, on the same sampled rows)."""
    from sklearn.cluster import KMeans

    out = []
    for i, lv in enumerate(tax.levels):
        k = lv.n_nodes
        flat, why = None, None
        if k > MAX_KMEANS_K:
            why = f"K={k} > {MAX_KMEANS_K}: flat k-means skipped"
        elif k >= len(x):
            why = f"K={k} >= {len(x)} sampled rows: flat k-means skipped"
        else:
            flat = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit_predict(x)
        for col, values in labels.items():
            mask, codes = _codes(values)
            rec: dict[str, Any] = {"level": i + 1, "label": col, "k": k, "rows": int(mask.sum())}
            if mask.sum() >= 2:
                tree = paths[mask, i]
                rec["tree"] = _scores(codes, tree)
                rec["kmeans"] = _scores(codes, flat[mask]) if flat is not None else None
            if why:
                rec["kmeans_skipped"] = why
            out.append(rec)
    return out


def _scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import (
        adjusted_mutual_info_score,
        adjusted_rand_score,
        normalized_mutual_info_score,
    )

    return {
        "ami": round(float(adjusted_mutual_info_score(truth, pred)), 4),
        "nmi": round(float(normalized_mutual_info_score(truth, pred)), 4),
        "ari": round(float(adjusted_rand_score(truth, pred)), 4),
    }


def landing(paths: np.ndarray, labels: dict[str, list[Any]], top: int = 50) -> dict[str, list]:
    """Where does label X land: per label column its `top` most frequent values, each with
    its sampled rows, its 3 largest level-1 nodes (share) and how many leaves hold it."""
    out: dict[str, list] = {}
    for col, values in labels.items():
        vals = np.array(["" if v is None else str(v) for v in values], dtype=object)
        names, inv, cnt = np.unique(vals, return_inverse=True, return_counts=True)
        rows = []
        for j in np.argsort(-cnt, kind="stable")[:top]:
            if names[j] == "":
                continue
            sel = inv == j
            l1, c1 = np.unique(paths[sel, 0], return_counts=True)
            best = np.argsort(-c1, kind="stable")[:3]
            rows.append(
                {
                    "value": str(names[j]),
                    "n": int(cnt[j]),
                    "l1": [[int(l1[b]), round(float(c1[b] / sel.sum()), 4)] for b in best],
                    "leaves": int(len(np.unique(paths[sel, -1]))),
                }
            )
        out[col] = rows
    return out


def near_duplicates(
    x: np.ndarray, leaves: np.ndarray, dedup_similarity: np.ndarray | None, paths: np.ndarray
) -> dict[str, Any]:
    """Within-leaf nearest-neighbour cosine similarity of the sampled rows (each node's
    first MAX_NN_ROWS), and per level-1 node the share an eps would keep: exact from
    dedup_max_similarity when the dedup has run, else this sketch (it sees only the
    sample, so it underestimates duplicates)."""
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    nn = np.full(len(x), np.nan)
    order = np.argsort(leaves, kind="stable")
    bounds = np.flatnonzero(np.diff(leaves[order])) + 1
    for rows in np.split(order, bounds):
        rows = rows[:MAX_NN_ROWS]
        if len(rows) < 2:
            continue
        g = xn[rows] @ xn[rows].T
        np.fill_diagonal(g, -np.inf)
        nn[rows] = g.max(1)
    exact = dedup_similarity is not None
    sim = dedup_similarity if exact else nn
    have = np.isfinite(sim)
    hist, edges = np.histogram(nn[np.isfinite(nn)], bins=40, range=(0.0, 1.0))
    keep = {}
    for eps in DEDUP_EPS:
        kept = ~(have & (sim >= 1 - eps))
        per_l1 = np.bincount(paths[:, 0], kept, minlength=paths[:, 0].max(initial=0) + 1)
        tot = np.bincount(paths[:, 0], minlength=len(per_l1))
        keep[str(eps)] = {
            "kept_share": round(float(kept.mean()) if len(kept) else 1.0, 4),
            "l1": {int(n): round(float(per_l1[n] / tot[n]), 4) for n in np.flatnonzero(tot)},
        }
    return {
        "source": "dedup_max_similarity" if exact else "sampled within-leaf nearest neighbour",
        "rows": int(np.isfinite(nn).sum()),
        "histogram": hist.tolist(),
        "edges": [round(float(e), 3) for e in edges],
        "keep": keep,
    }


def sampling_targets(tax: Taxonomy, leaf_counts: np.ndarray) -> list[dict[str, Any]]:
    """What balanced sampling (curation.sampling.allocate) would keep per level for a few
    targets: nodes that get rows, and the smallest and largest quota."""
    total = int(leaf_counts.sum())
    if total == 0:
        return []
    parents = [lv.parents for lv in tax.levels]
    out = []
    for frac in (0.5, 0.1, 0.01):
        target = max(1, int(total * frac))
        quotas = allocate(parents, leaf_counts, target)
        out.append(
            {
                "target": target,
                "levels": [
                    {
                        "level": i + 1,
                        "nodes_kept": int((q > 0).sum()),
                        "nodes": len(q),
                        "min_quota": int(q.min(initial=0)),
                        "max_quota": int(q.max(initial=0)),
                    }
                    for i, q in enumerate(quotas)
                ],
            }
        )
    return out


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, 2) coordinates: UMAP when umap-learn is installed, else PCA (numpy)."""
    if len(x) < 3:
        return np.zeros((len(x), 2), np.float32), "none"
    try:
        import umap  # optional

        return umap.UMAP(random_state=seed).fit_transform(x).astype(np.float32), "umap"
    except ImportError:
        pass
    xc = x - x.mean(0)
    cov = xc.T.astype(np.float64) @ xc
    w, v = np.linalg.eigh(cov)
    return (xc @ v[:, ::-1][:, :2]).astype(np.float32), "pca"
