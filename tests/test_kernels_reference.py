"""Torch reference kernels against a float64 brute force."""

from __future__ import annotations

import pytest
import torch

from mdf_taxonomy import kernels as K
from mdf_taxonomy.kernels import fixed_point as FP
from mdf_taxonomy.kernels import reference as R


def brute(x, c, metric):
    """float64 full distance matrix (small shapes only)."""
    x64, c64 = x.double(), c.double()
    if metric == "l2":
        return torch.cdist(x64, c64).pow(2)
    return 1.0 - x64 @ c64.T


def make(n, k, d, metric="l2", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(k, d, generator=g)
    x = c[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    return x.to(dtype), c


def check_against_brute(x, c, out, metric, tol=1e-4):
    full = brute(x, c, metric)
    top2 = full.topk(min(2, c.shape[0]), dim=1, largest=False)
    best = top2.values[:, 0]
    gap = top2.values[:, 1] - best if c.shape[0] > 1 else torch.full_like(best, 1e9)
    scale = x.double().pow(2).sum(1) + c.double().pow(2).sum(1).max() + 1.0
    near = gap <= tol * scale
    agree = out.ids == top2.indices[:, 0]
    assert bool((agree | near).all()), int((~agree & ~near).sum())
    # the chosen centroid is (near) optimal and the reported distance matches it
    chosen = full.gather(1, out.ids[:, None])[:, 0]
    assert torch.allclose(chosen, best, atol=float(tol * scale.max()))
    assert torch.allclose(out.distance.double(), chosen, rtol=1e-4, atol=1e-4 * float(scale.max()))
    if out.second is not None:
        if c.shape[0] > 1:
            assert torch.allclose(
                out.second.double(), top2.values[:, 1], rtol=1e-4, atol=1e-4 * float(scale.max())
            )
        else:
            assert torch.isinf(out.second).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(257, 37, 19), (64, 1, 8), (5, 300, 384), (1000, 129, 33)])
def test_assign_vs_brute(metric, dtype, shape):
    n, k, d = shape
    x, c = make(n, k, d, metric, dtype)
    out = K.assign(x, c, metric=metric, backend="torch", with_second=True)
    assert out.ids.dtype == torch.int64 and out.distance.dtype == torch.float32
    check_against_brute(x, c, out, metric)
    out2 = K.assign(x, c, metric=metric, backend="auto")
    assert out2.second is None
    assert torch.equal(out2.ids, out.ids) and torch.equal(out2.distance, out.distance)


def test_assign_spans_centroid_chunks(monkeypatch):
    monkeypatch.setattr(R, "CENTROID_CHUNK", 16)
    monkeypatch.setattr(R, "BLOCK_BUDGET_BYTES", 4096)
    x, c = make(300, 70, 12)
    out = K.assign(x, c, backend="torch", with_second=True)
    check_against_brute(x, c, out, "l2")


def test_assign_rows_independent_of_batch():
    x, c = make(600, 50, 24, seed=3)
    full = K.assign(x, c, backend="torch", with_second=True)
    for lo, hi in [(0, 1), (17, 18), (100, 333), (599, 600)]:
        part = K.assign(x[lo:hi], c, backend="torch", with_second=True)
        assert torch.equal(part.ids, full.ids[lo:hi])
        assert torch.equal(part.distance, full.distance[lo:hi])
        assert torch.equal(part.second, full.second[lo:hi])


def test_assign_empty_and_ties():
    c = torch.randn(4, 3)
    out = K.assign(torch.empty(0, 3), c, backend="torch", with_second=True)
    assert out.ids.shape == (0,) and out.distance.shape == (0,) and out.second.shape == (0,)
    # duplicate centroids: lowest index wins, second == best
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = K.assign(torch.tensor([[0.0, 2.0]]), c, backend="torch", with_second=True)
    assert out.ids.tolist() == [1] and out.second.tolist() == out.distance.tolist()


def make_tree(n, d, n_parents, seed=0, metric="l2", empty=(), single=()):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 40, (n_parents,), generator=g)
    for p in empty:
        sizes[p] = 0
    for p in single:
        sizes[p] = 1
    offs = torch.zeros(n_parents + 1, dtype=torch.int64)
    offs[1:] = sizes.cumsum(0)
    c = torch.randn(int(offs[-1]), d, generator=g)
    x = torch.randn(n, d, generator=g)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    groups = torch.randint(0, n_parents, (n,), generator=g)
    return x, groups, c, offs


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_grouped_vs_brute(metric):
    x, groups, c, offs = make_tree(500, 20, 30, metric=metric, empty=(3,), single=(5,))
    groups[:3] = 3
    groups[3:6] = 5
    out = K.grouped_assign(x, groups, c, offs, metric=metric, backend="torch", with_second=True)
    for p in range(30):
        rows = (groups == p).nonzero()[:, 0]
        a, b = int(offs[p]), int(offs[p + 1])
        if rows.numel() == 0:
            continue
        if b == a:
            assert (out.ids[rows] == -1).all() and torch.isinf(out.distance[rows]).all()
            continue
        sub = K.Assignment(out.ids[rows] - a, out.distance[rows], out.second[rows])
        assert ((sub.ids >= 0) & (sub.ids < b - a)).all()
        check_against_brute(x[rows], c[a:b], sub, metric)
    assert torch.isinf(out.second[3:6]).all()


def test_partial_sums_exact_and_order_free():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 33, generator=g)
    ids = torch.randint(-1, 17, (2000,), generator=g)
    sums, counts = K.partial_sums(x, ids, 17, backend="torch")
    assert sums.dtype == torch.int64 and counts.dtype == torch.int64
    assert counts.tolist() == torch.bincount(ids[ids >= 0], minlength=17).tolist()
    ref = torch.zeros(17, 33, dtype=torch.float64).index_add_(
        0, ids[ids >= 0], x[ids >= 0].double()
    )
    assert torch.allclose(K.from_fixed_point(sums), ref, atol=2000 * 2.0**-24)
    perm = torch.randperm(2000, generator=g)
    s2, c2 = K.partial_sums(x[perm], ids[perm], 17, backend="torch")
    assert torch.equal(s2, sums) and torch.equal(c2, counts)
    acc_s = torch.zeros_like(sums)
    acc_c = torch.zeros_like(counts)
    for lo, hi in [(0, 1), (1, 700), (700, 701), (701, 2000)]:
        s, cnt = K.partial_sums(x[perm[lo:hi]], ids[perm[lo:hi]], 17, backend="torch")
        acc_s += s
        acc_c += cnt
    assert torch.equal(acc_s, sums) and torch.equal(acc_c, counts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_partial_sums_low_precision(dtype):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(100, 9, generator=g)
    x = (x.sign() * x.abs().clamp_min(2.0**-10)).to(dtype)  # multiples of 2**-24: exact
    ids = torch.randint(0, 4, (100,), generator=g)
    sums, _ = K.partial_sums(x, ids, 4, backend="torch")
    ref = torch.zeros(4, 9, dtype=torch.float64).index_add_(0, ids, x.double())
    assert torch.equal(K.from_fixed_point(sums), ref)  # low-precision values are exact


def test_resolve_backend():
    assert K.resolve_backend("auto", "cpu") == "torch"
    assert K.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError):
        K.resolve_backend("cuda", "cpu")
    if torch.cuda.is_available() and K.triton_available():
        assert K.resolve_backend("auto", "cuda") == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_quantize_matches_fp64_formula(dtype):
    """The fp32 rounding equals floor(x * 2**24 + 0.5) in fp64 bit for bit."""
    g = torch.Generator().manual_seed(3)
    k = torch.randint(-(2**30), 2**30, (4000,), generator=g).double()
    halves = (k + 0.5) / 2**24  # exact ties of the rounding
    vals = torch.cat(
        [
            halves,
            -halves,
            (k + 0.25) / 2**24,
            (k - 0.5) / 2**24,
            torch.randn(4000, generator=g).double()
            * 10.0 ** torch.randint(-12, 5, (4000,), generator=g),
            torch.tensor(
                [
                    0.0,
                    -0.0,
                    2.0**15,
                    -(2.0**15),
                    2.0**15 - 2.0**-9,
                    0.5 / 2**24,
                    -0.5 / 2**24,
                    1.5 / 2**24,
                    -1.5 / 2**24,
                    2.0**-149,
                    -(2.0**-149),
                    2.0**-30,
                    -(2.0**-30),
                    2.0**27,
                    -(2.0**27),
                ]
            ),
        ]
    )
    if dtype != torch.float64:
        vals = vals.to(dtype)
        vals = vals[torch.isfinite(vals)]
    old = torch.floor(vals.to(torch.float64) * 2.0**24 + 0.5).to(torch.int64)
    assert torch.equal(FP.quantize(vals), old)
    ids = torch.arange(vals.numel()) % 5
    sums, _ = R.partial_sums_torch(vals[:, None], ids, 5)
    ref = torch.zeros(5, 1, dtype=torch.int64).index_add_(0, ids, old[:, None])
    assert torch.equal(sums, ref)


def test_make_assigner_names_and_checks():
    """A kernel_backend name becomes an assigner once; a bad name is refused with the text
    the config tables and the operators have always shown."""
    for name, cls in (
        ("torch", K.TorchAssigner),
        ("triton", K.TritonAssigner),
        ("auto", K.AutoAssigner),
    ):
        a = K.make_assigner(name)
        assert isinstance(a, cls) and isinstance(a, K.Assigner)
        assert a.name == name and a.exact
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton'"):
        K.make_assigner("trtion")
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton'"):
        K.assign(torch.ones(2, 3), torch.ones(1, 3), backend="cuda")
    assert K.METRICS == ("l2", "cosine")
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine'"):
        K.check_metric("dot")
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine'"):
        K.TorchAssigner().assign(torch.ones(2, 3), torch.ones(1, 3), metric="dot")


def test_auto_assigner_runs_torch_on_cpu_tensors():
    """'auto' decides per call from the tensor's device: CPU rows get the torch reference
    (so x_sqnorm is never returned), whatever else is installed."""
    x, c = make(40, 7, 5)
    auto = K.AutoAssigner().assign(x, c, with_second=True)
    ref = K.TorchAssigner().assign(x, c, with_second=True)
    assert all(torch.equal(u, v) for u, v in zip(auto[:3], ref[:3], strict=True))
    assert auto.x_sqnorm is None
    ids = auto.ids
    assert all(
        torch.equal(u, v)
        for u, v in zip(
            K.AutoAssigner().partial_sums(x, ids, 7),
            K.partial_sums(x, ids, 7, backend="torch"),
            strict=True,
        )
    )


def test_fp8_shortlist_assigner_is_marked_inexact_and_exact_on_torch():
    a = K.make_assigner("torch", fp8_shortlist=True)
    if K.triton_available():
        assert not a.exact and a.name == "torch+fp8"
    x, c = make(30, 9, 6)
    got = a.assign(x, c, with_second=True)  # torch backend: the exact result
    ref = K.assign(x, c, backend="torch", with_second=True)
    assert all(torch.equal(u, v) for u, v in zip(got[:3], ref[:3], strict=True))


def test_inertia_fixed_point_rounds_half_to_even_and_sums_round_half_up():
    """The two fixed-point conventions, stated once in kernels/fixed_point.py."""
    half = torch.tensor([0.5, 1.5, 2.5]) * 2.0**-FP.INERTIA_FIXED_POINT_BITS
    assert FP.quantize_inertia(half).tolist() == [0.0, 2.0, 2.0]
    assert FP.inertia_from_fixed(3 * 2**FP.INERTIA_FIXED_POINT_BITS) == 3.0
    halves = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64) * 2.0**-FP.FIXED_POINT_BITS
    assert FP.quantize(halves).tolist() == [1, 2, 3]
