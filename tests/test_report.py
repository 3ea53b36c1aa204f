"""The report (issue 19): facts built from the artifact and a bounded sample of labelled
rows of the bundled BioCLIP 2 sample, and the HTML page opened in headless Chromium."""

from __future__ import annotations

import json
import shutil
import time

import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

LABELS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
MAX_ROWS = 600  # below the sample's 1030 rows: the per-leaf cap is exercised


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mdf_taxonomy.engine import TaxonomyEngine
    from mdf_taxonomy.report import build_report

    root = tmp_path_factory.mktemp("report")
    engine = TaxonomyEngine(
        2, [8, 3], 768, str(root / "tax"), metric="cosine", seed=0, max_iter=3, progress=False
    )
    engine.fit(str(SAMPLE), output=str(root / "labelled"))
    facts = build_report(
        str(root / "tax"),
        str(root / "out"),
        data=str(root / "labelled"),
        labels=LABELS,
        max_rows=MAX_ROWS,
    )
    return root, facts


def test_facts_score_levels_against_labels_beside_flat_kmeans(built):
    root, facts = built
    scored = {(a["level"], a["label"]): a for a in facts["agreement"]}
    for level in (1, 2):
        for label in ("class", "order"):
            a = scored[(level, label)]
            assert a["k"] == (8, 24)[level - 1]
            for side in ("tree", "kmeans"):
                assert set(a[side]) == {"ami", "nmi", "ari"}
                assert -1.0 <= a[side]["ami"] <= 1.0
    assert json.loads((root / "out" / "report.json").read_text())["agreement"] == facts["agreement"]
    assert set(facts["landing"]) == set(LABELS) and facts["landing"]["class"][0]["n"] > 0


def test_counts_add_up_and_nothing_is_hidden(built):
    _, facts = built
    data = facts["data"]
    assert data["rows"] == 1030 and data["labelled"] + sum(data["rejected"].values()) == 1030
    assert data["sampled"] <= MAX_ROWS
    assert all(0 <= n <= data["sampled"] for n in data["unlabelled"].values())
    nodes = facts["nodes"]
    level1 = [n for n in nodes if n["level"] == 1]
    assert sum(n["size"] for n in level1) == data["labelled"]
    for n in level1:  # every parent's rows are its children's (drawn or summarised)
        kids = [k for k in nodes if k["parent"] == n["id"]]
        assert sum(k["size"] for k in kids) == n["size"]
        assert n["path"] == str(n["node"]) and n["cohesion"] is not None and n["members"]
    assert [b["nodes"] for b in facts["balance"]] == [8, 24]
    assert [c["lloyd_passes"] >= 1 for c in facts["convergence"]] == [True, True]
    assert all(len(c["inertia"]) == c["lloyd_passes"] for c in facts["convergence"])
    assert sum(facts["dedup"]["histogram"]) == facts["dedup"]["rows"]


def test_small_nodes_are_summarised_not_dropped(built):
    from mdf_taxonomy.model import TaxonomyStore
    from mdf_taxonomy.report import compute_facts
    from mdf_taxonomy.report.sample import read_sample

    root, _ = built
    tax = TaxonomyStore(str(root / "tax")).load()
    sample = read_sample(str(root / "labelled"), 2, 24, 768, "emb", ["class"], 200)
    facts = compute_facts(tax, sample, max_children=2)
    more = [n for n in facts["nodes"] if n.get("more_nodes")]
    assert more and all(n["label"] == f"+{n['size']} rows in {n['more_nodes']} nodes" for n in more)
    assert sum(n["size"] for n in facts["nodes"] if n["level"] == 1) == sample.rows


def test_map_sidecar_and_cli(built, tmp_path, capsys):
    from mdf_taxonomy import cli

    root, facts = built
    table = pq.read_table(root / "out" / "map.parquet")
    assert table.column_names == ["id", "taxonomy_path", "x", "y"]
    assert table.num_rows == facts["data"]["sampled"] == len(facts["map"]["x"])
    argv = ["report", str(root / "tax"), "--data", str(root / "labelled"), "--out"]
    assert cli.main([*argv, str(tmp_path / "cli"), "--labels", "class,order"]) == 0
    assert (tmp_path / "cli" / "report.html").stat().st_size > 1_000_000  # plotly inlined
    assert "report: " in capsys.readouterr().out
    assert cli.main(["report", str(root / "tax"), "--labels", "class", "--out", "x"]) == 2


def _chromium() -> tuple[str, str]:
    """(browser, driver) paths, or skip naming what is missing."""
    browser = next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "no headless Chromium here (apt-get install chromium chromium-driver; .ci/run does)"
        )
    return browser, driver


def test_html_renders_in_headless_chromium_and_a_click_shows_children(built, tmp_path):
    browser, driver_path = _chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, facts = built
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        driver.get((root / "out" / "report.html").as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.reportReady"))
        slices = driver.find_elements(By.CSS_SELECTOR, "#treemap g.slice")
        assert len(slices) > 8  # the root, its 8 children and theirs
        ActionChains(driver).move_to_element(slices[1]).click().perform()
        panel = driver.find_element(By.ID, "panel")
        WebDriverWait(driver, 10).until(lambda d: panel.get_attribute("data-node") != "root")
        node = next(n for n in facts["nodes"] if n["id"] == panel.get_attribute("data-node"))
        kids = panel.find_elements(By.CSS_SELECTOR, "#children li")
        assert len(kids) == node["children"] == 3 and f"path {node['path']}" in panel.text
        time.sleep(0.5)  # the drill-down transition
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_rejected_rows_are_counted_by_reason(built, tmp_path):
    import pyarrow as pa
    import pyarrow.compute as pc

    from mdf_taxonomy.report.sample import read_sample

    root, _ = built
    table = pq.read_table(root / "labelled")
    bad = table.slice(0, 5)
    for name in ("taxonomy_l1", "taxonomy_l2"):
        i = bad.schema.get_field_index(name)
        bad = bad.set_column(i, name, pa.array([-1] * 5, pa.int32()))
    i = bad.schema.get_field_index("taxonomy_error")
    bad = bad.set_column(i, "taxonomy_error", pa.array(["non_finite: field 'emb'"] * 5))
    pq.write_table(pa.concat_tables([table, bad]), tmp_path / "with_bad.parquet")
    sample = read_sample(str(tmp_path / "with_bad.parquet"), 2, 24, 768, None, ["class"], 100)
    assert sample.rows == 1035 and sample.rejected == {"non_finite": 5}
    assert int(sample.leaf_counts.sum()) == 1030 and len(sample.ids) <= 100
    assert pc.sum(pc.equal(table.column("taxonomy_error"), "")).as_py() == 1030


def test_a_tree_alone_is_reported_by_node_count(built, tmp_path):
    from mdf_taxonomy.report import build_report

    root, _ = built
    facts = build_report(str(root / "tax"), str(tmp_path / "alone"))
    assert "data" not in facts and "agreement" not in facts and "map" not in facts
    assert sum(n["size"] for n in facts["nodes"] if n["level"] == 1) == 24  # one per leaf
    assert (tmp_path / "alone" / "report.html").exists()
    assert not (tmp_path / "alone" / "map.parquet").exists()
