"""Assignment / Lloyd-step / grouped-labelling throughput on one GPU (issue 3's table).

One run measures, side by side, D=1024 clustered data, median of CUDA-event timings:
baseline A (obvious PyTorch: matmul + argmin + index_add_), baseline B (our torch
reference, on a row subset), flash-kmeans 0.3.1 (fp16 assign and one Lloyd iteration)
if importable, our Triton kernels (bf16), and the bf16 roofline (measured matmul rate /
(2*K*D) flops per row). Writes bench_kernels.json/.md to $OUT (or benchmarks/results)
and prints the table last.

Usage: python benchmarks/bench_kernels.py [--sweep] [--small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: _results

import _results as R  # noqa: E402
import torch  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402
from mdf_taxonomy.kernels import fp8_shortlist  # noqa: E402
from mdf_taxonomy.kernels import launch as L  # noqa: E402
from mdf_taxonomy.kernels import reference as REF  # noqa: E402
from mdf_taxonomy.kernels import triton_dispatch as TD  # noqa: E402

DEV = "cuda"
D = 1024


def timeit(fn, min_reps=3, max_reps=20, budget_s=1.5) -> float:
    """Median seconds of ``fn`` with CUDA events after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    t_start = time.time()
    while len(times) < max_reps and (len(times) < min_reps or time.time() - t_start < budget_s):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def matmul_rate(warm_s: float = 0.0) -> float:
    """bf16 matmul rate (8192^3). A short burst runs at the top clock; with ``warm_s`` of
    back-to-back matmuls first it is the rate under the board's power cap, which is what
    our long-running repeats at large K meet (power_bound.py, benchmarks/DECISIONS.md)."""
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < warm_s:
        for _ in range(8):
            a @ b
        torch.cuda.synchronize()
    t = timeit(lambda: a @ b, min_reps=10, max_reps=30)
    return 2 * 8192**3 / t


def clustered(n, k_true=4096, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    centers = torch.randn(k_true, D, device=DEV, generator=g)
    x = torch.empty(n, D, device=DEV, dtype=torch.bfloat16)
    for i in range(0, n, 1 << 18):
        m = min(1 << 18, n - i)
        lab = torch.randint(0, k_true, (m,), device=DEV, generator=g)
        x[i : i + m] = centers[lab] + 0.5 * torch.randn(m, D, device=DEV, generator=g)
    return x


class Tree(NamedTuple):
    """The grouped benchmark's 3-level tree over rows x, 1024 children per node (bf16, cast
    once). Level 3 is labelled in 1024 parent buckets (a level-2 id mod 1024, children
    ``lv3``), so that every level meets 1024 centroids per row."""

    g1: torch.Tensor  # level 1: every row under the root
    lv1: torch.Tensor
    off1: torch.Tensor
    lv2: torch.Tensor
    lv3: torch.Tensor
    off2: torch.Tensor  # 1024 parents x 1024 children (levels 2 and 3)


def three_level_tree(x: torch.Tensor) -> Tree:
    n = x.shape[0]
    lv1 = x[torch.randperm(n, device=DEV)[:1024]].clone()
    lv2 = (
        lv1.repeat_interleave(1024, 0).float() + 0.3 * torch.randn(1024 * 1024, D, device=DEV)
    ).to(torch.bfloat16)
    lv3 = (
        lv2[::1024].float().repeat_interleave(1024, 0)
        + 0.3 * torch.randn(1024 * 1024, D, device=DEV)
    ).to(torch.bfloat16)
    return Tree(
        torch.zeros(n, dtype=torch.int64, device=DEV),
        lv1,
        torch.tensor([0, 1024], device=DEV),
        lv2,
        lv3,
        torch.arange(0, 1024 * 1024 + 1, 1024, device=DEV),
    )


def label_three_levels(
    x: torch.Tensor, t: Tree, reuse_norms: bool = True, assigner: KR.Assigner | None = None
) -> torch.Tensor:
    """Every row labelled at every level, each level in one grouped call; the deeper
    levels reuse level 1's ||x||^2 as ``Taxonomy.walk`` does (``reuse_norms``)."""
    assigner = assigner or KR.make_assigner()
    a = assigner.grouped_assign(x, t.g1, t.lv1, t.off1)
    xn = a.x_sqnorm if reuse_norms else None
    b = assigner.grouped_assign(x, a.ids, t.lv2, t.off2, x_sqnorm=xn).ids
    return assigner.grouped_assign(x, b % 1024, t.lv3, t.off2, x_sqnorm=xn).ids


# ---------------------------------------------------------------- baseline A (obvious torch)
def torch_assign(x, c):
    c_sq = c.float().pow(2).sum(1)
    ids = torch.empty(x.shape[0], dtype=torch.int64, device=DEV)
    ch = max(1024, (1 << 29) // c.shape[0])
    for i in range(0, x.shape[0], ch):
        d = c_sq[None] - 2 * (x[i : i + ch] @ c.T).float()
        ids[i : i + ch] = d.argmin(1)
    return ids


def torch_lloyd(x, c):
    ids = torch_assign(x, c)
    sums = torch.zeros(c.shape[0], D, device=DEV, dtype=torch.float32)
    for i in range(0, x.shape[0], 1 << 18):
        sums.index_add_(0, ids[i : i + (1 << 18)], x[i : i + (1 << 18)].float())
    cnt = torch.bincount(ids, minlength=c.shape[0])
    return (sums / cnt.clamp_min(1)[:, None]).to(x.dtype)


# ---------------------------------------------------------------- ours
TRITON = KR.TritonAssigner()


def our_assign(x, c, assigner=TRITON):
    return assigner.assign(x, c).ids


def our_lloyd(x, c, assigner=TRITON):
    ids = assigner.assign(x, c).ids
    sums, cnt = assigner.partial_sums(x, ids, c.shape[0])
    return (KR.from_fixed_point(sums) / cnt.clamp_min(1)[:, None]).to(x.dtype)


def _cfg(bm, bn, bk, w, st, tma=False, xnb=None, xnu=1):
    """A launch config. (tl.range flatten / warp_specialize were options once: they
    measured no gain or far worse on H100 with triton 3.6, benchmarks/DECISIONS.md.)"""
    return dict(
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=w,
        num_stages=st,
        TMA=tma,
        XN_BLOCK=xnb or bk,
        XN_UNROLL=xnu,
    )


SWEEP = [
    _cfg(128, 256, 64, 8, 3, xnu=2),  # the default
    _cfg(128, 256, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3, xnu=4),
    _cfg(128, 256, 64, 8, 3, tma=True, xnu=2),
    _cfg(128, 256, 64, 8, 4, xnu=2),
]

FP8_SWEEP = [
    _cfg(128, 256, 128, 8, 3, tma=True),  # default
    _cfg(128, 256, 128, 8, 4, tma=True),
    _cfg(128, 256, 64, 8, 4, tma=True),
    _cfg(128, 256, 128, 8, 3),
]


PS_SWEEP = [
    dict(CHUNK=1024, BLOCK_R=4, NUM_STAGES=3, num_warps=4),  # default
    dict(CHUNK=1024, BLOCK_R=8, NUM_STAGES=3, num_warps=4),
    dict(CHUNK=1024, BLOCK_R=4, NUM_STAGES=3, num_warps=8),
    dict(CHUNK=1024, BLOCK_R=8, NUM_STAGES=2, num_warps=8),
    dict(CHUNK=1024, BLOCK_R=2, NUM_STAGES=4, num_warps=4),
    dict(CHUNK=1024, BLOCK_R=4, NUM_STAGES=4, num_warps=4),
    dict(CHUNK=512, BLOCK_R=4, NUM_STAGES=3, num_warps=4),
    dict(CHUNK=2048, BLOCK_R=4, NUM_STAGES=3, num_warps=4),
]


def sweep_psums(x, log):
    """Partial-sum launch configs (bit-identical to the default or invalid)."""
    for k, n in [(1024, x.shape[0]), (16384, x.shape[0]), (65536, x.shape[0] // 4)]:
        xs = x[:n]
        c = xs[torch.randperm(n, device=DEV)[:k]].clone()
        ids = TRITON.assign(xs, c).ids
        ref = TRITON.partial_sums(xs, ids, k)
        wi = 1e3 * timeit(lambda ids=ids, k=k: TD.work_items(ids + 1, k + 1, 1024))
        for ps in PS_SWEEP:
            tuned = KR.TritonAssigner(KR.KernelTuning(partial_sums=ps))
            try:
                out = tuned.partial_sums(xs, ids, k)
                ok = bool(torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]))
                t = timeit(lambda xs=xs, ids=ids, k=k, a=tuned: a.partial_sums(xs, ids, k))
            except Exception as e:  # noqa: BLE001
                print("psweep", k, ps, "ERROR", repr(e)[:200], flush=True)
                continue
            log.append(dict(psum_k=k, n=n, ps=ps, ms=1e3 * t, valid=ok, work_items_ms=wi))
            print(
                f"psweep K={k} n={n} {ps} {1e3 * t:.3f} ms valid={ok} (work items {wi:.3f} ms)",
                flush=True,
            )


def sweep(x, rate, log):
    best = {}
    for k, n in [(1024, x.shape[0]), (16384, min(x.shape[0], 1 << 18))]:
        if k > 1024 and os.environ.get("SWEEP_K1024_ONLY"):
            continue
        c = x[torch.randperm(x.shape[0], device=DEV)[:k]].clone()
        xs = x[:n]
        ref = TRITON.assign(xs, c, with_second=True)  # default config
        for cfg in SWEEP:
            tuned = KR.TritonAssigner(KR.KernelTuning(assign=cfg))
            try:
                out = tuned.assign(xs, c, with_second=True)
                agree = float((out.ids == ref.ids).float().mean())
                drel = float(
                    ((out.distance - ref.distance).abs() / ref.distance.abs().clamp_min(1e-6)).max()
                )
                t = timeit(
                    lambda xs=xs, c=c, a=tuned: our_assign(xs, c, a), max_reps=10, budget_s=1.0
                )
            except Exception as e:  # noqa: BLE001 - a config may not compile
                log.append(dict(sweep_k=k, cfg=cfg, error=repr(e)[:200]))
                print("sweep", k, cfg, "ERROR", repr(e)[:200], flush=True)
                continue
            frac = n * 2 * k * D / t / rate
            valid = agree > 0.9999 and drel < 1e-4
            log.append(
                dict(
                    sweep_k=k,
                    n=n,
                    cfg=cfg,
                    seconds=t,
                    roofline_frac=frac,
                    agree_with_default=agree,
                    max_rel_dist_diff=drel,
                    valid=valid,
                )
            )
            print(
                f"sweep K={k} {cfg} {n / t / 1e6:.1f} M rows/s ({frac:.1%} roofline) "
                f"agree={agree:.6f} drel={drel:.1e} valid={valid}",
                flush=True,
            )
            if valid and (k not in best or t < best[k][0]):
                best[k] = (t, cfg)
    for k, n in [(1024, x.shape[0]), (16384, min(x.shape[0], 1 << 18))]:
        if os.environ.get("SWEEP_NO_FP8"):
            break
        c = x[torch.randperm(x.shape[0], device=DEV)[:k]].clone()
        xs = x[:n]
        ref = KR.make_assigner("triton", fp8_shortlist=True).assign(xs, c)
        for cfg in FP8_SWEEP:
            fp8 = KR.make_assigner("triton", fp8_shortlist=True, tuning=KR.KernelTuning(fp8=cfg))
            try:
                out = fp8.assign(xs, c)
                agree = float((out.ids == ref.ids).float().mean())
                t = timeit(lambda xs=xs, c=c, a=fp8: a.assign(xs, c), max_reps=10, budget_s=1.0)
            except Exception as e:  # noqa: BLE001
                print("fp8 sweep", k, cfg, "ERROR", repr(e)[:300], flush=True)
                continue
            frac = n * 2 * k * D / t / rate
            valid = agree > 0.9999
            log.append(
                dict(
                    fp8_sweep_k=k,
                    n=n,
                    cfg=cfg,
                    seconds=t,
                    roofline_frac=frac,
                    agree_with_default=agree,
                    valid=valid,
                )
            )
            print(
                f"fp8 sweep K={k} {cfg} {n / t / 1e6:.1f} M rows/s ({frac:.1%} bf16 "
                f"roofline) agree={agree:.6f} valid={valid}",
                flush=True,
            )
            if valid and (("fp8", k) not in best or t < best[("fp8", k)][0]):
                best[("fp8", k)] = (t, cfg)
    return {k: v[1] for k, v in best.items()}


def gpu_state() -> str:
    """SM clock, power, temperature and throttle reasons now: runs on one card differ by
    10-15% at large K (benchmarks/DECISIONS.md), and these tell a throttled run apart."""
    q = (
        "clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,"
        "clocks_throttle_reasons.active"
    )
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi unavailable: {e!r}"


def bench_k(x, k, rate, cfg, with_fk, fp8_cfg=None):
    """One row of the table: every contender at one K."""
    n = x.shape[0]
    c = x[torch.randperm(n, device=DEV)[:k]].clone()
    r = dict(K=k, N=n, roofline=rate / (2 * k * D), cfg=cfg, fp8_cfg=fp8_cfg)
    tuning = KR.KernelTuning(assign=cfg, fp8=fp8_cfg)  # None, None: the table's
    tri = KR.TritonAssigner(tuning)
    fp8 = KR.make_assigner("triton", fp8_shortlist=True, tuning=tuning)
    exact = tri.assign(x, c, with_second=True)
    ids_ours = exact.ids
    short = fp8.assign(x, c, with_second=True)
    r["ours_fp8"] = n / timeit(lambda: fp8.assign(x, c))
    r["fp8_quantize_x_ms"] = 1e3 * timeit(lambda: fp8_shortlist.to_fp8_rows(x))
    mism = short.ids != exact.ids
    r["fp8_agree"] = float((~mism).float().mean())
    # how near the disagreements are: exact distance of the shortlist's pick over the
    # exact best, relative to the row's exact margin scale (best distance)
    if bool(mism.any()):
        cd = (x[mism].float() - c[short.ids[mism]].float()).pow(2).sum(1)
        r["fp8_mismatch_rel_gap_max"] = float(
            ((cd - exact.distance[mism]) / exact.distance[mism].clamp_min(1e-6)).max()
        )
        r["fp8_mismatch_rel_gap_median"] = float(
            ((cd - exact.distance[mism]) / exact.distance[mism].clamp_min(1e-6)).median()
        )
    r["exact_rel_gap_median"] = float(
        ((exact.second - exact.distance) / exact.distance.clamp_min(1e-6)).median()
    )
    r["ours_assign"] = n / timeit(lambda: our_assign(x, c, tri))
    if k <= 4096:  # host time per call is visible here: calls queued back to back hide it
        r["ours_assign_b2b"] = 10 * n / timeit(lambda: [our_assign(x, c, tri) for _ in range(10)])
    r["ours_lloyd"] = n / timeit(lambda: our_lloyd(x, c, tri))
    r["ours_lloyd_fp8"] = n / timeit(lambda: our_lloyd(x, c, fp8))
    r["ours_psums_ms"] = 1e3 * timeit(lambda: tri.partial_sums(x, ids_ours, k))
    # diagnostic: cosine skips the ||x||^2 pass (same GEMM and top-2 epilogue otherwise)
    r["ours_assign_cosine"] = n / timeit(lambda: tri.assign(x, c, metric="cosine").ids)
    r["agree_vs_torch"] = float((torch_assign(x, c) == ids_ours).float().mean())
    r["A_assign"] = n / timeit(lambda: torch_assign(x, c), max_reps=5)
    r["A_lloyd"] = n / timeit(lambda: torch_lloyd(x, c), max_reps=5)
    nb = min(n, 1 << 15)
    xb = x[:nb]
    r["B_assign"] = nb / timeit(lambda: REF.assign_torch(xb, c.float()), min_reps=1, max_reps=3)
    r["B_lloyd"] = nb / timeit(
        lambda: REF.partial_sums_torch(xb, REF.assign_torch(xb, c.float())[0], k),
        min_reps=1,
        max_reps=3,
    )
    if with_fk:
        from flash_kmeans import batch_kmeans_Euclid
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton

        x16, c16 = x.half()[None], c.half()[None]
        xsq = x16.float().pow(2).sum(-1)
        csq = c16.float().pow(2).sum(-1)
        out = torch.empty((1, n), dtype=torch.int32, device=DEV)
        r["fk_assign"] = n / timeit(lambda: euclid_assign_triton(x16, c16, xsq, out=out, c_sq=csq))
        r["fk_agree"] = float((out[0].long() == ids_ours).float().mean())
        if k <= 4096:
            r["fk_assign_b2b"] = (
                10
                * n
                / timeit(
                    lambda: [
                        euclid_assign_triton(x16, c16, xsq, out=out, c_sq=csq) for _ in range(10)
                    ]
                )
            )
        r["fk_lloyd"] = n / timeit(
            lambda: batch_kmeans_Euclid(x16, k, max_iters=1, tol=-1.0, init_centroids=c16)
        )
    r["assign_frac_roofline"] = r["ours_assign"] / r["roofline"]
    r["fp8_frac_roofline"] = r["ours_fp8"] / r["roofline"]
    r["gpu_after"] = gpu_state()
    print(
        {a: (round(b / 1e6, 2) if isinstance(b, float) and b > 1e3 else b) for a, b in r.items()},
        flush=True,
    )
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--small", action="store_true", help="quick smoke run")
    args = ap.parse_args()
    t0 = time.time()
    try:
        import flash_kmeans
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton  # noqa: F401

        fk_version = getattr(flash_kmeans, "__version__", "0.3.1")
    except Exception as e:  # noqa: BLE001
        print("flash-kmeans not importable:", repr(e))
        flash_kmeans = None
        fk_version = None

    import triton

    info = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        flash_kmeans=fk_version,
        date=R.utc_date(),
        D=D,
        gpu_start=gpu_state(),
    )
    rates = [matmul_rate()]
    print(info, "bf16 matmul TFLOP/s (first):", rates[0] / 1e12, flush=True)

    n_big = (1 << 16) if args.small else (1 << 20)
    x_all = clustered(n_big)
    rates.append(matmul_rate())
    rate = max(rates)  # the ceiling: best of the measurements (one more at the end)
    log: list = []
    chosen = sweep(x_all, rate, log) if args.sweep else {}
    if args.sweep and not os.environ.get("SWEEP_NO_PSUMS"):
        sweep_psums(x_all, log)
    rows = []
    for k, n in [(1024, n_big), (16384, n_big), (65536, n_big // 4)]:
        kk = 1024 if k <= 4096 else 16384
        rows.append(
            bench_k(
                x_all[:n],
                k,
                rate,
                chosen.get(kk),
                flash_kmeans is not None,
                chosen.get(("fp8", kk)),
            )
        )
    # grouped: a 3-level tree, 1024 children per node, each row labelled at every level
    n = n_big
    x = x_all[:n]
    g1, lv1, off1, lv2, lv3, off2 = tree = three_level_tree(x)
    first = KR.grouped_assign(x, g1, lv1, off1)
    a1, xn = first.ids, first.x_sqnorm

    grouped_cfg = chosen.get(1024)
    grouped = KR.TritonAssigner(KR.KernelTuning(assign=grouped_cfg))
    t3 = timeit(lambda: label_three_levels(x, tree, assigner=grouped))
    t3_own = timeit(lambda: label_three_levels(x, tree, reuse_norms=False, assigner=grouped))
    a2 = grouped.grouped_assign(x, a1, lv2, off2).ids
    lvl_ms = [
        1e3 * timeit(lambda: grouped.grouped_assign(x, g1, lv1, off1)),
        1e3 * timeit(lambda: grouped.grouped_assign(x, a1, lv2, off2, x_sqnorm=xn)),
        1e3 * timeit(lambda: grouped.grouped_assign(x, a2 % 1024, lv3, off2, x_sqnorm=xn)),
    ]
    # bucketing alone on an idle GPU: launch-bound (~20 small ops); inside a level it is
    # enqueued while the previous level's kernel runs
    prep_ms = 1e3 * timeit(lambda: TD.work_items(a1, 1024, 128))
    # diagnostics for level 2: one parent (all rows share one 1024-children block) and
    # rows spread uniformly over the 1024 parents
    one = torch.zeros_like(a1)
    unif = torch.arange(n, device=DEV) % 1024
    srt = torch.sort(a1).values  # rows arriving already ascending by parent: no sort
    diag_ms = [
        1e3 * timeit(lambda: grouped.grouped_assign(x, one, lv2, off2)),
        1e3 * timeit(lambda: grouped.grouped_assign(x, unif, lv2, off2)),
        1e3 * timeit(lambda: grouped.grouped_assign(x, srt, lv2, off2)),
    ]
    rows_per_parent = torch.bincount(a1, minlength=1024)
    # diagnostic: a deeper pipeline for the multi-parent level (children come from HBM)
    stages4 = KR.TritonAssigner(
        KR.KernelTuning(
            assign=dict(grouped_cfg or L.config(x.dtype, D, 1024, x.device), num_stages=4)
        )
    )
    lv2_s4_ms = 1e3 * timeit(lambda: stages4.grouped_assign(x, a1, lv2, off2))
    g_row = dict(
        N=n,
        levels=3,
        cfg=grouped_cfg,
        children=1024,
        rows_per_s=n / t3,
        rows_per_s_own_norms=n / t3_own,
        level_ms=lvl_ms,
        work_items_ms=prep_ms,
        lv2_one_parent_ms=diag_ms[0],
        lv2_uniform_parents_ms=diag_ms[1],
        lv2_presorted_ms=diag_ms[2],
        lv2_stages4_ms=lv2_s4_ms,
        lv2_rows_per_parent_max=int(rows_per_parent.max()),
        lv2_parents_with_rows=int((rows_per_parent > 0).sum()),
        roofline=rate / (3 * 2 * 1024 * D),
        check_lv1_equals_plain=bool(torch.equal(a1, KR.assign(x, lv1).ids)),
    )
    print(g_row, flush=True)

    rates.append(matmul_rate())
    info["bf16_matmul_tflops_sustained"] = matmul_rate(warm_s=3.0) / 1e12
    info["bf16_matmul_tflops_runs"] = [r / 1e12 for r in rates]
    info["bf16_matmul_tflops"] = max(rates) / 1e12
    if max(rates) > rate:  # rescale roofline fractions to the best ceiling seen
        for r in rows:
            r["roofline"] = max(rates) / (2 * r["K"] * D)
            r["assign_frac_roofline"] = r["ours_assign"] / r["roofline"]
            r["fp8_frac_roofline"] = r["ours_fp8"] / r["roofline"]
        g_row["roofline"] = max(rates) / (3 * 2 * 1024 * D)
        rate = max(rates)
    path = R.result_path("bench_kernels")
    R.write_result(path, info, rows, grouped=g_row, sweep=log, seconds=round(time.time() - t0, 1))

    def m(v):
        return "-" if v is None else f"{v / 1e6:.1f} M"

    lines = [
        f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}, "
        f"flash-kmeans {fk_version}; {info['date']}; D={D}; "
        f"bf16 matmul {rate / 1e12:.0f} TFLOP/s; rows/s, median of CUDA-event repeats.",
        "",
        "| K | N | A torch assign | A torch Lloyd | B ref assign | B ref Lloyd | "
        "flash-kmeans assign | flash-kmeans Lloyd | ours assign | ours Lloyd | "
        "bf16 roofline | ours/roofline | assign vs fk | Lloyd vs fk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fa, fl = r.get("fk_assign"), r.get("fk_lloyd")
        va = "-" if fa is None else f"{r['ours_assign'] / fa:.2f}x"
        vl = "-" if fl is None else f"{r['ours_lloyd'] / fl:.2f}x"
        lines.append(
            f"| {r['K']} | {r['N']} | {m(r['A_assign'])} | {m(r['A_lloyd'])} | "
            f"{m(r['B_assign'])} | {m(r['B_lloyd'])} | {m(fa)} | {m(fl)} | "
            f"{m(r['ours_assign'])} | {m(r['ours_lloyd'])} | {m(r['roofline'])} | "
            f"{r['assign_frac_roofline']:.0%} | {va} | {vl} |"
        )
    lines += [
        "",
        "fp8 (e4m3) shortlist + exact re-ranking of the top 2 (x quantised per call, included):",
        "",
        "| K | ours fp8 shortlist | vs bf16 roofline | vs ours bf16 | ids equal to "
        "bf16 kernel | quantise x | Lloyd step with it | its Lloyd vs fk |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fl = r.get("fk_lloyd")
        lines.append(
            f"| {r['K']} | {m(r['ours_fp8'])} | {r['fp8_frac_roofline']:.0%} | "
            f"{r['ours_fp8'] / r['ours_assign']:.2f}x | {r['fp8_agree']:.4%} | "
            f"{r['fp8_quantize_x_ms']:.2f} ms | {m(r['ours_lloyd_fp8'])} | "
            + ("-" if fl is None else f"{r['ours_lloyd_fp8'] / fl:.2f}x")
            + " |"
        )
    lines += [
        "",
        f"Grouped 3-level labelling (1024 children per node, N={n}): "
        f"{m(g_row['rows_per_s'])} rows/s (roofline {m(g_row['roofline'])}; "
        f"{m(g_row['rows_per_s_own_norms'])} with every level computing its own "
        "||x||^2); levels "
        + " / ".join(f"{v:.2f}" for v in g_row["level_ms"])
        + " ms (levels 2-3 reuse level 1's ||x||^2); "
        f"bucketing alone {g_row['work_items_ms']:.3f} ms (idle GPU, launch-bound)",
    ]
    sus = info["bf16_matmul_tflops_sustained"] * 1e12
    lines += [
        "",
        f"Against the bf16 matmul under the same power cap ({sus / 1e12:.0f} TFLOP/s "
        "after 3 s of back-to-back matmuls; the roofline above is a short burst at the "
        "top clock; calls short enough to run at the top clock, see the GPU line, are "
        "not like for like here): ours assign "
        + " / ".join(f"{r['ours_assign'] / (sus / (2 * r['K'] * D)):.0%}" for r in rows)
        + " at K = "
        + " / ".join(str(r["K"]) for r in rows)
        + ".",
    ]
    for r in rows:
        if "ours_assign_b2b" in r:
            fb = r.get("fk_assign_b2b")
            lines.append(
                f"K={r['K']}, 10 calls queued back to back (host time hidden): ours "
                f"{m(r['ours_assign_b2b'])} rows/s = "
                f"{r['ours_assign_b2b'] / r['roofline']:.0%} of the roofline"
                + (f", flash-kmeans {m(fb)} ({r['ours_assign_b2b'] / fb:.2f}x)" if fb else "")
                + "."
            )
    lines += [
        "",
        "GPU (SM clock, max clock, power, limit, temperature, throttle reasons): "
        f"at start {info['gpu_start']}; "
        + "; ".join(f"after K={r['K']} {r['gpu_after']}" for r in rows),
    ]
    table = "\n".join(lines)
    path.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
