"""The public API, ``import baddiff_core as bd``: what the chapters use, and nothing stale."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import nbformat
import pytest

import baddiff_core as bd

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


@pytest.mark.parametrize("name", bd.__all__)
def test_every_exported_name_is_its_module_s_object(name):
    value = getattr(bd, name)
    if name in bd._MODULES:
        assert value is importlib.import_module(f"baddiff_core.{name}")
    else:
        module = importlib.import_module(f"baddiff_core.{bd._WHERE[name]}")
        assert value is getattr(module, name)
        # a function or class is defined where bd says (not re-exported from elsewhere)
        if hasattr(value, "__module__") and callable(value):
            assert value.__module__.startswith(f"baddiff_core.{bd._WHERE[name]}")


def test_exported_names_do_not_shadow_submodules():
    """A submodule import sets the package attribute of its name: ``bd.train`` would turn
    from the function into the module as soon as anything imported
    ``baddiff_core.train``."""
    submodules = {p.stem for p in (ROOT / "baddiff_core").glob("*.py")}
    submodules |= {p.name for p in (ROOT / "baddiff_core").iterdir() if p.is_dir()}
    clash = set(bd._WHERE) & submodules
    assert not clash, f"exported names that are also submodules: {sorted(clash)}"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        bd.no_such_name  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    """``import baddiff_core`` is cheap: the CLI's --help does not wait for PyTorch."""
    code = "import sys, baddiff_core; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def _bd_attributes(path: pathlib.Path) -> set[str]:
    """Every ``bd.X`` a chapter's code reads (magics skipped)."""
    found = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        lines = [  # an IPython magic becomes a `pass` at its indentation
            line[: len(line) - len(line.lstrip())] + "pass"
            if line.lstrip().startswith(("%", "!"))
            else line
            for line in cell.source.splitlines()
        ]
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "bd"
            ):
                found.add(node.attr)
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapters_use_the_public_api(path):
    """A chapter imports ``baddiff_core as bd`` and reads only names ``bd`` exports."""
    source = "\n".join(
        c.source
        for c in nbformat.read(path, as_version=4).cells
        if c.cell_type == "code"
    )
    assert "import baddiff_core as bd" in source
    unknown = _bd_attributes(path) - set(bd.__all__)
    assert not unknown, f"{path.name} reads bd names that are not exported: {unknown}"
