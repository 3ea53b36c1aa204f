"""One tree level for Nsight Compute: where a grouped level's time goes (DRAM vs L2).

Runs bench_kernels.py's level 2 (1024 parents x 1024 children, N=1M, D=1024, rows in
random order) or the plain K=1024 assignment twice; profile the second launch, e.g.
  ncu --kernel-name _assign_kernel --launch-skip 1 --launch-count 1 \\
      --section SpeedOfLight --section MemoryWorkloadAnalysis \\
      python benchmarks/ncu_grouped_level.py grouped
(plain: --kernel-name _ws_assign_kernel ... plain)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402
from bench_kernels import clustered, three_level_tree  # noqa: E402

from mdf_taxonomy import kernels as KR  # noqa: E402


def main() -> None:
    x = clustered(1 << 20)
    _, lv1, _, lv2, _, off2 = three_level_tree(x)
    triton = KR.TritonAssigner()
    a1 = triton.assign(x, lv1, metric="l2").ids
    for _ in range(2):
        if sys.argv[1:] == ["plain"]:
            triton.assign(x, lv1, metric="l2")
        else:
            triton.grouped_assign(x, a1, lv2, off2)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
