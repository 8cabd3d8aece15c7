"""Data that ships with installed packages, so that nothing is downloaded at run time.

Introduced in chapter 1 (What is diffusion?) with scikit-learn's bundled photographs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SAMPLE_PHOTOS", "load_sample_photo"]

#: The photographs scikit-learn ships (``sklearn.datasets.load_sample_image``), 427 x 640 RGB.
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")


def load_sample_photo(name: str = "china.jpg", *, size: tuple[int, int] | None = None,
                      grayscale: bool = False) -> np.ndarray:
    """Load a photograph that scikit-learn ships, as floats in [0, 1].

    Args:
        name: one of :data:`SAMPLE_PHOTOS`.
        size: ``(height, width)`` to resize to (Lanczos), or ``None`` for the original 427 x 640.
        grayscale: return one luminance channel (ITU-R 601-2, as PIL's ``"L"`` mode).

    Returns:
        ``H,W`` (grayscale) or ``H,W,3`` float32 array in [0, 1].
    """
    from sklearn.datasets import load_sample_image

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"name={name!r} is not a photo scikit-learn ships; use one of {SAMPLE_PHOTOS}")
    image = Image.fromarray(load_sample_image(name))
    if grayscale:
        image = image.convert("L")
    if size is not None:
        height, width = size
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(image, dtype=np.float32) / 255.0, 0.0, 1.0)
