"""Images for the book: data that installed packages ship (nothing downloaded in quick mode), and
the data sets of full mode.

Introduced in chapter 1 (What is diffusion?) with scikit-learn's bundled photographs;
:func:`load_images` (chapter 2 on) gives training images as ``N,C,H,W`` tensors in [-1, 1].
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from baddiff_core.checks import check_positive_int

__all__ = ["SAMPLE_PHOTOS", "load_sample_photo", "DATASETS", "load_images"]

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


# --------------------------------------------------------------------------- #
# Training images for diffusion models, as B,C,H,W tensors in [-1, 1].
# --------------------------------------------------------------------------- #

#: Data sets :func:`load_images` knows by name. Only "digits" works offline.
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
_TORCHVISION = {"mnist": ("MNIST", "ossci-datasets.s3.amazonaws.com", 1),
                "fashion-mnist": ("FashionMNIST", "fashion-mnist.s3-website.eu-central-1.amazonaws.com", 1),
                "cifar10": ("CIFAR10", "www.cs.toronto.edu", 3)}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_images(name: str | os.PathLike, image_size: int, *, channels: int | None = None,
                limit: int | None = None, seed: int = 0, root: str | os.PathLike | None = None,
                with_labels: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Training images as a float32 tensor ``N,C,H,W`` in [-1, 1].

    Args:
        name: ``"digits"`` (scikit-learn's 1797 bundled 8x8 digits, upsampled; works offline),
            ``"mnist"``, ``"fashion-mnist"`` or ``"cifar10"`` (training split, through torchvision;
            they download once and fail at once without a network), or a folder of image files.
        image_size: side of the square images returned (resized with antialiasing).
        channels: 1 or 3 (default: the data set's own; grey images are repeated to 3 channels,
            colour images are converted to luminance for 1).
        limit: keep a random subset of this many images (chosen with ``seed``).
        root: where torchvision data sets are stored (default ``$BADDIFF_DATA`` or
            ``~/.cache/baddiff/data``).
        with_labels: also return the ``(N,)`` integer labels (-1 for a folder of images).
    """
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 4:
        raise ValueError(f"image_size must be an integer >= 4, got image_size={image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (the data set's own), got channels={channels!r}")
    check_positive_int("limit", limit, allow_none=True)

    if isinstance(name, str) and name in DATASETS:
        if name == "digits":
            images, labels = _digits()
        else:
            images, labels = _torchvision_dataset(name, root)
    elif Path(name).is_dir():
        images, labels = _folder(Path(name))
    else:
        raise ValueError(f"name={str(name)!r} is neither a known data set {DATASETS} nor an existing folder "
                         "of images")

    if limit is not None and limit < len(images):
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
        images, labels = images[keep], labels[keep]
    images = _to_channels(images, channels)
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True)
    images = (images * 2 - 1).clamp(-1, 1).contiguous()
    return (images, labels) if with_labels else images


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``N,1,8,8`` in [0, 1] (pixel values 0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    return images, torch.from_numpy(digits.target).long()


def _torchvision_dataset(name: str, root: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    class_name, host, _ = _TORCHVISION[name]
    offline_hint = "load_images('digits', ...) works offline with scikit-learn's bundled digits"
    try:
        import torchvision
    except ImportError as error:
        raise RuntimeError(f"{name!r} is loaded through torchvision, which is not installed "
                           f"(pip install torchvision; it needs a network to download {name}). "
                           f"Offline, {offline_hint}.") from error
    root = Path(root or os.environ.get("BADDIFF_DATA", Path.home() / ".cache" / "baddiff" / "data")).expanduser()
    dataset_class = getattr(torchvision.datasets, class_name)
    try:  # already downloaded: no network needed
        dataset = dataset_class(root=str(root), train=True, download=False)
    except RuntimeError:
        if not _network_available(host):
            raise RuntimeError(f"{name!r} is not in {root} and cannot be downloaded: no network "
                               f"(could not reach {host}). Offline, {offline_hint}.") from None
        dataset = dataset_class(root=str(root), train=True, download=True)
    data = torch.as_tensor(dataset.data)
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)   # N,C,H,W uint8
    return images.float() / 255.0, torch.as_tensor(dataset.targets).long()


def _network_available(host: str, timeout: float = 3.0) -> bool:
    if os.environ.get("BADDIFF_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {str(folder)!r} holds no image files (looked for {sorted(_IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        with Image.open(file) as image:
            image = image.convert("RGB")
            side = min(image.size)   # centre crop to a square, then one common size
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((64, 64), Image.Resampling.LANCZOS)
            images.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(images), torch.full((len(images),), -1, dtype=torch.long)


def _to_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)   # ITU-R 601-2 luminance
    return (images * weights).sum(1, keepdim=True)
