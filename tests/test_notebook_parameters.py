"""Chapters run through papermill with bad parameters fail early, with a clear
message."""

from __future__ import annotations

import papermill as pm
import pytest

from conftest import BOOK, chapter_notebooks

CHAPTERS = chapter_notebooks()

# each test starts a Jupyter kernel and runs a chapter (until its settings fail)
pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


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
def test_unknown_device_fails_in_the_settings_cell(tmp_path, chapter):
    error = run_with(chapter, {"DEVICE": "tpu9"}, tmp_path)
    assert error.ename == "ValueError"
    assert (
        "device='tpu9' is not a known device; use one of 'auto', 'cpu'" in error.evalue
    )


def test_quick_must_be_a_bool(tmp_path):
    error = run_with(CHAPTERS[0], {"QUICK": "no"}, tmp_path)
    assert error.ename in ("TypeError", "WrongTypeError")  # a TypeError subclass
    assert "QUICK must be True" in error.evalue
