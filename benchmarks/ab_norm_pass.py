"""A/B of the ||x||^2 pass placement at K=1024 and K=16384 (interleaved, same process).

Variants: the default config, XN_UNROLL 2/4/8 (distances must be bit-identical to the
default), and cosine (no norm pass:
the upper bound for any norm-pass change). Rounds alternate the variants so clock or
thermal drift hits all of them alike. Prints a table; writes ab_norm_pass.json to $OUT
(or benchmarks/results).
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: _results

import _results as R  # noqa: E402
import torch  # noqa: E402
from bench_kernels import DEV, D, clustered, timeit  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402
from mdf_taxonomy.kernels import launch as L  # noqa: E402


def tuned(cfg: dict | None) -> KR.TritonAssigner:
    return KR.TritonAssigner(KR.KernelTuning(assign=cfg))


def main() -> int:
    x_all = clustered(1 << 20)
    rows = []
    for k, n in [(1024, 1 << 20), (16384, 1 << 18)]:
        x = x_all[:n]
        c = x[torch.randperm(n, device=DEV)[:k]].clone()
        base = L.config(x.dtype, D, k, x.device)
        ref = KR.assign(x, c).distance
        variants = {f"default XN_UNROLL={base['XN_UNROLL']}": (base, "l2")}
        same = {}
        variants["l2 without the norm pass (wrong distances)"] = (dict(base, XN_UNROLL=0), "l2")
        for u in (2, 4):
            if u != base["XN_UNROLL"]:
                cfg = dict(base, XN_UNROLL=u)
                same[u] = bool(torch.equal(tuned(cfg).assign(x, c).distance, ref))
                variants[f"XN_UNROLL={u}"] = (cfg, "l2")
        variants["cosine (no norm pass)"] = (base, "cosine")
        times: dict = {v: [] for v in variants}
        for _ in range(5):
            for name, (cfg, metric) in variants.items():
                a = tuned(cfg)
                t = timeit(
                    lambda metric=metric, x=x, c=c, a=a: a.assign(x, c, metric=metric),
                    max_reps=8,
                    budget_s=0.5,
                )
                times[name].append(t)
        for name, ts in times.items():
            rows.append(
                dict(
                    K=k,
                    N=n,
                    variant=name,
                    rows_per_s=n / statistics.median(ts),
                    spread=(max(ts) - min(ts)) / statistics.median(ts),
                    bit_identical_distances=same,
                )
            )
    print("bit-identical distances vs default:", [r["bit_identical_distances"] for r in rows])
    info = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        date=R.utc_date(),
    )
    R.write_result(R.result_path("ab_norm_pass"), info, rows)
    print(info)
    print("| K | variant | rows/s (median of 5 rounds) | spread |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['variant']} | {r['rows_per_s'] / 1e6:.1f} M | {r['spread']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
