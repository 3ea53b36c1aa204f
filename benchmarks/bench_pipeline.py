"""Ours next to the peer (faiss, scikit-learn, Ray Data) or the decode ceiling, same data, one run.

    .venv/bin/python benchmarks/bench_pipeline.py [--quick] [--only fit,tree,...] [--rows N]
        [--tree-rows N] [--skip-sklearn] [--data-dir DIR] [--device cpu|cuda]

Rows (--only names): gen, decode, fit, tree, label, quality, fixed, init, raydata; with
--device cuda: gpu-ceiling, gpu-lloyd, gpu-label (the default there). Prints a markdown table
and writes benchmarks/results/bench_pipeline_<device>.json (one current file, overwritten).
The peers need the `bench` extra (faiss-cpu, scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from mdf_taxonomy import __version__, _mdf
from mdf_taxonomy.engine import TaxonomyEngine, describe_input, ensure_ray, fingerprint_of
from mdf_taxonomy.model import FitState, Level, Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.fitting import kmeans_plus_plus, resolve_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/: _results
import _results as R  # noqa: E402

try:  # the CPU peers; the GPU rows need none
    import faiss
except ImportError:
    faiss = None

RG = 65536  # rows per row group
# torch.from_numpy of the read-only views of Arrow buffers: only read here
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
LAYOUTS = {
    "list": lambda d: pa.list_(pa.float32()),
    "fsl": lambda d: pa.list_(pa.float32(), d),
    "fsb": lambda d: pa.binary(4 * d),
}


# -- data -------------------------------------------------------------------------------
def mixture(seed: int, m: int, dim: int, k_true: int = 256) -> np.ndarray:
    """`m` rows of the planted mixture: k_true Gaussian centres (scale 1.5), unit noise."""
    centres = np.random.default_rng([seed, 0]).standard_normal((k_true, dim), np.float32) * 1.5
    rng = np.random.default_rng([seed, 1, m])
    return centres[rng.integers(0, k_true, m)] + rng.standard_normal((m, dim), np.float32)


def embedding_array(x: np.ndarray, layout: str) -> pa.Array:
    n, d = x.shape
    flat = pa.array(x.reshape(-1), pa.float32())
    if layout == "list":
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d), flat)
    if layout == "fsl":
        return pa.FixedSizeListArray.from_arrays(flat, d)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * d), n, [None, pa.py_buffer(x)])


def gen_dataset(
    root: pathlib.Path, n: int, dim: int, layouts: list[str], seed: int, threads: int
) -> tuple[dict[str, pathlib.Path], float, bool]:
    """Streaming write, one RG-row chunk at a time per file, files in parallel; a folder
    per layout. Reused when root/meta.json says it holds the same data."""
    meta = {"rows": n, "dim": dim, "seed": seed, "layouts": sorted(layouts), "rg": RG}
    dirs = {lay: root / lay for lay in layouts}
    if (root / "meta.json").exists() and json.loads((root / "meta.json").read_text()) == meta:
        return dirs, 0.0, True
    files = max(4, -(-n // (4 * RG)))
    bounds = np.linspace(0, n, files + 1).astype(np.int64)

    def one_file(f: int) -> None:
        writers = {
            lay: pq.ParquetWriter(
                dirs[lay] / f"part-{f:03d}.parquet",
                pa.schema([("id", pa.int64()), ("embedding", LAYOUTS[lay](dim))]),
            )
            for lay in layouts
        }
        for lo in range(bounds[f], bounds[f + 1], RG):
            m = min(RG, bounds[f + 1] - lo)
            x = mixture(seed * 100_003 + lo, m, dim)  # chunk seed: the same rows at any split
            ids = pa.array(np.arange(lo, lo + m), pa.int64())
            for lay, w in writers.items():
                w.write_table(
                    pa.table({"id": ids, "embedding": embedding_array(x, lay)}), row_group_size=RG
                )
        for w in writers.values():
            w.close()

    t0 = time.perf_counter()
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one_file, range(files)))
    (root / "meta.json").write_text(json.dumps(meta))
    return dirs, time.perf_counter() - t0, False


def to_matrix(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An embedding column (list / fixed_size_list / fixed_size_binary) as (n, d) float32."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_binary(arr.type):
        d = arr.type.byte_width // 4
        return np.frombuffer(arr.buffers()[1], np.float32)[
            arr.offset * d : (arr.offset + len(arr)) * d
        ].reshape(-1, d)
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(arr), -1)


def row_groups(data: pathlib.Path) -> list[tuple[pathlib.Path, int]]:
    return [
        (p, i)
        for p in sorted(data.glob("*.parquet"))
        for i in range(pq.ParquetFile(p).num_row_groups)
    ]


def read_rg(item: tuple[pathlib.Path, int]) -> np.ndarray:
    path, i = item
    return to_matrix(
        pq.ParquetFile(path).read_row_group(i, ["embedding"], use_threads=False).column(0)
    )


def read_matrix(data: pathlib.Path, threads: int) -> np.ndarray:
    with ThreadPoolExecutor(threads) as pool:
        return np.concatenate(list(pool.map(read_rg, row_groups(data))))


# -- measuring --------------------------------------------------------------------------
class Peak:
    """Peak PSS (RSS where PSS is unreadable) of this process and its descendants (Ray's
    raylet and workers), and of the GPU memory in use, sampled every `interval` s."""

    def __init__(self, cuda: bool, interval: float = 1.0):
        self.cuda, self.interval, self.rss, self.gpu_used = cuda, interval, 0, 0
        self.stop = threading.Event()

    @staticmethod
    def tree_bytes() -> int:
        kids: dict[int, list[int]] = {}
        for p in pathlib.Path("/proc").glob("[0-9]*"):
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            todo += kids.get(pid, [])
            try:
                text = pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
                total += int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1)) * 1024
            except (OSError, AttributeError):
                try:
                    text = pathlib.Path(f"/proc/{pid}/status").read_text()
                    total += int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024
                except (OSError, AttributeError):
                    pass
        return total

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.rss = max(self.rss, self.tree_bytes())
            if self.cuda:
                free, total = torch.cuda.mem_get_info()
                self.gpu_used = max(self.gpu_used, total - free)

    def __enter__(self) -> Peak:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.rss = max(self.rss, self.tree_bytes())

    def fields(self) -> dict[str, float]:
        out = {"peak_host_pss_gb": round(self.rss / 2**30, 2)}
        if self.cuda:
            out["gpu_max_allocated_gb_this_process"] = round(
                torch.cuda.max_memory_allocated() / 2**30, 2
            )
            out["gpu_peak_used_gb_all_processes"] = round(self.gpu_used / 2**30, 2)
        return out


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def sse(x: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> float:
    """Sum of squared distances of rows to their nearest centroid (float64 total)."""
    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32))
    cn, total = (c * c).sum(1), 0.0
    for lo in range(0, len(x), chunk):
        t = torch.from_numpy(x[lo : lo + chunk])
        d = (t * t).sum(1, keepdim=True) - 2 * t @ c.T + cn
        total += float(d.min(1).values.clamp_min(0).double().sum())
    return total


def faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int) -> np.ndarray:
    """faiss k-means on every row (its default would subsample to 256 rows per centroid)."""
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        verbose=False,
        max_points_per_centroid=max(256, -(-len(x) // k) + 1),
    )
    km.train(np.ascontiguousarray(x))
    return km.centroids


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    d, i = index.search(np.ascontiguousarray(x), 1)
    return i[:, 0], d[:, 0]


# -- rows -------------------------------------------------------------------------------
def row(work: str, ours, peer, ratio, target: str, met: bool | None = None, **extra) -> dict:
    return {
        "work": work,
        "ours": ours,
        "peer": peer,
        "ratio": ratio,
        "target": target,
        "met": met,
        **extra,
    }


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if unit == "rows/s":
        return f"{v / 1e6:.2f}M rows/s" if v >= 1e6 else f"{v / 1e3:.1f}k rows/s"
    return f"{v:.3g} {unit}".strip() if abs(v) < 1000 else f"{v:,.0f} {unit}".strip()


def data(ctx: dict, name: str) -> dict[str, pathlib.Path]:
    a = ctx["args"]
    if name not in ctx["data"]:
        n, dim, lays = {
            "fit": (a.rows, a.dim, a.layouts),
            "tree": (a.tree_rows, a.dim, ["list"]),
            "tiny": (2000, a.dim, ["list"]),
            "gpu": (a.gpu_rows, a.gpu_dim, ["list"]),
        }[name]
        dirs, s, reused = gen_dataset(ctx["root"] / name, n, dim, lays, a.seed, a.threads)
        ctx["data"][name] = dirs
        ctx["gen"][name] = {"rows": n, "dim": dim, "layouts": lays, "seconds": s, "reused": reused}
    return ctx["data"][name]


def engine(ctx: dict, tag: str, **kw) -> TaxonomyEngine:
    """A fresh store per fit; tol=0 so every fit runs its max_iter passes."""
    uri = str(ctx["root"] / f"tax-{tag}-{time.time_ns()}")
    return TaxonomyEngine(
        storage_uri=uri, seed=ctx["args"].seed, progress=False, **{"tol": 0.0, **kw}
    )


def r_gen(ctx: dict) -> list[dict]:
    data(ctx, "fit")
    g = ctx["gen"]["fit"]
    n = g["rows"] * len(g["layouts"])
    work = f"1. generate {g['rows']:,} x {g['dim']} mixture as {'+'.join(g['layouts'])}"
    rate = n / g["seconds"] if g["seconds"] else "reused"
    return [row(work, rate, None, None, "—", unit="rows/s", seconds=g["seconds"])]


def r_decode(ctx: dict) -> list[dict]:
    out = []
    for lay, d in data(ctx, "fit").items():
        with ThreadPoolExecutor(ctx["args"].threads) as pool:
            n, s = timed(lambda: sum(len(m) for m in pool.map(read_rg, row_groups(d))))  # noqa: B023
        work = f"2. decode ceiling, {lay} -> float32, {ctx['args'].threads} threads"
        out.append(row(work, None, n / s, None, "—", unit="rows/s", seconds=s))
    return out


def r_fit(ctx: dict) -> list[dict]:
    a, d = ctx["args"], data(ctx, "fit")["list"]
    eng = engine(ctx, "fit", n_levels=1, branching_factor=a.k, dim=a.dim, max_iter=a.iters)
    tax, ours_s = timed(eng.fit, input=str(d))

    def peer():
        x = read_matrix(d, a.threads)
        return x, faiss_kmeans(x, a.k, a.iters, a.seed)

    (x, c_faiss), peer_s = timed(peer)
    passes = eng.last_fit.pass_log
    lloyd = [p["rows_per_s"] for p in passes if p["phase"] == "lloyd"]
    ctx["fit"] = dict(x=x, ours=tax.levels[0].centroids, faiss=c_faiss, rate=np.median(lloyd))
    work = f"3. 1-level fit N={len(x):,} D={a.dim} K={a.k} {a.iters} it (peer: read + faiss)"
    r = ours_s / peer_s
    return [
        row(
            work,
            ours_s,
            peer_s,
            r,
            "ratio <= 1.5",
            r <= 1.5,
            unit="s",
            passes=len(passes),
            ours_lloyd_pass_rows_per_s=lloyd,
        )
    ]


def r_tree(ctx: dict) -> list[dict]:
    a, d = ctx["args"], data(ctx, "tree")["list"]
    b1, b2 = a.tree
    eng = engine(
        ctx, "tree", n_levels=2, branching_factor=[b1, b2], dim=a.dim, max_iter=a.tree_iters
    )
    tax, ours_s = timed(eng.fit, input=str(d))

    def peer():
        x = read_matrix(d, a.threads)
        c1 = faiss_kmeans(x, b1, a.tree_iters, a.seed)
        l1, _ = nearest(x, c1)
        blocks = []
        for p in range(b1):
            rows = x[l1 == p]
            fit = len(rows) > b2
            blocks.append(faiss_kmeans(rows, b2, a.tree_iters, a.seed + p) if fit else rows)
        return len(x), np.concatenate(blocks)

    (n, _), peer_s = timed(peer)
    ctx["tree"] = {"engine": eng, "tax": tax}
    work = f"4. 2-level tree {b1} x {b2}, N={n:,}, {a.tree_iters} it/level (peer: read + faiss)"
    r, passes = ours_s / peer_s, len(eng.last_fit.pass_log)
    return [row(work, ours_s, peer_s, r, "ratio <= 2", r <= 2, unit="s", passes=passes)]


def r_label(ctx: dict) -> list[dict]:
    if "tree" not in ctx:
        ctx["rows"] += r_tree(ctx)
    d = data(ctx, "tree")["list"]
    eng, tax = ctx["tree"]["engine"], ctx["tree"]["tax"]
    ours_out, peer_out = ctx["root"] / "label-ours", ctx["root"] / "label-peer"
    _, ours_s = timed(eng.predict, input=str(d), output=str(ours_out), overwrite=True)
    lv1, lv2 = tax.levels

    def peer():
        table = pq.read_table(d)
        x = to_matrix(table.column("embedding"))
        l1, _ = nearest(x, lv1.centroids)
        l2, dist = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
        off = lv2.child_offsets(lv1.n_nodes)
        for p in np.unique(l1):
            rows = np.nonzero(l1 == p)[0]
            j, dd = nearest(x[rows], lv2.centroids[off[p] : off[p + 1]])
            l2[rows], dist[rows] = j + off[p], dd
        s1, s2 = (pa.array(v.astype(np.int32)) for v in (l1, l2))
        path = pc.binary_join_element_wise(*(pc.cast(v, pa.string()) for v in (s1, s2)), "/")
        new = {
            "taxonomy_path": path,
            "taxonomy_l1": s1,
            "taxonomy_l2": s2,
            "taxonomy_distance": pa.array(np.sqrt(np.maximum(dist, 0))),
        }
        for name, col in new.items():
            table = table.append_column(name, col)
        peer_out.mkdir(exist_ok=True)
        pq.write_table(table, peer_out / "part-000.parquet", row_group_size=RG)
        return table

    peer_table, peer_s = timed(peer)
    n, cols = peer_table.num_rows, ["id", "taxonomy_l2"]
    ours = pa.concat_tables([pq.read_table(p, columns=cols) for p in ours_out.rglob("*.parquet")])
    leaves = [t.sort_by("id").column(1).to_numpy() for t in (ours, peer_table.select(cols))]
    agree = float(np.mean(leaves[0] == leaves[1])) if len(ours) == n else None
    work = (
        f"5. label N={n:,} with row 4's tree ({lv1.n_nodes} + {lv2.n_nodes} nodes) to "
        "Parquet (peer: read + faiss IndexFlatL2 per level + write)"
    )
    ro, rp = n / ours_s, n / peer_s
    return [
        row(
            work,
            ro,
            rp,
            ro / rp,
            "ours >= peer",
            ro >= rp,
            unit="rows/s",
            leaf_agreement=agree,
            ours_rows_out=len(ours),
        )
    ]


def r_quality(ctx: dict) -> list[dict]:
    if "fit" not in ctx:
        ctx["rows"] += r_fit(ctx)
    a, f = ctx["args"], ctx["fit"]
    ours, fa = sse(f["x"], f["ours"]), sse(f["x"], f["faiss"])
    work = f"6. SSE, N={len(f['x']):,} K={a.k}, {a.iters} it: ours vs"
    out = [row(f"{work} faiss", ours, fa, ours / fa, "—", unit="")]
    if not a.skip_sklearn:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        km = KMeans(a.k, init="k-means++", n_init=1, max_iter=a.iters, tol=0.0, random_state=a.seed)
        with threadpool_limits(a.threads):
            _, s = timed(km.fit, f["x"])
        sk, work = sse(f["x"], km.cluster_centers_), f"{work} sklearn KMeans (k-means++, n_init=1)"
        out.append(
            row(
                work,
                ours,
                sk,
                ours / sk,
                "ratio <= 1.01",
                ours / sk <= 1.01,
                unit="",
                sklearn_fit_s=s,
            )
        )
    return out


def r_fixed(ctx: dict) -> list[dict]:
    a, d = ctx["args"], data(ctx, "tiny")["list"]
    eng = engine(ctx, "tiny", n_levels=1, branching_factor=4, dim=a.dim, max_iter=5)
    _, s = timed(eng.fit, input=str(d))
    log = eng.last_fit.pass_log
    per, work = s / len(log), f"7. per-pass fixed cost: 2,000 rows, K=4, 5 it, {len(log)} passes"
    return [
        row(
            work,
            per,
            None,
            None,
            "< 0.3 s",
            per < 0.3,
            unit="s",
            total_s=s,
            pass_seconds=[p["seconds"] for p in log],
        )
    ]


def r_init(ctx: dict) -> list[dict]:
    from sklearn.cluster import kmeans_plusplus

    a = ctx["args"]
    x = mixture(a.seed + 7, a.kpp_rows, a.dim)
    _, ours = timed(kmeans_plus_plus, torch.from_numpy(x), a.kpp_k, a.seed)
    _, peer = timed(kmeans_plusplus, x, a.kpp_k, random_state=a.seed)
    work = f"8. k-means++ init, {a.kpp_rows:,} x {a.dim}, k={a.kpp_k} (peer: sklearn)"
    return [row(work, ours, peer, ours / peer, "< 2 s", ours < 2, unit="s")]


def r_raydata(ctx: dict) -> list[dict]:
    a, d = ctx["args"], data(ctx, "fit")["list"]
    c = ctx["fit"]["ours"] if "fit" in ctx else mixture(a.seed + 9, a.k, a.dim)

    def assign(batch: pa.Table) -> pa.Table:
        torch.set_num_threads(1)  # one CPU per Ray task
        x = torch.from_numpy(np.require(to_matrix(batch.column("embedding")), requirements="W"))
        ct = torch.from_numpy(c)
        ids = ((ct * ct).sum(1) - 2 * x @ ct.T).argmin(1)
        return pa.table({"label": ids.numpy().astype(np.int32)})

    ensure_ray()
    ds = ray.data.read_parquet(str(d), columns=["embedding"])
    ds = ds.map_batches(assign, batch_format="pyarrow", batch_size=16384)
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    n, s = timed(lambda: sum(b.num_rows for b in batches))
    ours = ctx["fit"]["rate"] if "fit" in ctx else None
    work = (
        f"9. Ray Data read_parquet + map_batches(decode + torch assign K={a.k}), N={n:,} "
        "(ours: median Lloyd pass of row 3)"
    )
    return [row(work, ours, n / s, ours / (n / s) if ours else None, "—", unit="rows/s")]


# -- GPU rows ---------------------------------------------------------------------------
def r_gpu_ceiling(ctx: dict) -> list[dict]:
    a, d = ctx["args"], data(ctx, "gpu")["list"]

    def run() -> int:
        n = 0
        with ThreadPoolExecutor(a.threads) as pool:
            for m in pool.map(read_rg, row_groups(d)):
                n += len(torch.from_numpy(m).to(a.device))
        if a.device == "cuda":
            torch.cuda.synchronize()
        return n

    n, s = timed(run)
    ctx["ceiling"] = n / s
    work = f"G1. ceiling: pyarrow {a.threads} threads -> torch {a.device}, N={n:,} D={a.gpu_dim}"
    return [row(work, None, n / s, None, "—", unit="rows/s")]


def gpu_engine(ctx: dict, tag: str, **kw) -> TaxonomyEngine:
    a = ctx["args"]
    return engine(
        ctx,
        tag,
        dim=a.gpu_dim,
        device=a.device,
        gpus_per_replica=int(a.device == "cuda"),
        batch_size=a.gpu_batch,
        compute_dtype="bfloat16" if a.device == "cuda" else "float32",
        **kw,
    )


def pct(rate: float, ceiling: float | None) -> str | None:
    return f"{100 * rate / ceiling:.0f}% of ceiling" if ceiling else None


def r_gpu_lloyd(ctx: dict) -> list[dict]:
    """One Lloyd pass at K=gpu_k: the store is seeded with a level in phase "lloyd" (random
    data rows as centroids), so the fit resumes into exactly one pass and skips the init."""
    a, d = ctx["args"], data(ctx, "gpu")["list"]
    eng = gpu_engine(ctx, "lloyd", n_levels=1, branching_factor=a.gpu_k, max_iter=1, cache_bytes=0)
    _seed_lloyd(ctx, eng, d, a.gpu_k)
    with Peak(a.device == "cuda") as peak:
        _, s = timed(eng.fit, input=str(d))
    p, ceil = [q for q in eng.last_fit.pass_log if q["phase"] == "lloyd"][-1], ctx.get("ceiling")
    work = f"G2. Lloyd pass K={a.gpu_k} D={a.gpu_dim} N={p['rows']:,} (pass rows/s)"
    return [
        row(
            work,
            p["rows_per_s"],
            ceil,
            pct(p["rows_per_s"], ceil),
            "—",
            unit="rows/s",
            fit_s=s,
            **peak.fields(),
        )
    ]


def r_gpu_label(ctx: dict) -> list[dict]:
    a, d = ctx["args"], data(ctx, "gpu")["list"]
    rng = np.random.default_rng(a.seed)
    first = read_rg(row_groups(d)[0])
    levels, cents = [], first[rng.choice(len(first), a.gpu_tree[0], False)]
    levels.append(Level(cents, np.zeros(len(cents), np.int64)))
    for b in a.gpu_tree[1:]:  # children: the parent plus noise, blocks sorted by parent
        parents = np.repeat(np.arange(len(cents)), b)
        cents = cents[parents] + 0.5 * rng.standard_normal((len(parents), a.gpu_dim), np.float32)
        levels.append(Level(cents, parents))
    eng = gpu_engine(ctx, "label", n_levels=len(a.gpu_tree), branching_factor=list(a.gpu_tree))
    cfg = TaxonomyConfig(**{**eng.fit_params, "dim": a.gpu_dim})
    done = FitState(len(levels), "done")
    TaxonomyStore(eng.storage_uri).save(Taxonomy(cfg, a.gpu_dim, levels, done))
    out = str(ctx["root"] / "gpu-out")
    # the kernels' one-off compilation (seconds, once per process) is kept out of the rate
    warm = eng.load()
    _, compile_s = timed(
        warm.assign_paths,
        torch.from_numpy(first[:4096])
        .to(a.device)
        .to(torch.bfloat16 if a.device == "cuda" else torch.float32),
        prepared=True,
    )
    with Peak(a.device == "cuda") as peak:
        _, s = timed(eng.predict, input=str(d), output=out, overwrite=True)
    n, ceil = ctx["gen"]["gpu"]["rows"], ctx.get("ceiling")
    copies = ctx["root"] / "gpu-copy"
    copies.mkdir(exist_ok=True)

    def read_write(item: tuple[pathlib.Path, int]) -> int:
        path, i = item
        table = pq.ParquetFile(path).read_row_group(i, use_threads=False)
        pq.write_table(table, copies / f"{path.stem}-{i}.parquet", use_dictionary=["id"])
        return table.num_rows

    def copy_all() -> int:
        with ThreadPoolExecutor(a.threads) as pool:
            return sum(pool.map(read_write, row_groups(d)))

    m, cs = timed(copy_all)  # the same bytes in and out, no labels: labelling's ceiling
    rw = m / cs
    work = f"G3. label N={n:,} D={a.gpu_dim}, {' x '.join(map(str, a.gpu_tree))} tree, to Parquet"
    return [
        row(
            work,
            n / s,
            ceil,
            pct(n / s, ceil),
            "—",
            unit="rows/s",
            seconds=s,
            timings=eng.last_summary["label"].get("timings"),
            first_call_s=compile_s,
            **peak.fields(),
        ),
        row(
            f"G3b. read + write the same columns, no labels, {a.threads} threads (labelling's "
            "ceiling)",
            n / s,
            rw,
            f"{100 * n / s / rw:.0f}% of read+write",
            ">= 75%",
            n / s >= 0.75 * rw,
            unit="rows/s",
        ),
    ]


def _seed_lloyd(ctx: dict, eng: TaxonomyEngine, d: pathlib.Path, k: int) -> None:
    """Store a level in phase "lloyd" (random data rows as centroids), so fit() resumes
    straight into Lloyd passes and skips the init."""
    a = ctx["args"]
    cfg = eng._pipeline(str(d), None, fit=True)  # the loader and items the fit will see
    loader = _mdf.DataLoaderRegistry.create(cfg.data_loader.type, cfg.data_loader.params)
    items = loader.get_file_list(max_samples=cfg.executor.max_samples)
    first = read_rg(row_groups(d)[0])
    pick = np.random.default_rng(a.seed).choice(len(first), min(k, len(first)), False)
    fingerprint = fingerprint_of(describe_input(loader, items, cfg.executor.max_samples))
    config = resolve_config(TaxonomyConfig(**eng.fit_params), a.gpu_dim)
    level = Level(first[pick], np.zeros(len(pick), np.int64))
    state = FitState(level=1, phase="lloyd")
    TaxonomyStore(eng.storage_uri).save(Taxonomy(config, a.gpu_dim, [level], state, fingerprint))


def r_gpu_resident(ctx: dict) -> list[dict]:
    """A fit whose decoded rows stay on the GPU: passes after the first against the kernels
    alone (assign + partial sums on a resident bf16 tensor, same K), same run."""
    a, d = ctx["args"], data(ctx, "gpu")["list"]
    eng = gpu_engine(ctx, "resident", n_levels=1, branching_factor=a.gpu_k, max_iter=4)
    _seed_lloyd(ctx, eng, d, a.gpu_k)
    with Peak(a.device == "cuda") as peak:
        _, s = timed(eng.fit, input=str(d))
    passes = [q for q in eng.last_fit.pass_log if q["phase"] == "lloyd"]
    later = float(np.median([q["rows_per_s"] for q in passes[1:]]))
    tax = eng.load()
    n = min(passes[0]["rows"], 1 << 20)
    x = torch.randn(n, a.gpu_dim, device=a.device).to(torch.bfloat16)
    nodes_of = torch.zeros(n, dtype=torch.int64, device=a.device)

    def kernels_only() -> int:
        from mdf_taxonomy.kernels import partial_sums

        for _ in range(5):
            a_ = tax.assign_level(x, nodes_of, 1)
            partial_sums(x, a_.ids, a.gpu_k)
        if a.device == "cuda":
            torch.cuda.synchronize()
        return 5 * n

    kernels_only()  # compiled and warm
    m, ks = timed(kernels_only)
    work = (
        f"G4. GPU-resident fit K={a.gpu_k} D={a.gpu_dim} N={passes[0]['rows']:,} bf16: "
        f"passes 2-{len(passes)} (first {passes[0]['rows_per_s']:,.0f} rows/s) vs kernels"
    )
    return [
        row(
            work,
            later,
            m / ks,
            f"{100 * later / (m / ks):.0f}% of kernels",
            ">= 80%",
            later >= 0.8 * m / ks,
            unit="rows/s",
            fit_s=s,
            cached_rows=passes[-1].get("cached_rows"),
            **peak.fields(),
        )
    ]


ROWS = {
    "gen": r_gen,
    "decode": r_decode,
    "fit": r_fit,
    "tree": r_tree,
    "label": r_label,
    "quality": r_quality,
    "fixed": r_fixed,
    "init": r_init,
    "raydata": r_raydata,
    "gpu-ceiling": r_gpu_ceiling,
    "gpu-lloyd": r_gpu_lloyd,
    "gpu-label": r_gpu_label,
    "gpu-resident": r_gpu_resident,
}


def device_description(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"cpu: {model} x{os.cpu_count()}"


def main() -> None:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes, about a minute or two")
    ap.add_argument("--only", help="comma-separated rows: " + ",".join(ROWS))
    ap.add_argument("--rows", type=int, help="N of rows 1-3, 6, 9 (800000; quick 20000)")
    ap.add_argument("--tree-rows", type=int, help="N of rows 4-5 (200000; quick 20000)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--tree", type=ints, default=[64, 16])
    ap.add_argument("--tree-iters", type=int, default=5)
    ap.add_argument("--layouts", type=lambda s: s.split(","), default=list(LAYOUTS))
    ap.add_argument("--kpp-rows", type=int, help="row 8 sample rows (65536; quick 16384)")
    ap.add_argument("--kpp-k", type=int, help="row 8 k (1024; quick 256)")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument(
        "--data-dir",
        help="where the Parquet goes (kept, and reused when it "
        "matches); default a temporary folder",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-rows", type=int, default=4_000_000)
    ap.add_argument("--gpu-dim", type=int, default=1024)
    ap.add_argument("--gpu-k", type=int, default=16384)
    ap.add_argument("--gpu-tree", type=ints, default=[1024, 32, 32])
    ap.add_argument("--gpu-batch", type=int, default=65536)
    a = ap.parse_args()
    a.rows = a.rows or (20_000 if a.quick else 800_000)
    a.tree_rows = a.tree_rows or (20_000 if a.quick else 200_000)
    a.kpp_rows = a.kpp_rows or (16384 if a.quick else 65536)
    a.kpp_k = a.kpp_k or (256 if a.quick else 1024)
    if a.quick and a.device == "cuda":
        a.gpu_rows, a.gpu_k, a.gpu_tree = 200_000, 1024, [64, 16, 16]
    if "list" not in a.layouts:
        a.layouts = ["list", *a.layouts]
    cuda = a.device == "cuda"
    only = a.only.split(",") if a.only else [r for r in ROWS if r.startswith("gpu") == cuda]
    unknown = set(only) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; known: {','.join(ROWS)}")
    torch.set_num_threads(a.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(a.threads)
    device = device_description(cuda)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        root = pathlib.Path(a.data_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        ctx = {"args": a, "root": root, "data": {}, "gen": {}, "rows": []}
        for name in only:
            with Peak(cuda) as peak:
                t0 = time.perf_counter()
                new = ROWS[name](ctx)
            for r in new:
                r.setdefault("row", name)
                r.setdefault("wall_s", round(time.perf_counter() - t0, 2))
                for key, v in peak.fields().items():
                    r.setdefault(key, v)
            ctx["rows"] += new
            for r in new:
                print(
                    f"[{name}] {r['work']}: ours {fmt(r['ours'], r['unit'])}, "
                    f"peer {fmt(r['peer'], r['unit'])}",
                    flush=True,
                )
    try:
        import sklearn
    except ImportError:
        sklearn = None
    result = {
        "date": R.local_date(),
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": R.versions(
            mdf_taxonomy=__version__,
            torch=torch.__version__,
            pyarrow=pa.__version__,
            ray=ray.__version__,
            faiss=getattr(faiss, "__version__", None),
            numpy=np.__version__,
            scikit_learn=getattr(sklearn, "__version__", None),
        ),
        "params": vars(a),
        "datasets": ctx["gen"],
        "rows": ctx["rows"],
    }
    slug = "cpu" if not cuda else re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out = R.result_path("bench_pipeline", slug)
    R.write_json(out, result, default=str)
    print(f"\n{device}, {a.threads} threads{', quick' if a.quick else ''}; written {out}\n")
    print("| work | ours | peer/ceiling | ratio | target |\n|---|---|---|---|---|")
    for r in ctx["rows"]:
        ratio = r["ratio"] if isinstance(r["ratio"], str | None) else f"{r['ratio']:.4g}x"
        ratio = ratio or "—"
        met = {True: " (met)", False: " (missed)", None: ""}[r["met"]]
        print(
            f"| {r['work']} | {fmt(r['ours'], r['unit'])} | {fmt(r['peer'], r['unit'])} | "
            f"{ratio} | {r['target']}{met} |"
        )


if __name__ == "__main__":
    main()
