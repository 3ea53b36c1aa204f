"""The package's shape: layers import only those below them, modules stay small, and
importing a module does nothing but define it."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "mdf_taxonomy"
MAX_MODULE_LINES = 420

# lowest first; a module may import its own layer and the layers listed before it
LAYERS = (
    "_version",
    "_mdf",
    "kernels",
    "model",
    "backend",
    "passes",
    "curation",  # below operators: the sampling and dedup operators are its MDF faces
    "operators",
    "report",
    "engine",
    "cli",
)
# the package root only re-exports lazily; _mdf is the seam to MDF and imports none of ours
SEAM = "_mdf"


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(layer: str) -> int:
    return LAYERS.index(layer)


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every mdf_taxonomy module this one imports, at any depth of the code."""
    package = name if name in ("mdf_taxonomy",) or _is_package(name) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mdf_taxonomy")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("mdf_taxonomy"):
                # `from pkg import sub` imports the submodule, not only the package
                for a in node.names:
                    found.add(f"{mod}.{a.name}" if _exists(f"{mod}.{a.name}") else mod)
    return found


def _exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _is_package(name: str) -> bool:
    return (ROOT.joinpath(*name.split(".")) / "__init__.py").exists()


def test_layers_import_only_downwards():
    wrong = []
    for name, tree in sorted(_modules().items()):
        layer = _layer(name)
        if not layer:
            continue  # the package root: lazy re-exports only (checked below)
        for target in sorted(_imports(name, tree)):
            t_layer = _layer(target)
            if not t_layer:
                wrong.append(f"{name} imports the package root ({target})")
            elif layer in (SEAM, "_version") and t_layer != layer:
                wrong.append(f"{name} (the MDF seam) imports {target}")
            elif _rank(t_layer) > _rank(layer):
                wrong.append(f"{name} ({layer}) imports {target} ({t_layer}), a higher layer")
    assert not wrong, "\n".join(wrong)


def test_no_module_is_over_the_size_limit():
    big = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, big


def test_no_import_cycle_between_modules():
    graph = {
        name: {t for t in _imports(name, tree) if t != name} for name, tree in _modules().items()
    }
    for targets in graph.values():  # a package import stands for the package's __init__
        targets &= set(graph)
    seen: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == "mdf_taxonomy":
                continue
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in seen:
                visit(nxt, stack + [nxt])
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize(
    "module",
    ["mdf_taxonomy", "mdf_taxonomy.kernels", "mdf_taxonomy.model", "mdf_taxonomy.passes.records"],
)
def test_importing_a_low_layer_has_no_side_effects(module):
    code = (
        f"import sys; import {module}\n"
        "heavy = sorted(m for m in ('ray', 'rust_free_fallback', 'mega_data_factory', 'triton')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


def test_importing_the_package_registers_nothing():
    code = (
        "import mdf_taxonomy, sys\n"
        "assert 'mdf_taxonomy.operators' not in sys.modules, 'operators imported'\n"
        "from mdf_taxonomy import _mdf\n"
        "assert 'TaxonomyPathRefiner' not in _mdf.OperatorRegistry.list_operators()\n"
        "mdf_taxonomy.register()\n"
        "assert 'TaxonomyPathRefiner' in _mdf.OperatorRegistry.list_operators()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
