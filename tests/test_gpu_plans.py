"""Each chapter's first cell states its full mode's GPU time, and that time fits a Colab
session.

The number is computed, not written by hand: the test runs the chapter's parameters cell
and its setup cell (the one calling ``chapter_settings``) with ``QUICK = False`` at full
scale, which builds the chapter's ``PLAN`` (``baddiff_core.gpu_time``) without training
or sampling anything, and compares ``PLAN.minutes`` with the sentence "about N minutes
on a T4, M on an A100" of the first cell. The plan itself is checked against the work
the chapter really does (``PLAN.check(WORK)`` in the chapter's last cell) wherever the
chapter runs: quick mode in the book's build, full mode at the smoke scale in
``test_full_mode.py``.
"""

from __future__ import annotations

import re
import sys

import nbformat
import pytest

from baddiff_core.gpu_time import COLAB_MINUTES
from conftest import ROOT, chapter_notebooks

sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_plans import chapter_plan  # noqa: E402  (benchmarks/ is not a package)

CHAPTERS = chapter_notebooks()
STATED = re.compile(r"about (\d+) minutes on a T4, (\d+) on an A100")


def full_scale_plan(chapter, monkeypatch):
    monkeypatch.delenv("BADDIFF_SCALE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return chapter_plan(chapter)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_first_cell_states_the_full_modes_gpu_time(chapter, monkeypatch):
    plan = full_scale_plan(chapter, monkeypatch)
    first = nbformat.read(chapter, as_version=4).cells[0].source
    if not plan.flops:
        assert "no GPU" in first, (
            f"{chapter.name}: full mode does no GPU work; say so in the first cell"
        )
        return
    stated = STATED.search(" ".join(first.split()))
    computed = (round(plan.minutes("T4")), max(round(plan.minutes("A100")), 1))
    assert stated, (
        f"{chapter.name}: the first cell should say 'about {computed[0]} minutes on a T4, "
        f"{computed[1]} on an A100'"
    )
    assert (int(stated[1]), int(stated[2])) == computed, f"{chapter.name}: {plan}"
    assert plan.minutes("T4") <= COLAB_MINUTES, (
        f"{chapter.name}: {plan} does not fit a Colab session"
    )
