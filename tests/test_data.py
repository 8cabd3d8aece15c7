"""Training images: the offline digits, a folder of one's own images, CIFAR-10's binary
files (tiny fakes built here, byte by byte), and clear offline errors."""

from __future__ import annotations

import hashlib
import io
import shutil
import socket
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from baddiff_core import data
from baddiff_core.data import load_images, write_cifar10_binary


def test_digits_are_sklearns_digits_in_model_range():
    images, labels = load_images("digits", 8, with_labels=True)
    digits = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    # 8 px needs no resizing: exactly the bundled pixel values 0..16 mapped to [-1, 1]
    np.testing.assert_allclose(
        images[:, 0].numpy(), digits.images / 16 * 2 - 1, atol=1e-6
    )
    assert torch.equal(labels, torch.from_numpy(digits.target))


def test_digits_upsampled_and_in_colour():
    images = load_images("digits", 16, channels=3, limit=10, seed=3)
    assert images.shape == (10, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 2]), (
        "grey images are repeated over the channels"
    )
    again = load_images("digits", 16, channels=3, limit=10, seed=3)
    assert torch.equal(images, again)


def test_a_folder_of_images(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "black.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_images(tmp_path, 8)
    assert images.shape == (2, 3, 8, 8)
    # black.jpg (sorted first)
    assert torch.allclose(images[0], torch.full((3, 8, 8), -1.0), atol=0.02)
    assert torch.allclose(images[1], torch.full((3, 8, 8), 1.0), atol=0.02)
    assert load_images(tmp_path, 8, channels=1).shape == (2, 1, 8, 8)


def test_network_data_sets_fail_at_once_offline_and_name_the_alternative(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("BADDIFF_OFFLINE", "1")
    # empty: not the machine's own data root
    monkeypatch.setenv("BADDIFF_DATA", str(tmp_path))
    for name in ("mnist", "fashion-mnist", "cifar10"):
        with pytest.raises(RuntimeError, match=r"load_images\('digits'"):
            load_images(name, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(name="imagenet", image_size=16),
            "name='imagenet' is neither a known data set",
        ),
        (dict(name="digits", image_size=2), "image_size must be an integer >= 4"),
        (
            dict(name="digits", image_size=16, channels=2),
            r"channels must be 1 \(grey\), 3 \(RGB\) or None",
        ),
        (
            dict(name="digits", image_size=16, limit=0),
            "limit must be a positive integer",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_images(**kwargs)


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no image files"):
        load_images(tmp_path, 8)


def test_torchvision_data_sets_say_torchvision_is_optional(monkeypatch, tmp_path):
    # `import torchvision` raises ImportError
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(RuntimeError, match="torchvision, an optional package") as info:
        load_images("mnist", 16, root=tmp_path)
    assert "The book does not use 'mnist'" in str(info.value)


# --------------------------------------------------------------------------- #
# CIFAR-10, binary version: tiny fakes in the official layout, written here byte by byte
# --------------------------------------------------------------------------- #

TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]


def fake_cifar10(count: int = 15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random ``N,32,32,3`` uint8 images (H, W, RGB) and labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(
        0, 10, count
    )


def cifar10_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """The official record layout: a label byte, then the red, green and blue 32x32
    planes, row-major."""
    return b"".join(
        bytes([int(label)])
        + image[:, :, 0].tobytes()
        + image[:, :, 1].tobytes()
        + image[:, :, 2].tobytes()
        for image, label in zip(images, labels)
    )


def write_fake_folder(root, images, labels):
    """Five training files of len(images) / 5 records each, in
    ``root/cifar-10-batches-bin``."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    per_file = len(images) // 5
    for index, name in enumerate(TRAIN_FILES):
        part = slice(index * per_file, (index + 1) * per_file)
        (folder / name).write_bytes(cifar10_bytes(images[part], labels[part]))
    return folder


def expected_tensor(images: np.ndarray) -> np.ndarray:
    """N,3,32,32 in [-1, 1]: x / 255 * 2 - 1, channels R, G, B."""
    return np.moveaxis(images, -1, 1).astype(np.float64) / 255 * 2 - 1


@pytest.fixture
def no_network(monkeypatch):
    """Reading files on disk must not touch the network: any attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network used: {args}")

    monkeypatch.setenv("BADDIFF_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(data, "_download", refuse)


def test_cifar10_binary_files_are_read_exactly(tmp_path, no_network):
    images, labels = fake_cifar10(15)
    # one pure colour: R, G, B order
    images[0, :, :, 0], images[0, :, :, 1], images[0, :, :, 2] = (
        255,
        0,
        51,
    )
    write_fake_folder(tmp_path, images, labels)
    got, got_labels = load_images("cifar10", 32, root=tmp_path, with_labels=True)
    assert got.shape == (15, 3, 32, 32) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected_tensor(images), atol=1e-6)
    np.testing.assert_allclose(
        got[0, :, 0, 0].numpy(), [1.0, -1.0, 51 / 255 * 2 - 1], atol=1e-6
    )
    assert got_labels.dtype == torch.long and got_labels.tolist() == labels.tolist()
    grey = load_images("cifar10", 16, channels=1, root=tmp_path)
    assert grey.shape == (15, 1, 16, 16)


def test_cifar10_data_root_from_environment(tmp_path, monkeypatch, no_network):
    images, labels = fake_cifar10(10, seed=1)
    write_fake_folder(tmp_path / "from-env", images, labels)
    monkeypatch.setenv("BADDIFF_DATA", str(tmp_path / "from-env"))
    np.testing.assert_allclose(
        load_images("cifar10", 32).numpy(), expected_tensor(images), atol=1e-6
    )
    # an explicit root comes before $BADDIFF_DATA
    other, other_labels = fake_cifar10(5, seed=2)
    write_fake_folder(tmp_path / "explicit", other, other_labels)
    np.testing.assert_allclose(
        load_images("cifar10", 32, root=tmp_path / "explicit").numpy(),
        expected_tensor(other),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda raw: raw[:-1],
            r"data_batch_3\.bin.*not a whole, non-zero number of 3073-byte records",
        ),
        (
            lambda raw: b"",
            r"data_batch_3\.bin.*not a whole, non-zero number of 3073-byte records",
        ),
        (
            lambda raw: raw[:3073] + bytes([10]) + raw[3074:],
            r"data_batch_3\.bin.*record 1 has label 10",
        ),
    ],
)
def test_cifar10_damaged_file_is_named(tmp_path, no_network, damage, message):
    folder = write_fake_folder(tmp_path, *fake_cifar10(15))
    third = folder / "data_batch_3.bin"
    third.write_bytes(damage(third.read_bytes()))
    with pytest.raises(ValueError, match=message):
        load_images("cifar10", 32, root=tmp_path)


def test_cifar10_offline_and_missing_fails_at_once_and_says_how_to_get_it(
    tmp_path, no_network
):
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        load_images("cifar10", 32, root=tmp_path)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz" in message
    assert (
        str(tmp_path) in message
        and "tar -xzf" in message
        and "load_images('digits'" in message
    )
    assert list(tmp_path.iterdir()) == [], (
        "nothing is written when nothing can be downloaded"
    )


def make_archive(path, members: dict[str, bytes]) -> str:
    """A .tar.gz holding ``members`` (name -> bytes); returns its MD5, computed here."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return hashlib.md5(path.read_bytes()).hexdigest()


def official_members(images, labels) -> dict[str, bytes]:
    parts = np.array_split(np.arange(len(images)), 5)
    members = {
        f"cifar-10-batches-bin/{name}": cifar10_bytes(images[part], labels[part])
        for name, part in zip(TRAIN_FILES, parts)
    }
    members["cifar-10-batches-bin/test_batch.bin"] = cifar10_bytes(
        images[:2], labels[:2]
    )
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
    members["cifar-10-batches-bin/readme.html"] = b"<html></html>"
    return members


@pytest.fixture
def fake_download(tmp_path, monkeypatch):
    """The archive path with a network pretended: the download copies a local
    archive."""
    downloads = []

    def download(url, path):
        downloads.append(url)
        shutil.copyfile(tmp_path / "archive.tar.gz", path)

    monkeypatch.delenv("BADDIFF_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_network_available", lambda host, timeout=3.0: True)
    monkeypatch.setattr(data, "_download", download)
    return downloads


def test_cifar10_archive_is_downloaded_checked_and_extracted(
    tmp_path, monkeypatch, fake_download, capsys
):
    images, labels = fake_cifar10(12, seed=3)
    md5 = make_archive(tmp_path / "archive.tar.gz", official_members(images, labels))
    # the real check, against the tiny archive's MD5
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    root = tmp_path / "root"
    got, got_labels = load_images("cifar10", 32, root=root, with_labels=True)
    np.testing.assert_allclose(got.numpy(), expected_tensor(images), atol=1e-6)
    assert got_labels.tolist() == labels.tolist()
    assert fake_download == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert (
        len(printed) == 1
        and "162 MB" in printed[0]
        and str(root / "cifar-10-batches-bin") in printed[0]
    )
    # only the expected members, nothing left over beside them
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin"]
    assert sorted(p.name for p in (root / "cifar-10-batches-bin").iterdir()) == sorted(
        [*TRAIN_FILES, "batches.meta.txt", "test_batch.bin"]
    )
    # the second call reads the files: no download
    load_images("cifar10", 32, root=root)
    assert len(fake_download) == 1


def test_cifar10_archive_with_the_wrong_md5_is_not_extracted(tmp_path, fake_download):
    make_archive(tmp_path / "archive.tar.gz", official_members(*fake_cifar10(5)))
    root = tmp_path / "root"
    with pytest.raises(
        ValueError,
        match="has MD5 [0-9a-f]{32}, expected c32a1d4ab5d03f1284b67883e8d87530",
    ):
        load_images("cifar10", 32, root=root)
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    "evil", ["../evil", "/tmp/evil", "cifar-10-batches-bin/../../evil"]
)
def test_cifar10_archive_with_a_path_outside_is_refused(
    tmp_path, monkeypatch, fake_download, evil
):
    members = official_members(*fake_cifar10(5))
    members[evil] = b"owned"
    monkeypatch.setattr(
        data, "CIFAR10_MD5", make_archive(tmp_path / "archive.tar.gz", members)
    )
    root = tmp_path / "deep" / "root"
    with pytest.raises(
        ValueError,
        match=f"cifar-10-binary.tar.gz holds a member with an unsafe name {evil!r}",
    ):
        load_images("cifar10", 32, root=root)
    assert (
        not (tmp_path / "deep" / "evil").exists() and not (tmp_path / "evil").exists()
    )
    assert list(root.iterdir()) == [], "nothing extracted"


def test_cifar10_archive_without_the_data_files_is_refused(
    tmp_path, monkeypatch, fake_download
):
    members = official_members(*fake_cifar10(5))
    del members["cifar-10-batches-bin/data_batch_4.bin"]
    monkeypatch.setattr(
        data, "CIFAR10_MD5", make_archive(tmp_path / "archive.tar.gz", members)
    )
    with pytest.raises(
        ValueError, match=r"lacks the files \['cifar-10-batches-bin/data_batch_4.bin'\]"
    ):
        load_images("cifar10", 32, root=tmp_path / "root")


def test_write_cifar10_binary_round_trips_through_load_images(tmp_path, no_network):
    images, labels = fake_cifar10(13, seed=4)  # 13 over 5 files: 3, 3, 3, 2, 2
    folder = write_cifar10_binary(tmp_path / "cifar-10-batches-bin", images, labels)
    assert folder == tmp_path / "cifar-10-batches-bin"
    sizes = [(folder / name).stat().st_size for name in TRAIN_FILES]
    assert sizes == [3 * 3073] * 3 + [2 * 3073] * 2
    # the bytes are the official layout, as written independently here
    assert (folder / "data_batch_1.bin").read_bytes() == cifar10_bytes(
        images[:3], labels[:3]
    )
    got, got_labels = load_images("cifar10", 32, root=tmp_path, with_labels=True)
    np.testing.assert_allclose(got.numpy(), expected_tensor(images), atol=1e-6)
    assert got_labels.tolist() == labels.tolist()


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (
            np.zeros((5, 3, 32, 32), np.uint8),
            np.zeros(5, int),
            r"shape \(N, 32, 32, 3\), got shape=\(5, 3, 32, 32\)",
        ),
        (
            np.zeros((5, 32, 32, 3), np.float32),
            np.zeros(5, int),
            "uint8.*dtype=float32",
        ),
        (
            np.zeros((4, 32, 32, 3), np.uint8),
            np.zeros(4, int),
            "at least 5 images.*got 4",
        ),
        (
            np.zeros((5, 32, 32, 3), np.uint8),
            np.zeros(6, int),
            r"labels must be integers of shape \(5,\)",
        ),
        (
            np.zeros((5, 32, 32, 3), np.uint8),
            np.array([0, 1, 2, 3, 10]),
            "labels must be in 0..9.*10",
        ),
    ],
)
def test_write_cifar10_binary_rejects_bad_input(tmp_path, images, labels, message):
    with pytest.raises(ValueError, match=message):
        write_cifar10_binary(tmp_path / "cifar-10-batches-bin", images, labels)
    assert not (tmp_path / "cifar-10-batches-bin").exists()


# --------------------------------------------------------------------------- #
# Image files at their real bit depth and orientation.
# --------------------------------------------------------------------------- #


def test_read_image_keeps_16_bit_and_float_images(tmp_path):
    from PIL import Image

    from baddiff_core.data import read_image

    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = read_image(tmp_path / "deep.png")
    assert deep.shape == (48, 48, 3) and deep.dtype == np.float32
    # not saturated at 255/65535
    np.testing.assert_allclose(deep[..., 0], ramp / 65535, atol=1e-6)
    floats = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(floats, mode="F").save(tmp_path / "float.tif")
    np.testing.assert_allclose(
        read_image(tmp_path / "float.tif")[..., 2], floats, atol=1e-7
    )
    Image.fromarray(floats * 3, mode="F").save(tmp_path / "bright.tif")
    with pytest.raises(ValueError, match=r"bright.tif.*must hold values in \[0, 1\]"):
        read_image(tmp_path / "bright.tif")
    # A folder of 16-bit images loads at full depth too.
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(folder / "grey.png")
    loaded = load_images(folder, 8)
    assert torch.allclose(
        loaded, torch.full_like(loaded, 32768 / 65535 * 2 - 1), atol=1e-4
    )


def test_read_image_orientation_animation_and_broken_files(tmp_path):
    from PIL import Image

    from baddiff_core.data import read_image

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    wide.save(tmp_path / "portrait.jpg", exif=exif)
    assert read_image(tmp_path / "portrait.jpg").shape == (40, 20, 3), (
        "shown upright, as a viewer shows it"
    )

    frames = [Image.new("L", (8, 8), value) for value in (0, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(
        UserWarning, match="animated .2 frames.; its first frame is used"
    ):
        first = read_image(tmp_path / "anim.gif")
    assert first.max() == 0.0

    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        read_image(tmp_path / "cut.png")
