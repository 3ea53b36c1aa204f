"""Bad input never costs more than itself: each unreadable file or row group fails the job
with one line naming it, or (on_bad_file="skip") is left out, logged and reported, with
rows accounted against the footers; storage that cannot be reached is one clear line.

The loader runs in-process here (get_file_list, then load_files), as a driver and a
loader actor would call it; one test goes through Ray to check the report actor.
"""

from __future__ import annotations

import logging
import pickle
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import blobs, write_embeddings

from mdf_taxonomy.model import Taxonomy, TaxonomyConfig, TaxonomyStore, TaxonomyStoreError
from mdf_taxonomy.operators import (
    InputError,
    ParquetEmbeddingLoader,
    close_input_report,
    open_input_report,
    read_input_failures,
    read_input_report,
)

DIM = 4
ROWS = 60  # per good file, 3 row groups of 20


def good_file(path, start: int):
    x, _ = blobs(ROWS, DIM, 2, seed=start)
    return write_embeddings(path, x, ids=np.arange(start, start + ROWS), row_group_size=20)


def corrupt_page(path, row_group: int = 1) -> None:
    """Overwrite the header of the embedding column's first data page in `row_group`."""
    col = pq.ParquetFile(path).metadata.row_group(row_group).column(1)
    raw = bytearray(path.read_bytes())
    raw[col.data_page_offset : col.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-200])


def make_bad(path, kind: str) -> None:
    """One bad file of `kind` at `path` (ids 1000.. where it holds rows)."""
    x, _ = blobs(ROWS, DIM, 2, seed=9)
    ids = np.arange(1000, 1000 + ROWS)
    if kind == "truncated":
        write_embeddings(path, x, ids=ids, row_group_size=20)
        truncate(path)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"embedding": x}))
    elif kind == "text":
        path.write_text("id,embedding\n1,2\n")
    elif kind == "corrupt_page":
        write_embeddings(path, x, ids=ids, row_group_size=20)
        corrupt_page(path)
    elif kind == "no_embedding":
        pq.write_table(pa.table({"id": ids, "vector": pa.array(list(x))}), path)
    elif kind == "other_types":
        write_embeddings(path, x, ids=None, extra=None)
        t = pq.read_table(path)
        pq.write_table(t.set_column(0, "id", pa.array([str(i) for i in ids])), path)
    elif kind == "embedding_not_a_list":
        pq.write_table(pa.table({"id": ids, "embedding": [str(r) for r in x]}), path)
    else:
        raise AssertionError(kind)


# kind -> (found at listing time?, rows the report names)
BAD_KINDS = {
    "truncated": (True, None),
    "pickle": (True, None),
    "text": (True, None),
    "no_embedding": (True, ROWS),
    "other_types": (True, ROWS),
    "embedding_not_a_list": (True, ROWS),
    "corrupt_page": (False, 20),
}


@pytest.fixture
def mixed(tmp_path):
    """A directory of 3 good files with a bad one (its name sorted in the middle) to fill in."""
    good_file(tmp_path / "a.parquet", 0)
    good_file(tmp_path / "c.parquet", 100)
    good_file(tmp_path / "d.parquet", 200)
    good_ids = [*range(0, ROWS), *range(100, 100 + ROWS), *range(200, 200 + ROWS)]
    return tmp_path, tmp_path / "b.parquet", good_ids


def one_line(message: str) -> bool:
    return "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_skip_leaves_out_only_the_bad_item_and_accounts_for_it(mixed, kind, caplog):
    root, bad, good_ids = mixed
    make_bad(bad, kind)
    at_listing, rows = BAD_KINDS[kind]
    loader = ParquetEmbeddingLoader(str(root), on_bad_file="skip")
    with caplog.at_level(logging.WARNING):
        items = loader.get_file_list()
        recs = list(loader.load_files(items))
    ids = [r["id"] for r in recs]
    skipped = loader.listing_skipped + loader.load_skipped
    assert len(skipped) == 1
    entry = skipped[0]
    assert entry["file"] == str(bad) and entry["rows"] == rows and entry["action"] == "skipped"
    assert entry["stage"] == ("listing" if at_listing else "load")
    assert one_line(entry["reason"]) and str(bad) in entry["reason"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        str(bad) in m and f"({'unknown' if rows is None else rows} rows)" in m for m in warned
    )
    if at_listing:
        assert sorted(ids) == good_ids and not any(str(bad) in i for i in items)
    else:  # the other row groups of the file, and every later file, still come through
        assert entry["row_group"] == 1 and entry["item"] in items
        assert sorted(ids) == sorted([*good_ids, *range(1000, 1020), *range(1040, 1060)])
    # rows in = rows given + rows of the items named unreadable
    kept = [i for i in items if i != entry["item"]]
    assert loader.expected_rows(kept) == len(recs)
    if not at_listing:
        assert loader.expected_rows(items) == len(recs) + rows


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_fail_raises_one_line_naming_the_item(mixed, kind):
    root, bad, _ = mixed
    make_bad(bad, kind)
    at_listing, _ = BAD_KINDS[kind]
    loader = ParquetEmbeddingLoader(str(root))  # on_bad_file="fail" is the default
    with pytest.raises(InputError) as err:
        list(loader.load_files(loader.get_file_list()))
    msg = str(err.value)
    assert str(bad) in msg and one_line(msg) and "on_bad_file='skip'" in msg
    if not at_listing:
        assert "row group 1" in msg


def test_a_bad_item_never_costs_a_workers_other_items(tmp_path):
    """The seen-on-main case: one corrupt page among many files; every other row arrives."""
    files = [good_file(tmp_path / f"p{i:03d}.parquet", i * 100) for i in range(12)]
    corrupt_page(files[2], row_group=0)
    loader = ParquetEmbeddingLoader(str(tmp_path), on_bad_file="skip")
    items = loader.get_file_list()
    recs = list(loader.load_files(items))  # one worker holding every item
    assert len(recs) == 12 * ROWS - 20
    assert [e["item"] for e in loader.load_skipped] == [f"{files[2]}::rg=0"]
    assert loader.expected_rows(items) == len(recs) + 20


def test_a_failed_read_is_retried_once(tmp_path, monkeypatch):
    good_file(tmp_path / "a.parquet", 0)
    loader = ParquetEmbeddingLoader(str(tmp_path))
    items = loader.get_file_list()
    real = ParquetEmbeddingLoader._read_item
    calls = []

    def flaky(self, *args):
        calls.append(args[2])
        if len(calls) == 1:
            raise OSError("connection reset by peer")
        return real(self, *args)

    monkeypatch.setattr(ParquetEmbeddingLoader, "_read_item", flaky)
    assert len(list(loader.load_files(items))) == ROWS
    assert calls[:2] == [items[0], items[0]] and len(calls) == len(items) + 1


@pytest.mark.parametrize("change", ["truncated", "no_embedding", "corrupt_page"])
def test_a_file_broken_after_listing_is_handled_by_the_loader(tmp_path, change):
    good_file(tmp_path / "a.parquet", 0)
    good_file(tmp_path / "b.parquet", 100)
    target = tmp_path / "a.parquet"
    loader = ParquetEmbeddingLoader(str(tmp_path), on_bad_file="skip")
    items = loader.get_file_list()
    make_bad(target, change)
    recs = list(loader.load_files(items))
    lost = {e["item"] for e in loader.load_skipped}
    assert set(range(100, 100 + ROWS)) <= {r["id"] for r in recs}
    assert lost and all(i.startswith(str(target)) for i in lost)
    assert loader.expected_rows([i for i in items if i not in lost]) == len(recs)
    with pytest.raises(InputError, match="a.parquet"):
        list(ParquetEmbeddingLoader(str(tmp_path)).load_files(items))


def test_expected_rows_reads_footers_only_without_a_filter(tmp_path):
    path = good_file(tmp_path / "a.parquet", 0)
    for rg in range(3):
        corrupt_page(path, rg)  # no data page can be read, the footer can
    loader = ParquetEmbeddingLoader(str(path), on_bad_file="skip")
    items = loader.get_file_list()
    assert loader.expected_rows(items) == ROWS and loader.expected_rows(items[:1]) == 20
    assert list(loader.load_files(items)) == [] and len(loader.load_skipped) == 3
    fresh = ParquetEmbeddingLoader(str(path))  # no listing: footers read on demand
    assert fresh.expected_rows(items) == ROWS


def test_expected_rows_with_a_filter_counts_what_passes(tmp_path):
    x, _ = blobs(40, DIM, 2)
    for i, kingdom in enumerate(["Animalia", "Plantae"]):
        write_embeddings(
            tmp_path / f"kingdom={kingdom}" / "part.parquet",
            x[i * 20 : (i + 1) * 20],
            ids=np.arange(i * 20, (i + 1) * 20),
            row_group_size=5,
        )
    cases = [
        ([("kingdom", "==", "Plantae")], 20),
        ([("id", "<", 7)], 7),
        ([("kingdom", "==", "Animalia"), ("id", ">=", 12)], 8),
        (None, 40),
    ]
    for flt, want in cases:
        loader = ParquetEmbeddingLoader(str(tmp_path), filter=flt)
        items = loader.get_file_list()
        assert loader.expected_rows(items) == want == len(list(loader.load_files(items)))


def test_listing_problems_with_skip_and_fail(tmp_path):
    good_file(tmp_path / "a.parquet", 0)
    (tmp_path / "notes.txt").write_text("not data")
    glob = str(tmp_path / "*")  # a glob takes what it matches: notes.txt is a bad file
    loader = ParquetEmbeddingLoader(glob, on_bad_file="skip")
    assert len(loader.get_file_list()) == 3
    assert [e["file"] for e in loader.listing_skipped] == [str(tmp_path / "notes.txt")]
    with pytest.raises(InputError, match="notes.txt: not Parquet"):
        ParquetEmbeddingLoader(glob).get_file_list()


def test_a_directory_ignores_files_without_a_parquet_extension(tmp_path, caplog):
    good_file(tmp_path / "a.parquet", 0)
    (tmp_path / "README.md").write_text("# about this data\n")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.PARQUET").write_bytes((tmp_path / "a.parquet").read_bytes())
    loader = ParquetEmbeddingLoader(str(tmp_path))
    with caplog.at_level(logging.INFO):
        items = loader.get_file_list()
    assert len(items) == 6 and not loader.listing_skipped
    assert any("README.md" in r.getMessage() for r in caplog.records)
    only_readme = tmp_path / "docs"
    only_readme.mkdir()
    (only_readme / "README.md").write_text("x")
    with pytest.raises(InputError, match="holds no Parquet files.*README.md"):
        ParquetEmbeddingLoader(str(only_readme)).get_file_list()


@pytest.mark.parametrize("pattern", ["*.parquet", "nothing/*/x.parquet"])
def test_an_empty_glob_is_a_clear_error(tmp_path, pattern):
    with pytest.raises(InputError, match="matches no files"):
        ParquetEmbeddingLoader(str(tmp_path / pattern)).get_file_list()


def test_an_empty_dataset_gives_no_items_and_no_rows(tmp_path):
    x, _ = blobs(0, DIM, 1)
    write_embeddings(tmp_path / "empty.parquet", x.reshape(0, DIM))
    loader = ParquetEmbeddingLoader(str(tmp_path))
    assert loader.get_file_list() == [] and loader.expected_rows([]) == 0
    assert list(loader.load_files([])) == [] and loader.count_rows() == 0
    good_file(tmp_path / "full.parquet", 0)  # an empty file next to others costs nothing
    both = ParquetEmbeddingLoader(str(tmp_path))
    assert len(list(both.load_files(both.get_file_list()))) == ROWS


def test_a_foreign_file_sorted_last_keeps_its_columns(tmp_path):
    good_file(tmp_path / "a.parquet", 0)
    x, _ = blobs(5, DIM, 1)
    write_embeddings(
        tmp_path / "z.parquet",
        x,
        ids=np.arange(500, 505),
        extra={"caption": pa.array(list("abcde"))},
    )
    recs = list(
        ParquetEmbeddingLoader(str(tmp_path)).load_files(
            ParquetEmbeddingLoader(str(tmp_path)).get_file_list()
        )
    )
    by_id = {r["id"]: r for r in recs}
    assert by_id[502]["caption"] == "c" and by_id[0]["caption"] is None


@pytest.mark.parametrize("path", [np.zeros((4, 3), np.float32), 7, ["a.parquet", None]])
def test_a_path_that_is_not_uris_is_named_when_built(path):
    with pytest.raises(InputError, match="path must be a storage URI or a list of them"):
        ParquetEmbeddingLoader(path)


def test_on_bad_file_is_validated_when_built(tmp_path):
    with pytest.raises(InputError, match="on_bad_file must be one of"):
        ParquetEmbeddingLoader(str(tmp_path), on_bad_file="ignore")


def test_loader_actors_report_to_the_driver(ray_session, mixed):
    ray = ray_session
    root, bad, good_ids = mixed
    make_bad(bad, "corrupt_page")
    (root / "x.parquet").write_bytes(b"PAR1 but not really")
    open_input_report("t-report")
    try:
        loader = ParquetEmbeddingLoader(str(root), on_bad_file="skip", report_name="t-report")
        items = loader.get_file_list()  # the driver: x.parquet skipped at listing

        @ray.remote(num_cpus=0)
        def load(loader, items):  # a loader actor
            return [r["id"] for r in loader.load_files(items)]

        ids = ray.get(load.remote(loader, items))
        report = {e["file"]: e for e in read_input_report("t-report")}
        assert sorted(report) == [str(bad), str(root / "x.parquet")]
        assert report[str(bad)]["stage"] == "load" and report[str(bad)]["rows"] == 20
        assert report[str(root / "x.parquet")]["stage"] == "listing"
        assert len(ids) == loader.expected_rows(items) - 20
        assert read_input_failures("t-report") == []

        loader.on_bad_file = "fail"
        with pytest.raises(ray.exceptions.RayTaskError, match="b.parquet row group 1"):
            ray.get(load.remote(loader, [i for i in items if i.startswith(str(bad))]))
        failed = read_input_failures("t-report")
        assert [e["item"] for e in failed] == [f"{bad}::rg=1"] and one_line(failed[0]["reason"])
        open_input_report("t-report")  # a new pass starts empty
        assert read_input_report("t-report") == []
    finally:
        close_input_report("t-report")
    # without the actor (the stock `mdf run`) the loader only logs
    loader = ParquetEmbeddingLoader(str(root), on_bad_file="skip", report_name="gone")
    assert len(list(loader.load_files(loader.get_file_list()))) == len(good_ids) + 40


# -- storage that cannot be reached -------------------------------------------------
DEAD_S3 = {
    "key": "a",
    "secret": "b",
    "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
    "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
}


@pytest.mark.filterwarnings("ignore:Your installed version of s3fs:UserWarning")
@pytest.mark.parametrize("call", ["latest_version", "load", "save", "writer_lease"])
def test_an_unreachable_store_is_one_line_naming_the_uri(call):
    store = TaxonomyStore("s3://bucket/x", DEAD_S3)
    started = time.monotonic()
    with pytest.raises(TaxonomyStoreError) as err:
        if call == "save":
            store.save(
                Taxonomy(config=TaxonomyConfig(n_levels=1, branching_factor=2, dim=2), dim=2)
            )
        elif call == "writer_lease":
            with store.writer_lease():
                pass
        else:
            getattr(store, call)()
    msg = str(err.value)
    assert msg.startswith("cannot reach the storage of 's3://bucket/x'") and one_line(msg)
    assert "no taxonomy" not in msg and time.monotonic() - started < 30


def test_a_store_that_says_missing_while_unreachable_is_not_no_taxonomy(monkeypatch):
    """Some fsspec layers turn a refused connection into FileNotFoundError."""
    store = TaxonomyStore("memory://unreachable/tax")

    def missing(*args, **kwargs):
        raise FileNotFoundError(args[0] if args else "")

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(store.fs, "size", missing)
    monkeypatch.setattr(store.fs, "info", refused)
    with pytest.raises(TaxonomyStoreError, match="cannot reach the storage of 'memory://unr"):
        store.load()
    monkeypatch.setattr(store.fs, "info", missing)  # reachable, and really empty
    with pytest.raises(TaxonomyStoreError, match="no taxonomy at"):
        store.load()


@pytest.mark.filterwarnings("ignore:Your installed version of s3fs:UserWarning")
@pytest.mark.parametrize(
    "path",
    ["s3://bucket/x", "s3://bucket/x/*.parquet", ["s3://bucket/x/a.parquet", "s3://bucket/y"]],
)
def test_an_unreachable_input_is_one_line_naming_the_uri(path):
    started = time.monotonic()
    with pytest.raises(InputError) as err:
        ParquetEmbeddingLoader(path, storage_options=DEAD_S3).get_file_list()
    msg = str(err.value)
    assert msg.startswith(f"cannot reach the storage of {path!r}") and one_line(msg)
    assert time.monotonic() - started < 30


def test_storage_lost_mid_pass_is_raised_even_with_skip(monkeypatch, tmp_path):
    """pyarrow's fsspec bridge says "file not found" when the store is gone; the loader asks
    fsspec again and raises instead of skipping every file."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/lost/a.parquet", good_file(tmp_path / "a.parquet", 0).read_bytes())
    loader = ParquetEmbeddingLoader("memory://lost", on_bad_file="skip")
    items = loader.get_file_list()
    assert len(items) == 3

    def missing(*args, **kwargs):
        raise FileNotFoundError(args[0])

    def refused(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(fs, "_open", missing)
    monkeypatch.setattr(fs, "info", refused)
    with pytest.raises(InputError) as err:
        list(loader.load_files(items))
    assert str(err.value).startswith("cannot reach the storage of 'memory://lost'")
    assert one_line(str(err.value)) and loader.load_skipped == []
    fs.rm("/lost", recursive=True)
