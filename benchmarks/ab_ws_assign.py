"""The warp-specialised Gluon assignment against the ``tl.*`` kernel, on the GPU.

1. Correctness: on ragged and round shapes, bf16/fp16, l2/cosine, its ids, distances and
   second distances against the ``tl.*`` kernel's: bit-identical (same score arithmetic
   and ||x||^2 sum order).
2. Speed: interleaved A/B rounds (drift hits both alike) at K = 1024 / 16384 / 65536,
   D = 1024, with the bf16 matmul rate measured in the same run for the roofline.
Usage: python ab_ws_assign.py [check|bench|all] [KEY=VAL ...] (Gluon config overrides);
env WS_VARIANTS="K=V,K=V;cosine:K=V;..." adds variants (l2 unless prefixed),
AB_KS="1024,16384" picks the Ks, AB_SWEEP=0 skips the sweep over K.
Writes ab_ws_assign.json to $OUT (or benchmarks/results).
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: _results

import _results as R  # noqa: E402
import torch  # noqa: E402
from bench_kernels import DEV, D, clustered, matmul_rate, timeit  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402
from mdf_taxonomy.kernels import gluon_kernels as G  # noqa: E402
from mdf_taxonomy.kernels import triton_dispatch as TD  # noqa: E402

TL_ONLY = KR.TritonAssigner(KR.KernelTuning(warp_specialized=False))
DISPATCH = KR.TritonAssigner()


def run_ws(x, c, metric, conf=None):
    xs, cp, cn = TD.prep(x, c, metric)
    ids, dist, sec = TD.empty_out(xs.shape[0], xs.device, True)
    xn = torch.empty_like(dist) if metric == "l2" else None  # the kernel writes ||x||^2
    G.assign_ws(xs, cp, cn, ids, dist, sec, metric=metric, xn=xn, conf=conf)
    return ids, dist, sec, xn


def run_tl(x, c, metric):
    return TL_ONLY.assign(x, c, metric=metric, with_second=True)


def run_dispatch(x, c, metric):
    return DISPATCH.assign(x, c, metric=metric, with_second=True)


def check(conf) -> list[dict]:
    out = []
    shapes = [
        (70001, 1024, 1024),
        (5000, 1000, 1024),
        (777, 16384, 768),
        (300, 1, 1024),
        (4096, 130, 384),
        (129, 257, 64),
        (1 << 16, 4096, 1024),
    ]
    for dtype in (torch.bfloat16, torch.float16):
        for metric in ("l2", "cosine"):
            for n, k, d in shapes:
                g = torch.Generator(device=DEV).manual_seed(n + k + d)
                x = torch.randn(n, d, device=DEV, generator=g)
                c = x[torch.randint(0, n, (k,), device=DEV, generator=g)] + 0.3 * torch.randn(
                    k, d, device=DEV, generator=g
                )
                if metric == "cosine":
                    x = torch.nn.functional.normalize(x, dim=1)
                    c = torch.nn.functional.normalize(c, dim=1)
                x, c = x.to(dtype), c.to(dtype)
                a = run_ws(x, c, metric, conf)
                b = run_tl(x, c, metric)
                torch.cuda.synchronize()
                same_ids = a[0] == b[0]
                # a differing id must be a tie in the tl kernel's own scores
                diff = (~same_ids).nonzero().flatten()
                ties = bool(torch.all(a[1][diff] == b[1][diff])) if len(diff) else True
                rel = ((a[1] - b[1]).abs() / b[1].abs().clamp_min(1e-6)).max().item()
                rel2 = (a[2] - b[2]).abs() / b[2].abs().clamp_min(1e-6)
                rel2 = rel2[torch.isfinite(b[2])].max().item() if k > 1 else 0.0
                sec_inf = bool(torch.all(torch.isinf(a[2]) == torch.isinf(b[2])))
                ok = ties and rel < 1e-5 and rel2 < 1e-5 and sec_inf
                # same scores and ||x||^2 sum order: results must be bit-identical (the
                # dispatcher relies on it when it picks the Gluon kernel)
                same = all(u is v or torch.equal(u, v) for u, v in zip(a, b, strict=True))
                ok = ok and same
                out.append(
                    dict(
                        dtype=str(dtype),
                        metric=metric,
                        n=n,
                        k=k,
                        d=d,
                        ids_equal=float(same_ids.float().mean()),
                        diff_are_ties=ties,
                        dist_rel=rel,
                        second_rel=rel2,
                        bit_identical=same,
                        ok=ok,
                    )
                )
                print(("PASS" if ok else "FAIL"), out[-1], flush=True)
    return out


def bench(conf) -> list[dict]:
    rate = matmul_rate()
    x_all = clustered(1 << 20)
    rows = []
    ks = [int(k) for k in os.environ.get("AB_KS", "1024,16384,65536").split(",")]
    for k, n in [(k, 1 << 20 if k < 65536 else 1 << 18) for k in ks]:
        x = x_all[:n]
        c = x[torch.randperm(n, device=DEV)[:k]].clone()
        roof = rate / (2 * k * D)
        variants = {
            "tl (current default)": lambda x=x, c=c: run_tl(x, c, "l2"),
            "gluon ws": lambda x=x, c=c: run_ws(x, c, "l2", conf),
            "tl cosine": lambda x=x, c=c: run_tl(x, c, "cosine"),
            "gluon ws cosine": lambda x=x, c=c: run_ws(x, c, "cosine", conf),
        }
        for extra in filter(None, os.environ.get("WS_VARIANTS", "").split(";")):
            metric, _, kvs = extra.rpartition(":")  # "cosine:LAG=2" or "LAG=2" (l2)
            v = dict(conf, **{a: int(b) for a, b in (kv.split("=") for kv in kvs.split(","))})
            variants[f"gluon ws {extra}"] = lambda x=x, c=c, v=v, m=metric or "l2": run_ws(
                x, c, m, v
            )
        times: dict = {v: [] for v in variants}
        budget = 0.4 if k < 65536 else 0.8
        for _ in range(4):
            for name, fn in variants.items():
                times[name].append(timeit(fn, max_reps=8, budget_s=budget))
        for name, ts in times.items():
            r = n / statistics.median(ts)
            rows.append(
                dict(
                    K=k,
                    N=n,
                    variant=name,
                    rows_per_s=r,
                    roofline=roof,
                    frac=r / roof,
                    spread=(max(ts) - min(ts)) / statistics.median(ts),
                )
            )
    # over K, both metrics: where the dispatcher should pick the Gluon kernel (WS_MAX_K)
    x = torch.nn.functional.normalize(x_all.float(), dim=1).bfloat16()
    for k in (1024, 2048, 4096, 8192) if os.environ.get("AB_SWEEP", "1") == "1" else ():
        c = x[torch.randperm(x.shape[0], device=DEV)[:k]].clone()
        variants = {
            f"{name} {m}": (lambda c=c, f=f, m=m: f(x, c, m))
            for m in ("cosine", "l2")
            for name, f in (
                ("tl", run_tl),
                ("gluon ws", lambda x, c, m: run_ws(x, c, m, conf)),
                ("dispatcher", run_dispatch),
            )
        }
        times = {v: [] for v in variants}
        for _ in range(4):
            for name, fn in variants.items():
                times[name].append(timeit(fn, max_reps=8, budget_s=0.3))
        for name, ts in times.items():
            r = x.shape[0] / statistics.median(ts)
            roof = rate / (2 * k * D)
            rows.append(
                dict(
                    K=k,
                    N=x.shape[0],
                    variant=name,
                    rows_per_s=r,
                    roofline=roof,
                    frac=r / roof,
                    spread=(max(ts) - min(ts)) / statistics.median(ts),
                )
            )
    print(f"bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    print("| K | variant | rows/s (median of 4 rounds) | % of bf16 roofline | spread |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['K']} | {r['variant']} | {r['rows_per_s'] / 1e6:.1f} M | "
            f"{r['frac']:.0%} | {r['spread']:.1%} |"
        )
    return rows


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    conf = dict(G.CONFIG)
    for a in sys.argv[2:]:
        key, val = a.split("=")
        conf[key] = int(val)
    info = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        conf=conf,
        date=R.utc_date(),
    )
    print(info, flush=True)
    res = dict(info=info)
    if what in ("check", "all"):
        res["check"] = check(conf)
        print(f"check: {sum(r['ok'] for r in res['check'])}/{len(res['check'])} pass")
    if what in ("bench", "all"):
        res["bench"] = bench(conf)
    R.write_json(R.result_path("ab_ws_assign", what), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
