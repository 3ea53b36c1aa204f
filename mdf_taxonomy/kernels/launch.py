"""Launch configuration of the Triton kernels: the config table, the tuning a caller passes,
and where the warp-specialised Gluon kernel serves a call.

Determinism: a config depends on (dtype, D, K, device type) only, never on N, so a row's
arithmetic does not depend on the batch it came in. Tuning (``KernelTuning``) exists for
the benchmarks' sweeps and the tests of alternative load paths; results stay exact
whatever it is (configs change the summation order of fp32 dot products only).

Imports no Triton (``use_ws`` asks its version lazily), so ``KernelTuning`` can be built
where Triton is absent.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

# The warp-specialised Gluon kernel (gluon_kernels.py) serves K <= WS_MAX_K, where hiding
# the epilogue behind loads pays; above it memory traffic bounds both kernels. Its results
# are bit-identical to the tl kernel's, so the choice never changes a result
# (benchmarks/DECISIONS.md has the figures). WS_TRITON: the Tritons it is checked on; on
# others the tl kernel runs (on triton 3.9 the l2 consumers spill registers).
WS_TRITON = ("3.6.",)
WS_MAX_K = 4096


_CONFIG_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "TMA",
                  "XN_BLOCK", "XN_UNROLL")  # fmt: skip
# fmt: off
_CONFIGS = {
    "interpreter":       (16,  16,  16,  1, 1, False, 16,  1),  # tiny tiles keep it quick
    torch.float32:       (128, 64,  32,  4, 3, False, 32,  1),
    torch.float8_e4m3fn: (128, 256, 128, 8, 3, True,  128, 1),  # same bytes per k-step as bf16
    # The ||x||^2 pass is only correct on the GPU with 64-column chunks (BLOCK_K and
    # XN_BLOCK 64); two chunks per step overlap their load latencies, with the same bits.
    "16-bit":            (128, 256, 64,  8, 3, False, 64,  2),
}
# fmt: on


def config(dtype: torch.dtype, d: int, k: int, device: torch.device) -> dict:
    """Launch config from (dtype, D, K, device type) only: never from N (determinism)."""
    if device.type != "cuda":
        row = _CONFIGS["interpreter"]
    else:
        row = _CONFIGS.get(dtype, _CONFIGS["16-bit"])
    return dict(zip(_CONFIG_FIELDS, row, strict=True))


def partial_sums_config(n_clusters: int, device: torch.device) -> dict:
    """The partial-sum kernel's config (the sums are exact whatever it is)."""
    if device.type != "cuda":
        return dict(CHUNK=32, BLOCK_R=8, NUM_STAGES=1, num_warps=1)
    if n_clusters <= 4096:
        return dict(CHUNK=1024, BLOCK_R=8, NUM_STAGES=3, num_warps=4)
    return dict(CHUNK=1024, BLOCK_R=2, NUM_STAGES=4, num_warps=4)


@dataclasses.dataclass(frozen=True)
class KernelTuning:
    """Launch choices a caller fixes instead of the table's (benchmarks, tests).

    assign: the exact kernel's config for every shape (plain, split and grouped calls; a
    bucketed level then runs it as given, without its deeper-pipeline adjustment); a config
    is the tl kernel's, so it also keeps the Gluon kernel out. fp8: the shortlist pass's.
    partial_sums: keys set over the partial-sum table's. warp_specialized: False keeps the
    Gluon kernel out; ws_max_k: the largest K it serves. patch: keys set in every config
    the table gives (assign and fp8), e.g. ``{"TMA": 1}`` to check a load path everywhere.
    """

    assign: dict | None = None
    fp8: dict | None = None
    partial_sums: dict | None = None
    warp_specialized: bool = True
    ws_max_k: int = WS_MAX_K
    patch: dict | None = None

    def assign_config(self, dtype: torch.dtype, d: int, k: int, device: torch.device) -> dict:
        if self.assign is not None:
            return self.assign
        return dict(config(dtype, d, k, device), **(self.patch or {}))

    def fp8_config(self, d: int, k: int, device: torch.device) -> dict:
        if self.fp8 is not None:
            return self.fp8
        return dict(config(torch.float8_e4m3fn, d, k, device), **(self.patch or {}))

    def partial_sums_config(self, n_clusters: int, device: torch.device) -> dict:
        return dict(partial_sums_config(n_clusters, device), **(self.partial_sums or {}))


DEFAULT_TUNING = KernelTuning()


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of a CUDA device, asked once (it is on every launch's path)."""
    return torch.cuda.get_device_capability(device)


@functools.cache
def n_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_ok(t: torch.Tensor) -> bool:
    """Tensor descriptors (TMA) need Hopper (or the interpreter), unit inner stride and
    16-byte aligned rows."""
    if t.device.type == "cuda" and capability(t.device)[0] < 9:
        return False
    es = t.element_size()
    return (
        t.stride(1) == 1
        and t.data_ptr() % 16 == 0
        and (t.stride(0) * es) % 16 == 0
        and t.shape[1] * es >= 16
    )


def use_ws(
    xs: torch.Tensor, c: torch.Tensor, metric: str, k: int, tuning: KernelTuning = DEFAULT_TUNING
) -> bool:
    """Whether the Gluon kernel serves this call: 16-bit inputs with TMA rows on sm90 (it
    uses wgmma), small K, a validated Triton, and no tl config fixed by the caller."""
    if not (
        tuning.warp_specialized
        and k <= tuning.ws_max_k
        and tuning.assign is None
        and xs.is_cuda
        and xs.dtype in (torch.bfloat16, torch.float16)
        and c.dtype == xs.dtype
    ):
        return False
    import triton

    return (
        triton.__version__.startswith(WS_TRITON)
        and capability(xs.device) == (9, 0)
        and tma_ok(xs)
        and tma_ok(c)
    )
