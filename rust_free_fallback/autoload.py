"""Opt-in hook so the stock `mdf run` of a real MDF install finds plugin operators.

MDF's own CLI imports no third-party plugin. `python -m rust_free_fallback.autoload
install` writes a one-line `.pth` file into site-packages; at interpreter start it
installs a meta-path finder that waits for `mega_data_factory.framework` to be
imported and then calls every `mega_data_factory.plugins` entry point once (for
mdf-taxonomy: `mdf_taxonomy:register`). Until MDF is imported nothing else loads,
so other Python programs pay nothing. `uninstall` removes the file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import logging
import sys
import sysconfig
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

PLUGIN_GROUP = "mega_data_factory.plugins"
TARGET = "mega_data_factory.framework"
PTH_NAME = "mdf_plugins_autoload.pth"
PTH_LINE = "import rust_free_fallback.autoload as _mdf_autoload; _mdf_autoload.install()\n"
logger = logging.getLogger(__name__)


def load_plugins(specs: Sequence[str] = (), entry_point_group: str | None = PLUGIN_GROUP) -> None:
    """Import `module[:function]` specs (calling the function) and entry-point plugins."""
    for spec in specs:
        module_name, _, func = spec.partition(":")
        module = importlib.import_module(module_name)
        if func:
            getattr(module, func)()
    if entry_point_group:
        for ep in entry_points(group=entry_point_group):
            try:
                obj = ep.load()
                if callable(obj):
                    obj()
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not block a run
                logger.warning("plugin entry point %s failed: %s", ep.name, exc)


class _LoadPluginsAfterMDF(importlib.abc.MetaPathFinder):
    """Runs load_plugins() right after mega_data_factory.framework has executed."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001
            run_module(module)
            load_plugins()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Arm the hook in this interpreter (what the .pth line calls)."""
    if TARGET in sys.modules:
        load_plugins()
    elif not any(isinstance(f, _LoadPluginsAfterMDF) for f in sys.meta_path):
        sys.meta_path.insert(0, _LoadPluginsAfterMDF())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rust_free_fallback.autoload", description=__doc__.splitlines()[0]
    )
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument(
        "--site-packages",
        default=sysconfig.get_paths()["purelib"],
        help="where the .pth goes (default: this interpreter's site-packages)",
    )
    args = p.parse_args(argv)
    pth = Path(args.site_packages) / PTH_NAME
    if args.action == "install":
        pth.write_text(PTH_LINE)
        print(f"installed {pth}: `mdf run` now loads {PLUGIN_GROUP} entry points")
    elif args.action == "uninstall":
        pth.unlink(missing_ok=True)
        print(f"removed {pth}")
    else:
        print(f"{pth}: {'installed' if pth.exists() else 'not installed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
