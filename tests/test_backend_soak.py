"""Soak: several processes flush into one FitBackend at once, for a bounded time.

The sums must come out exact (int64, order-free), every retried flush must be ignored,
and the bucket actors' memory must stay flat (a pass keeps only its sums and its
flush ids).
"""

from __future__ import annotations

import time

import numpy as np

from mdf_taxonomy.backend import FitBackend

N_NODES, DIM, SECONDS = 97, 8, 6.0


def _flusher(backend: FitBackend, worker: int, pass_id: str, seconds: float) -> dict:
    """Flush random partials until the time is up; resend every 5th flush (a retry)."""
    rng = np.random.default_rng(worker)
    sums = np.zeros((N_NODES, DIM), np.int64)
    counts = np.zeros(N_NODES, np.int64)
    flushes = rows = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        nodes = np.unique(rng.integers(0, N_NODES, rng.integers(1, 40)))
        part = rng.integers(-(2**40), 2**40, (len(nodes), DIM), dtype=np.int64)
        cnt = rng.integers(1, 1000, len(nodes), dtype=np.int64)
        flush_id = f"w{worker}-{flushes}"
        for _ in range(2 if flushes % 5 == 0 else 1):
            backend.add_partials(pass_id, flush_id, nodes, part, cnt, {"rows": int(cnt.sum())}, {})
        sums[nodes] += part
        counts[nodes] += cnt
        rows += int(cnt.sum())
        flushes += 1
    return {"sums": sums, "counts": counts, "rows": rows, "flushes": flushes}


def _peak_rss(self) -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bucket_rss(backend: FitBackend, ray) -> int:
    """Peak resident memory of the bucket actors, summed (read inside each actor)."""
    return sum(ray.get([b.__ray_call__.remote(_peak_rss) for b in backend._buckets()]))


def test_concurrent_flushes_are_exact_and_memory_stays_flat(ray_session):
    ray = ray_session
    backend = FitBackend(num_buckets=3, name_prefix="soak_fit")
    try:
        backend.start_pass("soak-warmup", N_NODES, DIM)
        ray.get(ray.remote(_flusher).remote(backend, 99, "soak-warmup", 1.0))
        backend.start_pass("soak", N_NODES, DIM)
        before = _bucket_rss(backend, ray)
        task = ray.remote(num_cpus=0.5)(_flusher)
        sent = ray.get([task.remote(backend, w, "soak", SECONDS) for w in range(3)])
        after = _bucket_rss(backend, ray)
        got = backend.collect(N_NODES, DIM)
    finally:
        backend.shutdown()
    assert sum(s["flushes"] for s in sent) > 30, "the soak barely ran"
    assert np.array_equal(got["sums"], sum(s["sums"] for s in sent))
    assert np.array_equal(got["counts"], sum(s["counts"] for s in sent))
    assert got["totals"]["rows"] == sum(s["rows"] for s in sent)
    assert got["totals"]["duplicate_flushes"] > 0
    assert got["pass_ids"] == ["soak"]
    assert after - before < 64 * 2**20, f"bucket memory grew by {(after - before) / 2**20:.0f} MiB"
