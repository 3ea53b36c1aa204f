"""parse_arrow gives what parse_embeddings gives on the same rows as dicts, without a
Python step per row; the dict fast path gives what the per-record loop gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mdf_taxonomy.model.fitting import MAX_ABS_VALUE
from mdf_taxonomy.passes.records import (
    ParsedBatch,
    _field_values,
    _parse_loop,
    _stack_uniform,
    find_embedding_field,
    parse_arrow,
    parse_embeddings,
)

NAN, INF = float("nan"), float("inf")
F = "emb"


def assert_same(got: ParsedBatch, want: ParsedBatch) -> None:
    """Same bits, same positions, same reasons."""
    assert got.x.dtype == want.x.dtype == np.float32
    assert got.x.flags.c_contiguous and want.x.flags.c_contiguous
    assert got.x.shape == want.x.shape
    assert got.x.tobytes() == want.x.tobytes()
    assert got.valid.dtype == np.int64 and got.valid.tolist() == want.valid.tolist()
    assert got.errors == want.errors


def as_records(values: list) -> list[dict]:
    return [{F: v} for v in values]


# rows of 4 values, each good or bad in its own way (None: a null row)
FLOAT_ROWS = [
    [1.0, 2.0, 3.0, 4.0],
    None,
    [1.0, 2.0, 3.0],  # short
    [1.0, NAN, 0.0, 1.0],
    [-INF, 0.0, 0.0, 1.0],
    [1e39, 0.0, 0.0, 1.0],  # finite in float64, inf in float32
    [MAX_ABS_VALUE * 1.5, 0.0, 0.0, 1.0],  # finite in float32, out of range
    [MAX_ABS_VALUE, -MAX_ABS_VALUE, 0.0, 0.5],  # the bound is in range
    [0.0, 0.0, 0.0, 0.0],  # a point under l2, no direction under cosine
    [1e-30, 0.0, 0.0, 0.0],
    [],
    [1.0, None, 3.0, 4.0],  # a null value: not a numeric vector
    [0.25, -0.5, 7.0, 1e-3],
    [1.0, 2.0, 3.0, 4.0, 5.0],  # long
    [3.0, 1.0, 4.0, 1.0],
    None,
    [2.0, 7.0, 1.0, 8.0],
    [1.0, 1.0, 1.0, 1.0],
]
INT_ROWS = [
    [1, 2, 3, 4],
    None,
    [0, 0, 0, 0],
    [40_000, 1, 2, 3],
    [2**40, 0, 0, 1],
    [-7, 5, 0, 1],
    [1, 2, 3],
    [],
    [1, None, 3, 4],
    [9, 8, 7, 6],
    [1, 1, 1, 1],
    [5, 5, 5, 5, 5],
    [2, 0, 0, 0],
    [3, 0, 0, 0],
    [0, 0, 0, 4],
]


def _list_types(value_type: pa.DataType) -> list[pa.DataType]:
    return [pa.list_(value_type), pa.large_list(value_type)]


def _float_columns() -> list[pa.Array]:
    base = pa.array(FLOAT_ROWS, pa.list_(pa.float64()))
    cols = []
    for vt in [pa.float16(), pa.float32(), pa.float64()]:
        for t in _list_types(vt):
            cols.append(base.cast(t, safe=False))  # float16/32: 1e39 becomes inf, as it would
    return cols


def _fit(v: int | None, vt: pa.DataType) -> int | None:
    """An INT_ROWS value clipped into `vt`'s range."""
    if v is None:
        return None
    signed = pa.types.is_signed_integer(vt)
    lo, hi = (
        (-(2 ** (vt.bit_width - 1)), 2 ** (vt.bit_width - 1) - 1)
        if signed
        else (0, 2**vt.bit_width - 1)
    )
    return min(max(v, lo), hi)


def _int_columns() -> list[pa.Array]:
    cols = []
    for vt in [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint64()]:
        rows = [None if r is None else [_fit(v, vt) for v in r] for r in INT_ROWS]
        if vt == pa.uint64():
            rows.append([2**64 - 1, 0, 0, 1])  # past int64: numpy reads it as float64
        for t in _list_types(vt):
            cols.append(pa.array(rows, t))
    return cols


def _fixed_columns() -> list[pa.Array]:
    """fixed_size_list columns: every row is 4 long or null."""
    rows = [r if r is None or len(r) == 4 else None for r in FLOAT_ROWS]
    base = pa.array(rows, pa.list_(pa.float64(), 4))
    cols = [base.cast(pa.list_(vt, 4), safe=False) for vt in [pa.float32(), pa.float64()]]
    ints = [r if r is None or len(r) == 4 else [0, 0, 1, 0] for r in INT_ROWS]
    cols.append(
        pa.array([r and [_fit(v, pa.int32()) for v in r] for r in ints], pa.list_(pa.int32(), 4))
    )
    cols.append(pa.array(ints, pa.list_(pa.int64(), 4)))
    return cols


def _variants(col: pa.Array) -> list[pa.Array | pa.ChunkedArray]:
    """The column, a slice of it, and chunked versions (with an empty chunk)."""
    return [
        col,
        col.slice(3, 10),
        pa.chunked_array([col.slice(0, 5), col.slice(5)]),
        pa.chunked_array([col.slice(0, 0), col.slice(1, 6), col.slice(7)], type=col.type),
    ]


COLUMNS = _float_columns() + _int_columns() + _fixed_columns()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dim", [4, None, 3])
@pytest.mark.parametrize("col", COLUMNS, ids=lambda c: str(c.type))
def test_arrow_matches_the_dict_path(col, dim, metric):
    for variant in _variants(col):
        got = parse_arrow(variant, F, dim, metric=metric)
        want = parse_embeddings(as_records(variant.to_pylist()), F, dim, metric=metric)
        assert_same(got, want)


def test_the_parity_cases_name_every_kind():
    """The rows above do reach each reason (a parity test of all-valid rows proves little)."""
    col = pa.array(FLOAT_ROWS, pa.list_(pa.float64()))
    kinds = parse_arrow(col, F, 4, metric="cosine").reasons()
    assert set(kinds) == {
        "missing_embedding",
        "bad_embedding",
        "wrong_length",
        "non_finite",
        "out_of_range",
        "zero_vector",
    }
    errors = parse_arrow(col, F, 4).errors
    assert errors[5].startswith("out_of_range: field 'emb' has |value| up to 1e+39")
    assert errors[11] == "bad_embedding: field 'emb' is not a numeric vector"
    assert errors[2] == "wrong_length: field 'emb' has 3 values, expected 4"


def _fsb(rows: list[np.ndarray | None], width: int = 16) -> pa.Array:
    return pa.array(
        [None if r is None else r.astype("<f4").tobytes() for r in rows], pa.binary(width)
    )


with np.errstate(over="ignore"):  # 1e39 is inf in float32, as packed bytes would have it
    FSB_ROWS = [
        None if r is None or len(r) != 4 or None in r else np.asarray(r, np.float32)
        for r in FLOAT_ROWS
    ]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dim", [4, None, 2])
def test_fixed_size_binary_is_packed_float32(dim, metric):
    col = _fsb(FSB_ROWS)
    for variant in _variants(col):
        decoded = [None if b is None else np.frombuffer(b, "<f4") for b in variant.to_pylist()]
        got = parse_arrow(variant, F, dim, metric=metric)
        assert_same(got, parse_embeddings(as_records(decoded), F, dim, metric=metric))


@pytest.mark.parametrize(
    "col",
    [
        pa.array(["1.0, 2.0", None, "x"]),
        pa.array([{"a": 1.0}, None, {"a": 2.0}]),
        pa.array([["1", "2"], None, []], pa.list_(pa.string())),
        pa.array([[True, False], None, [True, True]], pa.list_(pa.bool_())),
        pa.array([[[1.0, 2.0]], None, [[3.0, 4.0]]]),  # nested lists
        pa.array([b"\x00\x00\x80?", None, b"ab"]),  # binary that is not fixed size
        pa.array([b"abcdef", None, b"ghijkl"], pa.binary(6)),  # width not a multiple of 4
        pa.array([1.0, None, 2.0]),  # scalars
        pa.array(["a", None, "a"]).dictionary_encode(),
    ],
    ids=lambda c: str(c.type),
)
@pytest.mark.parametrize("dim", [2, None])
def test_a_column_of_another_type_is_named_row_by_row(col, dim):
    parsed = parse_arrow(col, F, dim)  # never raises
    assert parsed.valid.tolist() == [] and parsed.x.shape == (0, dim or 0)
    assert parsed.errors == {
        0: "bad_embedding: field 'emb' is not a numeric vector",
        1: "missing_embedding: field 'emb' is absent or null",
        2: "bad_embedding: field 'emb' is not a numeric vector",
    }
    chunked = parse_arrow(pa.chunked_array([col, col]), F, dim)
    assert chunked.reasons() == {"bad_embedding": 4, "missing_embedding": 2}


@pytest.mark.parametrize("dim", [3, None])
def test_a_null_column_is_all_missing(dim):
    for col in [pa.nulls(4), pa.nulls(4, pa.list_(pa.float32())), pa.chunked_array([], pa.null())]:
        parsed = parse_arrow(col, F, dim)
        want = parse_embeddings(as_records(col.to_pylist()), F, dim)
        assert_same(parsed, want)
        assert parsed.reasons() == ({"missing_embedding": len(col)} if len(col) else {})


def test_list_nulls_with_values_behind_them_are_skipped():
    """A null list slot may still span child values (Arrow allows it): they are not read."""
    values = pa.array([1.0, 2.0, NAN, NAN, 5.0, 6.0], pa.float32())
    offsets = pa.array([0, 2, 4, 6], pa.int32())
    col = pa.ListArray.from_arrays(offsets, values, mask=pa.array([False, True, False]))
    parsed = parse_arrow(col, F, 2)
    assert parsed.valid.tolist() == [0, 2] and parsed.x.tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert parsed.reasons() == {"missing_embedding": 1}
    child_sliced = pa.ListArray.from_arrays(pa.array([0, 2, 4], pa.int32()), values.slice(2))
    assert_same(
        parse_arrow(child_sliced, F, None),
        parse_embeddings(as_records(child_sliced.to_pylist()), F, None),
    )


def test_float64_beyond_float32_and_huge_ints_are_out_of_range():
    col = pa.array([[1e39, 1.0], [-3e38, 1.0], [1.0, 1.0]], pa.list_(pa.float64()))
    errors = parse_arrow(col, F, 2).errors
    assert errors[0].startswith("out_of_range: field 'emb' has |value| up to 1e+39")
    assert errors[1].startswith("out_of_range: field 'emb' has |value| up to 3e+38")
    ints = pa.array([[2**63 - 1, 0], [1, 2]], pa.list_(pa.int64()))
    assert (
        parse_arrow(ints, F, 2)
        .errors[0]
        .startswith("out_of_range: field 'emb' has |value| up to 9.22e+18")
    )


# -- zero copy ------------------------------------------------------------------------------


def _buffer(arr: pa.Array) -> np.ndarray:
    return np.frombuffer(arr.buffers()[1], dtype=np.uint8)


def test_fixed_size_list_float32_is_a_view_on_the_arrow_buffer():
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)
    for variant in [col, col.slice(3, 10)]:
        parsed = parse_arrow(variant, F, None)
        assert parsed.x.shape == (len(variant), 8) and parsed.x.flags.c_contiguous
        assert np.shares_memory(parsed.x, _buffer(col.values))
        assert not parsed.x.flags.writeable  # Arrow memory is immutable
        assert np.array_equal(parsed.x, x[variant.offset : variant.offset + len(variant)])
    single = pa.chunked_array([col])
    assert np.shares_memory(parse_arrow(single, F, 8).x, _buffer(col.values))


def test_fixed_size_binary_and_full_list_float32_are_views_too():
    x = np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32)
    fsb = _fsb(list(x))
    assert np.shares_memory(parse_arrow(fsb.slice(2), F, 4).x, _buffer(fsb))
    lst = pa.array(list(x), pa.list_(pa.float32()))
    assert np.shares_memory(parse_arrow(lst, F, 4).x, _buffer(lst.values))


def test_a_rejected_row_costs_one_gather_and_a_writable_copy():
    x = np.ones((10, 4), np.float32)
    x[3, 1] = NAN
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 4)
    parsed = parse_arrow(col, F, 4)
    assert parsed.valid.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert not np.shares_memory(parsed.x, _buffer(col.values)) and parsed.x.flags.writeable


# -- the dict fast path is the loop ---------------------------------------------------------


def _loop(records: list, dim: int | None, metric: str = "l2") -> ParsedBatch:
    return _parse_loop(records, _field_values(records, F), F, dim, metric)


def _rng_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _mixed_good_and_bad() -> list:
    rows = list(_rng_rows(12, 4))
    rows[1] = np.array([1.0, NAN, 0.0, 1.0], np.float32)
    rows[2] = np.array([0.0, 0.0, 0.0, 0.0], np.float32)
    rows[3] = np.array([1e39, 0.0, 0.0, 1.0], np.float64)
    rows[4] = np.array([40_000, 0, 0, 1], np.int64)
    rows[5] = None
    rows[6] = [1, 2, 3, 4]  # python ints beside numpy floats
    rows[7] = (0.5, 0.5, 0.5, 0.5)
    rows[8] = np.array([1e-30, 0, 0, 0], np.float64)
    rows[9] = np.array([2**62, 0, 0, 0], np.int64)
    rows[10] = [INF, 1.0, 1.0, 1.0]
    return rows


FAST_BATCHES = {
    "numpy_f32": list(_rng_rows(30, 8)),
    "python_lists": [list(map(float, r)) for r in _rng_rows(30, 8)],
    "ints": [[i, i + 1, -i] for i in range(20)],
    "mixed_good_and_bad": _mixed_good_and_bad(),
    "all_one_wrong_length": list(_rng_rows(5, 3)),
    "float16": list(_rng_rows(6, 4).astype(np.float16)),
    "uint64": list(np.array([[2**64 - 1, 1], [1, 2]], np.uint64)),
}
LOOP_BATCHES = {  # batches the fast path leaves to the loop
    "strings": [["1.5", "2"], [1.0, 2.0]],
    "numpy_strings": [np.array(["1.5", "2.0"]), [1.0, 2.0]],
    "all_bool_row": [[True, False], [1.0, 2.0]],
    "numpy_bool_row": [np.array([True, False]), np.array([1.0, 2.0])],
    "memoryview": [memoryview(np.ones(2)), [1.0, 2.0]],
    "bytes": [b"\x00\x00\x80?\x00\x00\x80?", [1.0, 2.0]],
    "text": ["ab", "cd"],
    "nested": [[[1.0, 2.0]], [[3.0, 4.0]]],
    "ragged": [[1.0, 2.0], [1.0, 2.0, 3.0]],
    "a_none_inside": [[1.0, None], [1.0, 2.0]],
    "huge_python_int": [[2**70, 1], [1, 2]],
    "empty_rows": [[], []],
    "scalars": [1.0, 2.0],
    "dicts": [{"a": 1.0}, {"a": 2.0}],
    "complex": [np.array([1j, 2]), [1.0, 2.0]],
    "all_non_finite": [[NAN, 1.0], [INF, 1.0]],
}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dim", ["first", None, 99])
@pytest.mark.parametrize("name", list(FAST_BATCHES) + list(LOOP_BATCHES))
def test_the_fast_path_is_the_loop(name, dim, metric):
    values = FAST_BATCHES.get(name) or LOOP_BATCHES[name]
    records = as_records(values) + [{"other": 1}, "not a dict", None]
    if dim == "first":
        first = next(v for v in values if v is not None)
        dim = len(first) if hasattr(first, "__len__") else 1
    assert_same(parse_embeddings(records, F, dim, metric=metric), _loop(records, dim, metric))
    if name in FAST_BATCHES:
        assert _stack_uniform(_field_values(records, F)) is not None
    elif name != "all_non_finite":  # it stacks; only the dim cannot be inferred from it
        assert _stack_uniform(_field_values(records, F)) is None


def test_the_mixed_batch_names_each_row():
    parsed = parse_embeddings(as_records(_mixed_good_and_bad()), F, 4, metric="cosine")
    assert parsed.reasons() == {
        "non_finite": 2,
        "zero_vector": 2,
        "out_of_range": 3,
        "missing_embedding": 1,
    }
    assert parsed.errors[3].startswith("out_of_range: field 'emb' has |value| up to 1e+39")
    assert parsed.errors[9].startswith("out_of_range: field 'emb' has |value| up to 4.61e+18")
    assert parsed.valid.tolist() == [0, 6, 7, 11]
    assert parsed.x[1].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_the_fast_path_agrees_with_arrow():
    x = _rng_rows(40, 16, seed=3)
    x[5, 2] = NAN
    x[7] = 0.0
    x[9, 0] = 1e6
    rows: list = list(x)
    rows[11] = None
    col = pa.array(rows, pa.list_(pa.float32(), 16))
    for metric in ["l2", "cosine"]:
        assert_same(
            parse_arrow(col, F, None, metric=metric),
            parse_embeddings(as_records(rows), F, None, metric=metric),
        )


# -- find_embedding_field -------------------------------------------------------------------


@pytest.mark.parametrize(
    "emb_type",
    [
        pa.list_(pa.float32()),
        pa.large_list(pa.float64()),
        pa.list_(pa.float16(), 8),
        pa.binary(1024),
    ],
)
def test_find_embedding_field_takes_the_one_vector_column(emb_type):
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("vec", emb_type),
            ("tokens", pa.list_(pa.int32())),
            ("raw", pa.binary()),
            ("odd", pa.binary(6)),
            ("n", pa.float32()),
        ]
    )
    assert find_embedding_field(schema) == "vec"


def test_find_embedding_field_refuses_none_or_several():
    with pytest.raises(ValueError, match=r"several.*a: list<item: float>.*b: fixed_size_binary"):
        find_embedding_field(pa.schema([("a", pa.list_(pa.float32())), ("b", pa.binary(16))]))
    with pytest.raises(
        ValueError,
        match=r"no column holds embeddings.*id: string.*t: list<item: "
        r"int32>",
    ):
        find_embedding_field(pa.schema([("id", pa.string()), ("t", pa.list_(pa.int32()))]))
    with pytest.raises(ValueError, match="columns: none"):
        find_embedding_field(pa.schema([]))
