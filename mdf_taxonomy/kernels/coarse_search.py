"""Coarse-to-fine centroid search for levels with huge branching factors: opt-in, NOT exact.

Why: exact assignment costs 2*K*D flops per row (K = 2**20, D = 1024: 2 GFLOP a row). The
index is a small k-means over a block of centroids (about sqrt(K) cells) on a seeded
subsample, on the exact assigner's kernels with order-free sums, so the same centroids give
the same index bits on a device. A row is ranked against the cells (a dense rows x cells
product: the coarse level is small) and searched exactly among the members of its
``n_probe`` nearest cells. The centroids sorted by cell are a grouped level
whose parents are the cells, so the fine step is the exact kernels' ``grouped_assign``
(Triton on CUDA, torch elsewhere), one call over the rows repeated ``n_probe`` times.

What it returns: the exact nearest among the probed cells' members (lowest id on ties), its
distance as the exact grouped kernels compute it (torch: the same bits as a flat search;
Triton: its launch config follows the widest cell, so an ulp may differ), and as ``second``
the best other distance found, an upper bound of the true second best. A row whose nearest
centroid lies in no probed cell gets another one: that is the recall loss.

Determinism: the probed cells are a function of the row and the index alone. They are
ranked by BLAS in fp32 (fp64 where fp32 products are not IEEE) under the torch reference's
rigorous rounding bound; a row whose n_probe-th and next cell lie within it is ranked again
in fp64, then row by row (``rowwise``), as the reference settles its ids. The fine step is
the exact kernels'. So no result depends on the batch, and a fit is deterministic.

Memory: an index holds one cell-sorted copy of its centroids. Indexes are cached per
centroid tensor (weakly, and rebuilt when the tensor changes in place), so labelling builds
one per level and a fit pass, whose centroids are new, builds its own.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch

from . import rowwise
from .assigners import Assigner, Assignment, exact_assigner
from .fixed_point import from_fixed_point
from .metrics import check_metric
from .reference import _TINY32, _TINY64, _U32, _U64, _fp32_prerank_allowed, _gamma, _score_bound

CENTROID_SEARCHES: tuple[str, ...] = ("exact", "coarse")
#: Children of a parent from which the coarse search is used (below: the exact kernels).
DEFAULT_MIN_CENTROIDS: int = 65536
#: Cells searched per row.
DEFAULT_PROBE: int = 8
#: Training points per cell of the index's k-means (FAISS trains on up to 256).
TRAIN_PER_CELL: int = 32
INDEX_ITERS: int = 8
INDEX_SEED: int = 0
#: Coarse scores per block (CPU fp32: 32 MiB) and repeated rows per fine call (bytes).
_SCORE_BLOCK = {"cuda": 1 << 26, "cpu": 1 << 23}
_FINE_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}
_INF = float("inf")


def default_cells(k: int) -> int:
    """Cells of the index over k centroids: about sqrt(k)."""
    return max(1, min(k, round(math.sqrt(k))))


class CoarseIndex(NamedTuple):
    """The cells over one block of centroids (ids local to the block)."""

    coarse: torch.Tensor  # (m, D) float32 cell centres
    members: torch.Tensor  # (K,) int64: the centroid at each cell-sorted position
    centroids: torch.Tensor  # (K, D) the centroids in cell order (the input's dtype)
    offsets: torch.Tensor  # (m + 1,) int64: cell c holds positions offsets[c]:offsets[c+1]


def _means(exact: Assigner, x, ids, previous, metric):
    """Each cell's mean (an empty cell keeps its centre), summed in an order-free way: fp64
    ``index_add_`` on CPU (sequential there), the exact fixed-point partial sums elsewhere
    (CUDA's index_add_ is atomic)."""
    m = previous.shape[0]
    counts = torch.bincount(ids, minlength=m)
    if x.device.type == "cpu":
        sums = torch.zeros((m, x.shape[1]), dtype=torch.float64).index_add_(0, ids, x.double())
    else:
        sums = from_fixed_point(exact.partial_sums(x, ids, m)[0])
    mean = sums / counts.clamp_min(1)[:, None].to(torch.float64)
    new = torch.where((counts > 0)[:, None], mean, previous.to(torch.float64))
    if metric == "cosine":
        new = new / torch.linalg.vector_norm(new, dim=1, keepdim=True).clamp_min(1e-30)
    return new.to(torch.float32)


def build_index(
    centroids: torch.Tensor,
    exact: Assigner,
    *,
    metric: str = "l2",
    n_cells: int | None = None,
    iters: int = INDEX_ITERS,
    seed: int = INDEX_SEED,
) -> CoarseIndex:
    """k-means over the centroids: ``iters`` Lloyd steps on ``TRAIN_PER_CELL * n_cells`` of
    them (a seeded draw; the first ``n_cells`` seed the cells), then every centroid to its
    nearest cell; cells left empty are dropped. Nearest cells by ``exact.assign`` (Triton on
    CUDA), sums order-free (``_means``): the same centroids and kernels, the same index."""
    check_metric(metric)
    k, _ = centroids.shape
    dev = centroids.device
    m = min(k, n_cells or default_cells(k))
    c32 = centroids.to(torch.float32)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)).to(dev)
    train = c32[order[: min(k, TRAIN_PER_CELL * m)]]
    coarse = train[:m].clone()
    for _ in range(iters):
        coarse = _means(
            exact, train, exact.assign(train, coarse, metric=metric).ids, coarse, metric
        )
    cell = exact.assign(c32, coarse, metric=metric).ids.clamp_min(0)
    counts = torch.bincount(cell, minlength=m)
    keep = counts > 0
    if not bool(keep.all()):
        cell = (torch.cumsum(keep, 0) - 1)[cell]
        coarse, counts = coarse[keep], counts[keep]
    members = torch.argsort(cell, stable=True)  # by cell, then by id: ties keep the lowest
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts, 0)
    return CoarseIndex(coarse.contiguous(), members, centroids[members].contiguous(), offsets)


def _fp32_scores_sound(x: torch.Tensor) -> bool:
    """Whether BLAS fp32 products are IEEE here (what the fp32 rounding bound assumes)."""
    if x.device.type == "cuda":
        mm = torch.backends.cuda.matmul
        return (
            x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and torch.get_float32_matmul_precision() == "highest"
            and not mm.allow_tf32
            and getattr(mm, "fp32_precision", "none") in ("none", "ieee")
        )
    return _fp32_prerank_allowed(x, x)


def _lowest(xb, q64, qn64, p, metric, dtype):
    """BLAS scores of the rows against the cells in ``dtype``: the p lowest cells and
    whether that set is certain (its margin to the next cell beats the rounding bound)."""
    d = xb.shape[1]
    q, qn = q64.to(dtype), qn64.to(dtype)
    xd = xb.to(dtype)
    s = torch.addmm(qn[None], xd, q.T, alpha=-2.0) if metric == "l2" else torch.mm(xd, q.T).neg_()
    top = torch.topk(s, p + 1, dim=1, largest=False, sorted=True)
    cn_max = float(qn64.max())
    x_norm = torch.linalg.vector_norm(xb.to(torch.float64), dim=1) * (1.0 + _gamma(d + 2, _U64))
    unit, tiny = (_U32, _TINY32) if dtype == torch.float32 else (_U64, _TINY64)
    bound = _score_bound(x_norm, math.sqrt(cn_max) * (1 + 2**-40), cn_max, d, metric, unit, tiny)
    gap = top.values[:, p].to(torch.float64) - top.values[:, p - 1].to(torch.float64)
    return top.indices[:, :p], gap > 2.0 * bound  # NaN: not certain


def _lowest_rowwise(xs, q64, p, metric):
    """The p lowest cells by row-wise fp64 values (lowest cell id on ties)."""
    m, d = q64.shape
    out = torch.empty((xs.shape[0], p), dtype=torch.int64, device=xs.device)
    step = max(1, rowwise.ROWWISE_BLOCK_ELEMS * 32 // (m * d))
    for a in range(0, xs.shape[0], step):
        xb = xs[a : a + step]
        v = rowwise.pair_values(xb.repeat_interleave(m, 0), q64.repeat(xb.shape[0], 1), metric)
        out[a : a + xb.shape[0]] = torch.sort(v.view(-1, m), dim=1, stable=True).indices[:, :p]
    return out


def probe_cells(x: torch.Tensor, coarse: torch.Tensor, p: int, metric: str) -> torch.Tensor:
    """(N, p) the p nearest cells of each row, a set that depends on the row alone."""
    n, m = x.shape[0], coarse.shape[0]
    if p >= m:
        return torch.arange(m, device=x.device).expand(n, m)
    q64 = coarse.to(device=x.device, dtype=torch.float64)
    qn64 = (q64 * q64).sum(1)
    tiers = [torch.float32] if _fp32_scores_sound(x) else []
    out = torch.empty((n, p), dtype=torch.int64, device=x.device)
    step = max(1, _SCORE_BLOCK.get(x.device.type, _SCORE_BLOCK["cpu"]) // m)
    for r0 in range(0, n, step):
        xb = x[r0 : r0 + step]
        todo = torch.arange(xb.shape[0], device=x.device)
        for dtype in [*tiers, torch.float64]:
            cells, sure = _lowest(xb[todo], q64, qn64, p, metric, dtype)
            out[r0 + todo] = cells
            todo = todo[~sure]
            if not todo.numel():
                break
        if todo.numel():
            out[r0 + todo] = _lowest_rowwise(xb[todo], q64, p, metric)
    return out


def search(
    x: torch.Tensor,
    index: CoarseIndex,
    exact: Assigner,
    n_probe: int,
    *,
    metric: str = "l2",
    with_second: bool = False,
    x_sqnorm: torch.Tensor | None = None,
) -> Assignment:
    """Rows against the index: probe the n_probe nearest cells, search their members with
    the exact grouped kernels, keep the lowest (distance, id). Ids local to the block."""
    n, d = x.shape
    dev = x.device
    p = min(n_probe, index.coarse.shape[0])
    cells = probe_cells(x, index.coarse, p, metric)
    ids = torch.full((n,), -1, dtype=torch.int64, device=dev)
    dist = torch.full((n,), _INF, dtype=torch.float32, device=dev)
    sec = torch.full((n,), _INF, dtype=torch.float32, device=dev) if with_second else None
    xn = None
    budget = _FINE_BYTES.get(dev.type, _FINE_BYTES["cpu"])
    step = max(1, budget // (p * d * x.element_size()))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        xg = None if x_sqnorm is None else x_sqnorm[r0:r1].repeat_interleave(p)
        a = exact.grouped_assign(
            x[r0:r1].repeat_interleave(p, dim=0),
            cells[r0:r1].reshape(-1),
            index.centroids,
            index.offsets,
            metric=metric,
            with_second=with_second,
            x_sqnorm=xg,
        )
        local = a.ids.view(-1, p)
        gid = torch.where(local >= 0, index.members[local.clamp_min(0)], -1)
        dd = a.distance.view(-1, p)
        key = torch.where(gid >= 0, gid, torch.iinfo(torch.int64).max)
        best_j = torch.zeros(r1 - r0, dtype=torch.int64, device=dev)
        for j in range(1, p):  # the lowest (distance, id); p is small
            bd = dd.gather(1, best_j[:, None])[:, 0]
            bk = key.gather(1, best_j[:, None])[:, 0]
            take = (dd[:, j] < bd) | ((dd[:, j] == bd) & (key[:, j] < bk))
            best_j = torch.where(take, j, best_j)
        ids[r0:r1] = gid.gather(1, best_j[:, None])[:, 0]
        dist[r0:r1] = dd.gather(1, best_j[:, None])[:, 0]
        if with_second:
            others = dd.scatter(1, best_j[:, None], _INF).min(dim=1).values
            own = a.second.view(-1, p).gather(1, best_j[:, None])[:, 0]
            sec[r0:r1] = torch.maximum(torch.minimum(own, others), dist[r0:r1])
        if a.x_sqnorm is not None:
            xn = torch.empty((n,), dtype=torch.float32, device=dev) if xn is None else xn
            xn[r0:r1] = a.x_sqnorm.view(-1, p)[:, 0]
    return Assignment(ids, dist, sec, xn)


# (id(tensor), what...) -> (weakref to the tensor, its version, value)
_CACHE: dict = {}
CACHE_SIZE = 64  # indexes of a level's big parents; dead tensors' entries go first


def _cached(t: torch.Tensor, what: tuple, build):
    key = (id(t), *what)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    for k in [k for k, v in _CACHE.items() if v[0]() is None or k == key]:
        del _CACHE[k]  # free dead indexes before building a new one
    value = build()
    while len(_CACHE) >= CACHE_SIZE:
        del _CACHE[next(iter(_CACHE))]
    _CACHE[key] = (weakref.ref(t), t._version, value)
    return value


def clear_cache() -> None:
    """Forget every index (tests; freeing memory)."""
    _CACHE.clear()


def _sizes(child_offsets: torch.Tensor) -> list[int]:
    return _cached(child_offsets, ("offsets",), lambda: child_offsets.to(torch.int64).tolist())


class CoarseSearchAssigner(Assigner):
    """Coarse-to-fine search (see the module docstring) on the kernels of ``exact`` for
    blocks of at least ``min_centroids`` centroids; smaller blocks, partial sums and
    ``assign_earlier`` go to ``exact`` unchanged. Not exact.

    ``exact``: an exact assigner or a kernel backend name; ``n_probe``: cells searched
    per row; ``n_cells``: cells per index (None: about sqrt(K)). In ``grouped_assign``
    each big parent has its own index and its rows are searched parent by parent (huge
    levels have one or a few parents); the other rows take one exact grouped call.
    """

    name = "coarse"
    exact = False

    def __init__(
        self,
        exact: Assigner | str = "auto",
        *,
        n_probe: int = DEFAULT_PROBE,
        min_centroids: int = DEFAULT_MIN_CENTROIDS,
        n_cells: int | None = None,
    ):
        for what, v, lo in (("n_probe", n_probe, 1), ("min_centroids", min_centroids, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"CoarseSearchAssigner: {what} must be an integer >= {lo}")
        if n_cells is not None and (not isinstance(n_cells, int) or n_cells < 1):
            raise ValueError("CoarseSearchAssigner: n_cells must be None or an integer >= 1")
        self.exact_kernels = exact_assigner(exact) if isinstance(exact, str) else exact
        self.n_probe = n_probe
        self.min_centroids = min_centroids
        self.n_cells = n_cells

    def index(
        self, centroids: torch.Tensor, lo: int = 0, hi: int | None = None, metric: str = "l2"
    ) -> CoarseIndex:
        """The (cached) index over ``centroids[lo:hi]``."""
        hi = centroids.shape[0] if hi is None else hi
        what = ("index", lo, hi, metric, self.n_cells, repr(self.exact_kernels))
        return _cached(
            centroids,
            what,
            lambda: build_index(
                centroids[lo:hi], self.exact_kernels, metric=metric, n_cells=self.n_cells
            ),
        )

    def assign(self, x, centroids, *, metric="l2", with_second=False, x_sqnorm=None):
        if centroids.shape[0] < self.min_centroids:
            return self.exact_kernels.assign(
                x, centroids, metric=metric, with_second=with_second, x_sqnorm=x_sqnorm
            )
        return self._search(x, centroids, 0, centroids.shape[0], metric, with_second, x_sqnorm)

    def _search(self, x, centroids, lo, hi, metric, with_second, x_sqnorm):
        index = self.index(centroids, lo, hi, metric)
        a = search(
            x,
            index,
            self.exact_kernels,
            self.n_probe,
            metric=metric,
            with_second=with_second,
            x_sqnorm=x_sqnorm,
        )
        return a._replace(ids=torch.where(a.ids >= 0, a.ids + lo, a.ids)) if lo else a

    def grouped_assign(
        self, x, groups, centroids, child_offsets, *, metric="l2", with_second=False, x_sqnorm=None
    ):
        offs = _sizes(child_offsets)
        big = [p for p in range(len(offs) - 1) if offs[p + 1] - offs[p] >= self.min_centroids]
        exact = self.exact_kernels
        if not big:
            return exact.grouped_assign(
                x, groups, centroids, child_offsets, metric=metric, with_second=with_second,
                x_sqnorm=x_sqnorm,
            )  # fmt: skip
        n = x.shape[0]
        if len(offs) == 2:  # one parent: the whole batch is its rows
            return self._search(x, centroids, offs[0], offs[1], metric, with_second, x_sqnorm)
        groups = groups.to(device=x.device, dtype=torch.int64)
        if groups.shape != (n,):
            raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
        if n and (int(groups.min()) < 0 or int(groups.max()) >= len(offs) - 1):
            raise ValueError(f"group ids must lie in [0, {len(offs) - 1}), got out-of-range ids")
        ids = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        dist = torch.full((n,), _INF, dtype=torch.float32, device=x.device)
        sec = torch.full((n,), _INF, dtype=torch.float32, device=x.device) if with_second else None
        is_big = torch.zeros(len(offs) - 1, dtype=torch.bool, device=x.device)
        is_big[big] = True
        parts = [((~is_big[groups]).nonzero()[:, 0], None)]
        parts += [((groups == p).nonzero()[:, 0], p) for p in big]
        for rows, p in parts:
            if not rows.numel():
                continue
            xg = None if x_sqnorm is None else x_sqnorm[rows]
            if p is None:
                a = exact.grouped_assign(
                    x[rows], groups[rows], centroids, child_offsets, metric=metric,
                    with_second=with_second, x_sqnorm=xg,
                )  # fmt: skip
            else:
                a = self._search(x[rows], centroids, offs[p], offs[p + 1], metric, with_second, xg)
            ids[rows], dist[rows] = a.ids, a.distance
            if with_second:
                sec[rows] = a.second
        return Assignment(ids, dist, sec, x_sqnorm)

    def partial_sums(self, x, ids, n_clusters):
        return self.exact_kernels.partial_sums(x, ids, n_clusters)

    def assign_earlier(self, x, *, with_second=False):
        return self.exact_kernels.assign_earlier(x, with_second=with_second)

    def __repr__(self) -> str:
        return (
            f"CoarseSearchAssigner({self.exact_kernels!r}, n_probe={self.n_probe}, "
            f"min_centroids={self.min_centroids}, n_cells={self.n_cells})"
        )


def with_centroid_search(
    assigner: Assigner,
    centroid_search: str = "exact",
    min_centroids: int = DEFAULT_MIN_CENTROIDS,
    n_probe: int = DEFAULT_PROBE,
) -> Assigner:
    """The assigner a tree's ``centroid_search`` asks for, on the kernels of ``assigner``:
    itself for 'exact' (or when it is already a coarse search), else a coarse search."""
    if centroid_search not in CENTROID_SEARCHES:
        raise ValueError(
            f"centroid_search must be one of {CENTROID_SEARCHES}, got {centroid_search!r}"
        )
    if centroid_search == "exact" or isinstance(assigner, CoarseSearchAssigner):
        return assigner
    return CoarseSearchAssigner(assigner, n_probe=n_probe, min_centroids=min_centroids)
