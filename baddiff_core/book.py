"""Helpers every chapter of the book uses: run settings, seeding and publishing numbers into prose.

Introduced in chapter 1 (What is diffusion?). Each chapter has a papermill ``parameters`` cell
(``QUICK``, ``DEVICE``, ``SEED``) and then calls :func:`chapter_settings`, which checks them and
returns the derived settings, so that a bad parameter fails in the first cells with a clear message.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from baddiff_core.devices import resolve_device

__all__ = ["ChapterSettings", "chapter_settings", "seed_everything", "glue", "in_colab", "markdown_table"]


@dataclass(frozen=True)
class ChapterSettings:
    """The checked run settings of a chapter.

    Attributes:
        quick: ``True`` for the small CPU configuration (CI, the built book), ``False`` for the
            paper-scale configuration meant for a GPU.
        device: where tensors and models live.
        seed: the seed of every random step in the chapter.
    """

    quick: bool
    device: torch.device
    seed: int

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with ``seed + offset`` (one per independent random step)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def rng(self, offset: int = 0) -> np.random.Generator:
        """A NumPy generator seeded with ``seed + offset``."""
        return np.random.default_rng(self.seed + offset)


def chapter_settings(*, quick: Any, device: Any, seed: Any) -> ChapterSettings:
    """Check a chapter's ``QUICK``, ``DEVICE`` and ``SEED`` parameters and seed everything.

    Raises:
        TypeError: ``quick`` is not a bool or ``seed`` is not an integer.
        ValueError: ``device`` is unknown or absent on this machine, or ``seed`` is negative.
    """
    if not isinstance(quick, (bool, np.bool_)):
        raise TypeError(f"QUICK must be True (small, CPU, minutes) or False (paper scale, GPU), "
                        f"got {quick!r} of type {type(quick).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"SEED must be a non-negative integer, got {seed!r}")
    if seed < 0:
        raise ValueError(f"SEED must be a non-negative integer, got {seed!r}")
    settings = ChapterSettings(quick=bool(quick), device=resolve_device(device), seed=int(seed))
    seed_everything(settings.seed)
    return settings


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (for code that does not take one)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def in_colab() -> bool:
    """``True`` when running inside Google Colab."""
    return "google.colab" in sys.modules


def glue(name: str, value: Any, *, display: bool = False) -> None:
    """Publish ``value`` under ``name`` for the book's prose (``{glue:text}`name:.2f```).

    Uses myst-nb's ``glue`` when it is installed (the book build) and does nothing otherwise
    (Colab), so chapters run everywhere. NumPy and torch scalars are stored as plain Python numbers,
    because myst-nb formats their text: ``0.5``, not ``np.float64(0.5)``.
    """
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    try:
        from myst_nb import glue as _myst_glue
    except ImportError:  # pragma: no cover - depends on the environment
        return
    _myst_glue(name, value, display=display)


def markdown_table(rows: Sequence[Mapping[str, Any]], formats: Mapping[str, str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys, in column order).

    ``formats`` maps a column to a format spec (``{"asr": ".2f"}``) for its numbers; other values
    (and text in a formatted column, such as ``"-"`` for "not applicable") are printed with ``str``. Show it with ``IPython.display.Markdown``: the built book renders it as a real table.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows must hold at least one row, got none")
    columns = list(rows[0])
    for index, row in enumerate(rows):
        if list(row) != columns:
            raise ValueError(f"row {index} has columns {list(row)}, expected {columns} (as row 0)")
    formats = dict(formats or {})
    unknown = sorted(set(formats) - set(columns))
    if unknown:
        raise ValueError(f"formats names columns {unknown} that no row has; columns: {columns}")

    def cell(column: str, value: Any) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = format(value, formats[column]) if column in formats and numeric else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
