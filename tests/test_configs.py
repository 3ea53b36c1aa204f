"""The shipped configs as users run them, on the fallback runtime, and the README's YAML
lines equal to theirs. (The real-MDF runs are in test_real_mdf.py; the add-to-existing
config on the fallback in test_fallback_text_operators.py, the text one in
test_text_embedding.py.)"""

from __future__ import annotations

import re

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, SAMPLE
from test_real_mdf import rewrite

from mdf_taxonomy import cli
from mdf_taxonomy.model import TaxonomyStore

_BLOCK = re.compile(r"<!-- (configs/[\w.]+) -->\n```yaml\n(.*?)```", re.S)


def test_readme_yaml_matches_the_configs_line_for_line():
    readme = (ROOT / "README.md").read_text()
    blocks = _BLOCK.findall(readme)
    names = {name for name, _ in blocks}
    assert names >= {
        "configs/add_to_existing_pipeline.yaml",
        "configs/clean_embed_taxonomize.yaml",
        "configs/label_new_crawl.yaml",
    }
    for name, block in blocks:
        config = (ROOT / name).read_text()
        assert block in config, f"README's lines for {name} are not in it, as written"
    for name in re.findall(r"`(configs/[\w.]+\.yaml)`", readme):
        assert (ROOT / name).is_file(), f"README names {name}, which does not exist"


def test_label_new_crawl_keeps_every_column_and_labels_like_the_tree(ray_session, tmp_path, capsys):
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    demo["stages"][0]["operators"][0]["params"].update(max_iter=2, branching_factor=[4, 2])
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(demo))
    fit = rewrite(tmp_path / "demo.yaml", tmp_path / "fit")
    assert cli.main(["-q", "run", "-c", str(fit)]) == 0
    storage = str(tmp_path / "fit" / "taxonomy")
    label = rewrite(ROOT / "configs" / "label_new_crawl.yaml", tmp_path / "label", storage=storage)
    capsys.readouterr()
    assert cli.main(["-q", "run", "-c", str(label)]) == 0
    printed = capsys.readouterr().out
    out_dir = tmp_path / "label" / "labelled"
    assert "fit:" not in printed and f"labelled records: {out_dir}" in printed
    assert f"taxonomy artifact: {storage}" in printed
    sample = pq.read_table(SAMPLE)
    out = ds.dataset(out_dir, format="parquet", partitioning="hive").to_table()
    assert sorted(out["uuid"].to_pylist()) == sorted(sample["uuid"].to_pylist())
    fields = {"taxonomy_path", "taxonomy_l1", "taxonomy_l2", "taxonomy_distance"}
    assert set(out.column_names) == {
        *sample.column_names,
        *fields,
        "taxonomy_margin",
        "taxonomy_error",
    }
    by_id = {r["uuid"]: r for r in out.to_pylist()}
    rows = sample.to_pylist()
    for r in rows:  # every input column unchanged
        got = by_id[r["uuid"]]
        assert all(got[c] == pytest.approx(r[c]) if c == "emb" else got[c] == r[c] for c in r), r[
            "uuid"
        ]
    tax = TaxonomyStore(storage).load()
    labels = tax.assign_paths(np.stack([np.asarray(r["emb"], np.float32) for r in rows]))
    got = np.array([[by_id[r["uuid"]][f"taxonomy_l{i}"] for i in (1, 2)] for r in rows])
    assert np.array_equal(got, labels.paths)
    margin = np.array([by_id[r["uuid"]]["taxonomy_margin"] for r in rows])
    assert np.allclose(margin, labels.margin, atol=1e-5) and (margin >= 0).all()
