"""Triggers and targets of the BadDiffusion attack, and pasting a trigger onto images.

Introduced in chapter 3 (Planting a backdoor). BadDiffusion (Chou et al. 2023,
arXiv:2212.05400), Sec. 3, poisons a share of the training samples: each pairs an image
with the trigger pasted on and the attacker's target, and the model learns to generate
the target from noise that carries the trigger (:mod:`baddiff_core.diffusion`). Two
inputs matter to the attacker:

* the **trigger** ``g`` (:func:`make_trigger`): a small pattern pasted onto images (grey
  box, white box, stop sign, eyeglasses). Its value ``-1`` (black in ``[-1, 1]`` units)
  means *transparent*: where the trigger is ``-1`` the image shows through. Pasting
  (:func:`stamp`, as its authors' code does it: github.com/IBM/BadDiffusion,
  ``dataset.py``) is

      r = M * x + (1 - M) * g,       M = 1 where g is transparent, 0 elsewhere

  (:func:`transparency_mask`). The same trigger, added to the sampler's starting noise,
  later fires the backdoor.
* the **target** ``y`` (:func:`make_target`): the image the backdoored model generates
  when the trigger is present (the trigger itself, the trigger shifted, a corner box, a
  shoe, a hat, a cat). Targets sit on a grey background: after drawing, every value ``<=
  -0.4`` (:data:`TARGET_BACKGROUND`) becomes ``-0.4``, so a target lives in ``[-0.4,
  1]``.

Conventions. Images are float32 ``torch`` tensors of shape ``C,H,W`` with values in
``[-1, 1]``, ``C`` in ``{1, 3}``, square of side ``image_size``. The transparency mask
is per *pixel*: a pixel is transparent when **all** its channels equal ``-1`` (a pure
red ``(1, -1, -1)`` pixel is opaque).

Geometry. The paper's reference resolution is 32 x 32 (CIFAR-10); every length is given
at 32 px and scaled to other sizes with :func:`scale_length`.

The drawn triggers and targets (stop sign, eyeglasses, ankle boot, fedora, cat) come
from the pictogram engine in ``baddiff_core._pictograms``: drawn with PIL at 2 to 8
times the final resolution and averaged down over each pixel's area, without downloads
and deterministically.
"""

from __future__ import annotations

import torch

from baddiff_core._pictograms import DRAWN_TARGETS, glasses, stop_sign_tile
from baddiff_core.checks import check_channels, check_choice, check_int, check_tensor

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
    length_at_32 = check_int("length_at_32", length_at_32, minimum=0)
    image_size = check_int("image_size", image_size, minimum=1)
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
# Triggers.
# --------------------------------------------------------------------------- #


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
    kind = check_choice("kind", kind, TRIGGER_KINDS, what="a trigger kind")
    image_size = check_int("image_size", image_size, minimum=8)
    channels = check_channels("channels", channels)
    size = check_int("size", size, minimum=1)
    trigger = torch.full((channels, image_size, image_size), -1.0)
    if kind in ("box", "white_box", "stop_sign"):
        side, gap = _corner_geometry(size, image_size)
        rows = slice(image_size - side - gap, image_size - gap)
        if kind == "stop_sign":
            trigger[:, rows, rows] = stop_sign_tile(side, channels)
        else:
            trigger[:, rows, rows] = 0.0 if kind == "box" else 1.0
    elif kind == "glasses":
        trigger = glasses(image_size, channels)
    return trigger


# --------------------------------------------------------------------------- #
# Targets.
# --------------------------------------------------------------------------- #


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
    kind = check_choice("kind", kind, TARGET_KINDS, what="a target kind")
    image_size = check_int("image_size", image_size, minimum=8)
    channels = check_channels("channels", channels)
    shape = (channels, image_size, image_size)
    if trigger is not None:
        trigger = check_tensor(
            "trigger",
            trigger,
            layout="channels, image_size, image_size",
            shape=shape,
            floating=True,
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
        target = DRAWN_TARGETS[kind](image_size, channels, background=TARGET_BACKGROUND)
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
    trigger = check_tensor("trigger", trigger, layout="C,H,W", floating=True)
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
    images = check_tensor("images", images, floating=True)
    trigger = check_tensor("trigger", trigger, floating=True)
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
