"""A static check of the chapters: a name that quick mode defines is defined in full
mode too.

Every chapter branches on ``settings.quick``. A name assigned only in the quick branch
and read after it would be a ``NameError`` in full mode (``QUICK = False``), which CI's
quick build never sees. This test reads each chapter's code (IPython magics stripped)
and, for every ``if settings.quick:`` (or ``if not settings.quick:``), compares the
names each branch binds.
"""

from __future__ import annotations

import ast

import nbformat
import pytest

from conftest import chapter_notebooks

CHAPTERS = chapter_notebooks()


def chapter_code(path) -> str:
    cells = nbformat.read(path, as_version=4).cells
    lines = []
    for cell in cells:
        if cell.cell_type == "code":
            # an IPython magic becomes `pass`, keeping its indent
            for line in cell.source.splitlines():
                magic = line.lstrip().startswith(("%", "!"))
                lines.append(
                    line[: len(line) - len(line.lstrip())] + "pass" if magic else line
                )
    return "\n".join(lines)


def bound_names(statements: list[ast.stmt]) -> set[str]:
    """Names that ``statements`` bind at their own level (assignments, imports, defs,
    loops, with)."""
    names: set[str] = set()
    for statement in statements:
        for node in ast.walk(ast.Module(body=[statement], type_ignores=[])):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update(
                    (alias.asname or alias.name).split(".")[0] for alias in node.names
                )
    return names


def is_quick_test(test: ast.expr) -> bool | None:
    """True for ``settings.quick``, False for ``not settings.quick``, None otherwise."""

    def is_quick(node: ast.expr) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "quick"
            and isinstance(node.value, ast.Name)
            and node.value.id == "settings"
        )

    if is_quick(test):
        return True
    if (
        isinstance(test, ast.UnaryOp)
        and isinstance(test.op, ast.Not)
        and is_quick(test.operand)
    ):
        return False
    return None


def names_missing_in_full_mode(code: str) -> dict[int, set[str]]:
    """``{line of the if: names bound only in the quick branch and read after it}``."""
    tree = ast.parse(code)
    missing: dict[int, set[str]] = {}
    for node in ast.walk(tree):
        if (
            not isinstance(node, ast.If)
            or (polarity := is_quick_test(node.test)) is None
        ):
            continue
        quick_branch, full_branch = (
            (node.body, node.orelse) if polarity else (node.orelse, node.body)
        )
        bound_before = {
            n.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Store)
            and n.lineno < node.lineno
        }
        only_quick = bound_names(quick_branch) - bound_names(full_branch) - bound_before
        read_later = {
            n.id
            for n in ast.walk(tree)
            if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Load)
            and n.lineno > (node.end_lineno or node.lineno)
        }
        if only_quick & read_later:
            missing[node.lineno] = only_quick & read_later
    return missing


def test_the_check_finds_a_name_only_quick_mode_defines():
    code = "if settings.quick:\n    N = 1\n    M = 2\nelse:\n    N = 3\nprint(N, M)\n"
    assert names_missing_in_full_mode(code) == {1: {"M"}}
    assert (
        names_missing_in_full_mode(code.replace("    N = 3\n", "    N, M = 3, 4\n"))
        == {}
    )
    only_inside = "if settings.quick:\n    shipped = 1\n    print(shipped)\n"
    assert names_missing_in_full_mode(only_inside) == {}
    defined_before = "score = None\nif settings.quick:\n    score = 1\nprint(score)\n"
    assert names_missing_in_full_mode(defined_before) == {}
    negated = "if not settings.quick:\n    A = 1\nelse:\n    A, B = 1, 2\nprint(B)\n"
    assert names_missing_in_full_mode(negated) == {1: {"B"}}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_full_mode_defines_what_quick_mode_defines(chapter):
    missing = names_missing_in_full_mode(chapter_code(chapter))
    assert not missing, (
        f"{chapter.name}: names bound only when QUICK is True, read later: {missing}"
    )
