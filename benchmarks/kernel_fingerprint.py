"""The bits of the kernels' results on fixed inputs, as one hash per case.

Runs the public kernel API (``assign``, ``grouped_assign``, ``partial_sums``) on seeded
data and prints a JSON object ``{case: sha256 of ids, distances, second, sums}``. Run it on
two trees (before and after a refactor) on the same GPU and compare the objects: equal
hashes mean the same bits.

Usage: python benchmarks/kernel_fingerprint.py [--root TREE] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import types


def _import_kernels(root: str):
    # only the kernels package: some trees' package __init__ pulled in Ray at import
    sys.path.insert(0, root)
    pkg = types.ModuleType("mdf_taxonomy")
    pkg.__path__ = [os.path.join(root, "mdf_taxonomy")]
    sys.modules["mdf_taxonomy"] = pkg
    from mdf_taxonomy import kernels

    return kernels


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cases(kernels, device: str) -> dict[str, str]:
    import torch

    g = torch.Generator().manual_seed(0)
    out: dict[str, str] = {}
    backend = "triton" if device == "cuda" else "torch"
    for d, k, n in ((1024, 1024, 65536), (1024, 16384, 8192), (128, 100, 37), (1024, 64, 300)):
        centers = torch.randn(k, d, generator=g) * 3
        x = centers[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g)
        c = (centers + 0.1 * torch.randn(k, d, generator=g)).to(device)
        for dtype in (torch.bfloat16, torch.float32):
            xs = x.to(device, dtype)
            for metric in ("l2", "cosine"):
                xm = (
                    torch.nn.functional.normalize(xs.float(), dim=1).to(dtype)
                    if metric == "cosine"
                    else xs
                )
                cm = torch.nn.functional.normalize(c, dim=1) if metric == "cosine" else c
                a = kernels.assign(xm, cm, metric=metric, backend=backend, with_second=True)
                out[f"assign d{d} k{k} n{n} {dtype} {metric}"] = _digest(
                    a.ids, a.distance, a.second
                )
            sums, counts = kernels.partial_sums(xs, a.ids, k, backend=backend)
            out[f"partial_sums d{d} k{k} n{n} {dtype}"] = _digest(sums, counts)
        if device == "cuda" and k >= 1024:
            a = kernels.assign(
                x.to(device, torch.bfloat16),
                c,
                backend=backend,
                with_second=True,
                fp8_shortlist=True,
            )
            out[f"fp8 shortlist d{d} k{k} n{n}"] = _digest(a.ids, a.distance, a.second)
    # a tree level: 1024 parents x 64 children, and a single parent
    d, parents, per = 1024, 1024, 64
    c = (torch.randn(parents * per, d, generator=g) * 3).to(device)
    offsets = (torch.arange(parents + 1) * per).to(device)
    n = 1 << 17
    groups = torch.randint(0, parents, (n,), generator=g).to(device)
    x = (c[groups * per] + torch.randn(n, d, generator=g).to(device)).to(torch.bfloat16)
    a = kernels.grouped_assign(x, groups, c, offsets, backend=backend, with_second=True)
    out["grouped 1024x64 bf16"] = _digest(a.ids, a.distance, a.second)
    one = torch.zeros(n, dtype=torch.int64, device=device)
    a = kernels.grouped_assign(x, one, c[:per], offsets[:2], backend=backend, with_second=True)
    out["grouped single parent bf16"] = _digest(a.ids, a.distance, a.second)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), ".."))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    kernels = _import_kernels(os.path.abspath(args.root))
    print(json.dumps(cases(kernels, args.device), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
