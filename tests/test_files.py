"""Atomic writes: a file or folder appears whole or not at all, and replaces an older
one whole."""

import os
import stat

import pytest

from baddiff_core.files import atomic_file, atomic_folder, write_text_atomically


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir())


def test_a_finished_block_becomes_the_folder(tmp_path):
    target = tmp_path / "deep" / "model"
    with atomic_folder(target) as staging:
        assert not target.exists()  # nothing at the final name while writing
        assert staging.parent == target.parent and staging.name.startswith(".model.")
        (staging / "weights.bin").write_bytes(b"123")
        (staging / "sub").mkdir()
        (staging / "sub" / "config.json").write_text("{}")
    assert (target / "weights.bin").read_bytes() == b"123"
    assert (target / "sub" / "config.json").read_text() == "{}"
    assert _siblings(target) == ["model"]  # no staging folder left behind


def test_an_error_leaves_the_old_folder_as_it_was(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert _siblings(target) == ["model"]


def test_an_error_on_a_new_name_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "model") as staging:
            (staging / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_new_folder_replaces_an_old_one_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]  # not merged
    assert _siblings(target) == ["model"]


def test_the_finished_folder_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as staging:
            (staging / "file").write_text("x")
    finally:
        os.umask(umask)
    # mkdtemp made it 0o700
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "model" / "file").stat().st_mode) == 0o644


def test_a_file_appears_whole_and_replaces_the_old_one(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with atomic_file(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".results.json.")
        staging.write_text("new")
        assert target.read_text() == "old"  # unchanged until the block ends
    assert target.read_text() == "new"
    assert _siblings(target) == ["results.json"]


def test_a_failed_file_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(OSError):
        with atomic_file(target) as staging:
            staging.write_text("ha")
            raise OSError("no space left on device")
    assert target.read_text() == "old"
    assert _siblings(target) == ["results.json"]


def test_write_text_atomically_makes_folders_and_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text_atomically(tmp_path / "a" / "b.txt", "text\n")
    finally:
        os.umask(umask)
    assert path.read_text() == "text\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp made it 0o600
