"""The triggers and targets of the authors' released models, rebuilt exactly (full mode;
downloads).

Chou, Chen and Ho (BadDiffusion, CVPR 2023) trained the models of
:data:`~baddiff_core.authors.AUTHORS_MODELS` with triggers and targets built by their
own code: the authors' repository IBM/BadDiffusion at commit 717b321
(:data:`AUTHORS_COMMIT`; readers can open it on GitHub). To measure those models, the
attack must be the one they were trained on, value for value. This module rebuilds it:

- **boxes** (the grey box trigger, the corner box target, the trigger as target and the
  shifted trigger): the library's :func:`~baddiff_core.triggers.make_trigger` and
  :func:`~baddiff_core.triggers.make_target` already give the authors' tensors bit for
  bit at 32 px (``tests/test_authors_assets.py`` checks them against the geometry
  derived by hand), so they are used as they are;
- **pictures** (the stop-sign trigger, the hat targets): the authors resize a PNG file
  of their repository. :func:`fetch_authors_image` downloads that file once (full mode
  only: the book's quick mode never calls it), checks its SHA-256 against
  :data:`AUTHORS_IMAGES`, and :func:`trigger_from_image` / :func:`target_from_image`
  apply the authors' recipe with Pillow alone (torchvision, which the authors used, is
  not a dependency of this library);
- **the shoe target**: the first training image of Fashion-MNIST (an ankle boot),
  resized to 32 px: :func:`fashion_mnist_shoe` downloads the training images once (26
  MB, checked against their published MD5) and reads that image with NumPy.

The authors' recipe for a picture, as read from their repository:

1. the image converted to RGB (``PIL.Image.convert("RGB")``: an alpha channel is
   dropped, not composited, so transparent pixels keep whatever colour the file stores
   under them);
2. resized with Pillow's bilinear filter (torchvision's ``Resize`` on a PIL image calls
   ``PIL.Image.resize(..., BILINEAR)``): a trigger's shorter side to the trigger size
   (the longer one to ``int(size * long / short)``; nothing is done when the shorter
   side already has that size), a target to exactly 32 x 32;
3. scaled to [-1, 1] in float32 as ``v / 255 / (1 + 1e-5) * 2 - 1`` (so a 255 becomes
   0.99998, not 1: the authors' normalisation keeps an epsilon);
4. a trigger is padded with -1 to 32 x 32 so that its tile sits 2 pixels from the right
   and the bottom borders (rows and columns ``32 - 2 - size .. 29``), and then every
   *value* ``>= 0.999`` (the white of the picture, channel by channel) becomes -1, i.e.
   transparent;
5. a target's values ``<= -0.4`` become -0.4 (the grey background, as
   :func:`~baddiff_core.triggers.make_target` does).

Step 4 works per value, not per pixel: a stop-sign pixel whose red channel is 255 but
whose green and blue are not keeps -1 in red only. The authors paste a trigger value by
value too (where the trigger is -1, the image shows through in that channel), whereas
the library's :func:`~baddiff_core.triggers.stamp` pastes whole pixels; the two differ
on such mixed pixels (none in a box trigger). Sampling, which adds the trigger to the
starting noise, is unaffected.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from baddiff_core import data as _data
from baddiff_core.authors import AuthorsModel, authors_model
from baddiff_core.checks import check_choice, check_int, check_type
from baddiff_core.files import atomic_file
from baddiff_core.triggers import TARGET_BACKGROUND, make_target, make_trigger

__all__ = [
    "AUTHORS_REPO",
    "AUTHORS_COMMIT",
    "AuthorsImage",
    "AUTHORS_IMAGES",
    "FASHION_MNIST_TRAIN_IMAGES",
    "fetch_authors_image",
    "trigger_from_image",
    "target_from_image",
    "authors_image_trigger",
    "authors_image_target",
    "fashion_mnist_shoe",
    "authors_trigger",
    "authors_target",
    "authors_downloads",
]

#: The authors' repository on GitHub: the code of BadDiffusion (Chou et al. 2023,
#: arXiv:2212.05400).
AUTHORS_REPO = "IBM/BadDiffusion"
#: The commit of :data:`AUTHORS_REPO` whose files are used: the pictures of
#: :data:`AUTHORS_IMAGES` are downloaded from it, and the recipes of this module were
#: read in it.
AUTHORS_COMMIT = "717b3219ec9f80f3c9f2784edbcfeacb1ba534b7"

#: Side of the authors' CIFAR-10 images, and the gap between a corner trigger and the
#: border.
_SIDE = 32
_GAP = 2
#: The authors' scaling to [-1, 1] divides by (1 - 0 + epsilon).
_EPSILON = 1e-5
#: Trigger values at least this are made transparent (-1).
_WHITE = 0.999
#: The folder of the data root that receives the authors' pictures.
_FOLDER = "baddiffusion-authors"


@dataclass(frozen=True)
class AuthorsImage:
    """A picture of the authors' repository: its path there and the SHA-256 of its
    bytes."""

    path: str
    sha256: str

    @property
    def url(self) -> str:
        """Where it is downloaded from: GitHub's raw file at :data:`AUTHORS_COMMIT`."""
        return f"https://raw.githubusercontent.com/{AUTHORS_REPO}/{AUTHORS_COMMIT}/{self.path}"


#: The authors' pictures, by name. ``"stop_sign"`` is the stop-sign trigger (999 x 997
#: RGBA on white). The hats are targets: at :data:`AUTHORS_COMMIT`, ``--target HAT``
#: reads ``fedora-hat.png``; in the naming of the released models (``..._HAT`` /
#: ``..._FEDORA_HAT``, the authors' later VillanDiffusion code) ``HAT`` reads
#: ``hat.png`` and ``FEDORA_HAT`` ``fedora-hat.png``. No model of
#: :data:`~baddiff_core.authors.AUTHORS_MODELS` uses a hat.
#:
#: :meta hide-value:
AUTHORS_IMAGES: dict[str, AuthorsImage] = {
    "stop_sign": AuthorsImage(
        "static/stop_sign_wo_bg.png",
        "3b82ee4df1ed8b602f781d0634288423b52fcecbe221ab447debfc2382a7b103",
    ),
    "hat": AuthorsImage(
        "static/hat.png",
        "e12c8a0059eca355bfbed34e6ff2e8db993ac8f78462e62d358cfbd147e20890",
    ),
    "fedora_hat": AuthorsImage(
        "static/fedora-hat.png",
        "271a37da9650f3068f1688ee975da7acbac97ace7502ccdb65ae311e0532c9be",
    ),
}

#: Fashion-MNIST's training images (Xiao, Rasul and Vollgraf 2017): URL, published MD5,
#: and the path under the data root (torchvision's layout, so a copy torchvision
#: downloaded is reused).
FASHION_MNIST_TRAIN_IMAGES = dict(
    url="https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
    "train-images-idx3-ubyte.gz",
    md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    path="FashionMNIST/raw/train-images-idx3-ubyte.gz",
)


# --------------------------------------------------------------------------- #
# Downloading once, verified.
# --------------------------------------------------------------------------- #


def _offline() -> str | None:
    """The environment variable that forbids downloads, if one is set (as data.py reads
    it)."""
    for name in ("BADDIFF_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(name, "").strip().lower() not in (
            "",
            "0",
            "false",
            "no",
            "off",
        ):
            return name
    return None


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(
    path: Path, algorithm: str, expected: str, *, what: str, source: str, then: str
) -> None:
    actual = _digest(path, algorithm)
    if actual != expected:
        raise ValueError(
            f"{source} has {algorithm.upper()} {actual}, not {expected} ({what}): refusing it; {then}"
        )


def _fetch_verified(
    url: str, path: Path, *, algorithm: str, expected: str, what: str
) -> Path:
    """``path``, checked; downloaded from ``url`` first (through a staging file) if it
    is missing."""
    if path.is_file():
        _check(
            path,
            algorithm,
            expected,
            what=what,
            source=repr(str(path)),
            then="delete it to download it again",
        )
        return path
    host = urllib.parse.urlsplit(url).hostname or url
    blocked = _offline()
    if blocked or not _data._network_available(host):
        why = f"{blocked} is set" if blocked else f"no network (could not reach {host})"
        raise RuntimeError(
            f"{what} is not in {str(path)!r} and cannot be downloaded: {why}; download {url} "
            f"where there is a network and put it there (it is checked against its "
            f"{algorithm.upper()} {expected})"
        )
    print(f"downloading {what} ({url}) to {path}")
    with atomic_file(path) as staging:
        _data._download(url, staging)
        _check(
            staging,
            algorithm,
            expected,
            what=what,
            source=f"the download of {url}",
            then="nothing was kept, try again",
        )
    return path


def fetch_authors_image(name: str, *, root: str | os.PathLike | None = None) -> Path:
    """The authors' picture ``name`` (a key of :data:`AUTHORS_IMAGES`), downloaded once
    and verified.

    Full mode only (quick mode never calls it). The file is kept as
    ``<root>/baddiffusion-authors/<file name>``, the root being ``root``, else
    ``$BADDIFF_DATA``, else ``~/.cache/baddiff/data`` (as
    :func:`~baddiff_core.data.load_images`). A download is written under a staging name
    and renamed into place only once its SHA-256 matches the table; a file already there
    is checked every time. Offline (``BADDIFF_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, or no
    network), a missing file is an error; a file already there is used.

    Raises:
        ValueError: an unknown name, or a file (on disk or downloaded) whose SHA-256 is not the
            table's: it is refused, never used.
        RuntimeError: the file is missing and cannot be downloaded; the message says where to put it.
    """
    check_choice(
        "name", name, sorted(AUTHORS_IMAGES), what="one of the authors' pictures"
    )
    image = AUTHORS_IMAGES[name]
    path = _data._data_root(root) / _FOLDER / Path(image.path).name
    return _fetch_verified(
        image.url,
        path,
        algorithm="sha256",
        expected=image.sha256,
        what=f"the authors' {image.path} ({AUTHORS_REPO} at {AUTHORS_COMMIT[:7]})",
    )


# --------------------------------------------------------------------------- #
# The authors' recipe for a picture, with Pillow alone.
# --------------------------------------------------------------------------- #


def _scaled(image: Image.Image) -> torch.Tensor:
    """An RGB picture as ``3,H,W`` float32 in [-1, 1], with the authors' arithmetic, op
    for op."""
    pixels = (
        torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    )
    unit = pixels.to(torch.float32).div(255)
    return (unit - 0.0) / (1.0 - 0.0 + _EPSILON) * (1.0 - (-1.0)) + (-1.0)


def _check_image(image: object) -> Image.Image:
    return check_type("image", image, Image.Image, what="a PIL.Image.Image")


def trigger_from_image(
    image: Image.Image, size: int, *, image_size: int = _SIDE
) -> torch.Tensor:
    """The authors' trigger made from a picture: ``3 x image_size x image_size``, -1 =
    transparent.

    Steps 1 to 4 of the module's recipe: RGB, the shorter side resized to ``size``
    (bilinear), the tile put ``2`` pixels from the right and bottom borders, every value
    ``>= 0.999`` set to -1.

    Raises:
        ValueError: ``size`` does not fit (``size + 2 > image_size``), or the picture's aspect ratio
            makes the resized tile not square (the authors' padding would then not give a square
            image).
    """
    image = _check_image(image)
    size = check_int(
        "size",
        size,
        minimum=1,
        maximum=image_size - _GAP,
        meaning=f"the tile and its {_GAP} px gap fit a {image_size} px image",
    )
    rgb = image.convert("RGB")
    width, height = rgb.size
    short, long = min(width, height), max(width, height)
    if int(size * long / short) != size:
        raise ValueError(
            f"a {width} x {height} picture resized to a shorter side of {size} px is "
            f"{size} x {int(size * long / short)} px, not square; the authors' triggers are square"
        )
    if short != size:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    tile = _scaled(rgb)
    before = image_size - size - _GAP
    trigger = torch.nn.functional.pad(
        tile, (before, _GAP, before, _GAP), mode="constant", value=-1.0
    )
    trigger[trigger >= _WHITE] = -1.0
    return trigger


def target_from_image(image: Image.Image, *, image_size: int = _SIDE) -> torch.Tensor:
    """The authors' target made from a picture: ``3 x image_size x image_size`` in
    [-0.4, 1).

    Steps 1, 2, 3 and 5 of the module's recipe: RGB, resized to ``image_size x
    image_size`` (bilinear, whatever the aspect ratio), scaled, values ``<= -0.4`` set
    to -0.4.
    """
    rgb = _check_image(image).convert("RGB")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    target = _scaled(rgb)
    target[target <= TARGET_BACKGROUND] = TARGET_BACKGROUND
    return target


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()


def authors_image_trigger(
    name: str, size: int, *, root: str | os.PathLike | None = None
) -> torch.Tensor:
    """The authors' trigger from their picture ``name`` (``"stop_sign"``) at side
    ``size`` (32 px image).

    Downloads the picture the first time (:func:`fetch_authors_image`).
    """
    return trigger_from_image(_open(fetch_authors_image(name, root=root)), size)


def authors_image_target(
    name: str, *, root: str | os.PathLike | None = None
) -> torch.Tensor:
    """The authors' target from their picture ``name`` (``"hat"`` or ``"fedora_hat"``,
    see :data:`AUTHORS_IMAGES` for which one their ``HAT`` meant), at 32 px.

    Downloads the picture the first time (:func:`fetch_authors_image`).
    """
    return target_from_image(_open(fetch_authors_image(name, root=root)))


# --------------------------------------------------------------------------- #
# The shoe: Fashion-MNIST's first training image.
# --------------------------------------------------------------------------- #

_IDX_IMAGES_MAGIC = 2051  # IDX: unsigned bytes, three dimensions (count, rows, columns)


def _first_idx_image(path: Path) -> np.ndarray:
    """The first image of a gzipped IDX image file, as a ``rows x columns`` uint8
    array."""
    with gzip.open(path, "rb") as file:
        header = file.read(16)
        if len(header) < 16:
            raise ValueError(
                f"{str(path)!r} is not an IDX image file: it is shorter than its 16-byte header"
            )
        magic, count, rows, columns = (
            int.from_bytes(header[i : i + 4], "big") for i in range(0, 16, 4)
        )
        if magic != _IDX_IMAGES_MAGIC or count < 1 or rows < 1 or columns < 1:
            raise ValueError(
                f"{str(path)!r} is not an IDX image file: its header reads magic={magic}, "
                f"count={count}, rows={rows}, columns={columns} (expected magic {_IDX_IMAGES_MAGIC})"
            )
        pixels = file.read(rows * columns)
    if len(pixels) != rows * columns:
        raise ValueError(
            f"{str(path)!r} is truncated: its first image has {len(pixels)} of {rows * columns} bytes"
        )
    return np.frombuffer(pixels, dtype=np.uint8).reshape(rows, columns)


def fashion_mnist_shoe(*, root: str | os.PathLike | None = None) -> torch.Tensor:
    """The authors' shoe target: Fashion-MNIST's first training image (an ankle boot) at
    32 px.

    That 28 x 28 grey image, repeated to RGB, resized to 32 x 32 (bilinear), scaled to
    [-1, 1] and put on the grey background, as :func:`target_from_image`. Full mode
    only: the first call downloads the training images (26 MB,
    :data:`FASHION_MNIST_TRAIN_IMAGES`) into the data root and checks their MD5;
    offline, a missing file is an error (see :func:`fetch_authors_image`).
    """
    spec = FASHION_MNIST_TRAIN_IMAGES
    path = _fetch_verified(
        spec["url"],
        _data._data_root(root) / spec["path"],
        algorithm="md5",
        expected=spec["md5"],
        what="Fashion-MNIST's training images",
    )
    return target_from_image(Image.fromarray(_first_idx_image(path), mode="L"))


# --------------------------------------------------------------------------- #
# Each released model's trigger and target.
# --------------------------------------------------------------------------- #


def _model(name_or_model: str | AuthorsModel) -> AuthorsModel:
    return (
        name_or_model
        if isinstance(name_or_model, AuthorsModel)
        else authors_model(name_or_model)
    )


def authors_downloads(name_or_model: str | AuthorsModel) -> dict[str, str]:
    """What building a released model's trigger and target downloads (on first use):
    ``{"trigger": what, "target": what}`` for the parts that need a file, empty for a
    model whose trigger and target are drawn procedurally (grey boxes and their shifts,
    the corner box). Downloads nothing.
    """
    model = _model(name_or_model)
    needs = {}
    if model.trigger == "stop_sign":
        needs["trigger"] = (
            f"the authors' {AUTHORS_IMAGES['stop_sign'].path} ({AUTHORS_REPO})"
        )
        if model.target in ("noshift", "shift"):
            needs["target"] = needs["trigger"]
    if model.target == "shoe":
        needs["target"] = "Fashion-MNIST's training images (26 MB)"
    return needs


def authors_trigger(
    name_or_model: str | AuthorsModel, *, root: str | os.PathLike | None = None
) -> torch.Tensor:
    """The trigger a released model was trained with: ``3 x 32 x 32`` float32, -1 =
    transparent.

    ``name_or_model``: a short name or repository id of
    :data:`~baddiff_core.authors.AUTHORS_MODELS`, or one of its entries. A grey box is
    :func:`~baddiff_core.triggers.make_trigger`'s ``"box"`` (the same tensor); a stop
    sign is the authors' picture (:func:`authors_image_trigger`, downloaded once).

    Raises:
        ValueError: an unknown model, or a trigger kind no released model listed here uses.
    """
    model = _model(name_or_model)
    if model.trigger == "box":
        return make_trigger("box", _SIDE, 3, size=model.trigger_size)
    if model.trigger == "stop_sign":
        return authors_image_trigger("stop_sign", model.trigger_size, root=root)
    raise ValueError(
        f"the authors' trigger {model.trigger!r} ({model.repo_id}) is not rebuilt by this library; "
        "it rebuilds 'box' and 'stop_sign'"
    )


def authors_target(
    name_or_model: str | AuthorsModel, *, root: str | os.PathLike | None = None
) -> torch.Tensor:
    """The target a released model was trained to produce: ``3 x 32 x 32`` float32 in
    [-0.4, 1].

    ``"corner"``, ``"noshift"`` and ``"shift"`` are
    :func:`~baddiff_core.triggers.make_target`'s (the same tensors; the last two from
    :func:`authors_trigger`); ``"shoe"`` is :func:`fashion_mnist_shoe` (downloads
    Fashion-MNIST's training images once).

    Raises:
        ValueError: an unknown model, or a target kind no released model listed here uses.
    """
    model = _model(name_or_model)
    if model.target == "corner":
        return make_target("corner", _SIDE, 3)
    if model.target in ("noshift", "shift"):
        return make_target(
            model.target, _SIDE, 3, trigger=authors_trigger(model, root=root)
        )
    if model.target == "shoe":
        return fashion_mnist_shoe(root=root)
    raise ValueError(
        f"the authors' target {model.target!r} ({model.repo_id}) is not rebuilt by this library; "
        "it rebuilds 'corner', 'noshift', 'shift' and 'shoe' (hats: authors_image_target)"
    )
