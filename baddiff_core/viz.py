"""Figures: one style for the whole book, image grids and animations.

Introduced in chapter 1 (What is diffusion?).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import animation

__all__ = ["use_style", "to_display", "show_images", "show_strips", "animate_images"]

_STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "figure.figsize": (6.4, 3.6),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 10,
    "axes.titlesize": 10,
    "image.cmap": "gray",
    "animation.embed_limit": 20.0,  # MB of frames a notebook may embed
}


def use_style() -> None:
    """Apply the book's matplotlib style (call once at the top of a chapter)."""
    plt.rcParams.update(_STYLE)


def to_display(
    image: torch.Tensor | np.ndarray, *, value_range: tuple[float, float] = (-1.0, 1.0)
) -> np.ndarray:
    """Map one image to a NumPy array in [0, 1] that ``imshow`` understands.

    Args:
        image: ``C,H,W`` (torch layout, C in {1, 3}) or ``H,W`` or ``H,W,C``.
        value_range: the values that map to black and white; images are clipped to it.

    Returns:
        ``H,W`` for one channel, ``H,W,3`` for three.
    """
    array = (
        image.detach().float().cpu().numpy()
        if isinstance(image, torch.Tensor)
        else np.asarray(image, dtype=float)
    )
    low, high = value_range
    if high <= low:
        raise ValueError(
            f"value_range must be (low, high) with low < high, got {value_range!r}"
        )
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(
            f"image must be H,W or C,H,W or H,W,C, got shape {tuple(array.shape)}"
        )
    return np.clip((array - low) / (high - low), 0.0, 1.0)


def _pictures(
    name: str, one: str, pictures: Iterable[Any], titles: Sequence[str] | None
) -> list[Any]:
    """``pictures`` as a list, if there is at least one and ``titles`` (if given) has
    one entry per ``one`` picture."""
    pictures = list(pictures)
    if not pictures:
        raise ValueError(f"{name} must hold at least one image, got none")
    if titles is not None and len(titles) != len(pictures):
        raise ValueError(
            f"titles must have one entry per {one} ({len(pictures)}), got {len(titles)}"
        )
    return pictures


def show_images(
    images: Sequence[torch.Tensor | np.ndarray] | torch.Tensor,
    *,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    size: float = 1.6,
    suptitle: str | None = None,
) -> plt.Figure:
    """Show images in a grid, one per axis, with optional titles; returns the figure.

    ``images`` may be a ``B,C,H,W`` tensor or a sequence of single images (see
    :func:`to_display`).
    """
    images = _pictures("images", "image", images, titles)
    ncols = ncols or min(len(images), 8)
    nrows = -(-len(images) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size * ncols, size * nrows + (0.3 if suptitle else 0)),
        squeeze=False,
    )
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(
                to_display(images[index], value_range=value_range),
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            if titles is not None:
                ax.set_title(titles[index])
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def show_strips(
    rows: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
    *,
    width: float = 10.0,
    row_height: float = 1.25,
    value_range: tuple[float, float] = (-1.0, 1.0),
    fontsize: float | None = None,
) -> plt.Figure:
    """One titled strip per row: the row's images (``B,C,H,W`` or a list of ``C,H,W``)
    side by side.

    ``rows`` maps each title to its images, e.g. samples of one model or one checkpoint,
    so that rows compare at a glance. Returns the figure.
    """
    rows = dict(rows)
    if not rows:
        raise ValueError("rows must hold at least one row, got none")
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(width, row_height * len(rows)), squeeze=False
    )
    for ax, (title, images) in zip(axes[:, 0], rows.items()):
        images = [image.detach().cpu() for image in images]
        if not images:
            raise ValueError(f"row {title!r} holds no images")
        strip = torch.cat(images, dim=-1)  # C,H,B*W
        ax.imshow(
            to_display(strip, value_range=value_range),
            cmap="gray",
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        ax.set_title(title, loc="left", fontsize=fontsize)
        ax.axis("off")
    fig.tight_layout()
    return fig


def animate_images(
    frames: Sequence[torch.Tensor | np.ndarray],
    *,
    titles: Sequence[str] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    size: float = 3.0,
    interval_ms: int = 150,
) -> animation.FuncAnimation:
    """An animation that shows ``frames`` one after another (e.g. an image across
    diffusion steps).

    In a notebook, display it with ``IPython.display.HTML(anim.to_jshtml())``: the
    frames are embedded, so the animation plays in the static online book without a
    kernel.
    """
    frames = _pictures("frames", "frame", frames, titles)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.axis("off")
    shown = ax.imshow(
        to_display(frames[0], value_range=value_range),
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    title = ax.set_title(titles[0] if titles else "")

    def update(index: int):
        shown.set_data(to_display(frames[index], value_range=value_range))
        title.set_text(titles[index] if titles else "")
        return shown, title

    anim = animation.FuncAnimation(
        fig, update, frames=len(frames), interval=interval_ms, blit=False
    )
    # the animation, not a stray still of its first frame, is what a notebook shows
    plt.close(fig)
    return anim
