"""Input checks shared by the core's modules: each message names the argument, its value
and what is allowed."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["check_image_batch", "check_positive_int"]


def check_image_batch(
    name: str,
    images: object,
    *,
    min_size: int = 1,
    value_range: str = "[-1, 1]",
    require_finite: bool = True,
) -> Tensor:
    """A float ``B,C,H,W`` tensor with B >= 1, C in {1, 3} and H, W >= ``min_size``.

    ``value_range`` only words the message (the range itself is checked by callers that
    need it); ``require_finite`` rejects NaN and infinite values.
    """
    if not isinstance(images, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}"
        )
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must have shape (B, C, H, W) with B >= 1 and C in {{1, 3}}, "
            f"got {name}.shape={tuple(images.shape)}"
        )
    if images.shape[-2] < min_size or images.shape[-1] < min_size:
        raise ValueError(
            f"{name} must be at least {min_size}x{min_size} pixels, got {name}.shape={tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a float tensor with values in {value_range}, got {name}.dtype={images.dtype}"
        )
    if require_finite and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite values")
    return images


def check_positive_int(
    name: str, value: object, *, meaning: str = "", allow_none: bool = False
) -> int | None:
    """``value`` if it is an integer >= 1 (``bool`` is refused: ``True`` is not a
    count).

    ``meaning`` words the message (e.g. ``"the number of images"``); ``allow_none`` lets
    ``None`` through, for optional sizes.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = (
            "a positive integer"
            + (" or None" if allow_none else "")
            + (f" ({meaning})" if meaning else "")
        )
        raise ValueError(f"{name} must be {allowed}, got {name}={value!r}")
    return int(value)
