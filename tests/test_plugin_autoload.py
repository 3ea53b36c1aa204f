"""Registration: by register(), under both spellings, and through the opt-in autoload hook."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from conftest import ROOT

import mdf_taxonomy
from mdf_taxonomy import _mdf


def test_register_gives_both_spellings_idempotently():
    before = dict(_mdf.OperatorRegistry._operators)
    mdf_taxonomy.register()
    ops = _mdf.OperatorRegistry._operators
    assert ops == before
    assert ops["KMeansLevelRefiner"] is ops["KmeansLevelRefiner"]
    assert ops["TaxonomyPathRefiner"].__name__ == "TaxonomyPathRefiner"
    # MDF's YAML rule maps the snake-case names onto registered keys
    for snake in ("kmeans_level_refiner", "taxonomy_path_refiner"):
        assert "".join(p.capitalize() for p in snake.split("_")) in ops


def test_stock_mdf_import_triggers_plugin_registration(tmp_path):
    """A stand-in `mega_data_factory` (re-exporting the fallback) plays the real install:
    with the hook armed, importing its framework registers mdf-taxonomy by entry point."""
    fake = tmp_path / "mega_data_factory"
    (fake / "framework").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "framework" / "__init__.py").write_text(
        "from rust_free_fallback.framework import *  # noqa\n"
        "from rust_free_fallback.framework import OperatorRegistry\n"
    )
    (fake / "framework" / "config.py").write_text(
        "from rust_free_fallback.framework.config import *  # noqa\n"
    )
    code = textwrap.dedent("""
        import sys
        import rust_free_fallback.autoload as a
        a.install()
        assert "mdf_taxonomy" not in sys.modules
        from mega_data_factory.framework import OperatorRegistry
        import mdf_taxonomy._mdf as seam
        print(seam.MDF_FLAVOUR, sorted(OperatorRegistry.list_operators()))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("mega_data_factory")
    assert "KmeansLevelRefiner" in out.stdout and "TaxonomyPathRefiner" in out.stdout


def test_install_writes_and_removes_the_pth(tmp_path):
    from rust_free_fallback import autoload

    autoload.main(["install", "--site-packages", str(tmp_path)])
    pth = tmp_path / autoload.PTH_NAME
    assert pth.read_text() == autoload.PTH_LINE
    autoload.main(["uninstall", "--site-packages", str(tmp_path)])
    assert not pth.exists()
