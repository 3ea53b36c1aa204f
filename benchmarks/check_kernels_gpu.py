"""GPU correctness of the Triton kernels against a float64 reference (run on the device).

The fp64 reference uses the inputs as the kernel sees them (centroids rounded to the input
dtype), so what is measured is the kernel's own arithmetic error: ids must agree except
counted near-ties (chosen centroid's fp64 distance within 1e-5 * (||x||^2 + ||c||^2) of
the best); distances' relative error (norm-wise) under 1e-3 (bf16/fp16) / 1e-5 (fp32).
Agreement with fp32 (unrounded) centroids is reported too, for information. Partial sums
bit-identical to the torch reference and
independent of row order and batch split. Prints one line per case and a summary; writes
JSON to $OUT (or benchmarks/results). tests/test_gpu_kernels.py asserts the same at the same
tolerances; this script records the measured errors, at larger sizes, and takes a variant
(``TMA=1``, ``XN_UNROLL=4``: keys forced into every launch config, ``KernelTuning.patch``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402

from mdf_taxonomy import kernels as K  # noqa: E402

DEV = "cuda"
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
# near-tie bound on the fp64 gap, relative to ||x||^2 + ||c||^2 (input rounding)
TIE = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
TUNING = K.KernelTuning()  # main() sets the variant's


def tri() -> K.Assigner:
    return K.TritonAssigner(TUNING)


def fp8() -> K.Assigner:
    return K.make_assigner("triton", fp8_shortlist=True, tuning=TUNING)


def clustered(n, k, d, metric, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    c = torch.randn(k, d, device=DEV, generator=g)
    x = c[torch.randint(0, k, (n,), device=DEV, generator=g)]
    x = x + 0.3 * torch.randn(n, d, device=DEV, generator=g)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    return x.to(dtype), c


def fp64_top2(x, c, metric, chunk=4096):
    best = torch.empty(x.shape[0], dtype=torch.float64, device=DEV)
    sec = torch.empty_like(best)
    arg = torch.empty(x.shape[0], dtype=torch.int64, device=DEV)
    c64 = c.double()
    for i in range(0, x.shape[0], chunk):
        x64 = x[i : i + chunk].double()
        if metric == "l2":
            d = x64.pow(2).sum(1)[:, None] - 2 * x64 @ c64.T + c64.pow(2).sum(1)[None]
        else:
            d = 1 - x64 @ c64.T
        t = d.topk(min(2, c.shape[0]), dim=1, largest=False)
        best[i : i + chunk] = t.values[:, 0]
        arg[i : i + chunk] = t.indices[:, 0]
        sec[i : i + chunk] = t.values[:, 1] if c.shape[0] > 1 else float("inf")
    return arg, best, sec


def chosen_dist(x, c, ids, metric):
    x64, cc = x.double(), c.double()[ids]
    if metric == "l2":
        return (x64 - cc).pow(2).sum(1)
    return 1 - (x64 * cc).sum(1)


def check_assign(n, k, d, metric, dtype, seed=0):
    x, c = clustered(n, k, d, metric, dtype, seed)
    out = tri().assign(x, c, metric=metric, with_second=True)
    if DEV == "cuda":
        torch.cuda.synchronize()
    info_agree = float((fp64_top2(x, c, metric)[0] == out.ids).float().mean())
    c = c.to(dtype).float()  # what the kernel multiplies
    arg, best, sec = fp64_top2(x, c, metric)
    scale = x.double().pow(2).sum(1) + c.double().pow(2).sum(1).max()
    if metric == "cosine":
        scale = torch.full_like(scale, 2.0)
    written = bool((out.ids >= 0).all() and (out.ids < k).all())
    mism = out.ids != arg
    gap = (chosen_dist(x, c, out.ids.clamp(0, k - 1), metric) - best) / scale
    bad = mism & (gap > TIE[dtype])
    rel_d = float((out.distance.double() - best).norm() / best.norm())
    rel_s = float((out.second.double() - sec).norm() / sec.norm()) if k > 1 else 0.0
    ok = written and not bool(bad.any()) and rel_d < REL[dtype] and rel_s < REL[dtype]
    return dict(
        kind="assign",
        n=n,
        k=k,
        d=d,
        metric=metric,
        dtype=str(dtype),
        ok=ok,
        written=written,
        mismatches=int(mism.sum()),
        near_ties=int((mism & ~bad).sum()),
        bad=int(bad.sum()),
        max_tie_gap=float(gap[mism].max()) if mism.any() else 0.0,
        rel_dist=rel_d,
        rel_second=rel_s,
        agree_vs_fp32_centroids=info_agree,
    )


def check_grouped_paths(n, d, dtype, n_parents=37, seed=3):
    """Single-parent (plain kernel), pre-sorted (no sort) and bucketed paths give
    bit-identical results for the same rows."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    sizes = torch.randint(1, 600, (n_parents,), device=DEV, generator=g)
    offs = torch.zeros(n_parents + 1, dtype=torch.int64, device=DEV)
    offs[1:] = sizes.cumsum(0)
    x, c = clustered(n, int(offs[-1]), d, "l2", dtype, seed)
    groups = torch.randint(0, n_parents, (n,), device=DEV, generator=g)
    out = tri().grouped_assign(x, groups, c, offs, with_second=True)
    ok = True
    srt, perm = torch.sort(groups)
    o2 = tri().grouped_assign(x[perm], srt, c, offs, with_second=True)
    ok &= bool(
        torch.equal(o2.ids, out.ids[perm])
        and torch.equal(o2.distance, out.distance[perm])
        and torch.equal(o2.second, out.second[perm])
    )
    for p in (0, 7, n_parents - 1):
        rows = (groups == p).nonzero()[:, 0]
        o1 = tri().grouped_assign(x[rows], groups[rows], c, offs, with_second=True)
        ok &= bool(
            torch.equal(o1.ids, out.ids[rows])
            and torch.equal(o1.distance, out.distance[rows])
            and torch.equal(o1.second, out.second[rows])
        )
    return dict(kind="grouped_paths", n=n, d=d, dtype=str(dtype), ok=ok)


def check_sqnorm_reuse(n, k, d, dtype, seed=6):
    """Assignment.x_sqnorm: the Gluon and tl kernels return the same bits, and handing it
    back (x_sqnorm=) changes no bit of any result, plain, split or bucketed."""

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    x, c = clustered(n, k, d, "l2", dtype, seed)
    a = tri().assign(x, c, with_second=True)
    ok = same(a, tri().assign(x, c, with_second=True, x_sqnorm=a.x_sqnorm))
    tl_only = K.TritonAssigner(dataclasses.replace(TUNING, warp_specialized=False))
    b = tl_only.assign(x, c, with_second=True)
    ok &= same(a, b) and same(b, tl_only.assign(x, c, with_second=True, x_sqnorm=b.x_sqnorm))
    n_parents = 7
    offs = torch.linspace(0, k, n_parents + 1, device=DEV).long()
    groups = torch.randint(
        0, n_parents, (n,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed)
    )
    g = tri().grouped_assign(x, groups, c, offs, with_second=True)
    ok &= same(g, tri().grouped_assign(x, groups, c, offs, with_second=True, x_sqnorm=a.x_sqnorm))
    return dict(kind="sqnorm_reuse", n=n, k=k, d=d, dtype=str(dtype), ok=bool(ok))


def check_grouped(n, d, metric, dtype, n_parents=37, seed=1, mode="random"):
    g = torch.Generator(device=DEV).manual_seed(seed)
    sizes = torch.randint(1, 300, (n_parents,), device=DEV, generator=g)
    sizes[3] = 0
    sizes[4] = 1
    offs = torch.zeros(n_parents + 1, dtype=torch.int64, device=DEV)
    offs[1:] = sizes.cumsum(0)
    x, c = clustered(n, int(offs[-1]), d, metric, dtype, seed)
    groups = torch.randint(0, n_parents, (n,), device=DEV, generator=g)
    if mode == "sorted":
        groups = torch.sort(groups).values
    elif mode == "one":
        groups.fill_(5)
    out = tri().grouped_assign(x, groups, c, offs, metric=metric, with_second=True)
    c = c.to(dtype).float()
    ok, ties, badn = True, 0, 0
    rel_num, rel_den = 0.0, 0.0
    for p in range(n_parents):
        rows = (groups == p).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        a, b = int(offs[p]), int(offs[p + 1])
        if a == b:
            ok &= bool((out.ids[rows] == -1).all() and torch.isinf(out.distance[rows]).all())
            continue
        arg, best, _ = fp64_top2(x[rows], c[a:b], metric)
        mism = out.ids[rows] - a != arg
        scale = x[rows].double().pow(2).sum(1) + c[a:b].double().pow(2).sum(1).max()
        gap = (chosen_dist(x[rows], c, out.ids[rows].clamp(a, b - 1), metric) - best) / scale
        badn += int((mism & (gap > TIE[dtype])).sum())
        ties += int((mism & (gap <= TIE[dtype])).sum())
        rel_num += float((out.distance[rows].double() - best).pow(2).sum())
        rel_den += float(best.pow(2).sum())
        if b - a == 1:
            ok &= bool(torch.isinf(out.second[rows]).all())
    rel = (rel_num / rel_den) ** 0.5
    ok = ok and badn == 0 and rel < REL[dtype]
    return dict(
        kind="grouped",
        mode=mode,
        n=n,
        d=d,
        metric=metric,
        dtype=str(dtype),
        ok=ok,
        near_ties=ties,
        bad=badn,
        rel_dist=rel,
    )


def check_shortlist(n, k, d, metric, seed=4):
    """fp8 shortlist: the returned id's distance is exact (bf16 inputs, fp64 reference);
    an id differs from the exact nearest only when that one was not in the fp8 top-2
    (emulated with torch on the same quantised values); counts both."""
    from mdf_taxonomy.kernels import fp8_shortlist as F8

    x, c = clustered(n, k, d, metric, torch.bfloat16, seed)
    out = fp8().assign(x, c, metric=metric, with_second=True)
    c = c.to(torch.bfloat16).float()
    arg, best, sec = fp64_top2(x, c, metric)
    written = bool((out.ids >= 0).all() and (out.ids < k).all())
    d_chosen = chosen_dist(x, c, out.ids.clamp(0, k - 1), metric)
    rel_d = float((out.distance.double() - d_chosen).norm() / d_chosen.norm())
    qx, sx = F8.to_fp8_rows(x)
    qc, sc = F8.to_fp8_rows(c.to(torch.bfloat16))
    in_top2 = torch.empty(n, dtype=torch.bool, device=DEV)
    for i in range(0, n, 4096):
        ap = (qx[i : i + 4096].float() * sx[i : i + 4096, None]) @ (qc.float() * sc[:, None]).T
        sc_ = c.pow(2).sum(1)[None] - 2 * ap if metric == "l2" else -ap
        t2 = sc_.topk(min(2, k), dim=1, largest=False).indices
        in_top2[i : i + 4096] = (t2 == arg[i : i + 4096, None]).any(1)
    mism = out.ids != arg
    unexplained = int((mism & in_top2).sum())
    scale = x.double().pow(2).sum(1) + c.double().pow(2).sum(1).max()
    if metric == "cosine":
        scale = torch.full_like(scale, 2.0)
    gap = (d_chosen - best) / scale
    ok = written and unexplained == 0 and rel_d < REL[torch.bfloat16]
    return dict(
        kind="fp8_shortlist",
        n=n,
        k=k,
        d=d,
        metric=metric,
        ok=ok,
        written=written,
        agree=float((~mism).float().mean()),
        mismatches=int(mism.sum()),
        unexplained=unexplained,
        max_gap=float(gap[mism].max()) if mism.any() else 0.0,
        rel_dist_chosen=rel_d,
    )


def check_quantize(n, d, dtype, seed=5):
    """The one-pass Triton e4m3 quantiser equals the torch reference bit for bit (values
    spanning many binades, a zero row, a ragged D)."""
    from mdf_taxonomy.kernels import fp8_shortlist as F8

    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, d, device=DEV, generator=g)
    spread = 2.0 if dtype == torch.float16 else 4.0  # stay finite (fp16 max 65504)
    x = (x * torch.exp(spread * torch.randn(n, 1, device=DEV, generator=g))).to(dtype)
    assert bool(torch.isfinite(x).all())
    x[3] = 0
    q, sc = F8.to_fp8_rows(x)
    qr, scr = F8.to_fp8_rows(x.cpu())
    same_q = bool(torch.equal(q.view(torch.uint8).cpu(), qr.view(torch.uint8)))
    same_s = bool(torch.equal(sc.cpu(), scr))
    return dict(
        kind="fp8_quantize",
        n=n,
        d=d,
        dtype=str(dtype),
        ok=same_q and same_s,
        bytes_equal=same_q,
        scales_equal=same_s,
        differing=int((q.view(torch.uint8).cpu() != qr.view(torch.uint8)).sum()),
    )


def check_partial_sums(n, k, d, dtype, seed=2):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    ids = torch.randint(-1, k, (n,), device=DEV, generator=g)
    ids[: n // 3] = 1  # one big cluster
    s, c = K.partial_sums(x, ids, k, backend="triton")
    rs, rc = K.partial_sums(x, ids, k, backend="torch")
    perm = torch.randperm(n, device=DEV, generator=g)
    h = n // 3
    s1, c1 = K.partial_sums(x[perm[:h]], ids[perm[:h]], k, backend="triton")
    s2, c2 = K.partial_sums(x[perm[h:]], ids[perm[h:]], k, backend="triton")
    ok = bool(
        torch.equal(s, rs)
        and torch.equal(c, rc)
        and torch.equal(s1 + s2, rs)
        and torch.equal(c1 + c2, rc)
    )
    return dict(kind="partial_sums", n=n, k=k, d=d, dtype=str(dtype), ok=ok)


def main() -> int:
    t0 = time.time()
    global TUNING
    variant = sys.argv[1] if len(sys.argv) > 1 else "default"
    if variant != "default":  # e.g. "TMA=1" or "XN_UNROLL=4": forced everywhere
        forced = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in variant.split(",")}
        TUNING = K.KernelTuning(patch=forced)
    res = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for metric in ("l2", "cosine"):
            for n, k, d in [
                (4096, 1024, 1024),
                (3001, 777, 384),
                (2049, 5000, 768),
                (999, 300, 1000),
                (33, 16384, 1024),
                (1, 3, 77),
                (257, 1, 64),
            ]:
                res.append(check_assign(n, k, d, metric, dtype))
                print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
        res.append(check_grouped(5000, 1024, "l2", dtype))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
        res.append(check_grouped(3000, 384, "cosine", dtype))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
        res.append(check_grouped(5000, 1024, "l2", dtype, mode="sorted"))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
        res.append(check_grouped(3000, 768, "cosine", dtype, mode="one"))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
        res.append(check_grouped_paths(20000, 1024, dtype))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
        res.append(check_partial_sums(200_003, 1000, 1024, dtype))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
    for dtype, d in ((torch.bfloat16, 1024), (torch.float32, 1000), (torch.float16, 77)):
        res.append(check_quantize(3001, d, dtype))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
    for metric in ("l2", "cosine"):
        for n, k, d in [(8192, 1024, 1024), (4099, 5000, 768), (999, 300, 1000), (64, 1, 64)]:
            res.append(check_shortlist(n, k, d, metric))
            print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
    for n, k, d, dtype in [
        (8192, 1024, 1024, torch.bfloat16),
        (4099, 1000, 768, torch.float16),
        (300, 16384, 1024, torch.bfloat16),
        (2000, 1024, 1000, torch.float32),
    ]:
        res.append(check_sqnorm_reuse(n, k, d, dtype))
        print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
    # determinism: same row, different batch, bit-identical
    x, c = clustered(20000, 4096, 1024, "l2", torch.bfloat16, 9)
    a = tri().assign(x, c, with_second=True)
    b = tri().assign(x[5:900], c, with_second=True)
    det = bool(
        torch.equal(a.ids[5:900], b.ids)
        and torch.equal(a.distance[5:900], b.distance)
        and torch.equal(a.second[5:900], b.second)
    )
    a = fp8().assign(x, c, with_second=True)
    b = fp8().assign(x[5:900], c, with_second=True)
    det &= bool(
        torch.equal(a.ids[5:900], b.ids)
        and torch.equal(a.distance[5:900], b.distance)
        and torch.equal(a.second[5:900], b.second)
    )
    res.append(dict(kind="batch_independence", ok=det))
    print(f"{time.time() - t0:6.1f}s", res[-1], flush=True)
    n_ok = sum(r["ok"] for r in res)
    summary = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        date=time.strftime("%Y-%m-%d"),
        passed=n_ok,
        total=len(res),
        seconds=round(time.time() - t0, 1),
        variant=variant,
    )
    print("CHECK SUMMARY", summary, flush=True)
    for r in res:
        if not r["ok"]:
            print("FAILED", r)
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(out, "check_kernels_gpu.json"), "w") as f:
        json.dump(dict(summary=summary, cases=res), f, indent=1)
    return 0 if n_ok == len(res) else 1


if __name__ == "__main__":
    sys.exit(main())
