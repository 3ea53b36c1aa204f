"""Greedy k-means++ init: pruning skips only rows that cannot improve, so it picks what a
plain greedy k-means++ with the same draws picks, at the quality of the usual algorithms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import blobs

from mdf_taxonomy import kernels
from mdf_taxonomy.model.fitting import kmeans_plus_plus


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _potential(x: torch.Tensor, centres: torch.Tensor) -> float:
    """Sum over rows of the squared L2 distance to the nearest centre (fp64)."""
    return float(kernels.assign(x, centres.float()).distance.double().sum())


def _reference(x: torch.Tensor, k: int, seed: int, metric: str = "l2") -> torch.Tensor:
    """Plain greedy k-means++, exact fp64 distances to every row, the same draws."""
    gen = torch.Generator().manual_seed(seed)
    n, trials = len(x), 2 + int(np.log(k))
    xd = x.double()

    def dist(c: int) -> torch.Tensor:
        if metric == "cosine":
            return (1 - xd @ xd[c]).clamp_min(0)
        return ((xd - xd[c]) ** 2).sum(1)

    chosen = [int(torch.randint(n, (1,), generator=gen))]
    best = dist(chosen[0])
    for _ in range(1, k):
        cum = torch.cumsum(best, 0)
        total = float(cum[-1])
        if total <= 0:
            free = [r for r in range(n) if r not in chosen]
            chosen += free[: k - len(chosen)]
            break
        u = torch.rand(trials, generator=gen, dtype=torch.float64) * total
        last = torch.searchsorted(cum, cum[-1:])
        cands = torch.minimum(torch.searchsorted(cum, u, right=True), last).tolist()
        options = [torch.minimum(best, dist(c)) for c in cands]
        gains = torch.stack([(best - o).sum() for o in options])
        pick = int(torch.argmax(gains))
        chosen.append(cands[pick])
        best = options[pick]
    return x[chosen].float()


def _previous(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The former implementation (multinomial draws, one full assign per candidate)."""
    gen = torch.Generator().manual_seed(seed)
    n, trials = len(x), 2 + int(np.log(k))

    def dist(c: int) -> torch.Tensor:
        return kernels.assign(x, x[c][None]).distance.double().clamp_min(0)

    chosen = [int(torch.randint(n, (1,), generator=gen))]
    best = dist(chosen[0])
    for _ in range(1, k):
        total = float(best.sum())
        cands = torch.multinomial(best / total, trials, replacement=True, generator=gen)
        options = [torch.minimum(best, dist(c)) for c in cands.tolist()]
        pick = int(torch.argmin(torch.stack([o.sum() for o in options])))
        chosen.append(int(cands[pick]))
        best = options[pick]
    return x[chosen].float()


def _datasets() -> list[tuple[str, torch.Tensor, int, str]]:
    x16, _ = blobs(3000, 16, 24, seed=1)
    x64, _ = blobs(2000, 64, 40, seed=2, spread=2.0)  # overlapping blobs: little to prune
    dup = np.repeat(blobs(300, 8, 10, seed=3)[0], 4, axis=0)  # every row four times
    far = blobs(2000, 32, 16, seed=4)[0] + 1000.0  # far from the origin
    flat = np.random.default_rng(5).normal(size=(1500, 24)).astype(np.float32)
    return [
        ("blobs16", torch.from_numpy(x16), 60, "l2"),
        ("overlap64", torch.from_numpy(x64), 80, "l2"),
        ("duplicates", torch.from_numpy(dup), 50, "l2"),
        ("offset", torch.from_numpy(far), 40, "l2"),
        ("gaussian", torch.from_numpy(flat), 30, "l2"),
        ("cosine", torch.from_numpy(_unit(x16)), 60, "cosine"),
        ("cosine64", torch.from_numpy(_unit(x64)), 80, "cosine"),
    ]


@pytest.mark.parametrize(
    "name, x, k, metric", _datasets(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_pruning_picks_what_the_plain_greedy_picks(name, x, k, metric):
    for seed in (0, 7):
        pruned = kmeans_plus_plus(x, k, seed, metric)
        plain = kmeans_plus_plus(x, k, seed, metric, prune=False)
        assert torch.equal(pruned, plain), name
        assert torch.equal(pruned, _reference(x, k, seed, metric)), name


def test_same_inputs_give_the_same_bits():
    x = torch.from_numpy(blobs(4000, 32, 20, seed=6)[0])
    a = kmeans_plus_plus(x, 50, seed=3)
    assert torch.equal(a, kmeans_plus_plus(x, 50, seed=3))
    assert not torch.equal(a, kmeans_plus_plus(x, 50, seed=4))
    assert a.dtype == torch.float32 and a.shape == (50, 32)


def test_potential_matches_the_former_init_and_scikit_learn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x_np, _ = blobs(20_000, 32, 64, seed=8)
    x = torch.from_numpy(x_np)
    new, old, skl = [], [], []
    for seed in range(5):
        new.append(_potential(x, kmeans_plus_plus(x, 64, seed)))
        old.append(_potential(x, _previous(x, 64, seed)))
        c, _ = sklearn_cluster.kmeans_plusplus(x_np, 64, random_state=seed)
        skl.append(_potential(x, torch.from_numpy(c)))
    new_m, old_m, skl_m = np.mean(new), np.mean(old), np.mean(skl)
    print(f"\npotential, mean of 5 seeds: new {new_m:.4g} former {old_m:.4g} sklearn {skl_m:.4g}")
    assert abs(new_m / old_m - 1) < 0.05 and abs(new_m / skl_m - 1) < 0.05


def test_one_centre_and_every_row():
    x = torch.from_numpy(blobs(200, 8, 5, seed=9)[0])
    one = kmeans_plus_plus(x, 1, seed=1)
    assert one.shape == (1, 8) and bool((x == one).all(1).any())
    every = kmeans_plus_plus(x, 200, seed=1)
    order = lambda t: t[np.lexsort(t.numpy().T[::-1])]  # noqa: E731
    assert torch.equal(order(every), order(x))  # each row exactly once
    with pytest.raises(ValueError):
        kmeans_plus_plus(x, 201, seed=1)


def test_duplicate_rows_fall_back_to_unchosen_rows_in_order():
    pts = np.array([[0.0, 0.0], [5.0, 1.0], [-3.0, 4.0]], np.float32)
    x = torch.from_numpy(pts[np.arange(30) % 3])
    out = kmeans_plus_plus(x, 6, seed=2)
    first = {tuple(r) for r in out[:3].tolist()}
    assert first == {tuple(r) for r in pts.tolist()}  # the potential is 0 after three
    assert _potential(x, out[:3]) == 0.0
    # then the lowest unchosen rows: three of rows 0, 1, 2, 3, ... (all duplicates)
    assert all(tuple(r) in first for r in out[3:].tolist())


def test_two_distinct_points_two_centres():
    x = torch.tensor([[1.0, 2.0]] * 7 + [[1.0, 2.5]] * 5)
    for seed in range(4):
        out = kmeans_plus_plus(x, 2, seed)
        assert {tuple(r) for r in out.tolist()} == {(1.0, 2.0), (1.0, 2.5)}


def test_overflowing_rows_are_refused():
    x = torch.tensor([[1e30, 0.0], [-1e30, 0.0], [0.0, 1e30]])
    with pytest.raises(OverflowError, match="MAX_ABS_VALUE"):
        kmeans_plus_plus(x, 3, seed=0)
