"""What a pipeline run is made of, checked without running one: the final run's operators,
the input fingerprint, the labeller's schema without its store, the stats that reach users."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SAMPLE

from mdf_taxonomy import _mdf
from mdf_taxonomy.cli import options as cli_options
from mdf_taxonomy.engine import input_fingerprint, label_counts, pinned
from mdf_taxonomy.model import Level, Taxonomy, TaxonomyConfig, TaxonomyStore
from mdf_taxonomy.model.taxonomy import FitState
from mdf_taxonomy.operators import ParquetEmbeddingLoader, TaxonomyPathRefiner


def complete_taxonomy(dim: int = 4) -> Taxonomy:
    rng = np.random.default_rng(0)
    cfg = TaxonomyConfig(n_levels=2, branching_factor=[3, 2], dim=dim)
    levels = [
        Level(rng.normal(size=(3, dim)).astype(np.float32), np.zeros(3, np.int64)),
        Level(
            rng.normal(size=(6, dim)).astype(np.float32),
            np.repeat(np.arange(3), 2).astype(np.int64),
        ),
    ]
    return Taxonomy(
        config=cfg, dim=dim, levels=levels, state=FitState(phase="done"), fingerprint="f"
    )


def ops_of(config) -> list[tuple[str, bool, dict]]:
    return [(op.name, op.enabled, op.params) for st in config.stages for op in st.operators]


def test_final_run_of_a_fit_assigns_each_row_once():
    demo = _mdf.PipelineConfig.from_yaml(str(ROOT / "configs" / "demo.yaml"))
    tax = complete_taxonomy()
    tax.version = "000008"
    ops = ops_of(pinned(demo, tax, fit_pass=False))
    assert [(name, enabled) for name, enabled, _ in ops] == [
        ("kmeans_level_refiner", False),
        ("taxonomy_path_refiner", True),
    ]
    assert ops[1][2]["snapshot"] == "000008" and ops[1][2]["n_levels"] == 2
    # in a fit pass the labeller is off and the fitter pinned
    ops = ops_of(pinned(demo, tax, fit_pass=True))
    assert [(name, enabled) for name, enabled, _ in ops] == [
        ("kmeans_level_refiner", True),
        ("taxonomy_path_refiner", False),
    ]
    assert ops[0][2]["snapshot"] == "000008"


def test_final_run_without_a_labeller_labels_with_the_fitted_tree():
    demo = _mdf.PipelineConfig.from_yaml(str(ROOT / "configs" / "demo.yaml"))
    demo.stages[0].operators = demo.stages[0].operators[:1]  # the fitter alone
    tax = complete_taxonomy()
    tax.version = "000003"
    ((name, enabled, params),) = ops_of(pinned(demo, tax, fit_pass=False))
    assert (name, enabled) == ("taxonomy_path_refiner", True)
    assert params["storage_uri"] == "./output/demo/taxonomy" and params["embedding_field"] == "emb"
    assert params["snapshot"] == "000003" and "branching_factor" not in params


def fingerprint(path, **loader) -> str:
    ld = ParquetEmbeddingLoader(str(path), embedding_field="emb", **loader)
    return input_fingerprint(ld, ld.get_file_list(), None)


def test_fingerprint_is_the_content_not_the_spelling(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    shutil.copy(SAMPLE, tmp_path / "a" / "s.parquet")
    here = fingerprint(tmp_path / "a" / "s.parquet")
    monkeypatch.chdir(tmp_path / "a")
    assert fingerprint("s.parquet") == here
    assert fingerprint("./../a/s.parquet") == here
    # the same data copied to another folder is the same input
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert fingerprint(tmp_path / "b" / "s.parquet") == here
    # a different filter, a rewritten file or a row cap are other inputs
    assert fingerprint("s.parquet", filter=[["kingdom", "==", "Plantae"]]) != here
    ld = ParquetEmbeddingLoader("s.parquet", embedding_field="emb")
    assert input_fingerprint(ld, ld.get_file_list(), 100) != here
    table = pq.read_table("s.parquet")
    pq.write_table(table.slice(0, 1000), "s.parquet")
    assert fingerprint("s.parquet") != here


def test_labeller_keeps_its_schema_when_the_store_goes_away(tmp_path):
    store = TaxonomyStore(str(tmp_path / "tax"))
    store.save(complete_taxonomy())
    op = TaxonomyPathRefiner(storage_uri=str(tmp_path / "tax"))  # depth read in the driver
    shutil.rmtree(tmp_path / "tax")
    records = [{"id": 1, "embedding": np.ones(4, np.float32)}, {"id": 2, "embedding": None}]
    op.refine_batch(records)
    for rec in records:
        assert set(op.get_output_schema()) <= set(rec)
        assert rec["taxonomy_l1"] == -1 and rec["taxonomy_l2"] == -1 and rec["taxonomy_path"] == ""
        assert rec["taxonomy_error"].startswith("operator_failed")
    assert op.get_stats()["rejected"] == {"operator_failed": 2}


def test_labeller_refuses_a_missing_or_unfinished_taxonomy_when_built(tmp_path):
    with pytest.raises(Exception, match="no taxonomy"):
        TaxonomyPathRefiner(storage_uri=str(tmp_path / "nothing"))
    unfinished = complete_taxonomy()
    unfinished.state = FitState(level=2, phase="lloyd")
    TaxonomyStore(str(tmp_path / "half")).save(unfinished)
    with pytest.raises(ValueError, match="not complete"):
        TaxonomyPathRefiner(storage_uri=str(tmp_path / "half"))


def test_rejected_rows_are_reported_as_mdf_rejected_samples_and_still_pass(tmp_path):
    TaxonomyStore(str(tmp_path / "tax")).save(complete_taxonomy())
    op = TaxonomyPathRefiner(storage_uri=str(tmp_path / "tax"))
    records = [{"id": 1, "embedding": np.ones(4, np.float32)}, {"id": 2, "embedding": [1.0, 2.0]}]
    result = op.process_batch_with_rejected(records)
    assert [r["id"] for r in result.passed] == [1, 2]
    assert [r["id"] for r in result.rejected] == [2]
    details = result.rejected[0]["_rejection_details"]
    assert details["operator"] == "TaxonomyPathRefiner"
    assert details["reason"].startswith("wrong_length")


def test_label_counts_and_merged_stats():
    replicas = [
        {"rejected": {"wrong_length": 2}, "timings": {"assign_s": 1.5}, "input_records": 10},
        {
            "rejected": {"wrong_length": 1, "non_finite": 4},
            "timings": {"assign_s": 0.5},
            "input_records": 20,
        },
    ]
    merged = _mdf.merge_counts(replicas)
    assert merged == {
        "rejected": {"wrong_length": 3, "non_finite": 4},
        "timings": {"assign_s": 2.0},
        "input_records": 30,
    }
    counts = label_counts({"taxonomy": {"TaxonomyPathRefiner": merged, "Other": {"x": 1}}})
    assert counts == {"seen": 30, "labelled": 23, "rejected": {"wrong_length": 3, "non_finite": 4}}


def test_output_is_staged_refused_when_full_and_committed_whole(tmp_path):
    from mdf_taxonomy.engine import OutputExists, StagedOutput

    out = tmp_path / "out"
    staged = StagedOutput(str(out))
    (pathlib.Path(staged.staging) / "part-0.parquet").write_bytes(b"rows")
    assert not out.exists()  # nothing visible until the run ends
    staged.commit()
    assert [p.name for p in out.iterdir()] == ["part-0.parquet"]
    with pytest.raises(OutputExists, match="exists and is not empty.*--overwrite"):
        StagedOutput(str(out))
    # a crashed run leaves its staging folder; the next run clears it, and overwrite replaces
    crashed = StagedOutput(str(out), overwrite=True)
    again = StagedOutput(str(out), overwrite=True)
    assert not pathlib.Path(crashed.staging).exists()
    (pathlib.Path(again.staging) / "part-1.parquet").write_bytes(b"new")
    again.commit()
    assert [p.name for p in out.iterdir()] == ["part-1.parquet"]


def test_unwritable_output_is_named_before_any_work(tmp_path):
    from mdf_taxonomy.engine import OutputExists, StagedOutput

    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OutputExists, match="a_file/out' is not writable"):
        StagedOutput(str(tmp_path / "a_file" / "out"))


def _config_text(**overrides) -> str:
    text = (ROOT / "configs" / "demo.yaml").read_text()
    for old, new in overrides.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("executor:", "executer:", r"unknown top-level section\(s\) \['executer'\]"),
        (
            "      - name: taxonomy_path_refiner\n        params:\n",
            "      - name: taxonomy_path_refiner\n        params:\n          embeding_field: emb\n",
            "unexpected keyword argument 'embeding_field'",
        ),
        ("name: kmeans_level_refiner", "name: kmeans_levels_refiner", "unknown component"),
        (
            "          seed: 0\n",
            "          seed: 0\n          kernel_backend: trtion\n",
            "kernel_backend='trtion'",
        ),
        (
            "  type: ParquetEmbeddingLoader\n",
            "  type: ParquetEmbeddingLoadr\n",
            "data_loader: unknown component 'ParquetEmbeddingLoadr'",
        ),
    ],
)
def test_config_mistakes_are_named_before_the_first_pass(tmp_path, capsys, old, new, message):
    from mdf_taxonomy import cli

    path = tmp_path / "p.yaml"
    path.write_text(_config_text(**{old: new}))
    assert cli.main(["-q", "run", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (ROOT / "output" / "demo" / "taxonomy" / "LOCK").exists()


def test_cli_storage_options_parse():

    opts = cli_options._storage_options(
        ["anon=true", 'client_kwargs={"endpoint_url": "http://x"}', "key=abc"]
    )
    assert opts == {"anon": True, "client_kwargs": {"endpoint_url": "http://x"}, "key": "abc"}
    with pytest.raises(cli_options.CliError, match="KEY=VALUE"):
        cli_options._storage_options(["novalue"])


def test_a_refused_resume_says_what_differs(tmp_path):
    from mdf_taxonomy.engine import describe_input, input_differences

    shutil.copy(SAMPLE, tmp_path / "a.parquet")
    shutil.copy(SAMPLE, tmp_path / "b.parquet")

    def described(**loader):
        ld = ParquetEmbeddingLoader(str(tmp_path), embedding_field="emb", **loader)
        return describe_input(ld, ld.get_file_list(), None)

    before = described()
    table = pq.read_table(tmp_path / "b.parquet")
    pq.write_table(table.slice(0, 10), tmp_path / "b.parquet")
    shutil.copy(SAMPLE, tmp_path / "c.parquet")
    (tmp_path / "a.parquet").unlink()
    said = input_differences(before, described(filter=[["kingdom", "==", "Plantae"]]))
    assert "filter 'None' -> '(kingdom == \"Plantae\")'" in said
    assert "file a.parquet gone" in said and "file b.parquet rewritten" in said
    assert "file c.parquet new" in said


def test_unwritable_storage_is_refused_before_the_first_pass(ray_session, tmp_path):
    from mdf_taxonomy.engine import TaxonomyEngine
    from mdf_taxonomy.model import TaxonomyStoreError

    (tmp_path / "a_file").write_text("not a folder")
    uri = str(tmp_path / "a_file" / "tax")
    engine = TaxonomyEngine(
        n_levels=1, branching_factor=2, embedding_field="emb", storage_uri=uri, progress=False
    )
    with pytest.raises(TaxonomyStoreError, match="a_file/tax"):
        engine.fit(str(SAMPLE))
    assert engine.last_fit is not None and engine.last_fit.pass_log == []


def test_a_run_that_labels_nothing_exits_1_with_its_counts(ray_session, tmp_path, capsys):
    from conftest import write_embeddings

    from mdf_taxonomy import cli

    TaxonomyStore(str(tmp_path / "tax")).save(complete_taxonomy(dim=4))
    write_embeddings(tmp_path / "in" / "x.parquet", np.ones((20, 5), np.float32))  # dim 5
    rc = cli.main(
        [
            "-q",
            "predict",
            "--input",
            str(tmp_path / "in"),
            "--storage-uri",
            str(tmp_path / "tax"),
            "--output",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "labelled none of 20 records (rejected {'wrong_length': 20})" in err
    assert not (tmp_path / "out").exists()


def test_engine_docstring_documents_every_parameter_it_takes():
    from mdf_taxonomy.engine import TaxonomyEngine
    from mdf_taxonomy.model.config import RunConfig, parameter_docs

    own = [
        name
        for name, p in inspect.signature(TaxonomyEngine).parameters.items()
        if p.kind is not p.VAR_KEYWORD
    ]
    taken = own + [f.name for f in dataclasses.fields(TaxonomyConfig) if f.name != "extra"]
    taken += [f.name for f in dataclasses.fields(RunConfig)]
    docs = parameter_docs(TaxonomyEngine)
    assert sorted(docs) == sorted(set(taken))  # every one, none the engine does not take
    for name in taken:
        spec, meaning = docs[name]
        assert ", default=" in spec and meaning, name
    # the tables are the one owner: each entry is theirs, word for word
    for cls in (TaxonomyConfig, RunConfig):
        for name, entry in parameter_docs(cls).items():
            if name in docs:
                assert docs[name] == entry, name
    assert docs["storage_uri"] == (
        "str, default='./output/taxonomy'",
        "Where the taxonomy's snapshots live (any fsspec URI).",
    )
    with pytest.raises(TypeError, match="unknown parameter"):
        TaxonomyEngine(extra={})
