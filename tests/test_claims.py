"""The chapters' assertions can fail: none compares a value with what it was computed
from (issue #20, "an assertion that cannot fail is a defect").

A static check, with ``ast``, of every ``assert`` and every ``settings.check(...)``
condition in the chapters' code cells. It flags a comparison (``==``, ``<=``, ...,
``torch.allclose``, ``torch.equal``, ``math.isclose``, ...) between

- an expression and the same expression (``assert t <= t``);
- a name and the very expression, or literal, the notebook assigned to it
  (``x = len(a)`` ... ``assert x == len(a)``; ``n = 16`` ... ``check(n == 16, ...)``).

It is deliberately simple: it cannot see a tautology that goes through arithmetic, or a
threshold fitted on the models it then separates; reviews look for those.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

import nbformat
import pytest

from conftest import BOOK

CHAPTERS = sorted(BOOK.glob("*.ipynb"))  # every page with code

#: Functions whose first two arguments are compared, as ``a == b`` would be.
COMPARING_CALLS = {"allclose", "isclose", "equal", "array_equal"}


def notebook_code(path) -> str:
    """The code cells of a notebook as one module; an IPython magic (``%pip``,
    ``!ls``) becomes a ``pass`` at its indentation."""
    cells = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        cells.append(
            "\n".join(
                line[: len(line) - len(line.lstrip())] + "pass"
                if line.lstrip().startswith(("%", "!"))
                else line
                for line in cell.source.splitlines()
            )
        )
    return "\n".join(cells)


def _claims(tree: ast.AST) -> Iterator[ast.expr]:
    """The asserted conditions: ``assert`` tests and the first argument of
    ``settings.check(...)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            yield node.test
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "check"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "settings"
            and node.args
        ):
            yield node.args[0]


def _compared_pairs(condition: ast.expr) -> Iterator[tuple[ast.expr, ast.expr]]:
    """Every pair of expressions the condition compares."""
    for node in ast.walk(condition):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            yield from zip(operands[:-1], operands[1:])
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else getattr(func, "id", "")
            )
            if name in COMPARING_CALLS:
                yield node.args[0], node.args[1]


def _bindings(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """Every binding of a name, as ``(line, name, expression)`` in source order: the
    ``ast.dump`` of the expression a plain assignment gives it (``x = ...``,
    ``a, b = 1, 2``), or ``None`` where its value is not one expression (``x += 1``,
    ``for x in ...``, ``a, b = f()``)."""
    found: list[tuple[int, str, str | None]] = []

    def bind(target: ast.expr, value: ast.expr | None, line: int) -> None:
        if isinstance(target, ast.Name):
            found.append((line, target.id, None if value is None else ast.dump(value)))
        elif isinstance(target, (ast.Tuple, ast.List)):
            values = (
                value.elts
                if isinstance(value, (ast.Tuple, ast.List))
                and len(value.elts) == len(target.elts)
                else [None] * len(target.elts)
            )
            for element, element_value in zip(target.elts, values):
                bind(element, element_value, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target, node.value, node.end_lineno)
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value:
            bind(node.target, node.value, node.end_lineno)
        elif isinstance(node, ast.AugAssign):
            bind(node.target, None, node.end_lineno)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            bind(node.target, None, node.lineno)
        elif isinstance(node, ast.comprehension):
            bind(node.target, None, node.target.lineno)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    bind(item.optional_vars, None, node.lineno)
    return sorted(found, key=lambda binding: binding[0])


def _value_at(
    bindings: list[tuple[int, str, str | None]], name: str, line: int
) -> str | None:
    """The expression last assigned to ``name`` before ``line`` (straight-line code:
    loops and branches are not followed), or ``None``."""
    value = None
    for bound_at, bound, expression in bindings:
        if bound_at >= line:
            break
        if bound == name:
            value = expression
    return value


def tautologies(source: str) -> list[str]:
    """The comparisons in ``source``'s assertions that hold by construction, each as
    ``line N: text``."""
    tree = ast.parse(source)
    bindings = _bindings(tree)
    found = []
    for condition in _claims(tree):
        for left, right in _compared_pairs(condition):
            if ast.dump(left) == ast.dump(right):
                why = "compares an expression with itself"
            elif any(
                isinstance(a, ast.Name)
                and _value_at(bindings, a.id, condition.lineno) == ast.dump(b)
                for a, b in ((left, right), (right, left))
            ):
                why = "compares a name with the value it was assigned"
            else:
                continue
            found.append(f"line {condition.lineno}: {ast.unparse(condition)} ({why})")
    return found


# The detector itself, on hand-written snippets: one that must be flagged per pattern,
# and near misses that must not.
FLAGGED = {
    "name vs its definition": "x = len(a)\nassert x == len(a)",
    "same expression twice": "assert t <= t",
    "literal it was assigned": "n = 16\nsettings.check(n == 16, 'sixteen')",
    "inside and/or": "n = 16\nsettings.check(ok and 16 >= n, 'sixteen')",
    "unpacked tuple": "a, b = f(x), 3\nassert b == 3",
    "allclose with itself": "assert torch.allclose(y, y)",
    "name vs its definition, allclose": (
        "y = model(x)\nassert torch.allclose(y, model(x), atol=1e-6)"
    ),
    "chained comparison": "k = 2\nassert 0 < k <= 2",
}
NOT_FLAGGED = {
    "an independent computation": "x = len(a)\nassert x == sum(1 for _ in a)",
    "a threshold": "asr = measure(m)\nsettings.check(asr >= 0.8, 'it fires')",
    "a different literal": "n = 16\nassert n < 17",
    "accumulated": (
        "gap = 0.0\nfor t in ts:\n    gap = max(gap, d(t))\nassert gap < 0.0"
    ),
    "augmented": "n = 0\nn += step()\nassert n == 0",
    "reassigned since": "x = len(a)\nx = x - dropped(a)\nassert x == len(a)",
    "another object's check": "PLAN.check(WORK)\nPLAN.check(PLAN)",
    "the library against the formula": (
        "mine = q_sample(x0, t, eps)\nassert torch.allclose(mine, core, atol=1e-5)"
    ),
}


@pytest.mark.parametrize("source", FLAGGED.values(), ids=FLAGGED.keys())
def test_detector_flags_a_tautology(source):
    assert len(tautologies(source)) == 1, source


@pytest.mark.parametrize("source", NOT_FLAGGED.values(), ids=NOT_FLAGGED.keys())
def test_detector_passes_a_real_check(source):
    assert tautologies(source) == [], source


def test_every_chapter_is_examined():
    assert len(CHAPTERS) >= 11 and all(path.exists() for path in CHAPTERS)


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_assertions_can_fail(path):
    found = tautologies(notebook_code(path))
    assert not found, f"{path.name}: assertions that cannot fail:\n" + "\n".join(found)
