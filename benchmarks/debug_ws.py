"""Smoke test of the Gluon kernel on one small case (run in a subprocess per variant)."""
import sys

import _kernels_only  # noqa: F401
import torch
from ab_ws_assign import run_tl, run_ws

from mdf_taxonomy.kernels import gluon_kernels as G

n, k, d, metric = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
conf = dict(G.CONFIG)
for a in sys.argv[5:]:
    key, val = a.split("=")
    conf[key] = int(val)
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(n, d, device="cuda", generator=g).bfloat16()
c = torch.randn(k, d, device="cuda", generator=g).bfloat16()
a = run_ws(x, c, metric, conf)
torch.cuda.synchronize()
b = run_tl(x, c, metric)
print("ids equal", (a[0] == b[0]).float().mean().item(),
      "dist max rel", ((a[1] - b[1]).abs() / b[1].abs()).max().item(),
      "sec max rel", ((a[2] - b[2]).abs() / b[2].abs()).max().item())
