"""Bad embeddings get a counted reason; good ones are stacked as float32."""

from __future__ import annotations

import numpy as np

from mdf_taxonomy.operators import parse_embeddings


def test_each_kind_of_bad_record_is_named():
    good = np.arange(4, dtype=np.float32)
    records = [
        {"embedding": good},
        {"embedding": None},
        {"other": 1},
        {"embedding": [1.0, float("nan"), 0.0, 1.0]},
        {"embedding": [1.0, 2.0, 3.0]},
        {"embedding": "not a vector"},
        {"embedding": [1, 2, 3, 4]},
    ]
    parsed = parse_embeddings(records, "embedding", 4)
    assert parsed.valid.tolist() == [0, 6]
    assert parsed.x.dtype == np.float32 and parsed.x.shape == (2, 4)
    assert set(parsed.errors) == {1, 2, 3, 4, 5}
    assert parsed.errors[4].startswith("wrong_length")
    assert "3 values, expected 4" in parsed.errors[4]
    assert parsed.errors[3].startswith("non_finite")
    assert parsed.errors[1].startswith("missing_embedding")
    assert parsed.reasons() == {
        "missing_embedding": 2,
        "non_finite": 1,
        "wrong_length": 1,
        "bad_embedding": 1,
    }


def test_flush_id_is_a_function_of_the_batch():
    recs = [{"embedding": np.ones(3, np.float32) * i} for i in range(5)]
    a = parse_embeddings(recs, "embedding", 3)
    b = parse_embeddings([dict(r) for r in recs], "embedding", 3)
    assert a.flush_id("p1") == b.flush_id("p1") != a.flush_id("p2")
    c = parse_embeddings(recs[:4], "embedding", 3)
    assert c.flush_id("p1") != a.flush_id("p1")
