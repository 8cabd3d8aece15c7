"""``--output`` never destroys a user's files, and is checked before any training
starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from baddiff_core import cli
from baddiff_core.files import check_output_folder
from conftest import cli_argv, same_weights


@pytest.fixture
def no_training(monkeypatch):
    """Training would take minutes: any call to it fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the output was checked")

    monkeypatch.setattr("baddiff_core.attack.plant_backdoor", refuse)
    monkeypatch.setattr("baddiff_core.pretrained.train_clean_digits", refuse)


def run(argv, capsys) -> tuple[int, str]:
    status = cli.main(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("command", [["backdoor"], ["train-clean"]])
def test_a_folder_baddiff_did_not_write_is_kept(tmp_path, capsys, no_training, command):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('my work')\n")
    status, err = run([*command, "--output", str(project)], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "was not written by baddiff" in err and "--overwrite" in err
    assert (project / "src" / "main.py").read_text() == "print('my work')\n"


def test_a_file_is_not_turned_into_a_folder(tmp_path, capsys, no_training):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    status, err = run(["backdoor", "--output", str(notes)], capsys)
    assert status == 2 and "is a file" in err and notes.read_text() == "keep me"


@pytest.mark.parametrize("where", [".", ".."])
def test_the_current_folder_is_refused_even_with_overwrite(
    tmp_path, capsys, no_training, monkeypatch, where
):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2\n")
    monkeypatch.chdir(work)
    status, err = run(["backdoor", "--output", where, "--overwrite"], capsys)
    assert status == 2 and "current folder" in err
    assert (work / "data.csv").read_text() == "1,2\n" and sorted(
        os.listdir(tmp_path)
    ) == ["work"]


def test_an_output_under_a_file_fails_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    status, err = run(["backdoor", "--output", str(blocker / "model")], capsys)
    assert status == 2 and "is a file, not a folder" in err


def test_check_output_folder_allows_what_it_may_replace(tmp_path):
    # A new folder, an empty one, and a model baddiff wrote before: replacing them loses
    # nothing.
    assert (
        check_output_folder(tmp_path / "new" / "model", marker="baddiff.json")
        == tmp_path / "new" / "model"
    )
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", marker="baddiff.json")
    model = tmp_path / "model"
    model.mkdir()
    (model / "baddiff.json").write_text("{}")
    (model / "unet").mkdir()
    check_output_folder(model, marker="baddiff.json")
    # Anything else only with overwrite.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="not written by baddiff"):
        check_output_folder(tmp_path / "mine", marker="baddiff.json")
    check_output_folder(tmp_path / "mine", marker="baddiff.json", overwrite=True)
    assert (tmp_path / "mine" / "a.txt").read_text() == "a"  # checking writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "model"]


def test_overwrite_replaces_a_folder_with_the_model(tmp_path, capsys, monkeypatch):
    """With --overwrite the old content goes and a loadable model takes its place."""

    from baddiff_core.attack import BackdooredModel, BackdoorRecipe
    from baddiff_core.models import load_model
    from baddiff_core.pretrained import load_clean_digits

    def plant(recipe, **kwargs):
        unet, scheduler = load_clean_digits()
        return BackdooredModel(
            unet,
            scheduler,
            recipe.trigger_image(),
            recipe.target_image(),
            recipe,
            dict(report={"seconds": 0.0}, from_cache=False),
        )

    monkeypatch.setattr("baddiff_core.attack.plant_backdoor", plant)
    old = tmp_path / "old"
    old.mkdir()
    (old / "a.txt").write_text("a")
    status, err = run(
        ["backdoor", "--output", str(old), "--overwrite", "--device", "cpu"], capsys
    )
    assert status == 0, err
    assert not (old / "a.txt").exists() and (old / "baddiff.json").is_file()
    unet, _ = load_model(old)
    reference, _ = load_clean_digits()
    assert same_weights(unet, reference)
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".")], (
        "no staging folders left"
    )
    assert BackdoorRecipe().trigger == "white_box"


def test_a_checkpoint_folder_of_another_recipe_is_refused(tmp_path, capsys):
    """Two `baddiff backdoor` runs with one --checkpoint-dir: the second must not return
    the first's weights under its own recipe."""
    checkpoints = str(tmp_path / "ckpt")
    common = cli_argv(steps=2, batch_size=4, device="cpu", checkpoint_dir=checkpoints)
    status, err = run(
        ["backdoor", "--output", str(tmp_path / "first"), *common], capsys
    )
    assert status == 0, err
    other = ["--trigger", "box", "--target", "shoe", "--poison-rate", "0.5"]
    status, err = run(
        ["backdoor", "--output", str(tmp_path / "second"), *other, *common], capsys
    )
    assert status == 2 and "belong to another run" in err and "run: checkpoint '" in err
    assert not (tmp_path / "second").exists()
    longer = [arg if arg != "2" else "3" for arg in common]
    status, err = run(
        ["backdoor", "--output", str(tmp_path / "third"), *longer], capsys
    )
    assert status == 2 and "steps: checkpoint 2, this run 3" in err
