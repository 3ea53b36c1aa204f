"""Triton kernels under the CPU interpreter (TRITON_INTERPRET=1) against the torch reference.

The variable must be set before Triton JIT-decorates the kernels, hence at import time here.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mdf_taxonomy import kernels as K  # noqa: E402

if "mdf_taxonomy.kernels.assign_kernels" in sys.modules and os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("triton kernels already compiled without the interpreter", allow_module_level=True)
if os.environ["TRITON_INTERPRET"] != "1":
    pytest.skip("needs TRITON_INTERPRET=1", allow_module_level=True)

from mdf_taxonomy.kernels import assign_kernels as AK  # noqa: E402
from mdf_taxonomy.kernels import earlier_kernels as EK  # noqa: E402
from mdf_taxonomy.kernels import fp8_shortlist as F8  # noqa: E402
from mdf_taxonomy.kernels import launch as L  # noqa: E402
from mdf_taxonomy.kernels import triton_dispatch as TD  # noqa: E402

if not AK.INTERPRET:
    pytest.skip("triton kernels not in interpreter mode", allow_module_level=True)

# triton 3.6's interpreter (the GPU target's version, pinned in scripts/constraints.txt)
# turns 1-element arrays into scalars, deprecated by numpy 1.25 and an error from 2.4 on
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def dot_rows_alike(m=16, n=16, k=16) -> bool:
    """Whether the interpreter's tl.dot (numpy's float32 matmul, i.e. the BLAS) rounds a row
    alike at every position of an (m, k) block. OpenBLAS's AVX2 (Haswell) kernel does not:
    it sums rows 6-11 of 16 in another order than the others."""
    rng = np.random.default_rng(0)
    c = rng.standard_normal((n, k), dtype=np.float32)
    for _ in range(4):
        a = np.repeat(rng.standard_normal((1, k), dtype=np.float32), m, axis=0)
        out = np.matmul(a, c.T, dtype=np.float32)
        if not (out == out[0]).all():
            return False
    return True


def tuned(**assign) -> K.TritonAssigner:
    """The Triton assigner with a fixed launch config (``KernelTuning.assign``)."""
    return K.TritonAssigner(K.KernelTuning(assign=assign))


def make(n, k, d, metric="l2", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g)
    x = c[torch.randint(0, k, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    return x.to(dtype), c


def check(x, c, out, ref, tol):
    """ids equal except near-ties (within tol of the scale); distances close."""
    scale = float(x.float().pow(2).sum(1).max() + c.pow(2).sum(1).max() + 1.0)
    agree = out.ids == ref.ids
    if ref.second is not None:
        near = (ref.second - ref.distance) <= tol * scale
        assert bool((agree | near).all())
    else:
        assert agree.float().mean() > 0.97
    assert torch.allclose(out.distance, ref.distance, rtol=tol, atol=tol * scale)
    if out.second is not None:
        assert torch.allclose(out.second, ref.second, rtol=tol, atol=tol * scale, equal_nan=False)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]
)
@pytest.mark.parametrize("shape", [(37, 21, 19), (40, 50, 32), (1, 3, 7), (32, 48, 32)])
def test_assign_interpreted(metric, dtype, tol, shape):
    n, k, d = shape
    x, c = make(n, k, d, metric, dtype)
    out = K.assign(x, c, metric=metric, backend="triton", with_second=True)
    ref = K.assign(x, c.to(dtype).float(), metric=metric, backend="torch", with_second=True)
    assert out.ids.dtype == torch.int64 and out.distance.dtype == torch.float32
    check(x, c, out, ref, tol)
    out1 = K.assign(x, c, metric=metric, backend="triton")
    assert out1.second is None and torch.equal(out1.ids, out.ids)


def test_assign_split_centroids():
    """Few rows, many centroid tiles: the split + exact merge path."""
    x, c = make(5, 200, 16, seed=2)
    out = K.assign(x, c, backend="triton", with_second=True)
    ref = K.assign(x, c, backend="torch", with_second=True)
    check(x, c, out, ref, 1e-5)
    whole = K.assign(
        torch.cat([x, make(300, 200, 16, seed=2)[0]]), c, backend="triton", with_second=True
    )  # no split: same per-row result
    assert torch.equal(whole.ids[:5], out.ids)
    assert torch.equal(whole.distance[:5], out.distance)
    assert torch.equal(whole.second[:5], out.second)


def test_assign_empty():
    c = torch.randn(4, 8)
    out = K.assign(torch.empty(0, 8), c, backend="triton", with_second=True)
    assert out.ids.shape == (0,) and out.second.shape == (0,)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_grouped_interpreted(metric):
    g = torch.Generator().manual_seed(5)
    sizes = torch.tensor([3, 0, 1, 20, 17, 5])
    offs = torch.zeros(7, dtype=torch.int64)
    offs[1:] = sizes.cumsum(0)
    c = torch.randn(int(offs[-1]), 24, generator=g)
    x = torch.randn(70, 24, generator=g)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    groups = torch.randint(0, 6, (70,), generator=g)
    groups[:2] = 1
    out = K.grouped_assign(x, groups, c, offs, metric=metric, backend="triton", with_second=True)
    ref = K.grouped_assign(x, groups, c, offs, metric=metric, backend="torch", with_second=True)
    assert torch.equal(out.ids, ref.ids)
    assert (out.ids[:2] == -1).all() and torch.isinf(out.distance[:2]).all()
    fin = ~torch.isinf(ref.distance)
    assert torch.allclose(out.distance[fin], ref.distance[fin], rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.isinf(out.second), torch.isinf(ref.second))
    fin2 = ~torch.isinf(ref.second)
    assert torch.allclose(out.second[fin2], ref.second[fin2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_sums_interpreted(dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(150, 40, generator=g).to(dtype)
    ids = torch.randint(-1, 9, (150,), generator=g)
    ids[:60] = 3  # a cluster spanning several chunks
    s, n = K.partial_sums(x, ids, 10, backend="triton")
    rs, rn = K.partial_sums(x, ids, 10, backend="torch")
    assert torch.equal(s, rs) and torch.equal(n, rn)
    perm = torch.randperm(150, generator=g)
    s2, _ = K.partial_sums(x[perm], ids[perm], 10, backend="triton")
    assert torch.equal(s2, rs)


def test_partial_sums_rounding_edges():
    """Exact halves, negatives, tiny and large values round exactly like the fp64 reference."""
    s = 2.0**-24
    vals = torch.tensor(
        [
            0.5 * s,
            -0.5 * s,
            1.5 * s,
            -1.5 * s,
            2.5 * s,
            -2.5 * s,
            0.3 * s,
            -0.3 * s,
            -0.7 * s,
            0.7 * s,
            -0.5,
            0.5,
            -1.0 - 0.5 * s,
            3.75,
            -1234.5678,
            2.0**20 + 0.5,
            -(2.0**27),
            1e-30,
            -1e-30,
            0.0,
        ]
    )
    x = vals[:, None].repeat(1, 3)
    x[:, 1] *= 3.0
    ids = torch.arange(vals.numel()) % 4
    got, _ = K.partial_sums(x, ids, 4, backend="triton")
    ref, _ = K.partial_sums(x, ids, 4, backend="torch")
    assert torch.equal(got, ref)
    for i in range(vals.numel()):
        a, _ = K.partial_sums(x[i : i + 1], ids[i : i + 1], 4, backend="triton")
        b, _ = K.partial_sums(x[i : i + 1], ids[i : i + 1], 4, backend="torch")
        assert torch.equal(a, b), (i, vals[i])


def test_centroid_cache_sees_inplace_updates(monkeypatch):
    monkeypatch.setattr(TD, "CACHE_MIN_ELEMS", 0)
    x, c = make(20, 6, 16, seed=4)
    a = K.assign(x, c, backend="triton")
    assert torch.equal(K.assign(x, c, backend="triton").ids, a.ids)  # cached path
    c[a.ids[0]] += 100.0  # in place: the cache must notice
    b = K.assign(x, c, backend="triton")
    ref = K.assign(x, c, backend="torch")
    assert torch.equal(b.ids, ref.ids) and b.ids[0] != a.ids[0]
    TD.clear_caches()


def test_centroid_cache_is_bounded_and_keeps_nothing_alive(monkeypatch):
    """Cast and fp8 entries share one bounded cache that holds no strong reference to the
    centroids it was built from."""
    monkeypatch.setattr(TD, "CACHE_MIN_ELEMS", 0)
    TD.clear_caches()
    x = torch.randn(8, 16)
    refs = []
    for _ in range(6):
        c = torch.randn(5, 16)
        K.assign(x, c, backend="triton", fp8_shortlist=True)
        refs.append(weakref.ref(c))
        del c
    assert 0 < TD.cache_size() <= TD.CACHE_SIZE
    gc.collect()
    assert all(r() is None for r in refs)
    TD.clear_caches()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(40, 50, 32), (37, 33, 48), (5, 200, 16), (21, 7, 24)])
def test_tma_loads_match_pointer_loads(metric, dtype, shape):
    """Tensor-descriptor (TMA) loads compute what the clamped pointer loads do, including
    ragged N, K and D (hardware zero fill past the edges)."""
    n, k, d = shape
    x, c = make(n, k, d, metric, dtype=dtype, seed=8)
    ref = K.assign(x, c, metric=metric, backend="triton", with_second=True)
    tma = tuned(**dict(L.config(x.dtype, d, k, x.device), TMA=True))
    out = tma.assign(x, c, metric=metric, with_second=True)
    assert torch.equal(out.ids, ref.ids)
    assert torch.allclose(out.distance, ref.distance, rtol=1e-6, atol=1e-5)
    assert torch.allclose(out.second, ref.second, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(64, 40, 32), (37, 33, 48), (9, 1, 16), (50, 2, 16)])
def test_fp8_shortlist_reranks_exactly(metric, shape):
    """fp8 top-2 then exact re-ranking: ids equal the exact ones unless the true nearest
    was not among the two fp8 candidates (checked against the fp8 emulation itself);
    distances are exact for the returned id."""
    n, k, d = shape
    x, c = make(n, k, d, metric, seed=12)
    exact = K.assign(x, c, metric=metric, backend="torch", with_second=True)
    out = K.assign(x, c, metric=metric, backend="triton", with_second=True, fp8_shortlist=True)
    # what the fp8 pass ranks: per-row e4m3 quantisation of both sides
    qx, sx = F8.to_fp8_rows(x)
    qc, sc = F8.to_fp8_rows(c)
    approx = (qx.float() * sx[:, None]) @ (qc.float() * sc[:, None]).T
    score = c.pow(2).sum(1)[None] - 2 * approx if metric == "l2" else -approx
    top2 = score.topk(min(2, k), dim=1, largest=False).indices
    in_top2 = (top2 == exact.ids[:, None]).any(1)
    assert bool((out.ids[in_top2] == exact.ids[in_top2]).all())
    assert in_top2.float().mean() > 0.9
    assert bool((out.ids >= 0).all() and (out.ids < k).all())
    d_chosen = (x - c[out.ids]).pow(2).sum(1) if metric == "l2" else 1 - (x * c[out.ids]).sum(1)
    assert torch.allclose(out.distance, d_chosen, rtol=1e-5, atol=1e-4)
    assert bool((out.second >= out.distance).all())
    if k == 1:
        assert bool(torch.isinf(out.second).all())


def test_fp8_shortlist_without_fp8_hardware_runs_exact(monkeypatch):
    x, c = make(30, 20, 16, seed=15)
    monkeypatch.setattr(F8, "fp8_supported", lambda device: False)
    with pytest.warns(RuntimeWarning, match="exact kernel"):
        out = K.assign(x, c, backend="triton", fp8_shortlist=True)
    ref = K.assign(x, c, backend="triton")
    assert torch.equal(out.ids, ref.ids) and torch.equal(out.distance, ref.distance)


def test_fp8_shortlist_batch_independent():
    x, c = make(70, 40, 32, seed=13)
    full = K.assign(x, c, backend="triton", with_second=True, fp8_shortlist=True)
    part = K.assign(x[30:47], c, backend="triton", with_second=True, fp8_shortlist=True)
    assert torch.equal(full.ids[30:47], part.ids)
    assert torch.equal(full.distance[30:47], part.distance)


@pytest.mark.parametrize("tma", [False, True])
def test_grouped_fast_paths(tma):
    """One parent (plain kernel on the children block), rows pre-sorted by parent (no
    sort) and the general sorted-bucket path agree with the torch reference."""
    cfg = dict(L.config(torch.float32, 32, 1, torch.device("cpu")), TMA=tma)
    triton = tuned(**cfg)
    g = torch.Generator().manual_seed(11)
    sizes = torch.tensor([5, 0, 1, 40, 17])
    offs = torch.zeros(6, dtype=torch.int64)
    offs[1:] = sizes.cumsum(0)
    c = torch.randn(int(offs[-1]), 32, generator=g)
    x = torch.randn(90, 32, generator=g)
    cases = [
        torch.full((90,), 3),
        torch.full((90,), 1),
        torch.full((90,), 2),
        torch.sort(torch.randint(0, 5, (90,), generator=g)).values,
        torch.randint(0, 5, (90,), generator=g),
    ]
    for groups in cases:
        out = triton.grouped_assign(x, groups, c, offs, with_second=True)
        ref = K.grouped_assign(x, groups, c, offs, backend="torch", with_second=True)
        assert torch.equal(out.ids, ref.ids)
        fin = ~torch.isinf(ref.distance)
        assert torch.equal(fin, ~torch.isinf(out.distance))
        assert torch.allclose(out.distance[fin], ref.distance[fin], rtol=1e-5, atol=1e-4)
        assert torch.equal(torch.isinf(out.second), torch.isinf(ref.second))
    # The same rows give bit-identical results whichever path labels them. A row's position
    # in its 16-row block depends on the batch (the bucket sort is not stable); the GPU's MMA
    # rounds every position alike (tests/test_gpu_kernels.py checks the bits there),
    # but the interpreter's tl.dot is numpy's matmul, whose BLAS may not (dot_rows_alike).
    mixed = cases[4]
    out = triton.grouped_assign(x, mixed, c, offs, with_second=True)
    rows = (mixed == 3).nonzero()[:, 0]
    one = triton.grouped_assign(x[rows], mixed[rows], c, offs, with_second=True)
    assert torch.equal(one.ids, out.ids[rows])
    if dot_rows_alike(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]):
        assert torch.equal(one.distance, out.distance[rows])
        assert torch.equal(one.second, out.second[rows])
    else:
        assert torch.allclose(one.distance, out.distance[rows], rtol=1e-6, atol=1e-5)
        assert torch.allclose(one.second, out.second[rows], rtol=1e-6, atol=1e-5)


def test_grouped_offsets_read_once_per_tensor_and_refreshed_in_place():
    """A level's offsets are summarised once per tensor (no GPU read-back per call); an
    in-place change to them is seen."""
    TD.clear_caches()
    g = torch.Generator().manual_seed(3)
    c, x = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    offs, groups = torch.tensor([0, 3, 6]), torch.randint(0, 2, (20,), generator=g)
    K.grouped_assign(x, groups, c, offs, backend="triton")
    assert TD.offsets_info(offs) == (2, 3, 0, 3)
    offs[1] = 1  # parent 0 now has 1 child, parent 1 has 5
    got = K.grouped_assign(x, groups, c, offs, backend="triton")
    assert torch.equal(got.ids, K.grouped_assign(x, groups, c, offs, backend="torch").ids)
    assert TD.offsets_info(offs) == (2, 5, 0, 1)
    TD.clear_caches()


def test_work_items_padding():
    keys = torch.tensor([2, 0, 2, 2, 4, 0, 2])
    perm, ik, ipos, iend, counts = TD.work_items(keys, 5, 2)
    assert torch.equal(counts, torch.tensor([2, 0, 4, 0, 1]))
    assert ik.numel() == 7 // 2 + 5
    real = ik >= 0
    assert int(real.sum()) == 1 + 2 + 1
    assert bool((ipos[~real] == iend[~real]).all())
    assert torch.equal(keys[perm], torch.sort(keys).values)
    got = sorted(zip(ik[real].tolist(), ipos[real].tolist(), iend[real].tolist(), strict=True))
    assert got == [(0, 0, 2), (2, 2, 6), (2, 4, 6), (4, 6, 7)]


def test_invalid_ids_raise():
    """Validation happens after the work is enqueued; it must still raise."""
    x = torch.randn(10, 8)
    with pytest.raises(ValueError):
        K.partial_sums(x, torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 99]), 5, backend="triton")
    with pytest.raises(ValueError):
        K.grouped_assign(
            x,
            torch.tensor([0, 1, 2] * 3 + [3]),
            torch.randn(6, 8),
            torch.tensor([0, 2, 4, 6]),
            backend="triton",
        )
    with pytest.raises(ValueError):
        K.grouped_assign(
            x,
            torch.tensor([-1] + [0] * 9),
            torch.randn(6, 8),
            torch.tensor([0, 6]),
            backend="triton",
        )
    with pytest.raises(ValueError):  # past int32: must not wrap into a valid parent
        K.grouped_assign(
            x,
            torch.tensor([2**32 + 1] + [0] * 9),
            torch.randn(6, 8),
            torch.tensor([0, 2, 4, 6]),
            backend="triton",
        )


@pytest.mark.parametrize("xn_block,xn_unroll", [(64, 1), (16, 4), (16, 2)])
def test_norm_pass_chunking(xn_block, xn_unroll):
    """The ||x||^2 pass's chunk width changes only the summation order; unrolling (ragged
    D included) nothing."""
    x, c = make(37, 33, 48, seed=14)
    ref = K.assign(x, c, backend="triton", with_second=True)
    cfg = dict(L.config(x.dtype, 48, 33, x.device), XN_BLOCK=xn_block, XN_UNROLL=xn_unroll)
    out = tuned(**cfg).assign(x, c, with_second=True)
    assert torch.equal(out.ids, ref.ids)
    if xn_block == 16:  # the default chunk width: the same additions in the same order
        assert torch.equal(out.distance, ref.distance)
    assert torch.allclose(out.distance, ref.distance, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("grouped", [False, True])
def test_norm_pass_order_is_bit_identical(grouped):
    """||x||^2 before the centroid tiles (bucketed GPU levels) or after them: same bits."""
    x, c = make(37, 33, 48, seed=21)
    groups = torch.randint(0, 3, (37,), generator=torch.Generator().manual_seed(2))
    offs = torch.tensor([0, 10, 20, 33])
    base = L.config(x.dtype, 48, 33, x.device)
    outs = []
    for first in (False, True):
        a = tuned(**base, XN_FIRST=first)
        outs.append(
            a.grouped_assign(x, groups, c, offs, with_second=True)
            if grouped
            else a.assign(x, c, with_second=True)
        )
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))


def test_gluon_kernel_only_where_validated():
    """The warp-specialised Gluon kernel is picked only at small K on CUDA (sm90, 16-bit,
    validated Triton); everywhere else the tl kernel runs, so CPU runs and other GPUs
    never import Gluon."""
    x = torch.randn(64, 32)
    c = torch.randn(8, 32)
    assert not L.use_ws(x, c, "cosine", 8)  # CPU
    assert not L.use_ws(x, c, "l2", 8)
    assert L.WS_MAX_K >= 1024 and L.WS_TRITON
    assert L.KernelTuning().ws_max_k == L.WS_MAX_K


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(200, 40, 32), (9, 70, 24)])  # one block; centroid splits
def test_x_sqnorm_is_returned_and_reused_bit_identically(dtype, shape):
    """The kernels' ||x||^2 comes back with the result; handed back, it replaces the norm
    pass with the same bits (plain and split calls, single- and multi-parent levels)."""
    n, k, d = shape
    x, c = make(n, k, d, dtype=dtype, seed=31)
    a = K.assign(x, c, backend="triton", with_second=True)
    ref = (x.double() ** 2).sum(1).float()
    assert a.x_sqnorm.dtype == torch.float32
    assert torch.allclose(a.x_sqnorm, ref, rtol=1e-5)
    b = K.assign(x, c, backend="triton", with_second=True, x_sqnorm=a.x_sqnorm)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    groups = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(3))
    offs = torch.tensor([0, k // 3, k // 2, k])
    for g, o in ((torch.zeros_like(groups), torch.tensor([0, k])), (groups, offs)):
        ga = K.grouped_assign(x, g, c, o, backend="triton", with_second=True)
        assert torch.equal(ga.x_sqnorm, a.x_sqnorm)  # one norm, whichever path ran
        gb = K.grouped_assign(x, g, c, o, backend="triton", with_second=True, x_sqnorm=a.x_sqnorm)
        assert all(torch.equal(u, v) for u, v in zip(ga, gb, strict=True))


def test_x_sqnorm_absent_for_cosine_and_torch_and_checked():
    x, c = make(20, 6, 16, seed=32)
    assert K.assign(x, c, backend="torch").x_sqnorm is None
    cos = K.assign(torch.nn.functional.normalize(x, dim=1), c, metric="cosine", backend="triton")
    assert cos.x_sqnorm is None
    with pytest.raises(ValueError, match="x_sqnorm"):
        K.assign(x, c, backend="triton", x_sqnorm=torch.ones(19))
    with pytest.raises(ValueError, match="x_sqnorm"):
        K.grouped_assign(
            x,
            torch.zeros(20, dtype=torch.int64),
            c,
            torch.tensor([0, 6]),
            backend="triton",
            x_sqnorm=torch.ones(20, dtype=torch.float64),
        )


def test_walk_reuses_the_first_levels_norms():
    """A tree walk on the Triton backend hands level 1's ||x||^2 to the deeper levels and
    labels exactly as each level computing its own."""
    from mdf_taxonomy.model import Level, Taxonomy, TaxonomyConfig

    g = torch.Generator().manual_seed(33)
    cfg = TaxonomyConfig(n_levels=3, branching_factor=[4, 3, 2], dim=16)
    levels = [
        Level(torch.randn(4, 16, generator=g).numpy(), torch.zeros(4).numpy()),
        Level(
            torch.randn(12, 16, generator=g).numpy(), torch.arange(4).repeat_interleave(3).numpy()
        ),
        Level(
            torch.randn(24, 16, generator=g).numpy(), torch.arange(12).repeat_interleave(2).numpy()
        ),
    ]
    tax = Taxonomy(config=cfg, dim=16, levels=levels)
    x = tax.prepare(torch.randn(50, 16, generator=g))
    paths, last = tax.walk(x, 3, assigner=K.TritonAssigner())
    parents = torch.zeros(50, dtype=torch.int64)
    for level in range(1, 4):  # each level on its own, norm pass included
        a = tax.assign_level(x, parents, level, assigner=K.TritonAssigner())
        assert torch.equal(torch.from_numpy(paths[:, level - 1]).long(), a.ids)
        parents = a.ids
    assert torch.equal(last.distance, a.distance)


def test_tuning_is_an_argument_and_changes_no_bit():
    """Launch choices travel as KernelTuning (no module state): a fixed assign config, a
    patch over the table's configs and partial-sum keys give the default's results."""
    x, c = make(37, 33, 48, seed=22)
    ref = K.TritonAssigner().assign(x, c, with_second=True)
    base = L.config(x.dtype, 48, 33, x.device)
    for tuning in (
        K.KernelTuning(assign=dict(base)),
        K.KernelTuning(patch={"XN_UNROLL": 1}),
        K.KernelTuning(warp_specialized=False),
    ):
        out = K.make_assigner("triton", tuning=tuning).assign(x, c, with_second=True)
        assert all(torch.equal(u, v) for u, v in zip(out, ref, strict=True))
    ids = ref.ids
    want = K.partial_sums(x, ids, 33, backend="torch")
    ps = K.TritonAssigner(K.KernelTuning(partial_sums=dict(CHUNK=8, BLOCK_R=2)))
    assert all(torch.equal(u, v) for u, v in zip(ps.partial_sums(x, ids, 33), want, strict=True))
    assert L.KernelTuning(patch={"TMA": True}).assign_config(x.dtype, 48, 33, x.device)["TMA"]


def test_fp8_assigner_is_the_shortlist_on_triton():
    x, c = make(40, 24, 32, seed=23)
    a = K.make_assigner("triton", fp8_shortlist=True)
    assert isinstance(a, F8.Fp8ShortlistAssigner) and not a.exact
    got = a.assign(x, c, with_second=True)
    want = K.assign(x, c, backend="triton", with_second=True, fp8_shortlist=True)
    assert all(torch.equal(u, v) for u, v in zip(got[:3], want[:3], strict=True))
    g = torch.zeros(40, dtype=torch.int64)  # grouped levels and sums: the exact kernels
    o = torch.tensor([0, 24])
    exact = K.grouped_assign(x, g, c, o, backend="triton")
    assert torch.equal(a.grouped_assign(x, g, c, o).ids, exact.ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_assign_earlier_matches_the_reference_over_the_lower_triangle(dtype):
    """Each row's nearest earlier row (cosine) over several row blocks and column tiles,
    the diagonal tiles masked: the reference's ids (exact copies: the lowest id), its
    distances and runner-ups to rounding; row 0 has none, row 1 no runner-up."""
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(75, 40, generator=g), dim=1)
    x[50:53] = x[7]  # copies across blocks: ties go to the lowest id
    x[60] = x[52]
    low = x.to(dtype)
    want = K.TorchAssigner().assign_earlier(low.float(), with_second=True)
    got = K.TritonAssigner().assign_earlier(low, with_second=True)
    assert got.ids.tolist()[:2] == [-1, 0] and want.ids[0] == -1
    assert got.distance[0] == float("inf") and got.second[:2].tolist() == [float("inf")] * 2
    assert torch.equal(got.ids, want.ids)
    assert got.ids[50:53].tolist() == [7, 7, 7] and got.ids[60] == 7
    torch.testing.assert_close(got.distance[1:], want.distance[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.second[2:], want.second[2:], atol=1e-5, rtol=0)
    brute = low.double() @ low.double().T
    brute.masked_fill_(torch.ones_like(brute, dtype=torch.bool).triu_(), -float("inf"))
    assert torch.equal(want.ids[1:], brute[1:].argmax(1))
    assert K.AutoAssigner().assign_earlier(low.float()).second is None
    for split_cols in (16, 48, 1000):  # column ranges per program, merged: the same bits
        ids, dist, sec = EK.assign_earlier_triton(low, with_second=True, split_cols=split_cols)
        assert torch.equal(ids, got.ids) and torch.equal(dist, got.distance)
        assert torch.equal(sec, got.second)


def test_earlier_above_lists_the_reference_candidates_in_column_order():
    """Gathered rows, per-row thresholds, copies over several tiles: the reference's
    counts and first `cap` columns, ascending, -1 after them; cap < 1 is refused."""
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(90, 24, generator=g), dim=1)
    x[60:64] = x[5]
    pos = torch.tensor([0, 3, 10, 17, 40, 60, 61, 62, 63, 70, 89])
    thr = torch.full((len(pos),), 0.3)
    thr[5:9] = 0.99
    for cap in (1, 3, 8):
        want = K.TorchAssigner().earlier_above(x, pos, thr, cap)
        got = K.TritonAssigner().earlier_above(x, pos, thr, cap)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0][0] == 0 and got[1][8].tolist()[:4] == [5, 60, 61, 62]
    with pytest.raises(ValueError, match="cap"):
        K.TritonAssigner().earlier_above(x, pos, thr, 0)
