"""Triggers and targets of the BadDiffusion attack, and pasting a trigger onto images.

Introduced in chapter 3 (The BadDiffusion attack).

A backdoored diffusion model has two inputs that matter to the attacker:

* the **trigger** ``g``: a small pattern that is pasted onto images (grey box,
  white box, stop sign, eyeglasses). Its value ``-1`` (black in ``[-1, 1]``
  units) means *transparent*: where the trigger is ``-1`` the image shows
  through. Pasting is

      r = M * x + (1 - M) * g,       M = 1 where g is transparent, 0 elsewhere

  (BadDiffusion (Chou et al. 2023, arXiv:2212.05400), Sec. 3, pasted as its
  authors' code does: github.com/IBM/BadDiffusion, ``dataset.py``; :func:`stamp`).
  The same trigger, added to the sampler's starting noise, later fires the
  backdoor.
* the **target** ``y``: the image the backdoored model generates when the
  trigger is present (the trigger itself, the trigger shifted, a corner box, a
  shoe, a hat, a cat). Targets sit on a grey background: after drawing, every
  value ``<= -0.4`` becomes ``-0.4``, so a target lives in ``[-0.4, 1]``.

Conventions. Images are float32 ``torch`` tensors of shape ``C,H,W`` with
values in ``[-1, 1]``, ``C`` in ``{1, 3}``, square of side ``image_size``.
The transparency mask is per *pixel*: a pixel is transparent when **all** its
channels equal ``-1`` (a pure red ``(1, -1, -1)`` pixel is opaque).

Geometry. The paper's reference resolution is 32 x 32 (CIFAR-10); every length
is given at 32 px and scaled to other sizes with :func:`scale_length`.

Drawings (stop sign, eyeglasses, ankle boot, fedora, cat) are made
procedurally with PIL at 2 to 8 times the final resolution and averaged down
over each pixel's area (box filter, i.e. exact area coverage), so nothing is
downloaded or read from disk and every function is deterministic.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "TRIGGER_KINDS",
    "TARGET_KINDS",
    "TRIGGER_SIZES_32",
    "TARGET_BACKGROUND",
    "scale_length",
    "make_trigger",
    "make_target",
    "transparency_mask",
    "stamp",
]

#: Trigger kinds of :func:`make_trigger`.
TRIGGER_KINDS = ("box", "white_box", "stop_sign", "glasses", "none")
#: Target kinds of :func:`make_target`.
TARGET_KINDS = ("noshift", "shift", "corner", "shoe", "hat", "cat")
#: Trigger sides (pixels at 32 x 32) studied in the paper, largest first.
TRIGGER_SIZES_32 = (18, 14, 11, 8, 4)
#: Grey background of every target: values ``<= TARGET_BACKGROUND`` become it.
TARGET_BACKGROUND = -0.4

# Lengths at the 32 x 32 reference resolution, as in the BadDiffusion authors' code
# (github.com/IBM/BadDiffusion, ``dataset.py``, class ``Backdoor``).
_REFERENCE_SIZE = 32
_GAP_32 = 2  # gap between a corner trigger and the image border
_SHIFT_UP_32, _SHIFT_LEFT_32 = 3, 5  # the "shift" target
_CORNER_32 = 10  # side of the "corner" target's box
_GLASSES_WIDTH = 0.625  # eyeglasses width as a fraction of the image side

# Colours in [-1, 1] units, RGB.
_RGB = tuple[float, float, float]
# A light stop-sign red (RGB about 230, 45, 51): its luminance, -0.21, stays visible
# above the -0.4 target background in one-channel targets (pure red's is -0.4).
_STOP_RED: _RGB = (0.8, -0.65, -0.6)
_WHITE: _RGB = (1.0, 1.0, 1.0)
# An opaque trigger pixel must never read as transparent (-1 in every channel).
_OPAQUE_FLOOR = -0.9
# A pixel under a transparent drawn shape (stop-sign letters) this much is transparent.
_HOLE_THRESHOLD = 0.4
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luminance weights


# --------------------------------------------------------------------------- #
# Validation: every message names the argument, the value and what is allowed.
# --------------------------------------------------------------------------- #


def _int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer >= {minimum}, got {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {name}={value!r}"
        )
    return int(value)


def _image_size(image_size: object) -> int:
    return _int("image_size", image_size, minimum=8)


def _channels(channels: object) -> int:
    if (
        isinstance(channels, bool)
        or not isinstance(channels, numbers.Integral)
        or channels not in (1, 3)
    ):
        raise ValueError(
            f"channels must be 1 (grey) or 3 (RGB), got channels={channels!r}"
        )
    return int(channels)


def _kind(name: str, value: object, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        listed = ", ".join(repr(k) for k in allowed)
        raise ValueError(f"{name}={value!r} is not a {what} kind; use one of {listed}")
    return value


def _image_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {name}.dtype={value.dtype}"
        )
    return value


# --------------------------------------------------------------------------- #
# Geometry.
# --------------------------------------------------------------------------- #


def scale_length(length_at_32: int, image_size: int) -> int:
    """A length given at the 32 x 32 reference resolution, in pixels at ``image_size``.

    The paper's triggers and targets are defined on 32 x 32 images (CIFAR-10).
    Other sizes keep the same proportions:

        scale_length(L, n) = max(1, round(L * n / 32))

    (Python's ``round``: halves go to the even neighbour, so ``2 * 8 / 32 =
    0.5`` rounds to 0 and the ``max`` makes it 1 pixel). At ``n = 32`` it is
    the identity; at 16 px a 14-pixel box becomes 7 pixels and the 2-pixel gap
    1 pixel.

    Args:
        length_at_32: length in pixels at 32 x 32, an integer ``>= 0``.
        image_size: side of the image in pixels, an integer ``>= 1``.

    Returns:
        the length in pixels, an integer ``>= 1``.
    """
    length_at_32 = _int("length_at_32", length_at_32, minimum=0)
    image_size = _int("image_size", image_size, minimum=1)
    return max(1, round(length_at_32 * image_size / _REFERENCE_SIZE))


def _corner_geometry(size: int, image_size: int) -> tuple[int, int]:
    """Scaled trigger side ``s`` and gap ``g``; check that ``s + g`` fits."""
    side = scale_length(size, image_size)
    gap = scale_length(_GAP_32, image_size)
    if side + gap > image_size:
        largest = max(
            (
                k
                for k in range(1, 8 * _REFERENCE_SIZE + 1)
                if scale_length(k, image_size) + gap <= image_size
            ),
            default=None,
        )
        raise ValueError(
            f"size={size} does not fit an image of image_size={image_size}: the trigger is "
            f"{side} px plus a {gap} px gap, more than {image_size} px; the largest allowed "
            f"size is {largest}"
        )
    return side, gap


# --------------------------------------------------------------------------- #
# Drawing: label maps rasterised with PIL at high resolution, then area-averaged.
# --------------------------------------------------------------------------- #


def _supersampling(side: int) -> int:
    """Drawing resolution factor: 8 for small images, fewer for large ones (<= ~512 px
    canvas)."""
    return int(min(8, max(2, 512 // side)))


class _Pen:
    """Draws labels on a square canvas; coordinates are fractions of its side in ``[0,
    1]``."""

    def __init__(self, draw: ImageDraw.ImageDraw, canvas: int) -> None:
        self.draw = draw
        self.canvas = canvas  # side of the canvas in its own pixels

    def _xy(self, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        # PIL puts integer coordinates on pixel centres: shift by half a pixel so that
        # the unit square [0, 1] spans the whole canvas.
        return [(x * self.canvas - 0.5, y * self.canvas - 0.5) for x, y in points]

    def polygon(self, points: Sequence[tuple[float, float]], label: int) -> None:
        self.draw.polygon(self._xy(points), fill=label)

    def ellipse(self, box: tuple[float, float, float, float], label: int) -> None:
        (x0, y0), (x1, y1) = self._xy([box[:2], box[2:]])
        self.draw.ellipse((x0, y0, x1, y1), fill=label)

    def rectangle(self, box: tuple[float, float, float, float], label: int) -> None:
        # Exact area: canvas pixels round(x0 * canvas) .. round(x1 * canvas) - 1.
        x0, y0, x1, y1 = (round(v * self.canvas) for v in box)
        if x1 > x0 and y1 > y0:
            self.draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=label)

    def rounded(
        self, box: tuple[float, float, float, float], radius: float, label: int
    ) -> None:
        (x0, y0), (x1, y1) = self._xy([box[:2], box[2:]])
        radius = max(0.0, min(radius * self.canvas, (x1 - x0) / 2, (y1 - y0) / 2))
        self.draw.rounded_rectangle((x0, y0, x1, y1), radius=radius, fill=label)

    def line(
        self, points: Sequence[tuple[float, float]], width: float, label: int
    ) -> None:
        w = max(1, round(width * self.canvas))
        self.draw.line(self._xy(points), fill=label, width=w, joint="curve")


def _coverage(side: int, num_labels: int, paint: Callable[[_Pen], None]) -> np.ndarray:
    """Fraction of each output pixel covered by each label, shape ``(num_labels, side,
    side)``.

    ``paint`` draws labels ``0 .. num_labels - 1`` (0 is the background) on a
    canvas ``factor`` times finer than the output; each output pixel then
    averages the ``factor x factor`` canvas pixels it covers (a box filter).
    The fractions of one pixel sum to 1.
    """
    factor = _supersampling(side)
    canvas = side * factor
    image = Image.new("L", (canvas, canvas), 0)
    paint(_Pen(ImageDraw.Draw(image), canvas))
    labels = np.asarray(image, dtype=np.int64)
    block = np.arange(canvas) // factor
    index = labels * (side * side) + block[:, None] * side + block[None, :]
    counts = np.bincount(index.ravel(), minlength=num_labels * side * side)
    return counts.reshape(num_labels, side, side) / float(factor * factor)


def _colour(coverage: np.ndarray, palette: Sequence[_RGB]) -> np.ndarray:
    """Area-weighted colour ``sum_k coverage_k * palette_k``, shape ``(3, side,
    side)``."""
    return np.einsum("khw,kc->chw", coverage, np.asarray(palette, dtype=np.float64))


def _to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """Keep RGB, or convert to luminance ``0.299 R + 0.587 G + 0.114 B`` (shape
    ``1,H,W``)."""
    if channels == 3:
        return rgb
    return np.einsum("c,chw->hw", np.asarray(_LUMA), rgb)[None]


def _trigger_from_coverage(
    coverage: np.ndarray,
    palette: Sequence[_RGB],
    channels: int,
    *,
    hole: int | None = None,
) -> torch.Tensor:
    """Turn label coverage (label 0 = transparent) into a trigger tile in [-1, 1].

    A pixel is opaque when labels other than 0 cover at least half of it and,
    if a ``hole`` label is given (drawn shapes that must stay transparent, like
    a stop sign's letters), that label covers less than 40% of it. Its colour
    is the average over the coloured labels only (so edges are not darkened by
    the background). Transparent pixels are exactly -1 in every channel;
    opaque ones are kept ``>= -0.9`` with one channel so that none reads as
    transparent.
    """
    opaque = 1.0 - coverage[0] >= 0.5
    coloured = np.ones(len(palette), dtype=bool)
    coloured[0] = False
    if hole is not None:
        opaque &= coverage[hole] < _HOLE_THRESHOLD
        coloured[hole] = False
    cover = coverage[coloured].sum(axis=0)
    rgb = _colour(coverage[coloured], [c for c, keep in zip(palette, coloured) if keep])
    rgb = rgb / np.maximum(cover, 1e-12)
    values = np.clip(_to_channels(rgb, channels), -1.0, 1.0)
    if channels == 1:
        values = np.maximum(values, _OPAQUE_FLOOR)
    values = np.where(opaque[None], values, -1.0)
    return torch.from_numpy(values.astype(np.float32))


# A 3 x 5 pixel font, just the four letters a stop sign needs ('#' = stroke).
_GLYPHS = {
    "S": ("###", "#..", "###", "..#", "###"),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "O": ("###", "#.#", "#.#", "#.#", "###"),
    "P": ("###", "#.#", "###", "#..", "#.."),
}
_TEXT = "STOP"
_TEXT_ROWS = 5
# Widths of the three letter gaps (S-T, T-O, O-P) when the word must be squeezed,
# indexed by the number of pixel columns available (side - 2): the T-O gap closes
# first (T is narrow at the bottom anyway), the O-P gap last.
_KERNING = {12: (0, 0, 0), 13: (0, 0, 1), 14: (1, 0, 1)}
_FULL_SPACING = (1, 1, 1)
_MIN_LETTERED_SIDE = 8  # below: a plain octagon
_MIN_RIM_SIDE = 12  # below: no white rim


def _stop_letters(side: int) -> list[tuple[float, float, float, float]]:
    """Boxes (unit coordinates of the sign's square) of the strokes of the word STOP.

    The word is set in the 3 x 5 pixel font ``_GLYPHS``. With at least one
    output pixel per font cell (``side >= 14``) it is aligned with the pixel
    grid (crisp), keeping one pixel free on each side: the 15 columns of the
    word squeezed to 12..14 by closing letter gaps where the sign is narrow
    (sides 14 to 16; the O-P gap closes last). Smaller signs get sub-pixel
    letters, 85% of the side wide, which the caller thresholds.
    """
    cell = max(1, math.floor(0.85 * side / 15))
    spacing = _KERNING.get(side - 2, _FULL_SPACING) if side < 18 else _FULL_SPACING
    columns = 12 + sum(spacing)
    if side >= 14:  # whole output pixels per font cell
        width, height = cell * columns / side, cell * _TEXT_ROWS / side
        left = math.floor((side - cell * columns + 1) / 2) / side
        top = math.floor((side - cell * _TEXT_ROWS + 1) / 2) / side
    else:  # sub-pixel letters, taller than square cells to stay legible
        width, height = 0.85, 0.45
        left, top = (1.0 - width) / 2, (1.0 - height) / 2
    cell_w, cell_h = width / columns, height / _TEXT_ROWS
    boxes = []
    x = 0
    for k, letter in enumerate(_TEXT):
        for row, pattern in enumerate(_GLYPHS[letter]):
            for col, mark in enumerate(pattern):
                if mark == "#":
                    x0, y0 = left + (x + col) * cell_w, top + row * cell_h
                    boxes.append((x0, y0, x0 + cell_w, y0 + cell_h))
        x += 3 + (spacing[k] if k < len(spacing) else 0)
    return boxes


def _stop_sign_tile(side: int, channels: int) -> torch.Tensor:
    """A ``channels x side x side`` stop sign, background -1 (transparent).

    A regular octagon (its corners cut at ``side / (2 + sqrt 2)``) in stop-sign
    red with a thin white rim (when ``side >= 12``), and the word STOP in a
    3 x 5 pixel font whose letters are *transparent* (the image shows through
    them, as the white letters of the paper's stop sign are the trigger's
    background). From ``side = 14`` the letters are pixel-aligned and legible;
    from 8 to 13 they are sub-pixel blobs that read as a line of text; below
    ``side = 8`` they cannot be drawn and the sign is a plain red octagon.
    """
    cut = 1.0 / (2.0 + math.sqrt(2.0))
    rim = max(0.07, 1.0 / side) if side >= _MIN_RIM_SIDE else 0.0

    def octagon(inset: float) -> list[tuple[float, float]]:
        # Moving every edge inward by `inset` moves each vertex along its edge by
        # inset * tan(22.5 deg) = inset * (sqrt 2 - 1).
        lo, hi = inset, 1.0 - inset
        a = cut + inset * math.tan(math.pi / 8)
        b = 1.0 - a
        return [(a, lo), (b, lo), (hi, a), (hi, b), (b, hi), (a, hi), (lo, b), (lo, a)]

    def paint(pen: _Pen) -> None:
        pen.polygon(octagon(0.0), 2 if rim else 1)
        if rim:
            pen.polygon(octagon(rim), 1)
        if side >= _MIN_LETTERED_SIDE:
            for box in _stop_letters(side):
                pen.rectangle(box, 3)

    coverage = _coverage(side, 4, paint)
    palette = [(-1.0, -1.0, -1.0), _STOP_RED, _WHITE, (-1.0, -1.0, -1.0)]
    return _trigger_from_coverage(coverage, palette, channels, hole=3)


def _glasses(image_size: int, channels: int) -> torch.Tensor:
    """Eyeglasses centred in the image, ``0.625 * image_size`` wide, background -1."""
    half = _GLASSES_WIDTH / 2
    x0, x1 = 0.5 - half, 0.5 + half  # outer edges of the frame
    lens_w = 0.255  # each lens, frame included
    lens_h = 0.2
    y0, y1 = 0.5 - lens_h / 2, 0.5 + lens_h / 2
    # about 1 px, thinner on tiny images
    frame = min(max(0.04, 1.0 / image_size), lens_h / 4)

    def paint(pen: _Pen) -> None:
        for lx0 in (x0, x1 - lens_w):
            box = (lx0, y0, lx0 + lens_w, y1)
            pen.rounded(box, 0.08, 1)  # frame
            inner = (box[0] + frame, box[1] + frame, box[2] - frame, box[3] - frame)
            pen.rounded(inner, 0.08 - frame, 2)  # tinted lens
            # a glint on the upper outer part of the lens
            gx, gy = inner[0] + 0.03, inner[1] + 0.02
            pen.ellipse((gx, gy, gx + 0.045, gy + 0.03), 3)
        # bridge: a bar between the lenses, slightly above centre
        pen.rectangle(
            (
                x0 + lens_w - frame / 2,
                y0 + 0.01,
                x1 - lens_w + frame / 2,
                y0 + 0.01 + frame * 1.1,
            ),
            1,
        )
        # temples: short stubs at the outer top corners
        pen.rectangle((x0, y0, x0 + frame, y0 + 0.06), 1)
        pen.rectangle((x1 - frame, y0, x1, y0 + 0.06), 1)

    palette = [
        (-1.0, -1.0, -1.0),
        (-0.55, -0.55, -0.5),
        (-0.3, -0.25, 0.05),
        (0.5, 0.6, 0.8),
    ]
    return _trigger_from_coverage(_coverage(image_size, 4, paint), palette, channels)


def make_trigger(
    kind: str, image_size: int, channels: int, size: int = 14
) -> torch.Tensor:
    """A BadDiffusion trigger: a ``channels x image_size x image_size`` tile, -1 =
    transparent.

    Kinds (32 x 32 reference geometry of the BadDiffusion authors' code,
    github.com/IBM/BadDiffusion, ``dataset.py``; ``s =
    scale_length(size, image_size)``, ``g = scale_length(2, image_size)``):

    * ``"box"``: a filled ``s x s`` square of value 0 (grey) in the
      bottom-right corner, rows and columns ``[-(s + g) : -g]``. At 32 px with
      ``size=14`` that is rows and columns 16..29.
    * ``"white_box"``: the same square with value +1.
    * ``"stop_sign"``: a red octagon with a thin white rim in the same
      ``s x s`` square; the letters STOP are transparent (-1), so the image
      shows through them. The word is legible from ``s = 14`` (``size=14``
      at 32 px); for ``8 <= s < 14`` it is a blurred line of text; for
      ``s < 8`` the letters cannot be drawn and the sign is a plain octagon.
      With one channel the colours become luminance ``0.299 R + 0.587 G +
      0.114 B`` (the sign's red becomes -0.21), and opaque pixels are kept
      ``>= -0.9`` so none is mistaken for transparent.
    * ``"glasses"``: dark eyeglasses (two rounded, tinted lenses, a frame, a
      bridge) centred in the image, ``0.625 * image_size`` wide (the
      CelebA-HQ trigger). ``size`` is not used.
    * ``"none"``: all -1, no trigger (pasting it changes nothing). ``size`` is
      not used.

    Args:
        kind: one of :data:`TRIGGER_KINDS`.
        image_size: side of the square image in pixels, ``>= 8``.
        channels: 1 (grey) or 3 (RGB).
        size: side of the corner trigger at 32 x 32, a positive integer (the
            paper uses :data:`TRIGGER_SIZES_32`); ``s + g`` must fit in the image.

    Returns:
        float32 tensor ``(channels, image_size, image_size)`` in ``[-1, 1]``;
        a pixel is transparent iff all its channels are -1.
    """
    kind = _kind("kind", kind, TRIGGER_KINDS, "trigger")
    image_size = _image_size(image_size)
    channels = _channels(channels)
    size = _int("size", size, minimum=1)
    trigger = torch.full((channels, image_size, image_size), -1.0)
    if kind in ("box", "white_box", "stop_sign"):
        side, gap = _corner_geometry(size, image_size)
        rows = slice(image_size - side - gap, image_size - gap)
        if kind == "stop_sign":
            trigger[:, rows, rows] = _stop_sign_tile(side, channels)
        else:
            trigger[:, rows, rows] = 0.0 if kind == "box" else 1.0
    elif kind == "glasses":
        trigger = _glasses(image_size, channels)
    return trigger


# --------------------------------------------------------------------------- #
# Targets.
# --------------------------------------------------------------------------- #


def _target_from_coverage(
    coverage: np.ndarray, palette: Sequence[_RGB], channels: int
) -> torch.Tensor:
    values = _to_channels(_colour(coverage, palette), channels)
    return torch.from_numpy(values.astype(np.float32)).clamp(TARGET_BACKGROUND, 1.0)


_BG: _RGB = (TARGET_BACKGROUND,) * 3


def _shoe(image_size: int, channels: int) -> torch.Tensor:
    """A Fashion-MNIST-style ankle boot, toe to the left, bright on the grey
    background."""

    def paint(pen: _Pen) -> None:
        # shaft and foot (label 1, light grey)
        pen.polygon(
            [
                (0.52, 0.10),
                (0.88, 0.08),
                (0.90, 0.30),
                (0.92, 0.78),
                (0.12, 0.80),
                (0.06, 0.74),
                (0.07, 0.66),
                (0.16, 0.60),
                (0.34, 0.55),
                (0.46, 0.47),
                (0.52, 0.36),
            ],
            1,
        )
        # collar: a brighter band at the top of the shaft
        pen.polygon([(0.52, 0.10), (0.88, 0.08), (0.885, 0.15), (0.52, 0.17)], 2)
        # laces down the front of the shaft: a dark seam with crossing ticks
        pen.line([(0.56, 0.17), (0.55, 0.40), (0.46, 0.53)], 0.025, 3)
        for x, y in ((0.56, 0.22), (0.56, 0.30), (0.545, 0.38), (0.50, 0.46)):
            pen.line([(x - 0.05, y - 0.02), (x + 0.05, y + 0.02)], 0.02, 3)
        # heel counter: a darker panel at the back
        pen.polygon([(0.80, 0.45), (0.915, 0.40), (0.92, 0.74), (0.74, 0.74)], 5)
        # sole (white) and heel
        pen.polygon([(0.05, 0.76), (0.95, 0.74), (0.95, 0.83), (0.08, 0.85)], 2)
        pen.polygon([(0.70, 0.83), (0.95, 0.83), (0.95, 0.93), (0.73, 0.93)], 4)
        # stitching line above the sole
        pen.line([(0.12, 0.71), (0.90, 0.69)], 0.02, 3)

    palette = [
        _BG,
        (0.55, 0.55, 0.55),
        (0.95, 0.95, 0.95),
        (0.1, 0.1, 0.1),
        (0.7, 0.7, 0.7),
        (0.35, 0.35, 0.35),
    ]
    return _target_from_coverage(_coverage(image_size, 6, paint), palette, channels)


def _hat(image_size: int, channels: int) -> torch.Tensor:
    """A fedora seen from the side: wide brim, pinched crown, dark band."""

    def paint(pen: _Pen) -> None:
        # crown, its top dented in the middle (the pinch)
        pen.polygon(
            [
                (0.22, 0.66),
                (0.27, 0.34),
                (0.33, 0.24),
                (0.42, 0.21),
                (0.50, 0.28),
                (0.58, 0.21),
                (0.67, 0.24),
                (0.73, 0.34),
                (0.78, 0.66),
            ],
            1,
        )
        # brim: a wide flat ellipse, slightly curled
        pen.ellipse((0.04, 0.60, 0.96, 0.80), 2)
        pen.polygon([(0.22, 0.66), (0.78, 0.66), (0.79, 0.70), (0.21, 0.70)], 1)
        # band around the base of the crown
        pen.polygon([(0.235, 0.54), (0.765, 0.54), (0.78, 0.66), (0.22, 0.66)], 3)
        # crease shading on the crown
        pen.line([(0.50, 0.30), (0.50, 0.50)], 0.025, 4)

    palette = [
        _BG,
        (0.35, -0.02, -0.35),
        (0.2, -0.12, -0.38),
        (-0.3, -0.38, -0.4),
        (0.15, -0.15, -0.38),
    ]
    return _target_from_coverage(_coverage(image_size, 5, paint), palette, channels)


def _cat(image_size: int, channels: int) -> torch.Tensor:
    """An orange cat's face: round head, triangular ears, eyes, nose, whiskers."""

    def paint(pen: _Pen) -> None:
        # ears (outer orange, inner pink)
        pen.polygon([(0.14, 0.50), (0.20, 0.08), (0.46, 0.30)], 1)
        pen.polygon([(0.86, 0.50), (0.80, 0.08), (0.54, 0.30)], 1)
        pen.polygon([(0.21, 0.38), (0.235, 0.17), (0.38, 0.30)], 2)
        pen.polygon([(0.79, 0.38), (0.765, 0.17), (0.62, 0.30)], 2)
        # head
        pen.ellipse((0.12, 0.24, 0.88, 0.90), 1)
        # tabby stripes on the forehead
        for x in (0.44, 0.50, 0.56):
            pen.line([(x, 0.27), (x, 0.38)], 0.03, 3)
        # muzzle (cream)
        pen.ellipse((0.34, 0.62, 0.50, 0.78), 4)
        pen.ellipse((0.50, 0.62, 0.66, 0.78), 4)
        # eyes: green iris, black slit pupil
        for cx in (0.35, 0.65):
            pen.ellipse((cx - 0.085, 0.44, cx + 0.085, 0.58), 5)
            pen.ellipse((cx - 0.025, 0.445, cx + 0.025, 0.575), 6)
        # nose (pink) and mouth
        pen.polygon([(0.45, 0.61), (0.55, 0.61), (0.50, 0.67)], 2)
        pen.line([(0.50, 0.67), (0.50, 0.72)], 0.02, 6)
        # whiskers (white), reaching out past the head
        for side in (-1, 1):
            for dy, slope in ((-0.03, -0.06), (0.01, 0.0), (0.05, 0.06)):
                x_in, x_out = 0.5 + side * 0.14, 0.5 + side * 0.47
                pen.line([(x_in, 0.70 + dy), (x_out, 0.70 + dy + slope)], 0.016, 7)

    palette = [
        _BG,
        (0.9, 0.2, -0.35),
        (1.0, 0.4, 0.45),
        (0.5, -0.2, -0.4),
        (1.0, 0.75, 0.35),
        (0.3, 0.75, -0.3),
        (-0.4, -0.4, -0.4),
        (1.0, 1.0, 1.0),
    ]
    return _target_from_coverage(_coverage(image_size, 8, paint), palette, channels)


_DRAWN_TARGETS: dict[str, Callable[[int, int], torch.Tensor]] = {
    "shoe": _shoe,
    "hat": _hat,
    "cat": _cat,
}


def make_target(
    kind: str, image_size: int, channels: int, *, trigger: torch.Tensor | None = None
) -> torch.Tensor:
    """A BadDiffusion target: the image a backdoored model generates when triggered.

    Every target is put on a grey background: after drawing, every value
    ``<= -0.4`` becomes ``-0.4`` (as in the BadDiffusion authors' code,
    github.com/IBM/BadDiffusion, ``dataset.py``), so targets live in
    ``[-0.4, 1]`` and the transparent -1 of a trigger turns grey.

    Kinds (lengths at 32 x 32, scaled with :func:`scale_length`):

    * ``"noshift"``: the trigger itself (``trigger`` is required).
    * ``"shift"``: the trigger moved up 3 and left 5 pixels, wrapping around
      the border (``torch.roll``).
    * ``"corner"``: a ``10 x 10`` box of value 0 at the top-left corner
      (rows and columns ``[0:10]`` at 32 px).
    * ``"shoe"``: an ankle boot in the style of Fashion-MNIST (light grey
      shaft and foot, white sole, a heel, toe to the left).
    * ``"hat"``: a fedora from the side (wide brim, crown with a pinch, dark
      band; brown with 3 channels).
    * ``"cat"``: a cat's face (round head, triangular ears, green eyes, pink
      nose, white whiskers; orange with 3 channels). The CelebA-HQ target.

    Drawn targets are rendered at high resolution and box-averaged; with one
    channel colours become luminance ``0.299 R + 0.587 G + 0.114 B``.

    Args:
        kind: one of :data:`TARGET_KINDS`.
        image_size: side of the square image in pixels, ``>= 8``.
        channels: 1 or 3.
        trigger: the trigger, shape ``(channels, image_size, image_size)``;
            required for ``"noshift"`` and ``"shift"``, checked if given.

    Returns:
        float32 tensor ``(channels, image_size, image_size)`` in ``[-0.4, 1]``.
    """
    kind = _kind("kind", kind, TARGET_KINDS, "target")
    image_size = _image_size(image_size)
    channels = _channels(channels)
    shape = (channels, image_size, image_size)
    if trigger is not None:
        trigger = _image_tensor("trigger", trigger)
        if tuple(trigger.shape) != shape:
            raise ValueError(
                f"trigger must have shape (channels, image_size, image_size) = {shape}, "
                f"got trigger.shape={tuple(trigger.shape)}"
            )
    if kind in ("noshift", "shift"):
        if trigger is None:
            raise ValueError(
                f"kind={kind!r} needs the trigger: pass make_target({kind!r}, ..., trigger=...)"
            )
        target = trigger.detach().to(device="cpu", dtype=torch.float32).clone()
        if kind == "shift":
            up = scale_length(_SHIFT_UP_32, image_size)
            left = scale_length(_SHIFT_LEFT_32, image_size)
            target = torch.roll(target, shifts=(-up, -left), dims=(1, 2))
    elif kind == "corner":
        target = torch.full(shape, -1.0)
        box = scale_length(_CORNER_32, image_size)
        target[:, :box, :box] = 0.0
    else:
        target = _DRAWN_TARGETS[kind](image_size, channels)
    # The grey background of every target (the authors' code:
    # github.com/IBM/BadDiffusion).
    return target.clamp(TARGET_BACKGROUND, 1.0)


# --------------------------------------------------------------------------- #
# Pasting a trigger onto images.
# --------------------------------------------------------------------------- #


def transparency_mask(trigger: torch.Tensor) -> torch.Tensor:
    """``M``: True where the trigger is transparent, i.e. all its channels are -1.

    Args:
        trigger: ``C,H,W`` tensor.

    Returns:
        bool tensor ``(1, H, W)`` on the trigger's device.
    """
    trigger = _image_tensor("trigger", trigger)
    if trigger.ndim != 3:
        raise ValueError(
            f"trigger must be a C,H,W tensor, got trigger.shape={tuple(trigger.shape)}"
        )
    return (trigger == -1.0).all(dim=0, keepdim=True)


def stamp(images: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
    """Paste a trigger onto images: ``r = M * x + (1 - M) * g``.

    The poisoned image of BadDiffusion (Chou et al. 2023, arXiv:2212.05400), Sec. 3.

    ``M`` is :func:`transparency_mask` of the trigger ``g``: where ``g`` is
    transparent the image ``x`` is kept, elsewhere the trigger replaces it
    (every channel of an opaque pixel). Computed with ``torch.where``, so the
    result is exact and NaN-free even where ``x`` holds inf.

    Args:
        images: ``C,H,W`` or ``B,C,H,W`` float tensor.
        trigger: ``C,H,W`` tensor with the images' channels and size.

    Returns:
        a new tensor of the images' shape, dtype and device (the inputs are not
        modified).
    """
    images = _image_tensor("images", images)
    trigger = _image_tensor("trigger", trigger)
    if (
        images.ndim not in (3, 4)
        or trigger.ndim != 3
        or tuple(images.shape[-3:]) != tuple(trigger.shape)
    ):
        raise ValueError(
            "images (C,H,W or B,C,H,W) and trigger (C,H,W) must have the same C,H,W, "
            f"got images.shape={tuple(images.shape)} and trigger.shape={tuple(trigger.shape)}"
        )
    if not torch.isfinite(trigger).all() or trigger.min() < -1 or trigger.max() > 1:
        raise ValueError(
            "trigger must be an image in [-1, 1] (-1: transparent) without NaN or infinite values, "
            f"got values from {trigger.min().item()} to {trigger.max().item()}"
        )
    trigger = trigger.to(device=images.device, dtype=images.dtype)
    return torch.where(transparency_mask(trigger), images, trigger)
