"""Semantic dedup's pairwise step on one device: ours (`node_max_similarity`) against the
obvious torch code, side by side in one run, for both of our searches: the blocked torch
GEMMs with the exact recheck (`kernels=False`, columns ours_b*) and the search on the
fused assignment kernels (`semdedup_kernels`, `kernels=True`, columns kernel*, CUDA
only; kernel_search*: its search over the lower triangle alone), whose output is
checked bit for bit against the torch search's. Where the warp-specialised Gluon search
serves (16-bit, sm90), the tl kernel it replaced runs beside it in the same run (columns
kernel_tl*, kernel_search_tl*: `KernelTuning(warp_specialized=False)`).

The obvious code: the node's full similarity matrix by one matmul, the upper triangle
masked, max and argmax per row (what one writes first; its bf16 values are not exact and
it holds n^2 values). Ours: the whole call, sort, normalisation and exact recheck
included, results back on the host.

Data: one node of n rows at dimension D, a centre plus noise (mean cosine ~0.5) with 2% of
the rows near-copies of others (cosine ~0.999). Flops counted for both: n^2 * D, the
multiply-adds of the lower triangle (2 * n^2 * D / 2; the obvious code runs twice that).
The roofline: the dense bf16 peak, 989 TFLOP/s on an H200 (NVIDIA's figure, no sparsity);
on CPU the measured float32 matmul rate of this machine stands in for it.

Imports torch and `mdf_taxonomy.curation.semdedup` only (loaded from its file where the
package's other dependencies are missing), so it runs on a GPU machine with torch alone.

Usage: python benchmarks/bench_dedup.py [--device cpu|cuda] [--sizes N ...] [--dim D]
       [--dtypes float32|bfloat16|float16 ...] [--block-rows B ...]
       [--no-kernels] [--no-tl] [--reps R] [--search-reps R] [--threads T]
Writes results/bench_dedup_<device>.json (or to $OUT) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _results
H200_BF16_TFLOPS = 989.0


import _results as R  # noqa: E402

from mdf_taxonomy.curation import semdedup as SD  # noqa: E402, N812


def _kernels_ok() -> bool:
    """Whether the kernel search imports (the package and Triton)."""
    try:
        from mdf_taxonomy.curation import semdedup_kernels

        return semdedup_kernels.triton_available()
    except ImportError:
        return False


def _kernel_tolerance(dtype_name: str, dim: int) -> float | None:
    if not _kernels_ok():
        return None
    from mdf_taxonomy.curation import semdedup_kernels

    return semdedup_kernels.kernel_tolerance(SD.DTYPES[dtype_name], dim)


def _ws_serves(device: str) -> bool:
    """Whether the default search is the warp-specialised Gluon kernel (16-bit rows)."""
    from mdf_taxonomy.kernels import launch

    x = torch.zeros(2, 64, device=device, dtype=torch.float16)
    return launch.use_ws(x, x, "cosine", 0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device: str, reps: int) -> float:
    """Median wall seconds of `fn` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def node(n: int, dim: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    centre = torch.randn(dim, device=device, generator=g)
    centre /= centre.norm()
    x = centre + torch.randn(n, dim, device=device, generator=g) / dim**0.5
    dups = n // 50
    src = torch.randint(0, n - dups, (dups,), device=device, generator=g)
    x[n - dups :] = x[src] + 0.03 * torch.randn(dups, dim, device=device, generator=g) / dim**0.5
    return x


def obvious(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    u = torch.nn.functional.normalize(x.float(), dim=1).to(dtype)
    s = u @ u.T
    s.masked_fill_(torch.ones_like(s, dtype=torch.bool).triu_(), -float("inf"))
    return s.max(1)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ a, device, 5)


def _variants(args) -> list[tuple[str, bool, int]]:
    """(column prefix, kernels, block_rows): the torch search, then the kernel search
    (default dispatch, then the tl kernel alone where the Gluon one serves)."""
    out = [(f"ours_b{b}", False, b) for b in args.block_rows]
    if args.kernels:
        out.append(("kernel", True, 0))
        out += [("kernel_tl", True, 0)] if args.tl_beside else []
    return out


def _tl_tuning():
    from mdf_taxonomy.kernels import KernelTuning

    return KernelTuning(warp_specialized=False)


@contextlib.contextmanager
def _search_tuning(name: str):
    """The kernel search of variant `name`: kernel_tl runs the tl kernel (the Gluon one
    kept out), the others the default dispatch."""
    if name != "kernel_tl":
        yield
        return
    from mdf_taxonomy.curation import semdedup_kernels
    from mdf_taxonomy.kernels import TritonAssigner

    made = semdedup_kernels.make_assigner
    semdedup_kernels.make_assigner = lambda *a, **k: TritonAssigner(_tl_tuning())
    try:
        yield
    finally:
        semdedup_kernels.make_assigner = made


def measure(x: torch.Tensor, dtype_name: str, args, roofline: float) -> dict:
    """One node, one dtype: the obvious code, the torch search and the kernel search at
    each block size, side by side; the two searches' outputs compared bit for bit."""
    n, dim = x.shape
    dtype, device = SD.DTYPES[dtype_name], args.device
    ids = np.arange(n, dtype=np.int64)
    keys = np.arange(n, dtype=np.float64)  # the rows' own order, as the obvious code has it
    flops = float(n) * n * dim
    row = {"n": n, "dim": dim, "dtype": dtype_name, "flops": flops}
    row["obvious_s"] = timeit(lambda: obvious(x, dtype), device, args.reps)
    ref = obvious(x, dtype)[0].float().cpu().numpy()
    first = None
    for name, kernels, b in _variants(args):
        stats: dict = {}

        def run(b=b, stats=stats, kernels=kernels, name=name):
            with _search_tuning(name):
                return SD.node_max_similarity(
                    x, ids, keys, block_rows=b, compute_dtype=dtype, stats=stats, kernels=kernels
                )

        row[f"{name}_s"] = timeit(run, device, args.reps)
        val, eid = run()
        calls = args.reps + 2
        for key, count in stats.items():
            row[f"{name}_{key}_per_row"] = count / calls / n
        if kernels:  # one more call, synchronised per phase: where the time goes
            phases = {"timing": True}
            run(stats=phases)
            for key, seconds in phases.items():
                if key.endswith("_s"):
                    row[f"{name}_phase_{key}"] = seconds
        same = SD.is_duplicate(val, args.eps) == SD.is_duplicate(ref, args.eps)
        row[f"{name}_decisions_equal_to_obvious"] = float(same.mean())
        if first is None:
            first = (name, val, eid)
        else:
            row[f"{name}_equal_to_{first[0]}"] = bool(
                np.array_equal(val, first[1]) and np.array_equal(eid, first[2])
            )
        if device.startswith("cuda") and n == min(args.sizes) and not row.get("cpu_checked"):
            cpu = SD.node_max_similarity(x.cpu(), ids, keys, block_rows=1024)  # float32, CPU
            row["cpu_checked"] = name
            row["equal_to_cpu_float32"] = bool(
                np.array_equal(val, cpu[0]) and np.array_equal(eid, cpu[1])
            )
    searches = []
    if args.kernels:  # the search alone, on the rows as the kernel reads them
        from mdf_taxonomy.kernels import TritonAssigner

        low = SD.unit_rows(x).to(dtype)
        searches = [("kernel_search", TritonAssigner())]
        searches += [("kernel_search_tl", TritonAssigner(_tl_tuning()))] if args.tl_beside else []
        outs = []
        for name, search in searches:
            row[f"{name}_s"] = timeit(
                lambda s=search: s.assign_earlier(low, with_second=True), device, args.search_reps
            )
            outs.append(search.assign_earlier(low, with_second=True))
        if len(outs) == 2:
            row["kernel_search_equal_to_tl"] = all(
                (a is None and b is None) or torch.equal(a, b)
                for a, b in zip(outs[0], outs[1], strict=True)
            )
        del low, outs
    names = ["obvious", *(v[0] for v in _variants(args))]
    for name in names + [name for name, _ in searches]:
        seconds = row[f"{name}_s"]
        row[f"{name}_rows_per_s"] = n / seconds
        row[f"{name}_tflops"] = flops / seconds / 1e12
        row[f"{name}_frac_roofline"] = flops / seconds / roofline
    return row


def table(rows: list[dict], args) -> list[str]:
    head = ["n", "dtype", "obvious rows/s", "TFLOP/s", "roof"]
    for p, kernels, b in _variants(args):
        label = p if kernels else f"torch b={b}"
        head += [f"{label} rows/s", "ms", "TFLOP/s", "roof", "vs obvious", "rechecked/row"]
        head += ["uncertain/row", "== torch", "search alone TFLOP/s", "roof"] if kernels else []
    head += ["search == tl"] if args.tl_beside else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["n"]), r["dtype"], f"{r['obvious_rows_per_s']:.3g}"]
        cells += [f"{r['obvious_tflops']:.3g}", f"{100 * r['obvious_frac_roofline']:.0f}%"]
        for p, kernels, _ in _variants(args):
            cells += [f"{r[p + '_rows_per_s']:.3g}", f"{1e3 * r[p + '_s']:.3g}"]
            cells += [f"{r[p + '_tflops']:.3g}"]
            cells += [f"{100 * r[p + '_frac_roofline']:.0f}%"]
            cells += [f"{r['obvious_s'] / r[p + '_s']:.2f}x"]
            cells += [f"{r.get(p + '_rechecked_pairs_per_row', float('nan')):.2f}"]
            if kernels:
                cells += [f"{r.get(p + '_uncertain_rows_per_row', float('nan')):.3f}"]
                same = [v for k, v in r.items() if k.startswith(p + "_equal_to_")]
                cells += [str(same[0]) if same else "-"]
                q = p.replace("kernel", "kernel_search")
                cells += [f"{r[q + '_tflops']:.3g}", f"{100 * r[q + '_frac_roofline']:.0f}%"]
        cells += [str(r.get("kernel_search_equal_to_tl", "-"))] if args.tl_beside else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--dtypes", nargs="+", choices=list(SD.DTYPES))
    ap.add_argument("--block-rows", type=int, nargs="+", help="the torch search's")
    ap.add_argument("--no-kernels", dest="kernels", action="store_false", help="torch only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--search-reps", type=int, default=20, help="the search alone's")
    ap.add_argument("--no-tl", dest="tl_beside", action="store_false", help="no tl kernel columns")
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on CPU)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.threads or not cuda:  # one thread: steady figures on a shared machine
        torch.set_num_threads(args.threads or 1)
    args.sizes = args.sizes or (
        [4096, 8192, 16384, 32768, 65536] if cuda else [1024, 2048, 4096, 8192]
    )
    dim = args.dim or (1024 if cuda else 256)
    dtypes = args.dtypes or (["float16", "bfloat16"] if cuda else ["float32"])
    args.block_rows = args.block_rows or ([4096] if cuda else [512, 1024])
    # the kernel search: on CUDA (on CPU Triton only interprets, far too slowly to time)
    args.kernels = args.kernels and cuda and _kernels_ok()
    args.tl_beside = args.tl_beside and args.kernels and _ws_serves(args.device)
    device_name = R.device_name(args.device)
    if cuda:
        roofline = H200_BF16_TFLOPS * 1e12
        roofline_note = "H200 dense bf16/fp16 peak, 989 TFLOP/s"
        if "H200" not in device_name:
            roofline_note += f" (the device is {device_name}: another peak applies)"
    else:
        roofline = matmul_rate(args.device, torch.float32)
        roofline_note = f"measured float32 matmul of this CPU, {roofline / 1e9:.1f} GFLOP/s"
    info = R.run_info(
        args.device,
        extra_versions={"numpy": np.__version__},
        torch_threads=torch.get_num_threads(),
        load_average_after=os.getloadavg(),
        dim=dim,
        dtypes=dtypes,
        block_rows=args.block_rows,
        kernel_search=args.kernels,
        tl_beside=args.tl_beside,
        search_reps=args.search_reps,
        kernel_tolerance={d: _kernel_tolerance(d, dim) for d in dtypes},
        reps=args.reps,
        flop_count="n^2 * D per node (2 * n^2 * D / 2: the lower triangle), for both",
        roofline=roofline_note,
        roofline_flops=roofline,
        group=SD.GROUP,
        tolerance={d: SD.similarity_tolerance(SD.DTYPES[d], dim) for d in dtypes},
        data="centre + noise (mean cosine ~0.5), 2% near-copies (cosine ~0.999)",
        decisions_compared_at_eps=args.eps,
    )
    path = R.result_path("bench_dedup", R.device_slug(device_name if cuda else None))
    rows = []
    for n in args.sizes:
        x = node(n, dim, args.device)
        for dtype_name in dtypes:
            rows.append(measure(x, dtype_name, args, roofline))
            print("\n".join(table(rows[-1:], args)[2:]), flush=True)
            info["load_average_after"] = os.getloadavg()
            info["complete"] = False
            R.write_result(path, info, rows)  # so far
        del x
        if cuda:
            torch.cuda.empty_cache()
    info["complete"] = True
    R.write_result(path, info, rows)
    print(f"\n{device_name}; torch {torch.__version__}; D={dim}; {roofline_note}")
    print(f"flops counted: {info['flop_count']}; wall-clock median of {args.reps} after a warm-up")
    print("\n".join(table(rows, args)))
    exact = [r for r in rows if "equal_to_cpu_float32" in r]
    for r in exact:
        print(f"n={r['n']}: {r['dtype']} on CUDA ({r['cpu_checked']}) == float32 on CPU, "
              f"bit for bit: {r['equal_to_cpu_float32']}")  # fmt: skip
    for r in rows:
        for name, kernels, _ in _variants(args):
            if kernels:
                pre = f"{name}_phase_"
                ph = {k[len(pre) : -2]: v for k, v in r.items() if k.startswith(pre)}
                print(f"n={r['n']} {r['dtype']} {name} phases (ms): "
                      + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in ph.items()))  # fmt: skip
    same = [v for r in rows for k, v in r.items() if "_equal_to_ours_" in k]
    if same:
        print(f"kernel search == torch search, bit for bit, in all {len(same)} cases: {all(same)}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
