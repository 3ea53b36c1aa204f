"""CPU assignment: fp32 BLAS ranking + error-bound re-rank in fp64 is exact and batch-free."""

from __future__ import annotations

import pytest
import torch

from mdf_taxonomy import kernels as K
from mdf_taxonomy.kernels import reference as R
from mdf_taxonomy.kernels import rowwise


def brute_ids(x, c, metric):
    """fp64 argmin over the full matrix (difference form), first occurrence on ties.

    Elementwise products summed per pair, not a matrix product: BLAS may give equal
    centroids scores an ulp apart by their place in the matrix."""
    x64, c64 = x.double(), c.double()
    if metric == "l2":
        full = ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    else:
        full = 1.0 - (x64[:, None, :] * c64[None, :, :]).sum(-1)
    return full.argmin(dim=1), full


def planted(n, k, d, metric, seed, dyadic=False):
    """Clustered rows plus planted near-ties: duplicate centroids, rows equal to a centroid,
    rows (almost) equidistant from two centroids. ``dyadic``: small multiples of 1/8, so
    every fp64 score is exact and the planted ties are exact ties."""
    g = torch.Generator().manual_seed(seed)
    if dyadic:
        c = torch.randint(-8, 9, (k, d), generator=g).float() / 8
    else:
        c = torch.randn(k, d, generator=g)
    c[5] = c[2]
    c[k - 1] = c[0]
    if metric == "cosine" and not dyadic:
        c = torch.nn.functional.normalize(c, dim=1)
    lab = torch.randint(0, k, (n,), generator=g)
    if dyadic:
        x = c[lab] + torch.randint(-2, 3, (n, d), generator=g).float() / 8
    else:
        x = c[lab] + 0.3 * torch.randn(n, d, generator=g)
    x[:10] = c[torch.tensor([2, 5, 0, k - 1, 1, 3, 4, 6, 7, 8]) % k]  # equal to a centroid
    a = torch.randint(0, k, (20,), generator=g)
    b = (a + 1 + torch.randint(0, k - 1, (20,), generator=g)) % k
    mid = (c[a] + c[b]) / 2  # equidistant (exactly so for dyadic values)
    if metric == "cosine" and not dyadic:
        mid = torch.nn.functional.normalize(mid, dim=1)
    x[10:30] = mid
    x[30:40] = mid[:10] + 1e-6 * (c[a[:10]] - c[b[:10]])  # a hair closer to a
    if metric == "cosine" and not dyadic:
        x = torch.nn.functional.normalize(x, dim=1)
    return x, c


def bits(t):
    return t.view(torch.int32)


def split_assign(x, c, metric, size, **kw):
    parts = [
        K.assign(x[i : i + size], c, metric=metric, backend="torch", **kw)
        for i in range(0, x.shape[0], size)
    ]
    return torch.cat([p.ids for p in parts]), torch.cat([p.distance for p in parts])


def rerank_fraction(x, c, metric):
    cf = c.double()
    cn = (cf * cf).sum(1) if metric == "l2" else None
    return float(R._fp32_ids(x, cf, cn, metric)[1].float().mean())


@pytest.mark.parametrize("dyadic", [False, True])
@pytest.mark.parametrize("d", [3, 64, 257])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_exact_ids_and_batch_free_bits(metric, d, dyadic):
    x, c = planted(300, 40, d, metric, seed=d, dyadic=dyadic)
    ref, full = brute_ids(x, c, metric)
    ids, dist = split_assign(x, c, metric, x.shape[0])
    assert torch.equal(ids, ref), (ids != ref).nonzero()[:, 0].tolist()
    if metric == "l2" or not dyadic:  # (unnormalised dyadic rows: cosine ranks otherwise)
        assert (ids[:2] == 2).all() and (ids[2:4] == 0).all()  # duplicates: the lowest id
    if metric == "l2":
        assert (dist[:10] == 0).all()
    chosen = full.gather(1, ids[:, None])[:, 0]
    assert torch.allclose(dist.double(), chosen, rtol=1e-6, atol=1e-6)
    for size in (1, 7):
        i2, d2 = split_assign(x, c, metric, size)
        assert torch.equal(i2, ids) and torch.equal(bits(d2), bits(dist)), size
    # the fp64-only path (with_second) returns the same ids and distance bits
    out = K.assign(x, c, metric=metric, backend="torch", with_second=True)
    assert torch.equal(out.ids, ids) and torch.equal(bits(out.distance), bits(dist))
    assert (out.second >= out.distance).all()
    if metric == "l2" or not dyadic:
        assert torch.equal(bits(out.second[:2]), bits(out.distance[:2]))  # duplicate centroid
    print(f"\nre-ranked {metric} d={d} dyadic={dyadic}: {rerank_fraction(x, c, metric):.1%}")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_multi_chunk_matches_fp64_path(metric, monkeypatch):
    monkeypatch.setattr(R, "CENTROID_CHUNK", 16)
    monkeypatch.setattr(R, "BLOCK_BUDGET_BYTES", 8192)
    monkeypatch.setattr(rowwise, "ROWWISE_BLOCK_ELEMS", 100)
    x, c = planted(400, 70, 33, metric, seed=4)
    ref, _ = brute_ids(x, c, metric)
    got = K.assign(x, c, metric=metric, backend="torch")
    assert torch.equal(got.ids, ref)
    monkeypatch.setattr(R, "_fp32_prerank_allowed", lambda *a: False)
    slow = K.assign(x, c, metric=metric, backend="torch")
    assert torch.equal(slow.ids, got.ids) and torch.equal(bits(slow.distance), bits(got.distance))
    i1, d1 = split_assign(x, c, metric, 1)
    assert torch.equal(i1, got.ids) and torch.equal(bits(d1), bits(got.distance))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    x, c = planted(200, 30, 64, "l2", seed=9)
    x, c = x.to(dtype), c.to(dtype)
    ref, _ = brute_ids(x, c, "l2")
    ids, dist = split_assign(x, c, "l2", 200)
    assert torch.equal(ids, ref)
    i7, d7 = split_assign(x, c, "l2", 7)
    assert torch.equal(i7, ids) and torch.equal(bits(d7), bits(dist))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bound_covers_fp32_scores(metric):
    g = torch.Generator().manual_seed(2)
    for d, scale in [(3, 1.0), (257, 1.0), (64, 1e3), (128, 1e-3)]:
        x = scale * torch.randn(500, d, generator=g)
        c = scale * torch.randn(50, d, generator=g)
        c64 = c.double()
        cn = (c64 * c64).sum(1)
        exact = (cn[None] - 2 * x.double() @ c64.T) if metric == "l2" else -(x.double() @ c64.T)
        for rows in (x, x[:1]):
            ex = exact[: rows.shape[0]]
            s32 = (
                torch.addmm(cn.float()[None], rows, c.T, alpha=-2.0)
                if metric == "l2"
                else -(rows @ c.T)
            )
            x_norm = rows.double().norm(dim=1)
            bound = R._score_bound(x_norm, float(cn.max().sqrt()), float(cn.max()), d, metric)
            err = (s32.double() - ex).abs().max(dim=1).values
            assert (err <= bound / 2).all()  # rigorous without the safety factor


def test_clustered_rerank_fraction_is_small():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(256, 64, generator=g)
    x = c[torch.randint(0, 256, (20000,), generator=g)] + 0.5 * torch.randn(20000, 64, generator=g)
    frac = rerank_fraction(x, c, "l2")
    print(f"\nre-ranked rows on clustered data (N=20000, K=256, D=64): {frac:.3%}")
    assert frac < 0.05


def test_grouped_uses_the_same_rule():
    g = torch.Generator().manual_seed(8)
    offs = torch.tensor([0, 5, 5, 12, 40])
    x, c = planted(300, 40, 16, "l2", seed=8)
    groups = torch.randint(0, 4, (300,), generator=g)
    out = K.grouped_assign(x, groups, c, offs, backend="torch")
    for p in range(4):
        rows = (groups == p).nonzero()[:, 0]
        a, b = int(offs[p]), int(offs[p + 1])
        if b == a:
            assert (out.ids[rows] == -1).all()
            continue
        ref, _ = brute_ids(x[rows], c[a:b], "l2")
        assert torch.equal(out.ids[rows] - a, ref)
        one = K.assign(x[rows[:1]], c[a:b], backend="torch")
        assert torch.equal(bits(one.distance), bits(out.distance[rows[:1]]))
