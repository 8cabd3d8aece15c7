"""Chapters run through papermill with bad parameters fail early, with a clear
message.

Every chapter checks its parameters with the same line, the first after its
``parameters`` cell: ``bd.chapter_settings(quick=QUICK, device=DEVICE, seed=SEED)``.
That it is there, before any work, is checked in every chapter without a kernel; that
the line fails early and clearly is checked by running one chapter (a Jupyter kernel
per run: about 10 s each on 2 cores), the book's first and its last.
"""

from __future__ import annotations

import nbformat
import papermill as pm
import pytest

from conftest import BOOK, chapter_notebooks

CHAPTERS = chapter_notebooks()
SETTINGS_LINE = "settings = bd.chapter_settings(quick=QUICK, device=DEVICE, seed=SEED)"


def run_with(chapter, parameters, tmp_path) -> pm.PapermillExecutionError:
    with pytest.raises(pm.PapermillExecutionError) as failure:
        pm.execute_notebook(
            chapter,
            tmp_path / chapter.name,
            parameters=parameters,
            cwd=BOOK,
            progress_bar=False,
            kernel_name="python3",
        )
    # It failed in the first code cells (the settings), not deep inside a computation;
    # papermill adds one cell of injected parameters.
    assert failure.value.exec_count <= 5, (
        f"failed late, in code cell {failure.value.exec_count}"
    )
    return failure.value


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_the_settings_are_checked_right_after_the_parameters(chapter):
    code = [
        c for c in nbformat.read(chapter, as_version=4).cells if c.cell_type == "code"
    ]
    tagged = [
        i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, "one parameters cell"
    parameters, following = code[tagged[0]], code[tagged[0] + 1].source.splitlines()
    for name in ("QUICK", "DEVICE", "SEED"):
        assert any(
            line.startswith(f"{name} = ") for line in parameters.source.splitlines()
        )
    # the next cell imports, then checks the parameters: nothing runs before
    first = next(
        line for line in following if line and not line.startswith(("import ", "from "))
    )
    assert first == SETTINGS_LINE, first
    # before the parameters, only the Colab install cell
    assert tagged[0] <= 1 and all("pip" in c.source for c in code[: tagged[0]])


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("chapter", [CHAPTERS[0], CHAPTERS[-1]], ids=["first", "last"])
def test_unknown_device_fails_in_the_settings_cell(tmp_path, chapter):
    error = run_with(chapter, {"DEVICE": "tpu9"}, tmp_path)
    assert error.ename == "ValueError"
    assert (
        "device='tpu9' is not a known device; use one of 'auto', 'cpu'" in error.evalue
    )


@pytest.mark.notebooks
@pytest.mark.slow
def test_quick_must_be_a_bool(tmp_path):
    error = run_with(CHAPTERS[0], {"QUICK": "no"}, tmp_path)
    assert error.ename in ("TypeError", "WrongTypeError")  # a TypeError subclass
    assert "QUICK must be True" in error.evalue
