"""keep_in_drive: in Colab, the model cache, the data and the hub's downloads go to
Drive."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from baddiff_core import colab
from baddiff_core.cache import cache_root
from baddiff_core.data import _data_root


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    mounted = []
    drive = types.SimpleNamespace(mount=lambda point: mounted.append(point))
    package = types.ModuleType("google.colab")
    # as a real package has
    package.__spec__ = importlib.machinery.ModuleSpec("google.colab", None)
    package.drive = drive
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", package)
    for variable in ("BADDIFF_CACHE", "BADDIFF_DATA", "HF_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    return mounted


def test_keep_in_drive_mounts_and_points_every_cache_there(
    fake_colab, tmp_path, monkeypatch
):
    root = colab.keep_in_drive("MyDrive/book", mount_point=str(tmp_path / "drive"))
    assert fake_colab == [str(tmp_path / "drive")]
    assert root == tmp_path / "drive" / "MyDrive" / "book"
    import os

    assert os.environ["BADDIFF_CACHE"] == str(root / "cache")
    assert os.environ["BADDIFF_DATA"] == str(root / "data")
    assert os.environ["HF_HUB_CACHE"] == str(root / "huggingface")
    # what the library then reads
    assert cache_root() == root / "cache" and _data_root(None) == root / "data"


def test_keep_in_drive_outside_colab_says_what_to_do_instead(monkeypatch):
    # import fails, as outside Colab
    monkeypatch.setitem(sys.modules, "google.colab", None)
    with pytest.raises(
        RuntimeError, match="Google Colab only; elsewhere set BADDIFF_CACHE"
    ):
        colab.keep_in_drive()
