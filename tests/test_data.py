"""Training images: the offline digits, a folder of one's own images, and clear offline errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from baddiff_core.data import load_images


def test_digits_are_sklearns_digits_in_model_range():
    images, labels = load_images("digits", 8, with_labels=True)
    digits = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    # 8 px needs no resizing: exactly the bundled pixel values 0..16 mapped to [-1, 1]
    np.testing.assert_allclose(images[:, 0].numpy(), digits.images / 16 * 2 - 1, atol=1e-6)
    assert torch.equal(labels, torch.from_numpy(digits.target))


def test_digits_upsampled_and_in_colour():
    images = load_images("digits", 16, channels=3, limit=10, seed=3)
    assert images.shape == (10, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 2]), "grey images are repeated over the channels"
    again = load_images("digits", 16, channels=3, limit=10, seed=3)
    assert torch.equal(images, again)


def test_a_folder_of_images(tmp_path):
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "black.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_images(tmp_path, 8)
    assert images.shape == (2, 3, 8, 8)
    assert torch.allclose(images[0], torch.full((3, 8, 8), -1.0), atol=0.02)   # black.jpg (sorted first)
    assert torch.allclose(images[1], torch.full((3, 8, 8), 1.0), atol=0.02)
    assert load_images(tmp_path, 8, channels=1).shape == (2, 1, 8, 8)


def test_network_data_sets_fail_at_once_offline_and_name_the_alternative(monkeypatch):
    monkeypatch.setenv("BADDIFF_OFFLINE", "1")
    for name in ("mnist", "fashion-mnist", "cifar10"):
        with pytest.raises(RuntimeError, match=r"load_images\('digits'"):
            load_images(name, 16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="imagenet", image_size=16), "name='imagenet' is neither a known data set"),
    (dict(name="digits", image_size=2), "image_size must be an integer >= 4"),
    (dict(name="digits", image_size=16, channels=2), "channels must be 1, 3 or None"),
    (dict(name="digits", image_size=16, limit=0), "limit must be a positive integer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_images(**kwargs)


def test_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no image files"):
        load_images(tmp_path, 8)
