"""The Triton kernels on a CUDA GPU against the torch oracle (run on the device machine).

The oracle gets the inputs as the kernel sees them (centroids rounded to the input dtype), so
what is checked is the kernel's own arithmetic error. ids agree except near-ties (the
chosen centroid's fp64 distance within 1e-5 * (||x||^2 + max ||c||^2) of the best; 2e-5
for cosine's scale of 2); distances' norm-wise relative error under 1e-3 (bf16/fp16) /
1e-5 (fp32). Partial sums, the paths of a grouped level, reused norms and the
warp-specialised kernel are bit-identical where they must be. Skipped without a GPU.

``GPU_KERNEL_PATCH="TMA=1,XN_UNROLL=4"`` forces launch keys into every config
(``KernelTuning.patch``), to check another load path or unrolling everywhere.
"""

from __future__ import annotations

import os

import pytest
import torch

from mdf_taxonomy import kernels as K

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

if torch.cuda.is_available():
    triton = pytest.importorskip("triton")
    # decorated now, compiled: a later interpreter test module sets TRITON_INTERPRET
    from mdf_taxonomy.kernels import assign_kernels as AK
    from mdf_taxonomy.kernels import fp8_shortlist as F8
    from mdf_taxonomy.kernels import launch as L

    if AK.INTERPRET:
        pytest.skip("kernels loaded in interpreter mode", allow_module_level=True)

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}
TIE = 1e-5  # near-tie bound on the fp64 gap, relative to the row's scale
_FORCED = [kv.split("=") for kv in os.environ.get("GPU_KERNEL_PATCH", "").split(",") if kv]
PATCH = {key: int(value) for key, value in _FORCED}
TUNING = K.KernelTuning(patch=PATCH or None)
TRITON = None if not torch.cuda.is_available() else K.TritonAssigner(TUNING)
ORACLE = K.TorchAssigner()


def same(a, b) -> bool:
    return all((u is None and v is None) or torch.equal(u, v) for u, v in zip(a, b, strict=True))


def clustered(n, k, d, metric, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    c = torch.randn(k, d, device=DEV, generator=g)
    x = c[torch.randint(0, k, (n,), device=DEV, generator=g)]
    x = x + 0.3 * torch.randn(n, d, device=DEV, generator=g)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        c = torch.nn.functional.normalize(c, dim=1)
    return x.to(dtype), c


def chosen_dist(x, c, ids, metric):
    """fp64 distance of each row to centroid ids[i]."""
    x64, cc = x.double(), c.double()[ids]
    if metric == "l2":
        return (x64 - cc).pow(2).sum(1)
    return 1 - (x64 * cc).sum(1)


def row_scale(x, c_norm_max, metric):
    if metric == "cosine":
        return torch.full((x.shape[0],), 2.0, dtype=torch.float64, device=x.device)
    return x.double().pow(2).sum(1) + c_norm_max


def rel_err(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def check_against_oracle(x, c, out, ref, metric, dtype, scale):
    """ids equal the oracle's but for near-ties; distances within REL (norm-wise)."""
    k = c.shape[0]
    assert bool((out.ids >= 0).all() and (out.ids < k).all()), "ids not written"
    mism = out.ids != ref.ids
    if bool(mism.any()):
        gap = chosen_dist(x[mism], c, out.ids[mism], metric) - ref.distance[mism].double()
        gap = gap / scale[mism]
        assert float(gap.max()) <= TIE, f"{int(mism.sum())} mismatches, max gap {gap.max()}"
    assert rel_err(out.distance, ref.distance) < REL[dtype]
    if k > 1:
        assert rel_err(out.second, ref.second) < REL[dtype]
    else:
        assert bool(torch.isinf(out.second).all())


ASSIGN_SHAPES = [
    (4096, 1024, 1024),
    (3001, 777, 384),
    (2049, 5000, 768),
    (999, 300, 1000),
    (33, 16384, 1024),
    (1, 3, 77),
    (257, 1, 64),
]  # (33, 16384): split-K


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", ASSIGN_SHAPES)
def test_assign_matches_the_oracle(dtype, metric, shape):
    n, k, d = shape
    x, c = clustered(n, k, d, metric, dtype, seed=0)
    out = TRITON.assign(x, c, metric=metric, with_second=True)
    c = c.to(dtype).float()  # what the kernel multiplies
    ref = ORACLE.assign(x, c, metric=metric, with_second=True)
    scale = row_scale(x, float(c.double().pow(2).sum(1).max()), metric)
    check_against_oracle(x, c, out, ref, metric, dtype, scale)
    assert torch.equal(K.assign(x, c.to(dtype), metric=metric).ids, out.ids)  # 'auto'


def tree_level(n, d, metric, dtype, n_parents, max_children, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    sizes = torch.randint(1, max_children, (n_parents,), device=DEV, generator=g)
    offs = torch.zeros(n_parents + 1, dtype=torch.int64, device=DEV)
    offs[1:] = sizes.cumsum(0)
    x, c = clustered(n, int(offs[-1]), d, metric, dtype, seed)
    return g, sizes, offs, x, c


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "metric,n,d,mode",
    [
        ("l2", 5000, 1024, "random"),
        ("cosine", 3000, 384, "random"),
        ("l2", 5000, 1024, "sorted"),
        ("cosine", 3000, 768, "one"),
    ],
)
def test_grouped_matches_the_oracle(dtype, metric, n, d, mode):
    """Each row against its parent's block: an empty parent (-1, +inf), a single child
    (second +inf), many parents bucketed, rows pre-sorted, one parent (plain kernel)."""
    n_parents = 37
    g = torch.Generator(device=DEV).manual_seed(1)
    sizes = torch.randint(1, 300, (n_parents,), device=DEV, generator=g)
    sizes[3] = 0
    sizes[4] = 1
    offs = torch.zeros(n_parents + 1, dtype=torch.int64, device=DEV)
    offs[1:] = sizes.cumsum(0)
    x, c = clustered(n, int(offs[-1]), d, metric, dtype, seed=1)
    groups = torch.randint(0, n_parents, (n,), device=DEV, generator=g)
    groups[:3] = 3  # rows of the empty parent
    groups[3:6] = 4  # rows of the single child
    if mode == "sorted":
        groups = torch.sort(groups).values
    elif mode == "one":
        groups.fill_(5)
    out = TRITON.grouped_assign(x, groups, c, offs, metric=metric, with_second=True)
    c = c.to(dtype).float()
    ref = ORACLE.grouped_assign(x, groups, c, offs, metric=metric, with_second=True)
    empty = sizes[groups] == 0
    assert bool((out.ids[empty] == -1).all() and torch.isinf(out.distance[empty]).all())
    assert bool(torch.isinf(out.second[sizes[groups] == 1]).all())
    cn = c.double().pow(2).sum(1)
    block_max = torch.stack(
        [
            cn[int(offs[p]) : int(offs[p + 1])].max() if sizes[p] else cn.new_zeros(())
            for p in range(n_parents)
        ]
    )
    scale = row_scale(x, block_max[groups], metric)
    rows = ~empty
    mism = rows & (out.ids != ref.ids)
    lo, hi = offs[groups], offs[groups + 1]
    assert bool(((out.ids[rows] >= lo[rows]) & (out.ids[rows] < hi[rows])).all())
    if bool(mism.any()):
        gap = chosen_dist(x[mism], c, out.ids[mism], metric) - ref.distance[mism].double()
        assert float((gap / scale[mism]).max()) <= TIE
    assert rel_err(out.distance[rows], ref.distance[rows]) < REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_paths_are_bit_identical(dtype):
    """Single-parent (plain kernel), pre-sorted and bucketed paths: the same bits for the
    same rows."""
    g, _, offs, x, c = tree_level(20000, 1024, "l2", dtype, 37, 600, seed=3)
    groups = torch.randint(0, 37, (20000,), device=DEV, generator=g)
    out = TRITON.grouped_assign(x, groups, c, offs, with_second=True)
    srt, perm = torch.sort(groups)
    o2 = TRITON.grouped_assign(x[perm], srt, c, offs, with_second=True)
    assert same(o2[:3], tuple(t[perm] for t in out[:3]))
    for p in (0, 7, 36):
        rows = (groups == p).nonzero()[:, 0]
        o1 = TRITON.grouped_assign(x[rows], groups[rows], c, offs, with_second=True)
        assert same(o1[:3], tuple(t[rows] for t in out[:3]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_sums_exact_and_split_free(dtype):
    n, k, d = 200_003, 1000, 1024
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(n, d, device=DEV, generator=g).to(dtype)
    ids = torch.randint(-1, k, (n,), device=DEV, generator=g)
    ids[: n // 3] = 1  # one big cluster
    s, cnt = TRITON.partial_sums(x, ids, k)
    rs, rc = ORACLE.partial_sums(x, ids, k)
    assert torch.equal(s, rs) and torch.equal(cnt, rc)
    perm = torch.randperm(n, device=DEV, generator=g)
    h = n // 3
    s1, c1 = TRITON.partial_sums(x[perm[:h]], ids[perm[:h]], k)
    s2, c2 = TRITON.partial_sums(x[perm[h:]], ids[perm[h:]], k)
    assert torch.equal(s1 + s2, rs) and torch.equal(c1 + c2, rc)


@pytest.mark.parametrize(
    "n,k,d,dtype",
    [
        (8192, 1024, 1024, torch.bfloat16),
        (4099, 1000, 768, torch.float16),
        (300, 16384, 1024, torch.bfloat16),
        (2000, 1024, 1000, torch.float32),
    ],
)
def test_x_sqnorm_reuse_and_warp_specialised_kernel_bit_identical(n, k, d, dtype):
    """Handing Assignment.x_sqnorm back changes no bit (plain, split, bucketed), and the
    Gluon kernel gives the tl kernel's bits, norms included."""
    x, c = clustered(n, k, d, "l2", dtype, seed=6)
    a = TRITON.assign(x, c, with_second=True)
    assert same(a, TRITON.assign(x, c, with_second=True, x_sqnorm=a.x_sqnorm))
    tl_only = K.TritonAssigner(K.KernelTuning(warp_specialized=False, patch=PATCH or None))
    b = tl_only.assign(x, c, with_second=True)
    assert same(a, b)
    assert same(b, tl_only.assign(x, c, with_second=True, x_sqnorm=b.x_sqnorm))
    offs = torch.linspace(0, k, 8, device=DEV).long()
    groups = torch.randint(
        0, 7, (n,), device=DEV, generator=torch.Generator(device=DEV).manual_seed(6)
    )
    gr = TRITON.grouped_assign(x, groups, c, offs, with_second=True)
    assert same(
        gr, TRITON.grouped_assign(x, groups, c, offs, with_second=True, x_sqnorm=a.x_sqnorm)
    )


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "dtype,k", [(torch.bfloat16, 1024), (torch.float16, 4096), (torch.bfloat16, 2048)]
)
def test_warp_specialised_kernel_same_bits_as_tl(metric, dtype, k):
    x, c = clustered(8192, k, 1024, metric, dtype, seed=7)
    if metric == "l2" and L.capability(x.device) == (9, 0):
        c16 = c.to(dtype)
        assert L.use_ws(x, c16, metric, k) == triton.__version__.startswith(L.WS_TRITON)
    ws = TRITON.assign(x, c, metric=metric, with_second=True)
    tl_only = K.TritonAssigner(K.KernelTuning(warp_specialized=False, patch=PATCH or None))
    assert same(ws, tl_only.assign(x, c, metric=metric, with_second=True))


def test_rows_do_not_depend_on_the_batch():
    """Same row, another batch (a split-K call for 895 rows, none for 20000): same bits."""
    x, c = clustered(20000, 4096, 1024, "l2", torch.bfloat16, seed=9)
    a = TRITON.assign(x, c, with_second=True)
    b = TRITON.assign(x[5:900], c, with_second=True)
    assert same(b[:3], tuple(t[5:900] for t in a[:3]))
    if F8.fp8_supported(x.device):
        fp8 = K.make_assigner("triton", fp8_shortlist=True, tuning=TUNING)
        a = fp8.assign(x, c, with_second=True)
        b = fp8.assign(x[5:900], c, with_second=True)
        assert same(b[:3], tuple(t[5:900] for t in a[:3]))


@pytest.mark.parametrize(
    "d,dtype", [(1024, torch.bfloat16), (1000, torch.float32), (77, torch.float16)]
)
def test_fp8_quantiser_equals_the_torch_reference(d, dtype):
    """Values spanning many binades, a zero row, a ragged D: same bytes and scales."""
    g = torch.Generator(device=DEV).manual_seed(5)
    x = torch.randn(3001, d, device=DEV, generator=g)
    spread = 2.0 if dtype == torch.float16 else 4.0  # stay finite (fp16 max 65504)
    x = (x * torch.exp(spread * torch.randn(3001, 1, device=DEV, generator=g))).to(dtype)
    assert bool(torch.isfinite(x).all())
    x[3] = 0
    q, sc = F8.to_fp8_rows(x)
    qr, scr = F8.to_fp8_rows(x.cpu())
    assert torch.equal(q.view(torch.uint8).cpu(), qr.view(torch.uint8))
    assert torch.equal(sc.cpu(), scr)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n,k,d", [(8192, 1024, 1024), (4099, 5000, 768), (999, 300, 1000), (64, 1, 64)]
)
def test_fp8_shortlist_within_its_bounds(metric, n, k, d):
    """Distances exact for the returned ids; an id differs from the exact nearest only
    where that one was not in the fp8 top-2 (emulated on the same quantised values)."""
    if not F8.fp8_supported(torch.device(DEV)):
        pytest.skip("no fp8 tensor cores")
    x, c = clustered(n, k, d, metric, torch.bfloat16, seed=4)
    fp8 = K.make_assigner("triton", fp8_shortlist=True, tuning=TUNING)
    assert not fp8.exact
    out = fp8.assign(x, c, metric=metric, with_second=True)
    c = c.to(torch.bfloat16).float()
    ref = ORACLE.assign(x, c, metric=metric)
    assert bool((out.ids >= 0).all() and (out.ids < k).all())
    d_chosen = chosen_dist(x, c, out.ids, metric)
    assert rel_err(out.distance, d_chosen) < REL[torch.bfloat16]
    qx, sx = F8.to_fp8_rows(x)
    qc, sc = F8.to_fp8_rows(c.to(torch.bfloat16))
    in_top2 = torch.empty(n, dtype=torch.bool, device=DEV)
    for i in range(0, n, 4096):
        ap = (qx[i : i + 4096].float() * sx[i : i + 4096, None]) @ (qc.float() * sc[:, None]).T
        s = c.pow(2).sum(1)[None] - 2 * ap if metric == "l2" else -ap
        top2 = s.topk(min(2, k), dim=1, largest=False).indices
        in_top2[i : i + 4096] = (top2 == ref.ids[i : i + 4096, None]).any(1)
    unexplained = (out.ids != ref.ids) & in_top2
    assert int(unexplained.sum()) == 0
    assert bool((out.second >= out.distance).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 64), (2, 64), (700, 96), (3000, 1024)])
def test_assign_earlier_matches_the_oracle(dtype, n, d):
    """Each row's nearest earlier row over the lower triangle (one launch, the diagonal
    tiles masked): the float64 oracle's ids except near-ties, distances to the dtype's
    rounding; copies go to the lowest id; row 0 has none."""
    g = torch.Generator(device=DEV).manual_seed(n)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=DEV, generator=g), dim=1)
    if n > 600:
        x[500:503] = x[11]
    low = x.to(dtype)
    got = K.TritonAssigner().assign_earlier(low, with_second=True)
    want = K.TorchAssigner().assign_earlier(low.float(), with_second=True)
    assert got.ids[0] == -1 and got.distance[0] == float("inf")
    if n < 2:
        return
    exact = low.double() @ low.double().T
    rows = torch.arange(1, n, device=DEV)
    chosen = exact[rows, got.ids[1:]]
    best = exact[rows, want.ids[1:]]
    assert bool((got.ids[1:] < rows).all())
    assert bool((best - chosen <= 2e-5).all())  # a different id only at a near-tie
    tol = REL[dtype] if dtype != torch.float32 else 1e-5
    assert float((got.distance[1:] - want.distance[1:]).abs().max()) <= tol
    if n > 600:
        assert got.ids[500:503].tolist() == [11, 11, 11]
        assert float((got.second[2:] - want.second[2:]).abs().max()) <= tol
    from mdf_taxonomy.kernels import earlier_kernels as EK

    for split_cols in (256, 1024, n):  # column ranges per program, merged: the same bits
        ids, dist, sec = EK.assign_earlier_triton(low, with_second=True, split_cols=split_cols)
        assert torch.equal(ids, got.ids) and torch.equal(dist, got.distance)
        assert torch.equal(sec, got.second)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_earlier_above_lists_the_oracles_candidates(dtype):
    """Every earlier column over the row's threshold, away from the threshold by more
    than the dtype's rounding, is listed, in ascending order; counts agree likewise."""
    g = torch.Generator(device=DEV).manual_seed(9)
    n, d = 5000, 1024
    x = torch.nn.functional.normalize(torch.randn(n, d, device=DEV, generator=g), dim=1)
    x[4000:4010] = x[17]
    low = x.to(dtype)
    pos = torch.arange(5, n, 7, device=DEV)
    pos = torch.cat([pos, torch.arange(4000, 4010, device=DEV)]).unique()
    thr = torch.full((len(pos),), 0.09, device=DEV)
    count, cand = K.TritonAssigner().earlier_above(low, pos, thr, 64)
    exact = low.double()[pos] @ low.double().T
    later = torch.arange(n, device=DEV)[None, :] >= pos[:, None]
    sure = (exact >= 0.09 + 1e-3) & ~later
    maybe = (exact >= 0.09 - 1e-3) & ~later
    assert bool((count >= sure.sum(1)).all()) and bool((count <= maybe.sum(1)).all())
    rows = torch.nonzero(count <= 64, as_tuple=True)[0]
    for r in rows[:: max(1, len(rows) // 50)].tolist():
        listed = cand[r, : int(count[r])]
        assert bool((listed[1:] > listed[:-1]).all()) and bool(maybe[r, listed].all())
        assert bool(torch.isin(sure[r].nonzero()[:, 0], listed).all())
    copies = torch.nonzero((pos >= 4000) & (pos < 4010), as_tuple=True)[0]
    assert bool((cand[copies] == 17).any(1).all())  # the original, for every copy


def _earlier_rows(n, d, dtype, seed):
    """Unit rows with exact ties: copies of one row inside one column chunk and across
    chunks (row 11 copied to 500..502, row 100 to 3000 and 5000 where n allows)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=DEV, generator=g), dim=1)
    for src, dst in ((11, [500, 501, 502]), (100, [3000, 5000])):
        dst = [i for i in dst if i < n]
        if dst:
            x[dst] = x[src].clone()
    return x.to(dtype)


def _ws_serves(x) -> bool:
    return L.use_ws(x, x, "cosine", 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "n,d", [(2, 64), (3, 64), (127, 64), (129, 96), (700, 1024), (3000, 1024), (5001, 1024)]
)
def test_warp_specialised_earlier_same_bits_as_tl(dtype, n, d):
    """The Gluon lower-triangle search gives the tl kernel's bits (ids, distances, runner-up),
    whole row blocks or split into column chunks of any width; copies go to the lowest id."""
    from mdf_taxonomy.kernels import earlier_kernels as EK

    low = _earlier_rows(n, d, dtype, seed=n + d)
    tl_only = K.KernelTuning(warp_specialized=False)
    want = EK.assign_earlier_triton(low, with_second=True, tuning=tl_only)
    if not _ws_serves(low):
        pytest.skip("the Gluon kernel does not serve this device / Triton")
    for split_cols in (None, 256, 1024, n):
        got = EK.assign_earlier_triton(low, with_second=True, split_cols=split_cols)
        assert same(got, want), split_cols
    if n > 600:
        assert want[0][500:503].tolist() == [11, 11, 11]
    if n > 5000:
        assert want[0][[3000, 5000]].tolist() == [100, 100]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [8192, 12345, 16384])
def test_warp_specialised_earlier_nodes_of_8k_and_more(dtype, n):
    """Nodes of 8k rows and more (the persistent grid's longest-first plan over split row
    blocks, one merge launch): the tl kernel's bits and the float64 oracle's ids except at
    near-ties."""
    low = _earlier_rows(n, 1024, dtype, seed=n)
    if not _ws_serves(low):
        pytest.skip("the Gluon kernel does not serve this device / Triton")
    got = TRITON.assign_earlier(low, with_second=True)
    tl_only = K.TritonAssigner(K.KernelTuning(warp_specialized=False))
    assert same(got, tl_only.assign_earlier(low, with_second=True))
    rows = torch.arange(1, n, device=DEV)[::7]
    exact = low[rows].double() @ low.double().T
    exact.masked_fill_(torch.arange(n, device=DEV)[None, :] >= rows[:, None], -2.0)
    best = exact.max(1).values
    assert bool((best - exact[torch.arange(len(rows)), got.ids[rows]] <= 2e-5).all())
    assert float((got.distance[rows] - (1 - best)).abs().max()) <= REL[dtype]
    assert got.ids[500:503].tolist() == [11, 11, 11] and got.ids[[3000, 5000]].tolist() == [
        100,
        100,
    ]
