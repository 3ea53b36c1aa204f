"""The second tier: the documented pipelines under the REAL Mega-Data-Factory framework.

MDF's package (../shared/vendor/mega-data-factory, beside the clone) goes on the
PYTHONPATH of a child process, so `mdf_taxonomy._mdf` binds to it there; this
process stays on rust_free_fallback and fits the same data with the same seed, and
the trees must be equal bit for bit. Each run checks rows in = rows out + rows MDF's
own operators filtered, and every id once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, SAMPLE
from taxonomy_toys import assert_same_tree

from mdf_taxonomy import cli
from mdf_taxonomy.engine import TaxonomyEngine
from mdf_taxonomy.model import TaxonomyStore

VENDOR = ROOT.parent / "shared" / "vendor" / "mega-data-factory"
BIN = pathlib.Path(sys.executable).parent


@pytest.fixture(scope="module")
def real_env() -> dict[str, str]:
    """The environment of a child process that imports the real MDF framework."""
    if not (VENDOR / "mega_data_factory" / "framework").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"the real MDF framework is missing: looked for {VENDOR}")
        pytest.skip(f"the real MDF framework is not beside this clone ({VENDOR})")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(VENDOR), str(ROOT)])
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    probe = subprocess.run(
        [sys.executable, "-c", "import mdf_taxonomy._mdf as m; print(m.MDF_FLAVOUR)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.stdout.strip() == "mega_data_factory", probe.stderr[-2000:]
    return env


def run_real(args: list[str], env: dict[str, str], cwd: pathlib.Path, timeout: int = 900) -> str:
    """Run a command under the real framework; returns its stdout (asserting rc 0)."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def rewrite(config: pathlib.Path, tmp: pathlib.Path, **paths: str) -> pathlib.Path:
    """The config with its storage, output and data paths moved under `tmp`."""
    cfg = yaml.safe_load(config.read_text())
    cfg["data_loader"]["params"]["path"] = paths.get("data", str(SAMPLE))
    for stage in cfg["stages"]:
        for op in stage["operators"]:
            if "storage_uri" in op.get("params", {}):
                op["params"]["storage_uri"] = paths.get("storage", str(tmp / "taxonomy"))
    cfg["data_writer"]["params"]["output_path"] = str(tmp / "labelled")
    out = tmp / config.name
    tmp.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def labelled(path: pathlib.Path) -> pa.Table:
    return ds.dataset(str(path), format="parquet", partitioning="hive").to_table()


def ids_once(table: pa.Table, expected: list[str]) -> None:
    got = table["uuid"].to_pylist()
    assert len(got) == len(set(got)), "a record was written more than once"
    assert sorted(got) == sorted(expected)


@pytest.fixture(scope="module")
def sample() -> pa.Table:
    return pq.read_table(SAMPLE)


@pytest.fixture(scope="module")
def demo_real(real_env, tmp_path_factory) -> pathlib.Path:
    """The bundled demo, fitted and labelled by `mdf-taxonomy run` on the real MDF."""
    tmp = tmp_path_factory.mktemp("demo_real")
    cfg = rewrite(ROOT / "configs" / "demo.yaml", tmp)
    out = run_real([str(BIN / "mdf-taxonomy"), "-q", "run", "-c", str(cfg)], real_env, ROOT)
    (tmp / "stdout.txt").write_text(out)
    return tmp


def test_demo_runs_under_real_mdf_and_equals_the_fallback_tree(
    demo_real, ray_session, sample, tmp_path
):
    out = (demo_real / "stdout.txt").read_text()
    assert "records in: 1030, out: 1030" in out
    assert "labelled: 1030 of 1030, rejected 0" in out
    table = labelled(demo_real / "labelled")
    ids_once(table, sample["uuid"].to_pylist())
    assert set(table["taxonomy_error"].to_pylist()) == {""}
    assert set(sample.column_names) <= set(table.column_names)
    # the fit's summary lies next to its snapshots, counts and passes included
    summary = json.loads(next((demo_real / "taxonomy" / "runs").glob("*.json")).read_text())
    assert summary["runtime"] == "mega_data_factory"
    assert summary["fit"]["rows_seen"] == 1030 and summary["fit"]["passes_run"] >= 3
    assert summary["label"]["labelling"] == {"seen": 1030, "labelled": 1030, "rejected": {}}
    # the same config under the fallback, in this process: the same tree bit for bit
    cfg = rewrite(ROOT / "configs" / "demo.yaml", tmp_path)
    assert cli.main(["-q", "run", "-c", str(cfg)]) == 0
    assert_same_tree(
        TaxonomyStore(str(demo_real / "taxonomy")).load(),
        TaxonomyStore(str(tmp_path / "taxonomy")).load(),
    )


def _clean_survivors(sample: pa.Table) -> pa.Table:
    """What the add-to-existing YAML's MDF stages keep: a common name of >= 4 characters,
    then the first record of each species (one loader, one replica: file order)."""
    seen: set[str] = set()
    keep = []
    for i, (name, species) in enumerate(
        zip(sample["common_name"].to_pylist(), sample["species"].to_pylist(), strict=True)
    ):
        if len(name or "") < 4:
            continue
        key = " ".join(species.split()).lower() if isinstance(species, str) and species else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        keep.append(i)
    return sample.take(keep)


def test_add_to_existing_pipeline_with_mdf_operators(real_env, ray_session, sample, tmp_path):
    tmp = tmp_path / "real"
    cfg = rewrite(ROOT / "configs" / "add_to_existing_pipeline.yaml", tmp)
    out = run_real([str(BIN / "mdf-taxonomy"), "-q", "run", "-c", str(cfg)], real_env, ROOT)
    survivors = _clean_survivors(sample)
    filtered = len(sample) - len(survivors)
    assert 0 < filtered < len(sample)
    # rows in = rows out + rows MDF's own filter and dedup took out
    assert f"records in: {len(sample)}, out: {len(survivors)}" in out
    assert f"labelled: {len(survivors)} of {len(survivors)}" in out
    table = labelled(tmp / "labelled")
    ids_once(table, survivors["uuid"].to_pylist())
    assert set(table["taxonomy_error"].to_pylist()) == {""}
    # the fallback's tree on the rows that MDF's stages let through
    pq.write_table(survivors, tmp_path / "survivors.parquet")
    params = yaml.safe_load(cfg.read_text())["stages"][1]["operators"][0]["params"]
    engine = TaxonomyEngine(
        n_levels=params["n_levels"],
        branching_factor=params["branching_factor"],
        metric=params["metric"],
        seed=params["seed"],
        max_iter=params["max_iter"],  # and the embedding column found, as in the YAML
        storage_uri=str(tmp_path / "fallback"),
        progress=False,
    )
    want = engine.fit(str(tmp_path / "survivors.parquet"))
    assert_same_tree(TaxonomyStore(str(tmp / "taxonomy")).load(), want)


FIT_ARGS = {
    "n_levels": 1,
    "branching_factor": 6,
    "metric": "cosine",
    "seed": 3,
    "max_iter": 1,
    "embedding_field": "emb",
}


def test_engine_fit_and_cli_fit_under_real_mdf(real_env, ray_session, sample, tmp_path):
    code = (
        "import sys, json; from mdf_taxonomy import TaxonomyEngine; "
        f"e = TaxonomyEngine(**json.loads({json.dumps(json.dumps(FIT_ARGS))}), "
        "storage_uri=sys.argv[2], progress=False); "
        "t = e.fit(sys.argv[1], output=sys.argv[3]); print('summary', e.last_summary['label'])"
    )
    run_real(
        [
            sys.executable,
            "-c",
            code,
            str(SAMPLE),
            str(tmp_path / "engine"),
            str(tmp_path / "engine_out"),
        ],
        real_env,
        tmp_path,
    )
    out = run_real(
        [
            str(BIN / "mdf-taxonomy"),
            "-q",
            "fit",
            "--input",
            str(SAMPLE),
            "--storage-uri",
            str(tmp_path / "cli"),
            "--output",
            str(tmp_path / "cli_out"),
            "--n-levels",
            "1",
            "--branching-factor",
            "6",
            "--metric",
            "cosine",
            "--seed",
            "3",
            "--max-iter",
            "1",
            "--embedding-field",
            "emb",
        ],
        real_env,
        tmp_path,
    )
    assert "labelled: 1030 of 1030" in out and "run summary:" in out
    for name in ("engine_out", "cli_out"):
        ids_once(labelled(tmp_path / name), sample["uuid"].to_pylist())
    want = TaxonomyEngine(**FIT_ARGS, storage_uri=str(tmp_path / "fallback"), progress=False).fit(
        str(SAMPLE)
    )
    for name in ("engine", "cli"):
        assert_same_tree(TaxonomyStore(str(tmp_path / name)).load(), want)


@pytest.fixture(scope="module")
def crawl_with_bad_rows(tmp_path_factory, sample) -> pathlib.Path:
    """The sample plus three records whose embeddings cannot be labelled."""
    root = tmp_path_factory.mktemp("crawl")
    shutil.copy(SAMPLE, root / "part-0.parquet")
    dim = len(sample["emb"][0])
    bad = sample.slice(0, 3).drop_columns(["emb", "uuid"])
    bad = bad.append_column("uuid", pa.array(["bad-null", "bad-short", "bad-nan"]))
    emb = pa.array([None, [0.1] * (dim - 1), [float("nan")] * dim], pa.list_(pa.float32()))
    pq.write_table(
        bad.append_column("emb", emb).select(sample.column_names), root / "part-1.parquet"
    )
    return root


def test_label_only_config_and_stock_mdf_cli(
    real_env, demo_real, crawl_with_bad_rows, sample, tmp_path
):
    storage = str(demo_real / "taxonomy")
    want_ids = [*sample["uuid"].to_pylist(), "bad-null", "bad-short", "bad-nan"]
    reasons = {"missing_embedding": 1, "wrong_length": 1, "non_finite": 1}
    # mdf-taxonomy run on a labelling-only YAML: no refit, counts reach the user
    ours = rewrite(
        ROOT / "configs" / "label_new_crawl.yaml",
        tmp_path / "ours",
        data=str(crawl_with_bad_rows),
        storage=storage,
    )
    out = run_real([str(BIN / "mdf-taxonomy"), "-q", "run", "-c", str(ours)], real_env, ROOT)
    assert "records in: 1033, out: 1033" in out
    assert f"labelled: 1030 of 1033, rejected {reasons}" in out
    assert "fit:" not in out
    # the stock MDF CLI, with the plugin hook armed in a site dir of its own
    site = tmp_path / "site"
    site.mkdir()
    run_real(
        [
            sys.executable,
            "-m",
            "rust_free_fallback.autoload",
            "install",
            "--site-packages",
            str(site),
        ],
        real_env,
        ROOT,
    )
    stock = rewrite(
        ROOT / "configs" / "label_new_crawl.yaml",
        tmp_path / "stock",
        data=str(crawl_with_bad_rows),
        storage=storage,
    )
    cfg = yaml.safe_load(stock.read_text())  # and MDF's own rejected-samples output on
    cfg["executor"]["rejected_samples"] = {
        "enabled": True,
        "output_path": str(tmp_path / "rejected"),
    }
    cfg["data_writer"]["params"]["partition_by"] = "taxonomy_l1"  # MDF's writer, by node
    stock.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code = (
        "import site, sys, runpy; site.addsitedir(sys.argv.pop(1)); "
        "sys.argv[0] = 'mdf'; runpy.run_module('mega_data_factory.cli', run_name='__main__')"
    )
    out = run_real([sys.executable, "-c", code, str(site), "run", "-c", str(stock)], real_env, ROOT)
    assert "Input samples: 1033" in out and "Output samples: 1033" in out
    rejected = labelled(tmp_path / "rejected").to_pylist()  # counted where MDF counts them
    assert sorted(r["uuid"] for r in rejected) == ["bad-nan", "bad-null", "bad-short"]
    assert {r["_rejection_details"]["reason"].split(":")[0] for r in rejected} == set(reasons)
    tax = TaxonomyStore(storage).load()
    rows = sample.to_pylist()
    want = tax.assign_paths(np.stack([np.asarray(r["emb"], np.float32) for r in rows]))[0]
    for name in ("ours", "stock"):
        table = labelled(tmp_path / name / "labelled")
        ids_once(table, want_ids)
        by_id = {r["uuid"]: r for r in table.to_pylist()}
        got = np.array(
            [[by_id[r["uuid"]][f"taxonomy_l{i + 1}"] for i in range(tax.n_levels)] for r in rows]
        )
        assert np.array_equal(got, want), f"{name}: labels differ from Taxonomy.assign_paths"
        errors = {u: by_id[u]["taxonomy_error"] for u in ("bad-null", "bad-short", "bad-nan")}
        assert errors["bad-null"].startswith("missing_embedding")
        assert errors["bad-short"].startswith("wrong_length")
        assert errors["bad-nan"].startswith("non_finite")
        assert all(by_id[u]["taxonomy_l1"] == -1 for u in errors)
    # MDF's partition_by reads back by node with pushdown: that node's rows, its files only
    dataset = ds.dataset(str(tmp_path / "stock" / "labelled"), partitioning="hive")
    table = dataset.to_table()
    for node in sorted(set(table["taxonomy_l1"].to_pylist())):
        where = ds.field("taxonomy_l1") == node
        files = [f.path for f in dataset.get_fragments(filter=where)]
        assert files and all(f"/taxonomy_l1={node}/" in f for f in files)
        got = sorted(dataset.to_table(filter=where)["uuid"].to_pylist())
        assert got == sorted(table.filter(where)["uuid"].to_pylist())


def test_clean_embed_taxonomize_under_real_mdf(real_env, tmp_path):
    """Real text through MDF's length filter and exact dedup, our embedding refiner, the fit
    and the labeller, written in Hive folders by node by our PartitionedParquetWriter."""
    from test_text_embedding import check_output, clean_survivors, small_config

    cfg = small_config(tmp_path)
    out = run_real([str(BIN / "mdf-taxonomy"), "-q", "run", "-c", str(cfg)], real_env, ROOT)
    kept = len(clean_survivors())
    assert f"labelled: {kept} of {kept}, rejected 0" in out
    summary = json.loads(next((tmp_path / "taxonomy" / "runs").glob("*.json")).read_text())
    assert summary["runtime"] == "mega_data_factory"
    assert TaxonomyStore(str(tmp_path / "taxonomy")).load().dim == 384
    check_output(tmp_path / "labelled")
