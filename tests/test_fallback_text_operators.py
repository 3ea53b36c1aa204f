"""The fallback's own text_length_filter and text_exact_deduplicator (MDF's semantics).

Unit tests of both operators, the same decisions as MDF's operators on records that
probe the edge cases (when MDF is beside the clone), and
configs/add_to_existing_pipeline.yaml end to end under the fallback.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, SAMPLE
from test_real_mdf import VENDOR, labelled, rewrite

from mdf_taxonomy import cli
from rust_free_fallback.framework import DedupBackend, OperatorConfig, OperatorRegistry
from rust_free_fallback.operators import TextExactDeduplicator, TextLengthFilter

# -- registration and signatures --------------------------------------------------------


def test_registered_under_mdf_keys_on_framework_import():
    code = (
        "import sys; from rust_free_fallback.framework import OperatorRegistry as R\n"
        "print(R.get('TextLengthFilter').__name__, R.get('TextExactDeduplicator').__name__)\n"
        "print('mdf_taxonomy' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TextLengthFilter", "TextExactDeduplicator", "False"]
    for snake in ("text_length_filter", "text_exact_deduplicator"):
        assert OperatorRegistry.get(OperatorConfig(name=snake).get_class_name())


def test_constructor_parameters_and_defaults_are_mdfs():
    def sig(cls: type) -> dict[str, object]:
        return {n: p.default for n, p in inspect.signature(cls).parameters.items()}

    assert sig(TextLengthFilter) == {
        "min_length": 0,
        "max_length": None,
        "text_field": "text",
        "text_length_field": "text_length",
    }
    assert sig(TextExactDeduplicator) == {
        "text_field": "text",
        "hash_algorithm": "auto",
        "normalize_whitespace": True,
        "lowercase": True,
        "include_url": False,
        "url_field": "url",
    }


# -- TextLengthFilter -------------------------------------------------------------------


def _kept(op: TextLengthFilter, records: list[dict]) -> list[int]:
    return [i for i, r in enumerate(op.process_batch(records)) if r is not None]


def test_length_bounds_are_inclusive():
    records = [{"text": "x" * n} for n in range(7)]
    assert _kept(TextLengthFilter(min_length=2, max_length=4), records) == [2, 3, 4]
    assert _kept(TextLengthFilter(min_length=4), records) == [4, 5, 6]  # max_length None
    assert _kept(TextLengthFilter(), records) == list(range(7))
    assert _kept(TextLengthFilter(min_length=5, max_length=4), records) == []


def test_missing_or_non_text_counts_as_length_zero():
    records = [{}, {"text": None}, {"text": 12345}, {"text": ""}, {"text": b"abcd"}, {"text": "ab"}]
    op = TextLengthFilter(min_length=1)
    assert _kept(op, records) == [4, 5]
    assert _kept(TextLengthFilter(max_length=0), records) == [0, 1, 2, 3]
    stats = op.get_stats()  # the rejections are counted
    assert (stats["input_records"], stats["output_records"]) == (6, 2)


def test_precomputed_length_field_wins_over_the_text():
    op = TextLengthFilter(min_length=3, max_length=10, text_field="body", text_length_field="n")
    records = [
        {"body": "a", "n": 5},  # the field is trusted
        {"body": "a" * 5, "n": 1},
        {"body": "a" * 5, "n": None},  # not a number: measure the text
        {"body": "a" * 5, "n": "5"},
        {"n": 3.9},  # truncated to 3, as MDF does
        {"body": "a" * 5, "n": float("nan")},  # MDF crashes here; we reject
        {"body": "a" * 5, "n": float("inf")},
        {"body": "a", "n": np.int64(5)},  # numpy numbers too (MDF would measure the text)
    ]
    assert _kept(op, records) == [0, 2, 3, 4, 7]
    assert _kept(TextLengthFilter(min_length=4, text_field="body"), [{"body": "abcd"}]) == [0]


def test_rejected_records_carry_the_filter_reason():
    res = TextLengthFilter(min_length=2).process_batch_with_rejected([{"text": "ab"}, {"id": 1}])
    assert res.passed == [{"text": "ab"}]
    assert res.rejected[0]["_rejection_details"]["operator"] == "TextLengthFilter"


# -- TextExactDeduplicator --------------------------------------------------------------


def test_keys_normalise_whitespace_and_case_by_default():
    op = TextExactDeduplicator()
    keys = op.get_dedup_keys_batch(
        [{"text": "Hello   World\n"}, {"text": " hello world"}, {"text": "hello  worlds"}]
    )
    assert keys[0] == keys[1] == hashlib.md5(b"hello world").hexdigest()
    assert keys[2] != keys[0]
    strict = TextExactDeduplicator(normalize_whitespace=False, lowercase=False)
    a, b, c = strict.get_dedup_keys_batch([{"text": "A  b"}, {"text": "a  b"}, {"text": "A b"}])
    assert len({a, b, c}) == 3 and a == hashlib.md5(b"A  b").hexdigest()
    only_case = TextExactDeduplicator(normalize_whitespace=False)
    a, b = only_case.get_dedup_keys_batch([{"text": "A  b"}, {"text": "a b"}])
    assert a != b and a == hashlib.md5(b"a  b").hexdigest()


def test_hash_algorithms_and_url_prefix():
    assert TextExactDeduplicator().hash_algorithm in ("xxhash", "md5")
    op = TextExactDeduplicator(hash_algorithm="sha256", include_url=True, url_field="u")
    keys = op.get_dedup_keys_batch([{"text": "Hi", "u": "http://a"}, {"text": "Hi", "u": ""}])
    assert keys == [
        hashlib.sha256(b"http://a|hi").hexdigest(),
        hashlib.sha256(b"hi").hexdigest(),  # no URL: the text alone
    ]
    with pytest.raises(ValueError, match="hash_algorithm"):
        TextExactDeduplicator(hash_algorithm="SHA256")  # MDF would silently use md5


def test_records_without_text_are_keyed_by_id():
    op = TextExactDeduplicator()
    keys = op.get_dedup_keys_batch(
        [{"id": "a"}, {"id": 7, "text": ""}, {"id": "c", "text": 5}, {}, {"text": None}]
    )
    assert keys == ["a", "7", "c", "", ""]


@pytest.fixture
def backend(ray_session):
    b = DedupBackend(num_buckets=3, name_prefix=f"test_text_dedup_{uuid.uuid4().hex[:8]}")
    yield b
    b.kill()


def test_first_record_of_each_key_wins_across_batches_and_replicas(backend):
    op = TextExactDeduplicator(text_field="species")
    op.backend = backend
    replica = pickle.loads(pickle.dumps(op))  # as the executor ships it to a second actor
    first = [{"id": 0, "species": "Anas"}, {"id": 1, "species": "anas "}, {"id": 2}]
    out = op.process_batch(first)
    assert [r and r["id"] for r in out] == [0, None, 2]
    second = [{"id": 3, "species": "ANAS"}, {"id": 4, "species": "Bufo"}, {"id": 2}, {"id": 5}]
    res = replica.process_batch_with_rejected(second)
    assert [r["id"] for r in res.passed] == [4, 5]  # no species: one record per id
    assert [r["id"] for r in res.rejected] == [3, 2]
    details = [r["_rejection_details"] for r in res.rejected]
    assert [d["reason"] for d in details] == ["duplicate", "duplicate"]
    assert [d["dedup_key"] for d in details] == [op.dedup_key({"species": "anas"}), "2"]
    assert backend.size() == 4


def test_without_a_backend_it_says_so():
    with pytest.raises(RuntimeError, match="DedupBackend"):
        TextExactDeduplicator().process_batch([{"text": "a"}])


# -- the same decisions as MDF's own operators --------------------------------------------

PROBES = [
    {"id": "r0", "text": "Hello   World", "n": 11, "url": "http://a"},
    {"id": "r1", "text": "hello world", "url": "http://b"},
    {"id": "r2", "text": " HELLO\tworld\n", "url": "http://a"},
    {"id": "r3", "text": "", "n": 4},
    {"id": "r4"},
    {"id": "r4", "text": None},
    {"id": "r6", "text": 42, "n": 2.5},
    {"text": "   "},
    {"text": "\t"},
    {"id": "r9", "text": "ünïcödé  ΣΊΣΥΦΟΣ", "n": "17"},
    {"id": "r10", "text": "ünïcödé σίσυφοσ", "n": True},
    {"id": "r11", "text": b"bytes!!"},
    {"id": "r12", "text": "x" * 8, "n": 40},
    {},
    {"id": "r14", "text": "a\ud800b"},
    {"id": "r15", "text": "ab"},
]
FILTERS = [
    {"min_length": 4, "text_length_field": "n"},
    {"min_length": 0, "max_length": 7},
    {"min_length": 1, "max_length": 12, "text_length_field": "n"},
]
DEDUPS = [
    {},
    {"hash_algorithm": "sha256", "include_url": True},
    {"normalize_whitespace": False, "lowercase": False, "hash_algorithm": "md5"},
    {"lowercase": False},
]


def _decisions(filter_cls: type, dedup_cls: type, job: dict) -> dict[str, list]:
    """Keep flags of each filter; what each dedup keeps of the records, in order; and for
    `chain` (filter params, dedup params), the indices that survive both in turn."""
    records = job["records"]

    def first_of_each_key(dedup, batch: list[dict]) -> list[bool]:
        seen: set = set()
        kept = []
        for key in dedup.get_dedup_keys_batch(batch):
            kept.append(key not in seen)
            seen.add(key)
        return kept

    out: dict[str, list] = {}
    for i, params in enumerate(job.get("filters", [])):
        out[f"filter{i}"] = list(filter_cls(**params).should_keep_batch(records))
    for i, params in enumerate(job.get("dedups", [])):
        out[f"dedup{i}"] = first_of_each_key(dedup_cls(**params), records)
    if "chain" in job:
        f_params, d_params = job["chain"]
        flags = filter_cls(**f_params).should_keep_batch(records)
        rows = [i for i, keep in enumerate(flags) if keep]
        kept = first_of_each_key(dedup_cls(**d_params), [records[i] for i in rows])
        out["chain"] = [i for i, keep in zip(rows, kept, strict=True) if keep]
    return out


MDF_DECISIONS = f"""
import json, pickle, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_fallback_text_operators import _decisions
from mega_data_factory.operators.filters.text_length_filter import TextLengthFilter
from mega_data_factory.operators.dedup.text_exact_dedup import TextExactDeduplicator
job = pickle.load(open(sys.argv[1], "rb"))
print(json.dumps(_decisions(TextLengthFilter, TextExactDeduplicator, job)))
"""


def _mdf_decisions(job: dict, tmp_path) -> dict[str, list]:
    """`_decisions` with MDF's own operators, in a child process that imports MDF."""
    if not (VENDOR / "mega_data_factory" / "operators").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"the real MDF framework is missing: looked for {VENDOR}")
        pytest.skip(f"the real MDF framework is not beside this clone ({VENDOR})")
    path = tmp_path / "job.pkl"
    path.write_bytes(pickle.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(VENDOR), str(ROOT)])
    proc = subprocess.run(
        [sys.executable, "-c", MDF_DECISIONS, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_same_decisions_as_mdfs_operators(tmp_path):
    job = {"records": PROBES, "filters": FILTERS, "dedups": DEDUPS}
    ours = _decisions(TextLengthFilter, TextExactDeduplicator, job)
    assert ours == _mdf_decisions(job, tmp_path)


# -- configs/add_to_existing_pipeline.yaml under the fallback -----------------------------


def _expected_survivors(table: pa.Table) -> list[str]:
    """uuids the YAML's clean stage keeps, in file order: common_name of >= 4 characters,
    then the first of each species, whitespace-collapsed and lowercased; records without
    a species share the empty key (the sample has no `id` column)."""
    table = table.append_column("row", pa.array(range(table.num_rows), pa.int64()))
    table = table.filter(
        pc.fill_null(pc.greater_equal(pc.utf8_length(table["common_name"]), 4), False)
    )
    collapsed = pc.replace_substring_regex(pc.utf8_trim_whitespace(table["species"]), r"\s+", " ")
    table = table.append_column("key", pc.fill_null(pc.utf8_lower(collapsed), ""))
    first = table.group_by("key").aggregate([("row", "min")])["row_min"]
    keep = table.filter(pc.is_in(table["row"], first)).sort_by("row")
    return keep["uuid"].to_pylist()


def test_add_to_existing_pipeline_runs_under_the_fallback(ray_session, tmp_path):
    sample = pq.read_table(SAMPLE)
    cfg = rewrite(ROOT / "configs" / "add_to_existing_pipeline.yaml", tmp_path)
    assert cli.main(["-q", "run", "-c", str(cfg)]) == 0
    want = _expected_survivors(sample)
    assert 0 < len(want) < sample.num_rows
    table = labelled(tmp_path / "labelled")
    got = table["uuid"].to_pylist()
    assert len(got) == len(want) and sorted(got) == sorted(want)
    assert set(sample.column_names) <= set(table.column_names)
    for name in ("taxonomy_path", "taxonomy_l1", "taxonomy_l2", "taxonomy_distance"):
        assert table[name].null_count == 0, name
    assert set(table["taxonomy_error"].to_pylist()) == {""}
    assert pc.min(table["taxonomy_l1"]).as_py() >= 0 and pc.min(table["taxonomy_l2"]).as_py() >= 0


def test_mdfs_own_operators_keep_the_same_records_with_the_yamls_params(tmp_path):
    """What MDF's own operators keep of the sample with the YAML's params, in file order
    (a test of its own, so the fallback's run above needs no MDF beside it)."""
    sample = pq.read_table(SAMPLE)
    want = _expected_survivors(sample)
    cfg = rewrite(ROOT / "configs" / "add_to_existing_pipeline.yaml", tmp_path)
    clean = yaml.safe_load(cfg.read_text())["stages"][0]["operators"]
    job = {
        "records": sample.select(["uuid", "common_name", "species"]).to_pylist(),
        "chain": [op["params"] for op in clean],
    }
    mdf_kept = _mdf_decisions(job, tmp_path)["chain"]
    assert [job["records"][i]["uuid"] for i in mdf_kept] == want
