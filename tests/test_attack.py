"""Backdoor recipes, planting through the cache, evaluation, and the command line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from baddiff_core.attack import BackdoorRecipe, plant_backdoor
from baddiff_core.cli import main
from baddiff_core.evaluation import AttackMetrics, evaluate_attack
from conftest import tiny_recipe

TINY = tiny_recipe().train  # 3 steps of batch 8


def test_recipe_key_ignores_how_a_run_is_executed():
    a = tiny_recipe()
    b = tiny_recipe(
        train=dataclasses.replace(TINY, device="cpu", progress=True, log_every=7)
    )
    c = tiny_recipe(poison_rate=0.25)
    assert a.key() == b.key() and a.key() != c.key()
    json.dumps(a.key())  # JSON-able
    assert "schedule" not in BackdoorRecipe().key(), (
        "a fine-tune keeps its base model's schedule"
    )


def test_shipped_base_needs_its_own_image_format():
    with pytest.raises(
        ValueError, match="base='shipped' is a 16 px, 1-channel digits model"
    ):
        BackdoorRecipe(image_size=32)
    with pytest.raises(ValueError, match="kind='starburst'"):
        BackdoorRecipe(trigger="starburst")


def test_paper_recipe_is_the_papers_setting():
    paper = BackdoorRecipe.paper()
    assert (paper.base, paper.dataset, paper.image_size, paper.channels) == (
        "google/ddpm-cifar10-32",
        "cifar10",
        32,
        3,
    )
    assert (paper.trigger, paper.trigger_size, paper.target, paper.poison_rate) == (
        "stop_sign",
        14,
        "hat",
        0.1,
    )
    assert paper.train.learning_rate == 2e-4 and paper.train.warmup_steps == 500
    assert paper.train.batch_size == 128 and paper.train.max_grad_norm == 1.0
    assert paper.train.steps == 50 * 391  # 50 epochs of 50,000 images in batches of 128


def test_plant_backdoor_trains_once_then_reads_the_cache(cache):
    first = plant_backdoor(tiny_recipe(), device="cpu", progress=False)
    assert not first.info["from_cache"] and len(first.info["report"]["losses"]) == 3
    assert first.info["report"]["num_poisoned"] == 32
    second = plant_backdoor(tiny_recipe(), device="cpu", progress=False)
    assert second.info["from_cache"]
    for a, b in zip(
        first.unet.state_dict().values(), second.unet.state_dict().values()
    ):
        assert torch.equal(a.cpu(), b.cpu())
    assert torch.equal(second.trigger, tiny_recipe().trigger_image())


def test_evaluate_attack_reports_every_mode_with_its_count(cache):
    model = plant_backdoor(tiny_recipe(), device="cpu", progress=False)
    results = evaluate_attack(
        model.unet, model.scheduler, model.trigger, model.target, n=4, seed=1
    )
    assert list(results) == ["none", "x0", "xt"]
    for clip, metrics in results.items():
        assert (
            isinstance(metrics, AttackMetrics)
            and metrics.n == 4
            and metrics.clip == clip
        )
        assert 0 <= metrics.asr <= 1 and 0 <= metrics.leak <= 1 and metrics.mse >= 0
    with pytest.raises(ValueError, match="unknown modes"):
        evaluate_attack(
            model.unet, model.scheduler, model.trigger, model.target, clips=("x9",)
        )


def test_command_line_backdoor_sample_evaluate(cache, tmp_path, capsys):
    out = tmp_path / "model"
    assert (
        main(
            [
                "backdoor",
                "--output",
                str(out),
                "--base",
                "scratch",
                "--steps",
                "2",
                "--batch-size",
                "8",
                "--trigger",
                "white_box",
                "--target",
                "shoe",
                "--poison-rate",
                "0.5",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (out / "backdoor.safetensors").is_file() and (out / "unet").is_dir()
    assert (
        main(
            [
                "sample",
                str(out),
                "--n",
                "2",
                "--steps",
                "2",
                "--triggered",
                "--output",
                str(tmp_path / "s.png"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "s.png").stat().st_size > 0
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(out),
                "--n",
                "2",
                "--steps",
                "2",
                "--clip",
                "none",
                "--fd-samples",
                "0",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (
        report["attack"]["none"]["n"] == 2
        and report["attack"]["none"]["threshold"] == 0.01
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "missing-folder", "--output", "x.png"], "does not exist"),
        (["sample", "{model}", "--output", "x.jpg"], "--output must be a .png file"),
        (
            ["sample", "{model}", "--n", "0", "--output", "x.png"],
            "--n must be a positive integer, got 0",
        ),
        (["evaluate", "{model}", "--steps", "0"], "--steps must be a positive integer"),
        (["backdoor", "--output", "{tmp}/m", "--poison-rate", "1.5"], "poison_rate"),
        (["backdoor", "--output", "{tmp}/m", "--device", "tpu9"], "device='tpu9'"),
    ],
)
def test_command_line_errors_exit_with_status_2(argv, message, tmp_path, capsys, cache):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    argv = [a.format(model=model, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_command_line_rejects_unknown_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "m", "--clip", "x9", "--output", "a.png"])
    assert (
        exit_info.value.code == 2 and "invalid choice: 'x9'" in capsys.readouterr().err
    )


def test_an_interrupted_fine_tune_resumes_from_its_last_checkpoint(cache, monkeypatch):
    """A training with checkpoints keeps them in the cache's checkpoint folder of its
    recipe; run again after an interruption, it resumes there, ends with the weights of
    an uninterrupted run (bit for bit on a CPU) and deletes the folder once the model is
    saved."""
    import baddiff_core.train as train_module
    from baddiff_core.cache import checkpoint_folder, recipe_key

    # checkpoint_every=0: no checkpoints
    plant_backdoor(tiny_recipe(), device="cpu", progress=False)
    assert not (cache / "checkpoints").exists()
    recipe = tiny_recipe(
        train=dataclasses.replace(
            TINY, steps=6, checkpoint_every=2, hflip=True, ema_decay=0.9
        )
    )
    folder = checkpoint_folder("backdoor", recipe.key())
    assert folder == cache / "checkpoints" / f"backdoor-{recipe_key(recipe.key())}"
    # uninterrupted
    reference = plant_backdoor(recipe, device="cpu", progress=False, use_cache=False)
    assert not folder.exists(), "no cache, no checkpoints"

    real_save, real_loss = train_module._save_checkpoint, train_module.diffusion_loss
    saved = []

    def save_then_disconnect(checkpoint_dir, step, *args, **kwargs):
        made = real_save(checkpoint_dir, step, *args, **kwargs)
        saved.append((checkpoint_dir, step))
        if step == 4:
            raise KeyboardInterrupt("the session was lost after the step-4 checkpoint")
        return made

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_disconnect)
    with pytest.raises(KeyboardInterrupt):
        plant_backdoor(recipe, device="cpu", progress=False)
    assert (
        saved == [(folder, 2), (folder, 4)] and (folder / "checkpoint-0000004").is_dir()
    )
    assert not (cache / "models" / folder.name).exists(), "nothing cached yet"

    losses = []

    def counting_loss(*args, **kwargs):  # one call per optimizer step
        losses.append(real_loss(*args, **kwargs))
        return losses[-1]

    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)
    monkeypatch.setattr(train_module, "diffusion_loss", counting_loss)
    resumed = plant_backdoor(recipe, device="cpu", progress=False)
    assert len(losses) == 2, (
        "steps 5 and 6 only: the first four came from the checkpoint"
    )
    assert (
        resumed.info["report"]["resumed_from_step"] == 4
        and len(resumed.info["report"]["losses"]) == 6
    )
    assert resumed.info["report"]["losses"] == reference.info["report"]["losses"]
    for (name, x), y in zip(
        reference.unet.state_dict().items(), resumed.unet.state_dict().values()
    ):
        torch.testing.assert_close(x, y, msg=name, atol=0, rtol=0)
    # the entry the checkpoints were named after
    assert Path(resumed.info["path"]).name == folder.name
    assert not folder.exists() and (cache / "checkpoints").is_dir()
    assert plant_backdoor(recipe, device="cpu", progress=False).info["from_cache"]
