"""The pictogram engine behind :mod:`baddiff_core.triggers`: the stop sign and the
eyeglasses triggers, the ankle boot, fedora and cat targets.

Each drawing is a *label map*: ``paint`` fills shapes with integer labels (0 is the
background) on a canvas 2 to 8 times finer than the image, with PIL; each output pixel
then takes the fraction of its area that every label covers (a box filter, i.e. exact
area coverage), and a palette turns those fractions into a colour. Nothing is downloaded
or read from disk, and every drawing is deterministic. With one channel the colours
become luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R 601).

Triggers (:func:`stop_sign_tile`, :func:`glasses`) keep -1 (transparent) where they are
not drawn; targets (:data:`DRAWN_TARGETS`) are painted on a grey ``background`` and
clamped to ``[background, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["stop_sign_tile", "glasses", "shoe", "hat", "cat", "DRAWN_TARGETS"]

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
_GLASSES_WIDTH = 0.625  # eyeglasses width as a fraction of the image side


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


# --------------------------------------------------------------------------- #
# Triggers, transparent (-1) where nothing is drawn.
# --------------------------------------------------------------------------- #

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


def stop_sign_tile(side: int, channels: int) -> torch.Tensor:
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


def glasses(image_size: int, channels: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------- #
# Targets, on a grey background.
# --------------------------------------------------------------------------- #


def _target_from_coverage(
    coverage: np.ndarray, palette: Sequence[_RGB], channels: int, background: float
) -> torch.Tensor:
    """Area-weighted colour of label coverage (label 0 = the grey ``background``),
    clamped to ``[background, 1]``."""
    values = _to_channels(_colour(coverage, palette), channels)
    return torch.from_numpy(values.astype(np.float32)).clamp(background, 1.0)


def shoe(image_size: int, channels: int, *, background: float) -> torch.Tensor:
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
        (background,) * 3,
        (0.55, 0.55, 0.55),
        (0.95, 0.95, 0.95),
        (0.1, 0.1, 0.1),
        (0.7, 0.7, 0.7),
        (0.35, 0.35, 0.35),
    ]
    return _target_from_coverage(
        _coverage(image_size, 6, paint), palette, channels, background
    )


def hat(image_size: int, channels: int, *, background: float) -> torch.Tensor:
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
        (background,) * 3,
        (0.35, -0.02, -0.35),
        (0.2, -0.12, -0.38),
        (-0.3, -0.38, -0.4),
        (0.15, -0.15, -0.38),
    ]
    return _target_from_coverage(
        _coverage(image_size, 5, paint), palette, channels, background
    )


def cat(image_size: int, channels: int, *, background: float) -> torch.Tensor:
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
        (background,) * 3,
        (0.9, 0.2, -0.35),
        (1.0, 0.4, 0.45),
        (0.5, -0.2, -0.4),
        (1.0, 0.75, 0.35),
        (0.3, 0.75, -0.3),
        (-0.4, -0.4, -0.4),
        (1.0, 1.0, 1.0),
    ]
    return _target_from_coverage(
        _coverage(image_size, 8, paint), palette, channels, background
    )


#: The drawn targets by kind: ``draw(image_size, channels, background=...)``.
DRAWN_TARGETS: dict[str, Callable[..., torch.Tensor]] = {
    "shoe": shoe,
    "hat": hat,
    "cat": cat,
}
