"""Images for the book: data that installed packages ship (nothing downloaded in quick
mode), and the data sets of full mode.

Introduced in chapter 1 (What is diffusion?) with scikit-learn's bundled photographs;
:func:`load_images` (chapter 2 on) gives training images as ``N,C,H,W`` tensors in [-1,
1].

CIFAR-10 (full mode) is read from its official *binary* version with NumPy: the Python
version of the data set is a set of pickles, and unpickling runs whatever code a file
asks for.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from baddiff_core.checks import (
    check_channels,
    check_choice,
    check_int,
    check_positive_int,
)
from baddiff_core.files import atomic_folder

__all__ = [
    "SAMPLE_PHOTOS",
    "load_sample_photo",
    "DATASETS",
    "load_images",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR10_FOLDER",
    "write_cifar10_binary",
]

#: The photographs scikit-learn ships (``sklearn.datasets.load_sample_image``), 427 x
#: 640 RGB.
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")


def load_sample_photo(
    name: str = "china.jpg",
    *,
    size: tuple[int, int] | None = None,
    grayscale: bool = False,
) -> np.ndarray:
    """Load a photograph that scikit-learn ships, as floats in [0, 1].

    Args:
        name: one of :data:`SAMPLE_PHOTOS`.
        size: ``(height, width)`` to resize to (Lanczos), or ``None`` for the original 427 x 640.
        grayscale: return one luminance channel (ITU-R 601-2, as PIL's ``"L"`` mode).

    Returns:
        ``H,W`` (grayscale) or ``H,W,3`` float32 array in [0, 1].
    """
    from sklearn.datasets import load_sample_image

    check_choice("name", name, SAMPLE_PHOTOS, what="a photo scikit-learn ships")
    image = Image.fromarray(load_sample_image(name))
    if grayscale:
        image = image.convert("L")
    if size is not None:
        height, width = size
        if not (
            isinstance(height, int)
            and isinstance(width, int)
            and height > 0
            and width > 0
        ):
            raise ValueError(
                f"size must be (height, width) with positive integers, got {size!r}"
            )
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(image, dtype=np.float32) / 255.0, 0.0, 1.0)


# --------------------------------------------------------------------------- #
# Training images for diffusion models, as B,C,H,W tensors in [-1, 1].
# --------------------------------------------------------------------------- #

#: Data sets :func:`load_images` knows by name. "digits" works offline; the others once
#: their files are on disk.
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
#: Loaded through the optional package torchvision (not used by the book).
_TORCHVISION = {
    "mnist": ("MNIST", "ossci-datasets.s3.amazonaws.com", 1),
    "fashion-mnist": (
        "FashionMNIST",
        "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
        1,
    ),
}

#: CIFAR-10's official binary version (Krizhevsky 2009): read with NumPy, nothing is
#: unpickled.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
#: The MD5 that the CIFAR-10 page publishes for the archive at :data:`CIFAR10_URL`:
#: a download with another digest is refused.
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_CIFAR10_HOST = "www.cs.toronto.edu"
_CIFAR10_ARCHIVE_MB = 162
#: The folder the archive extracts to, inside the data root.
CIFAR10_FOLDER = "cifar-10-batches-bin"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
#: The archive's members that are extracted (anything else in it is left there).
_CIFAR10_MEMBERS = (*_CIFAR10_TRAIN, "test_batch.bin", "batches.meta.txt")
_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
#: One record: a label byte, then 32x32 red, green and blue planes, each row-major.
_CIFAR10_SIDE = 32
_CIFAR10_RECORD = 1 + 3 * _CIFAR10_SIDE * _CIFAR10_SIDE
_OFFLINE_HINT = (
    "load_images('digits', ...) works offline with scikit-learn's bundled digits"
)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_images(
    name: str | os.PathLike,
    image_size: int,
    *,
    channels: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    with_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Training images as a float32 tensor ``N,C,H,W`` in [-1, 1].

    Args:
        name: ``"digits"`` (scikit-learn's 1797 bundled 8x8 digits, upsampled; works offline),
            ``"cifar10"`` (the 50000 training images, read with NumPy from the official binary files
            ``<root>/cifar-10-batches-bin/data_batch_{1..5}.bin``; when they are missing, the 162 MB
            archive is downloaded once, checked against its MD5 and extracted), ``"mnist"`` or
            ``"fashion-mnist"`` (training split, through the optional package torchvision; not used by
            the book), or a folder of image files. Data sets that need a download fail at once without
            a network (or with ``BADDIFF_OFFLINE=1``).
        image_size: side of the square images returned (resized with antialiasing).
        channels: 1 or 3 (default: the data set's own; grey images are repeated to 3 channels,
            colour images are converted to luminance for 1).
        limit: keep a random subset of this many images (chosen with ``seed``).
        root: the data root, where downloaded data sets are stored (default ``$BADDIFF_DATA`` or
            ``~/.cache/baddiff/data``).
        with_labels: also return the ``(N,)`` integer labels (-1 for a folder of images).
    """
    image_size = check_int("image_size", image_size, minimum=4)
    channels = check_channels(
        "channels", channels, allow_none=True, meaning="the data set's own"
    )
    check_positive_int("limit", limit, allow_none=True)

    if isinstance(name, str) and name in DATASETS:
        if name == "digits":
            images, labels = _digits()
        elif name == "cifar10":
            images, labels = _cifar10(_data_root(root))
        else:
            images, labels = _torchvision_dataset(name, root)
    elif Path(name).is_dir():
        images, labels = _folder(Path(name))
    else:
        raise ValueError(
            f"name={str(name)!r} is neither a known data set {DATASETS} nor an existing folder "
            "of images"
        )

    if limit is not None and limit < len(images):
        keep = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(seed)
        )[:limit]
        images, labels = images[keep], labels[keep]
    images = _to_channels(images, channels)
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = F.interpolate(
            images,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    images = (images * 2 - 1).clamp(-1, 1).contiguous()
    return (images, labels) if with_labels else images


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``N,1,8,8`` in [0, 1] (pixel values 0..16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    return images, torch.from_numpy(digits.target).long()


def _data_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$BADDIFF_DATA``, else ``~/.cache/baddiff/data``."""
    return Path(
        root
        or os.environ.get("BADDIFF_DATA")
        or Path.home() / ".cache" / "baddiff" / "data"
    ).expanduser()


def _torchvision_dataset(
    name: str, root: str | os.PathLike | None
) -> tuple[torch.Tensor, torch.Tensor]:
    class_name, host, _ = _TORCHVISION[name]
    try:
        import torchvision
    except ImportError as error:
        raise RuntimeError(
            f"{name!r} is loaded through torchvision, an optional package that is not installed "
            f"(pip install torchvision; it needs a network to download {name}). "
            f"The book does not use {name!r}. Offline, {_OFFLINE_HINT}."
        ) from error
    root = _data_root(root)
    dataset_class = getattr(torchvision.datasets, class_name)
    try:  # already downloaded: no network needed
        dataset = dataset_class(root=str(root), train=True, download=False)
    except RuntimeError:
        if not _network_available(host):
            raise RuntimeError(
                f"{name!r} is not in {root} and cannot be downloaded: no network "
                f"(could not reach {host}). Offline, {_OFFLINE_HINT}."
            ) from None
        dataset = dataset_class(root=str(root), train=True, download=True)
    data = torch.as_tensor(dataset.data)
    # N,C,H,W uint8
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    return images.float() / 255.0, torch.as_tensor(dataset.targets).long()


# --------------------------------------------------------------------------- #
# CIFAR-10 from its binary version: NumPy only, never a pickle.
# --------------------------------------------------------------------------- #


def _cifar10(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's training images as ``N,3,32,32`` in [0, 1] and their labels,
    downloaded if missing."""
    folder = root / CIFAR10_FOLDER
    files = [folder / name for name in _CIFAR10_TRAIN]
    if not all(file.is_file() for file in files):
        _fetch_cifar10(root)
    images, labels = zip(*(_read_cifar10_file(file) for file in files))
    images = torch.from_numpy(np.concatenate(images))
    return images.float() / 255.0, torch.from_numpy(
        np.concatenate(labels).astype(np.int64)
    )


def _read_cifar10_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One file of the binary version: ``N,3,32,32`` uint8 images (R, G, B planes) and
    ``(N,)`` labels."""
    size = path.stat().st_size
    if size == 0 or size % _CIFAR10_RECORD:
        raise ValueError(
            f"{str(path)!r} is not a CIFAR-10 binary file: its {size} bytes are not a whole, non-zero "
            f"number of {_CIFAR10_RECORD}-byte records (1 label byte + 3 x 32 x 32 pixel bytes); "
            f"delete {str(path.parent)!r} to download it again"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, _CIFAR10_RECORD)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise ValueError(
            f"{str(path)!r} is not a CIFAR-10 binary file: record {int(bad[0])} has label "
            f"{int(labels[bad[0]])} ({bad.size} records outside 0..9); labels must be 0..9"
        )
    images = records[:, 1:].reshape(-1, 3, _CIFAR10_SIDE, _CIFAR10_SIDE)
    return images, labels


def write_cifar10_binary(
    folder: str | os.PathLike, images: np.ndarray, labels: np.ndarray
) -> Path:
    """Write images in CIFAR-10's binary layout, as ``folder/data_batch_1.bin`` ..
    ``data_batch_5.bin``.

    For a stand-in of CIFAR-10 where the real one cannot be downloaded (tests of full
    mode, offline machines): with ``folder = <root>/cifar-10-batches-bin``,
    ``load_images("cifar10", ..., root=root)`` reads these images back. Each record is
    one label byte followed by the 32 x 32 red, green and blue planes, each row-major;
    the images are split over the five files as evenly as possible, and
    ``batches.meta.txt`` names the ten classes, as in the real data. ``folder`` is
    replaced as a whole (atomically: :func:`~baddiff_core.files.atomic_folder`).

    Args:
        folder: the folder to write (created; an existing one is replaced).
        images: ``N,32,32,3`` uint8 array (height, width, RGB, as images are usually held), N >= 5.
        labels: ``(N,)`` integers in 0..9.

    Returns:
        ``folder``, as a :class:`~pathlib.Path`.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    side = _CIFAR10_SIDE
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != (side, side, 3)
    ):
        raise ValueError(
            f"images must be a uint8 array of shape (N, {side}, {side}, 3), got "
            f"shape={images.shape}, dtype={images.dtype}"
        )
    if len(images) < len(_CIFAR10_TRAIN):
        raise ValueError(
            f"images must hold at least {len(_CIFAR10_TRAIN)} images (one per file), "
            f"got {len(images)}"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape ({len(images)},), one per image, got "
            f"shape={labels.shape}, dtype={labels.dtype}"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"labels must be in 0..9, got values from {labels.min()} to {labels.max()}"
        )
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # N, R plane | G | B
    records = np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1)
    folder = Path(folder)
    with atomic_folder(folder) as staging:
        for name, part in zip(
            _CIFAR10_TRAIN, np.array_split(records, len(_CIFAR10_TRAIN))
        ):
            (staging / name).write_bytes(np.ascontiguousarray(part).tobytes())
        (staging / "batches.meta.txt").write_text("\n".join(_CIFAR10_CLASSES) + "\n")
    return folder


def _fetch_cifar10(root: Path) -> None:
    """Download the binary archive, check its MD5 and extract its data files into
    ``root``."""
    folder = root / CIFAR10_FOLDER
    if not _network_available(_CIFAR10_HOST):
        raise RuntimeError(
            f"'cifar10' is not in {str(folder)!r} (data_batch_1.bin .. data_batch_5.bin) and cannot be downloaded: "
            f"no network (could not reach {_CIFAR10_HOST}). To get it, download {CIFAR10_URL} "
            f"({_CIFAR10_ARCHIVE_MB} MB) where there is a network and extract it into the data root "
            f"(tar -xzf cifar-10-binary.tar.gz -C {str(root)!r}; the root is root=, else $BADDIFF_DATA, else "
            f"~/.cache/baddiff/data). Offline, {_OFFLINE_HINT}."
        )
    root.mkdir(parents=True, exist_ok=True)
    print(f"downloading CIFAR-10 ({CIFAR10_URL}, {_CIFAR10_ARCHIVE_MB} MB) to {folder}")
    with tempfile.TemporaryDirectory(prefix=".cifar10-download.", dir=root) as scratch:
        archive = Path(scratch) / "cifar-10-binary.tar.gz"
        _download(CIFAR10_URL, archive)
        digest = _md5(archive)
        if digest != CIFAR10_MD5:
            raise ValueError(
                f"the download of {CIFAR10_URL} has MD5 {digest}, expected {CIFAR10_MD5} "
                "(an interrupted or altered download); nothing was extracted, try again"
            )
        _extract_cifar10(archive, folder, source=CIFAR10_URL)


def _download(url: str, path: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as file:
        shutil.copyfileobj(response, file, length=1 << 20)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_cifar10(archive: Path, folder: Path, *, source: str) -> None:
    """Extract the expected regular files of ``archive`` into ``folder`` (replaced
    atomically).

    Every member name is checked first, so that an archive that names a path outside its
    folder (absolute, with ``..`` or a backslash) is refused as a whole; only the
    expected files are extracted, by name, with tarfile's ``"data"`` filter where this
    Python has it. ``source`` (where the archive came from) names it in errors.
    """
    wanted = {f"{CIFAR10_FOLDER}/{name}": name for name in _CIFAR10_MEMBERS}
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            parts = PurePosixPath(member.name).parts
            if (
                member.name.startswith(("/", "\\"))
                or ".." in parts
                or "\\" in member.name
            ):
                raise ValueError(
                    f"the archive {source} holds a member with an unsafe name {member.name!r} "
                    "(absolute, with '..' or a backslash); refusing to extract anything from it"
                )
        found = {
            member.name: member
            for member in members
            if member.name in wanted and member.isfile()
        }
        missing = [name for name in wanted if name not in found]
        if missing:
            raise ValueError(
                f"the archive {source} is not CIFAR-10's binary version: it lacks the files {missing}"
            )
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with atomic_folder(folder) as staging:
            for name, member in found.items():
                member.name = wanted[name]  # flat, into the staging folder
                tar.extract(member, staging, **extra)


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
        raise ValueError(
            f"folder {str(folder)!r} holds no image files (looked for {sorted(_IMAGE_SUFFIXES)})"
        )
    images = [
        torch.from_numpy(read_image(file, size=_FOLDER_SIZE)).permute(2, 0, 1)
        for file in files
    ]
    return torch.stack(images), torch.full((len(images),), -1, dtype=torch.long)


_FOLDER_SIZE = 64  # images from a folder are centre-cropped to a square and resized to this side first
#: Pillow modes holding more than 8 bits per pixel, and the value that means white in
#: each.
_DEEP_MODES = {
    "I;16": 65535,
    "I;16B": 65535,
    "I;16L": 65535,
    "I;16N": 65535,
    "I": 65535,
}


def read_image(path: str | os.PathLike, *, size: int | None = None) -> np.ndarray:
    """An image file as an ``H,W,3`` float32 array in [0, 1], at its real bit depth and
    orientation.

    8-bit images (any Pillow mode: grey, palette, RGBA, ...) are converted to RGB;
    16-bit images ("I;16", and "I" as Pillow opens 16-bit PNGs) are divided by 65535
    instead of being saturated at 255; floating-point images (mode "F", e.g. 32-bit
    TIFFs) are taken as they are and must lie in [0, 1]. The EXIF orientation is applied
    (a phone's portrait photo stays upright). An animated image gives its first frame,
    with a warning. With ``size``, the image is centre-cropped to a square and resized
    (Lanczos) to ``size`` x ``size``.

    Raises:
        ValueError: the file cannot be read (truncated, not an image), or a float image has values
            outside [0, 1] or not finite; the message names the file.
    """
    import warnings

    from PIL import ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                warnings.warn(
                    f"{path.name} is animated ({frames} frames); its first frame is used",
                    stacklevel=2,
                )
                image.seek(0)
            image = ImageOps.exif_transpose(image)
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"cannot read the image {str(path)!r}: {error}") from None
    if image.mode in _DEEP_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if image.mode == "F":
            if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
                raise ValueError(
                    f"the floating-point image {str(path)!r} must hold values in [0, 1], got "
                    f"{np.nanmin(values)} to {np.nanmax(values)}"
                )
        else:
            values = values / _DEEP_MODES[image.mode]
        channels = [Image.fromarray(np.ascontiguousarray(values), mode="F")]
    else:
        rgb = image.convert("RGB")
        channels = None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    box = (left, top, left + side, top + side)
    if channels is None:  # 8 bits: as before, one RGB image
        if size is not None:
            rgb = rgb.crop(box).resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(rgb, dtype=np.float32) / 255.0
    if size is not None:
        channels = [
            c.crop(box).resize((size, size), Image.Resampling.LANCZOS) for c in channels
        ]
    # Lanczos may overshoot a little
    grey = np.clip(np.asarray(channels[0], dtype=np.float32), 0.0, 1.0)
    return np.repeat(grey[..., None], 3, axis=2)


def _to_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3:
        return images.repeat(1, 3, 1, 1)
    # ITU-R 601-2 luminance
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)
