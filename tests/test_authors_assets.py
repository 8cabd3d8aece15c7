"""The authors' triggers and targets, rebuilt exactly: boxes against the geometry
derived by hand, pictures against an independent computation of the recipe on hand-made
images, downloads refused on a wrong digest or offline. Everything runs offline on
stand-ins written here; one test reads the authors' real pictures from a local mirror of
their repository and skips where there is none.

When this file was written, every picture tensor was also compared with the authors'
recipe run through torchvision 0.28's own transforms (Resize, ToTensor, Pad) on the real
pictures and on random images: equal bit for bit. torchvision is not a dependency, so
that check is not repeated here; the SHA-256 pins of ``test_the_authors_real_pictures``
carry it.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from baddiff_core import authors_assets as assets
from baddiff_core import data
from baddiff_core.authors import AUTHORS_MODELS
from baddiff_core.authors_assets import (
    AUTHORS_COMMIT,
    AUTHORS_IMAGES,
    FASHION_MNIST_TRAIN_IMAGES,
    AuthorsImage,
    authors_image_trigger,
    authors_target,
    authors_trigger,
    fashion_mnist_shoe,
    fetch_authors_image,
    target_from_image,
    trigger_from_image,
)
from baddiff_core.triggers import make_target, make_trigger

MIRROR = Path("/work/.mirror/IBM+BadDiffusion/repo")


# --------------------------------------------------------------------------- #
# An independent computation of the recipe, in NumPy float32.
# --------------------------------------------------------------------------- #


def scale(pixels: np.ndarray) -> np.ndarray:
    """``H,W,3`` uint8 -> ``3,H,W`` float32: v / 255 / (1 + 1e-5) * 2 - 1, each step
    rounded to float32."""
    v = pixels.astype(np.float32).transpose(2, 0, 1) / np.float32(255)
    return v / np.float32(1.00001) * np.float32(2) + np.float32(-1)


def expected_trigger(tile_pixels: np.ndarray, size: int) -> torch.Tensor:
    """The tile at rows and columns 32 - 2 - size .. 29 of a -1 canvas; values >= 0.999
    become -1."""
    canvas = np.full((3, 32, 32), -1, dtype=np.float32)
    canvas[:, 30 - size : 30, 30 - size : 30] = scale(tile_pixels)
    canvas[canvas >= np.float32(0.999)] = -1
    return torch.from_numpy(canvas)


def expected_target(pixels: np.ndarray) -> torch.Tensor:
    values = scale(pixels)
    return torch.from_numpy(np.maximum(values, np.float32(-0.4)))


def quadrants(side: int, colours) -> np.ndarray:
    """A ``side x side`` RGB image of four flat quadrants (top-left, top-right,
    bottom-left, bottom-right)."""
    half = side // 2
    image = np.empty((side, side, 3), dtype=np.uint8)
    for (rows, cols), colour in zip(
        [
            (slice(0, half), slice(0, half)),
            (slice(0, half), slice(half, side)),
            (slice(half, side), slice(0, half)),
            (slice(half, side), slice(half, side)),
        ],
        colours,
    ):
        image[rows, cols] = colour
    return image


COLOURS = [
    (255, 255, 255),
    (255, 128, 0),
    (254, 1, 77),
    (0, 0, 0),
]  # white, mixed, near-white, black


# --------------------------------------------------------------------------- #
# Stand-ins: a data root, a picture, Fashion-MNIST's images; never the network.
# --------------------------------------------------------------------------- #


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty data root as $BADDIFF_DATA, offline; any download attempt fails the
    test."""
    monkeypatch.setenv("BADDIFF_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("BADDIFF_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(url, path):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(data, "_download", refuse)
    return tmp_path / "data"


def standin_stop_sign(root: Path, monkeypatch) -> Image.Image:
    """A hand-made 40 x 39 picture in the stop sign's place, its digest patched into the
    table."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (39, 40, 4), dtype=np.uint8)
    pixels[:8] = 255  # a white band: transparent once made a trigger
    path = root / "baddiffusion-authors" / "stop_sign_wo_bg.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(
        AUTHORS_IMAGES,
        "stop_sign",
        AuthorsImage(AUTHORS_IMAGES["stop_sign"].path, digest),
    )
    return Image.open(path)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """Gzipped IDX image file: magic 2051, count, rows, columns (big-endian), then the
    pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = b"".join(int(v).to_bytes(4, "big") for v in (2051, *images.shape))
    with gzip.open(path, "wb") as file:
        file.write(header + images.astype(np.uint8).tobytes())


def standin_fashion_mnist(root: Path, monkeypatch, first: np.ndarray) -> Path:
    path = root / FASHION_MNIST_TRAIN_IMAGES["path"]
    write_idx_images(path, np.stack([first, 255 - first]))
    monkeypatch.setitem(
        FASHION_MNIST_TRAIN_IMAGES, "md5", hashlib.md5(path.read_bytes()).hexdigest()
    )
    return path


# --------------------------------------------------------------------------- #
# Boxes: the library's tensors are the authors', by hand-derived geometry.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("size", [4, 8, 11, 14, 18])
def test_the_grey_box_is_the_authors_box(size):
    # The authors: a (size x size) box of value (vmin + vmax) / 2 = 0 at rows and
    # columns [-(size + 2) : -2] of a -1 image, i.e. 32 - 2 - size .. 29 (16..29 for 14
    # px).
    expected = torch.full((3, 32, 32), -1.0)
    expected[:, 30 - size : 30, 30 - size : 30] = 0.0
    assert torch.equal(make_trigger("box", 32, 3, size=size), expected)
    if size == 14:
        rows = torch.nonzero(expected[0] == 0)[:, 0].unique()
        assert rows.tolist() == list(range(16, 30))


def test_the_corner_target_is_the_authors_corner():
    # The authors: a grey 0 box at rows and columns 0..9 of a -1 image, then -1 -> -0.4.
    expected = torch.full((3, 32, 32), -0.4)
    expected[:, :10, :10] = 0.0
    assert torch.equal(make_target("corner", 32, 3), expected)


def test_the_trigger_as_target_and_the_shift_are_the_authors():
    # The authors: the trigger with values <= -0.4 raised to -0.4 ("no shift"), or first
    # rolled 3 rows up and 5 columns left, wrapping around (torch.roll by (-3, -5)).
    trigger = torch.full((3, 32, 32), -1.0)
    trigger[:, 16:30, 16:30] = 0.0
    trigger[0, 0, 0] = 0.5  # wraps to row 29, column 27
    trigger[1, 5, 7] = -0.7  # below the background: raised to -0.4
    noshift = trigger.clamp(min=-0.4)
    assert torch.equal(make_target("noshift", 32, 3, trigger=trigger), noshift)
    shifted = torch.full((3, 32, 32), -0.4)
    shifted[:, 13:27, 11:25] = 0.0
    shifted[0, 29, 27] = 0.5
    assert torch.equal(make_target("shift", 32, 3, trigger=trigger), shifted)


# --------------------------------------------------------------------------- #
# Pictures: the recipe against an independent computation on hand-made images.
# --------------------------------------------------------------------------- #


def test_a_tile_already_at_the_trigger_size_is_scaled_placed_and_whitened_value_by_value():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (14, 14, 4), dtype=np.uint8)
    rgba[0, 0, :3] = (255, 255, 255)  # white: transparent
    rgba[0, 1, :3] = (255, 128, 0)  # only red is 255: -1 in red alone
    rgba[0, 2, :3] = (254, 254, 254)  # near white: opaque
    rgba[:, :, 3] = 0  # alpha is dropped, not composited
    trigger = trigger_from_image(Image.fromarray(rgba, "RGBA"), 14)
    assert trigger.dtype == torch.float32 and trigger.shape == (3, 32, 32)
    assert torch.equal(trigger, expected_trigger(rgba[:, :, :3], 14))
    assert trigger[:, 16, 16].tolist() == [-1.0, -1.0, -1.0]
    assert (
        trigger[0, 16, 17] == -1.0
        and trigger[1, 16, 17] > -1.0
        and trigger[2, 16, 17] == -1.0
    )
    assert (trigger[:, 16, 18] > 0.99).all()


def test_a_picture_is_resized_bilinearly_to_the_trigger_size():
    # 28 x 28 flat quadrants halved to 14 x 14: PIL's bilinear filter (antialiased: 4
    # taps at weights 1/8, 3/8, 3/8, 1/8) keeps a quadrant's colour exactly where all
    # taps are inside it, rows and columns 0..5 and 8..13 of the tile.
    picture = quadrants(28, COLOURS)
    trigger = trigger_from_image(Image.fromarray(picture), 14)
    expected = expected_trigger(quadrants(14, COLOURS), 14)
    inside = [16 + i for i in (*range(0, 6), *range(8, 14))]
    index = torch.tensor(inside)
    assert torch.equal(trigger[:, index][:, :, index], expected[:, index][:, :, index])
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[16:30, 16:30] = False
    assert (trigger[:, outside] == -1).all()
    # The whole tile is PIL's bilinear resize (what torchvision's Resize calls on a PIL
    # image). 40 wide, 39 high
    noise = np.random.default_rng(1).integers(0, 256, (39, 40, 3), dtype=np.uint8)
    resized = np.asarray(
        Image.fromarray(noise).resize((14, 14), Image.Resampling.BILINEAR)
    )
    assert torch.equal(
        trigger_from_image(Image.fromarray(noise), 14), expected_trigger(resized, 14)
    )


def test_a_picture_whose_tile_would_not_be_square_or_would_not_fit_is_refused():
    with pytest.raises(ValueError, match="14 x 15 px, not square"):
        # shorter side 37 -> 14, longer 41 -> 15
        trigger_from_image(Image.new("RGB", (41, 37)), 14)
    with pytest.raises(ValueError, match=r"size must be an integer in \[1, 30\]"):
        trigger_from_image(Image.new("RGB", (40, 40)), 31)
    with pytest.raises(TypeError, match="PIL.Image.Image"):
        trigger_from_image(np.zeros((14, 14, 3), dtype=np.uint8), 14)


def test_a_picture_target_is_resized_to_32_scaled_and_put_on_grey():
    rng = np.random.default_rng(2)
    exact = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert torch.equal(
        target_from_image(Image.fromarray(exact)), expected_target(exact)
    )
    picture = quadrants(64, COLOURS)  # halved: exact inside each quadrant
    target = target_from_image(Image.fromarray(picture))
    expected = expected_target(quadrants(32, COLOURS))
    index = torch.tensor([*range(0, 14), *range(18, 32)])
    assert torch.equal(target[:, index][:, :, index], expected[:, index][:, :, index])
    assert target.min() == torch.tensor(-0.4) and target.max() < 1  # 255 -> 0.99998


# --------------------------------------------------------------------------- #
# Downloads: once, verified, refused on a wrong digest or offline.
# --------------------------------------------------------------------------- #


def test_a_picture_already_there_is_verified_and_used_offline(root, monkeypatch):
    picture = standin_stop_sign(root, monkeypatch)
    assert (
        fetch_authors_image("stop_sign")
        == root / "baddiffusion-authors" / "stop_sign_wo_bg.png"
    )
    assert torch.equal(
        authors_image_trigger("stop_sign", 14), trigger_from_image(picture, 14)
    )


def test_a_picture_with_the_wrong_digest_is_refused_and_kept(root, monkeypatch):
    standin_stop_sign(root, monkeypatch)
    monkeypatch.setitem(
        AUTHORS_IMAGES,
        "stop_sign",
        AuthorsImage("static/stop_sign_wo_bg.png", "0" * 64),
    )
    with pytest.raises(
        ValueError, match="has SHA256 [0-9a-f]{64}, not 0{64}"
    ) as refused:
        fetch_authors_image("stop_sign")
    assert "\n" not in str(refused.value) and "delete it to download it again" in str(
        refused.value
    )
    assert (root / "baddiffusion-authors" / "stop_sign_wo_bg.png").is_file()


@pytest.mark.parametrize("variable", ["BADDIFF_OFFLINE", "HF_HUB_OFFLINE"])
def test_a_missing_picture_offline_fails_at_once_in_one_line(
    root, monkeypatch, variable
):
    monkeypatch.delenv("BADDIFF_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    # the variable decides
    monkeypatch.setattr(data, "_network_available", lambda host, timeout=3.0: True)
    with pytest.raises(RuntimeError) as refused:
        fetch_authors_image("hat")
    message = str(refused.value)
    assert "\n" not in message and f"{variable} is set" in message
    assert (
        f"https://raw.githubusercontent.com/IBM/BadDiffusion/{AUTHORS_COMMIT}/static/hat.png"
        in message
    )
    assert not (root / "baddiffusion-authors").exists() or not any(
        (root / "baddiffusion-authors").iterdir()
    )


@pytest.fixture
def network(root, monkeypatch):
    """A network that serves ``served[url]``; records the URLs asked for."""
    served, asked = {}, []

    def download(url, path):
        asked.append(url)
        Path(path).write_bytes(served[url])

    monkeypatch.delenv("BADDIFF_OFFLINE", raising=False)
    monkeypatch.setattr(
        data,
        "_network_available",
        lambda host, timeout=3.0: host == "raw.githubusercontent.com",
    )
    monkeypatch.setattr(data, "_download", download)
    return served, asked


def test_a_picture_is_downloaded_once_from_the_authors_commit(
    root, monkeypatch, network
):
    served, asked = network
    payload = b"\x89PNG stand-in bytes"
    monkeypatch.setitem(
        AUTHORS_IMAGES,
        "hat",
        AuthorsImage("static/hat.png", hashlib.sha256(payload).hexdigest()),
    )
    url = f"https://raw.githubusercontent.com/IBM/BadDiffusion/{AUTHORS_COMMIT}/static/hat.png"
    assert AUTHORS_IMAGES["hat"].url == url
    served[url] = payload
    path = fetch_authors_image("hat")
    assert path.read_bytes() == payload and asked == [url]
    assert fetch_authors_image("hat") == path and asked == [url]  # not downloaded again


def test_a_download_with_the_wrong_digest_is_not_kept(root, network):
    served, asked = network
    served[AUTHORS_IMAGES["fedora_hat"].url] = b"not the authors' fedora"
    with pytest.raises(
        ValueError, match="the download of .* has SHA256 .*nothing was kept"
    ):
        fetch_authors_image("fedora_hat")
    folder = root / "baddiffusion-authors"
    assert not folder.exists() or not any(folder.iterdir())  # no file, no staging file


def test_an_unknown_picture_is_refused():
    with pytest.raises(ValueError, match="not one of the authors' pictures"):
        fetch_authors_image("cat")


# --------------------------------------------------------------------------- #
# The shoe: Fashion-MNIST's first training image.
# --------------------------------------------------------------------------- #


def test_the_shoe_is_the_first_training_image_resized_like_a_picture(root, monkeypatch):
    first = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    standin_fashion_mnist(root, monkeypatch, first)
    shoe = fashion_mnist_shoe()
    assert (
        shoe.shape == (3, 32, 32)
        and torch.equal(shoe[0], shoe[1])
        and torch.equal(shoe[1], shoe[2])
    )
    assert torch.equal(shoe, target_from_image(Image.fromarray(first, mode="L")))
    flat = np.full((28, 28), 200, dtype=np.uint8)  # independent: a flat image
    standin_fashion_mnist(root, monkeypatch, flat)
    assert torch.equal(
        fashion_mnist_shoe(), expected_target(np.full((32, 32, 3), 200, dtype=np.uint8))
    )


def test_a_damaged_fashion_mnist_file_is_refused(root, monkeypatch):
    path = root / FASHION_MNIST_TRAIN_IMAGES["path"]
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wb") as file:
        file.write((2049).to_bytes(4, "big") + bytes(12))  # a label file's magic
    monkeypatch.setitem(
        FASHION_MNIST_TRAIN_IMAGES, "md5", hashlib.md5(path.read_bytes()).hexdigest()
    )
    with pytest.raises(ValueError, match="not an IDX image file"):
        fashion_mnist_shoe()
    monkeypatch.setitem(FASHION_MNIST_TRAIN_IMAGES, "md5", "0" * 32)
    with pytest.raises(ValueError, match="has MD5"):
        fashion_mnist_shoe()


def test_fashion_mnist_offline_and_missing_fails_at_once(root):
    with pytest.raises(
        RuntimeError,
        match="Fashion-MNIST's training images is not in .* BADDIFF_OFFLINE is set",
    ):
        fashion_mnist_shoe()


# --------------------------------------------------------------------------- #
# Every released model.
# --------------------------------------------------------------------------- #

#: The authors' names in the released repositories' ids, in the library's words.
AUTHORS_TRIGGERS = {
    "SM_STOP_SIGN": ("stop_sign", 14),
    "XSM_STOP_SIGN": ("stop_sign", 11),
    "BIG_BOX_MED": ("box", 18),
    "SM_BOX_MED": ("box", 14),
    "XXSM_BOX_MED": ("box", 8),
}
AUTHORS_TARGETS = {
    "BOX": "corner",
    "SHIFT": "shift",
    "TRIGGER": "noshift",
    "FASHION": "shoe",
}


@pytest.mark.parametrize("name", sorted(AUTHORS_MODELS))
def test_every_released_model_gets_its_trigger_and_target(root, monkeypatch, name):
    model = AUTHORS_MODELS[name]
    attack = model.repo_id.split(f"_p{model.poison_rate:g}_", 1)[1]
    trigger_name, target_name = attack.split("_new-set")[0].split("-")
    assert AUTHORS_TRIGGERS[trigger_name] == (model.trigger, model.trigger_size)
    assert AUTHORS_TARGETS[target_name] == model.target

    picture = standin_stop_sign(root, monkeypatch)
    first = np.random.default_rng(4).integers(0, 256, (28, 28), dtype=np.uint8)
    standin_fashion_mnist(root, monkeypatch, first)
    trigger, target = authors_trigger(name), authors_target(model)
    assert trigger.shape == target.shape == (3, 32, 32)
    assert trigger.dtype == target.dtype == torch.float32
    assert (
        trigger.min() >= -1
        and trigger.max() <= 1
        and target.min() >= -0.4
        and target.max() <= 1
    )
    if model.trigger == "box":
        assert torch.equal(trigger, make_trigger("box", 32, 3, size=model.trigger_size))
    else:
        assert torch.equal(trigger, trigger_from_image(picture, model.trigger_size))
    expected = {
        "corner": lambda: make_target("corner", 32, 3),
        "noshift": lambda: trigger.clamp(min=-0.4),
        "shift": lambda: torch.roll(
            trigger.clamp(min=-0.4), shifts=(-3, -5), dims=(1, 2)
        ),
        "shoe": lambda: target_from_image(Image.fromarray(first, mode="L")),
    }[model.target]()
    assert torch.equal(target, expected)


def test_an_attack_no_released_model_uses_is_refused():
    from baddiff_core.authors import AuthorsModel

    with pytest.raises(ValueError, match="not rebuilt by this library"):
        authors_trigger(AuthorsModel("x/y", "glasses", 14, "corner", 0.1))
    with pytest.raises(ValueError, match="hats: authors_image_target"):
        authors_target(AuthorsModel("x/y", "box", 14, "hat", 0.1))


# --------------------------------------------------------------------------- #
# The real pictures, where a mirror of the authors' repository is at hand.
# --------------------------------------------------------------------------- #

#: SHA-256 of the float32 bytes of the tensors built from the real pictures; equal,
#: when written,
#: to the authors' recipe run through torchvision 0.28's transforms (with Pillow 13.0).
REAL_TENSORS = {
    (
        "stop_sign",
        11,
    ): "15368c37264c1d4ec068df6e13ba751800704e48e970b231fe4ee2caa3e79a20",
    (
        "stop_sign",
        14,
    ): "8e7eda256d57b104a5d06e08837ce3b15e8c4e315cf833159d9eb38ce5f23945",
    ("hat", None): "efcd3a8cbd3951f5c3f78cacddf5152b60089b475df29a21d758ac4d143fbcb7",
    (
        "fedora_hat",
        None,
    ): "f131102fe10850e3fbecd159d73e5cce2c98c685f75f1d7c293214ccd0cbe905",
}


def test_the_authors_real_pictures(root):
    if not MIRROR.is_dir() or shutil.which("git") is None:
        pytest.skip(
            f"no mirror of {assets.AUTHORS_REPO} at {MIRROR} (only on the machine this was written on)"
        )
    folder = root / "baddiffusion-authors"
    folder.mkdir(parents=True)
    for image in AUTHORS_IMAGES.values():
        blob = subprocess.run(
            ["git", "-C", str(MIRROR), "show", f"{AUTHORS_COMMIT}:{image.path}"],
            capture_output=True,
            check=True,
        ).stdout
        (folder / Path(image.path).name).write_bytes(blob)
    for name in AUTHORS_IMAGES:
        fetch_authors_image(name)  # the table's digests hold
    for (name, size), digest in REAL_TENSORS.items():
        tensor = (
            authors_image_trigger(name, size)
            if size
            else assets.authors_image_target(name)
        )
        assert hashlib.sha256(tensor.numpy().tobytes()).hexdigest() == digest, (
            name,
            size,
        )
    sign = authors_image_trigger("stop_sign", 14)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[16:30, 16:30] = False
    assert (sign[:, outside] == -1).all()  # the tile sits at 16..29
    transparent = (sign == -1).all(0)[16:30, 16:30]
    assert 0 < int(transparent.sum()) < 14 * 14  # white corners and letters
