"""Helpers every chapter of the book uses: run settings, seeding and publishing numbers
into prose.

Introduced in chapter 1 (What is diffusion?). Each chapter has a papermill
``parameters`` cell (``QUICK``, ``DEVICE``, ``SEED``) and then calls
:func:`chapter_settings`, which checks them and returns the derived settings, so that a
bad parameter fails in the first cells with a clear message.

Three scales run the same code:

- ``"quick"`` (``QUICK = True``): small images on a CPU in minutes; what the online book
  and CI show;
- ``"full"`` (``QUICK = False``): the paper's data and model (CIFAR-10,
  ``google/ddpm-cifar10-32``) on a GPU;
- ``"smoke"`` (``QUICK = False`` with the environment variable ``BADDIFF_SCALE=smoke``):
  every line of full mode, with steps, batches and sample counts cut to a few, so that
  CI can run full mode's code on a CPU (``tests/test_full_mode.py``, with offline
  stand-ins for what full mode downloads). At this scale outcomes (an attack fires,
  clipping stops it) mean nothing: :meth:`ChapterSettings.check` records them instead of
  asserting them. Identities (a formula against diffusers) stay asserts.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from baddiff_core.checks import check_bool, check_int
from baddiff_core.devices import resolve_device, use_available_cpus

if TYPE_CHECKING:
    from baddiff_core.attack import BackdoorRecipe
    from baddiff_core.train import TrainConfig

__all__ = [
    "SCALES",
    "SCALE_ENV",
    "SMOKE_SCHEDULE",
    "FULL_MODE_DOWNLOADS",
    "ChapterSettings",
    "chapter_settings",
    "seed_everything",
    "glue",
    "in_colab",
    "markdown_table",
]

#: The three scales a chapter runs at (see the module docstring).
SCALES = ("quick", "full", "smoke")
#: The environment variable that turns full mode (``QUICK = False``) into the smoke
#: scale.
SCALE_ENV = "BADDIFF_SCALE"
#: The noise schedule a full-mode model trained from scratch gets at the smoke scale:
#: T = 10, so that a DDPM chain is ten network calls (the paper's T = 1000 is
#: :data:`~baddiff_core.diffusion.PAPER_SCHEDULE`).
SMOKE_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=10, beta_start=1e-2, beta_end=0.5
)
#: Training at the smoke scale: a couple of optimizer steps on a few images.
_SMOKE_TRAIN = dict(
    steps=2, batch_size=4, gradient_accumulation_steps=1, warmup_steps=0, log_every=1
)
_SMOKE_IMAGES = 32

#: What full mode fetches on first use (then cached), printed when a chapter starts in
#: full mode.
FULL_MODE_DOWNLOADS = (
    "Full mode downloads, on first use and once: the pre-trained google/ddpm-cifar10-32 (Hugging "
    "Face hub, 143 MB), CIFAR-10's binary release (162 MB, into $BADDIFF_DATA or "
    "~/.cache/baddiff/data), the FID's Inception-v3 weights (torch-fidelity, about 90 MB) and, for "
    "Elijah's uniformity score, LPIPS's VGG16 weights (piq and torchvision, about 530 MB), as far "
    "as this chapter uses them."
)

Recipe = TypeVar("Recipe", "BackdoorRecipe", "TrainConfig")


@dataclass(frozen=True)
class ChapterSettings:
    """The checked run settings of a chapter.

    Attributes:
        quick: ``True`` for the small CPU configuration (CI, the built book), ``False`` for the
            paper-scale configuration meant for a GPU (and for its smoke scale).
        device: where tensors and models live.
        seed: the seed of every random step in the chapter.
        scale: ``"quick"``, ``"full"`` or ``"smoke"`` (one of :data:`SCALES`).
    """

    quick: bool
    device: torch.device
    seed: int
    scale: str = "quick"

    @property
    def smoke(self) -> bool:
        """``True`` at the smoke scale: full mode's code with every size cut to a
        few."""
        return self.scale == "smoke"

    def scaled(self, full: Any, *, smoke: Any) -> Any:
        """``full`` (a full-mode size: samples, steps, ...), or ``smoke`` at the smoke
        scale."""
        return smoke if self.smoke else full

    @property
    def asr_threshold(self) -> float:
        """The attack-success MSE threshold of this scale
        (:data:`~baddiff_core.evaluation.ASR_THRESHOLDS`)."""
        from baddiff_core.evaluation import asr_threshold

        return asr_threshold(self.quick)

    @property
    def fid_features(self) -> str:
        """The features of the Fréchet distance: ``"inception"`` (the paper's FID; full
        mode downloads its weights) at the full scale, ``"digits"`` (the book's offline
        network) otherwise."""
        return "inception" if self.scale == "full" else "digits"

    def recipe(self, recipe: Recipe, *, seed_offset: int = 0) -> Recipe:
        """``recipe`` (a :class:`~baddiff_core.attack.BackdoorRecipe` or a
        :class:`~baddiff_core.train.TrainConfig`) trained with the chapter's seed plus
        ``seed_offset``, and at the smoke scale cut to a couple of steps on a few
        images.

        Every trained model in a chapter goes through here, so a change of ``SEED``
        reaches all of them.
        """
        from baddiff_core.attack import BackdoorRecipe
        from baddiff_core.train import TrainConfig

        seed = self.seed + seed_offset
        if isinstance(recipe, TrainConfig):
            config = dataclasses.replace(recipe, seed=seed)
            if self.smoke:
                config = dataclasses.replace(
                    config,
                    **_SMOKE_TRAIN,
                    checkpoint_every=min(config.checkpoint_every, 1),
                )
            return config
        if isinstance(recipe, BackdoorRecipe):
            changes: dict[str, Any] = dict(
                train=self.recipe(recipe.train, seed_offset=seed_offset)
            )
            if self.smoke:
                changes["data_limit"] = min(
                    recipe.data_limit or _SMOKE_IMAGES, _SMOKE_IMAGES
                )
                if recipe.base == "scratch":
                    changes["schedule"] = dict(SMOKE_SCHEDULE)
            return dataclasses.replace(recipe, **changes)
        raise TypeError(
            f"recipe must be a BackdoorRecipe or a TrainConfig, got {type(recipe).__name__}"
        )

    def check(
        self, condition: Any, claim: str, *, scales: Sequence[str] = ("quick", "full")
    ) -> bool:
        """Assert an outcome the prose states (``claim``) at the ``scales`` where it was
        measured.

        At any other scale the outcome is printed as recorded, not checked: at the smoke
        scale a couple of training steps make outcomes meaningless, and a claim measured
        only at the quick scale (``scales=("quick",)``) is reported, not assumed, at the
        paper's scale. Returns the condition as a ``bool``.
        """
        unknown = sorted(set(scales) - set(SCALES))
        if unknown:
            raise ValueError(
                f"scales={tuple(scales)!r} names unknown scales {unknown}; use some of {SCALES}"
            )
        holds = bool(condition)
        if self.scale in scales and not self.smoke:
            if not holds:
                raise AssertionError(claim)
        else:
            print(
                f"[{self.scale} scale, recorded, not checked] {claim}: {'holds' if holds else 'does not hold'}"
            )
        return holds

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with ``seed + offset`` (one per independent
        random step)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def rng(self, offset: int = 0) -> np.random.Generator:
        """A NumPy generator seeded with ``seed + offset``."""
        return np.random.default_rng(self.seed + offset)


def chapter_settings(*, quick: Any, device: Any, seed: Any) -> ChapterSettings:
    """Check a chapter's ``QUICK``, ``DEVICE`` and ``SEED`` parameters and seed
    everything.

    With ``quick=False``, the environment variable ``BADDIFF_SCALE`` chooses the scale:
    unset or ``"full"`` for the paper's scale, ``"smoke"`` for full mode's code at a few
    steps (CI).

    Raises:
        TypeError: ``quick`` is not a bool or ``seed`` is not an integer.
        ValueError: ``device`` is unknown or absent on this machine, ``seed`` is negative, or
            ``BADDIFF_SCALE`` is set to something else than ``"full"`` or ``"smoke"``.
    """
    quick = check_bool(
        "QUICK", quick, meaning="True: small, CPU, minutes; False: paper scale, GPU"
    )
    seed = check_int("SEED", seed, minimum=0)
    requested = os.environ.get(SCALE_ENV, "").strip().lower() or "full"
    if requested not in ("full", "smoke"):
        raise ValueError(
            f"{SCALE_ENV}={os.environ[SCALE_ENV]!r} is not a scale; use 'full' (the default) or "
            "'smoke' (full mode's code at a few steps), or unset it"
        )
    scale = "quick" if quick else requested
    settings = ChapterSettings(
        quick=quick, device=resolve_device(device), seed=seed, scale=scale
    )
    seed_everything(settings.seed)
    use_available_cpus()  # a CPU quota or pinned cores: no more torch threads than CPUs to run them
    if scale == "full":
        print(FULL_MODE_DOWNLOADS)
    return settings


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (for code that does not take
    one)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def in_colab() -> bool:
    """``True`` when running inside Google Colab."""
    return "google.colab" in sys.modules


def glue(name: str, value: Any, *, display: bool = False) -> None:
    """Publish ``value`` under ``name`` for the book's prose
    (``{glue:text}`name:.2f```).

    Uses myst-nb's ``glue`` when it is installed (the book build) and does nothing
    otherwise (Colab), so chapters run everywhere. NumPy and torch scalars are stored as
    plain Python numbers, because myst-nb formats their text: ``0.5``, not
    ``np.float64(0.5)``.
    """
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    try:
        from myst_nb import glue as _myst_glue
    except ImportError:  # pragma: no cover - depends on the environment
        return
    _myst_glue(name, value, display=display)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], formats: Mapping[str, str] | None = None
) -> str:
    """A Markdown table of ``rows`` (dicts with the same keys, in column order).

    ``formats`` maps a column to a format spec (``{"asr": ".2f"}``) for its numbers;
    other values (and text in a formatted column, such as ``"-"`` for "not applicable")
    are printed with ``str``. Show it with ``IPython.display.Markdown``: the built book
    renders it as a real table.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows must hold at least one row, got none")
    columns = list(rows[0])
    for index, row in enumerate(rows):
        if list(row) != columns:
            raise ValueError(
                f"row {index} has columns {list(row)}, expected {columns} (as row 0)"
            )
    formats = dict(formats or {})
    unknown = sorted(set(formats) - set(columns))
    if unknown:
        raise ValueError(
            f"formats names columns {unknown} that no row has; columns: {columns}"
        )

    def cell(column: str, value: Any) -> str:
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        text = (
            format(value, formats[column])
            if column in formats and numeric
            else str(value)
        )
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(cell(c, row[c]) for c in columns) + " |" for row in rows
    ]
    return "\n".join(lines)


def show_table(
    rows: Sequence[Mapping[str, Any]],
    formats: Mapping[str, str] | None = None,
    *,
    title: str | None = None,
) -> None:
    """Show ``rows`` as a table in the notebook (and so in the built book):
    :func:`markdown_table` of ``rows`` and ``formats``, under a bold ``title`` if given.

    The table scrolls sideways when it is wider than the page, instead of wrapping
    its cells word by word.
    """
    from IPython.display import Markdown, display

    table = markdown_table(rows, formats)
    display(Markdown(f"**{title}**\n\n{table}" if title else table))
