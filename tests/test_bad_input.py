"""Bad input fails at once with an error that names the argument, the value and what is
allowed.

One table, one row per case, across the public API; the command line's exit status 2 is
tested in ``test_attack.test_command_line_errors_exit_with_status_2``. Each row gives
the call, the exception type and a pattern that its message must match.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baddiff_core import (
    attack,
    data,
    devices,
    diffusion,
    metrics,
    models,
    poison,
    sampling,
    train,
    triggers,
)
from baddiff_core.cache import cached_model

TINY = dict(block_out_channels=(16, 32), norm_num_groups=8)


def tiny_unet():
    return models.make_unet(8, 1, **TINY)


def scheduler():
    return diffusion.make_scheduler(**diffusion.QUICK_SCHEDULE)


def images(n=4, channels=1, size=8, value=0.0):
    return torch.full((n, channels, size, size), value)


def box(size=8, channels=1, image_size=8):
    return triggers.make_trigger("box", image_size, channels, size=size)


def corner(channels=1, image_size=8):
    return triggers.make_target("corner", image_size, channels)


def poisoned(data=None, *, trigger=None, target=None, poison_rate=0.1):
    """A ``PoisonedDataset`` of ``images()`` with ``box()`` and ``corner()`` at poison
    rate 0.1, seed 0, but for what the case passes."""
    return poison.PoisonedDataset(
        images() if data is None else data,
        trigger=box() if trigger is None else trigger,
        target=corner() if target is None else target,
        poison_rate=poison_rate,
        seed=0,
    )


def truncated_model(tmp_path: Path) -> str:
    folder = models.save_model(tmp_path / "model", tiny_unet(), scheduler())
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return str(folder)


def other_architecture_checkpoint(tmp_path: Path) -> str:
    config = train.TrainConfig(
        steps=1,
        batch_size=2,
        device="cpu",
        progress=False,
        checkpoint_every=1,
        checkpoint_dir=str(tmp_path / "run"),
    )
    train.train(
        models.make_unet(8, 1, block_out_channels=(32, 64), norm_num_groups=8),
        scheduler(),
        images(value=0.1),
        config,
    )
    return str(train.latest_checkpoint(tmp_path / "run"))


def read_only_cache(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("BADDIFF_CACHE", str(blocker))
    cached_model("x", {"a": 1}, lambda: (tiny_unet(), scheduler(), {}))


CASES = {
    # poisoning
    "poison rate above 1": (
        lambda tmp, mp: poisoned(poison_rate=1.5),
        ValueError,
        r"poison_rate.*1\.5",
    ),
    "poison rate NaN": (
        lambda tmp, mp: poisoned(poison_rate=float("nan")),
        ValueError,
        r"poison_rate.*nan",
    ),
    "images with NaN": (
        lambda tmp, mp: poisoned(images(value=float("nan"))),
        ValueError,
        "NaN",
    ),
    "images outside [-1, 1]": (
        lambda tmp, mp: poisoned(images(value=3.0)),
        ValueError,
        r"\[-1, 1\].*3",
    ),
    "trigger channels differ from the images'": (
        lambda tmp, mp: poisoned(trigger=box(channels=3)),
        ValueError,
        "shape",
    ),
    "target size differs from the images'": (
        lambda tmp, mp: poisoned(target=corner(image_size=16)),
        ValueError,
        "shape",
    ),
    "images are not a tensor": (
        lambda tmp, mp: poisoned([[0.0]]),
        TypeError,
        "list",
    ),
    # triggers and targets
    "trigger larger than the image": (
        lambda tmp, mp: triggers.make_trigger("box", 8, 1, size=40),
        ValueError,
        "size",
    ),
    "unknown trigger kind": (
        lambda tmp, mp: triggers.make_trigger("star", 16, 1),
        ValueError,
        r"'star'.*box.*white_box.*stop_sign",
    ),
    "unknown target kind": (
        lambda tmp, mp: triggers.make_target("dog", 16, 1),
        ValueError,
        r"'dog'.*hat",
    ),
    "two channels": (
        lambda tmp, mp: triggers.make_trigger("box", 16, 2),
        ValueError,
        r"channels.*2",
    ),
    "stamp: size mismatch": (
        lambda tmp, mp: triggers.stamp(images(size=16), box()),
        ValueError,
        r"same C,H,W.*\(4, 1, 16, 16\).*\(1, 8, 8\)",
    ),
    # data
    "unknown data set": (
        lambda tmp, mp: data.load_images("imagenet-9000", 16),
        ValueError,
        r"'imagenet-9000'.*digits",
    ),
    "image size too small": (
        lambda tmp, mp: data.load_images("digits", 2),
        ValueError,
        r"image_size.*2",
    ),
    # sampling
    "zero samples": (
        lambda tmp, mp: sampling.sample(tiny_unet(), scheduler(), 0),
        ValueError,
        r"n=0",
    ),
    "True as a sample count": (
        lambda tmp, mp: sampling.sample(tiny_unet(), scheduler(), True),
        ValueError,
        r"n must be a positive integer \(the number of images\), got n=True",
    ),
    "True as a batch size": (
        lambda tmp, mp: sampling.sample(tiny_unet(), scheduler(), 2, batch_size=True),
        ValueError,
        r"batch_size must be a positive integer or None, got batch_size=True",
    ),
    "negative batch size": (
        lambda tmp, mp: sampling.sample(tiny_unet(), scheduler(), 2, batch_size=-1),
        ValueError,
        r"batch_size=-1",
    ),
    "unknown sampler": (
        lambda tmp, mp: sampling.sample(tiny_unet(), scheduler(), 2, sampler="euler"),
        ValueError,
        r"'euler'.*ddpm.*ddim",
    ),
    "unknown clipping mode": (
        lambda tmp, mp: sampling.sample(tiny_unet(), scheduler(), 2, clip="both"),
        ValueError,
        r"'both'.*none.*x0.*xt",
    ),
    "more inference steps than training steps": (
        lambda tmp, mp: sampling.sample(
            tiny_unet(), scheduler(), 2, num_inference_steps=500
        ),
        ValueError,
        r"num_inference_steps.*\[1, 100\].*500",
    ),
    # training
    "zero training steps": (
        lambda tmp, mp: train.TrainConfig(steps=0),
        ValueError,
        r"steps=0",
    ),
    "negative batch size (training)": (
        lambda tmp, mp: train.TrainConfig(batch_size=-2),
        ValueError,
        r"batch_size=-2",
    ),
    "learning rate of 2": (
        lambda tmp, mp: train.TrainConfig(learning_rate=2.0),
        ValueError,
        r"learning_rate=2",
    ),
    "images that do not fit the model": (
        lambda tmp, mp: train.train(
            models.make_unet(16, 1),
            scheduler(),
            images(),
            train.TrainConfig(steps=1, device="cpu", progress=False),
        ),
        ValueError,
        "do not fit the model",
    ),
    # devices
    "a device that does not exist": (
        lambda tmp, mp: devices.resolve_device("tpu9"),
        ValueError,
        r"'tpu9'.*auto.*cpu.*cuda",
    ),
    # metrics
    "ASR threshold of 0": (
        lambda tmp, mp: metrics.attack_success_rate(
            images(value=0.1), corner()[None].expand(4, -1, -1, -1)[0], 0.0
        ),
        ValueError,
        "threshold",
    ),
    "samples with inf": (
        lambda tmp, mp: metrics.mse_to_target(images(value=float("inf")), corner()),
        ValueError,
        "infinite",
    ),
    # models and checkpoints
    "a model folder that does not exist": (
        lambda tmp, mp: models.load_model(tmp / "nowhere"),
        FileNotFoundError,
        "does not exist",
    ),
    "an empty model folder": (
        lambda tmp, mp: models.load_model(tmp),
        FileNotFoundError,
        "unet/config.json' is missing: a model folder holds",
    ),
    "a truncated weights file": (
        lambda tmp, mp: models.load_model(truncated_model(tmp)),
        ValueError,
        "truncated or corrupt",
    ),
    "a checkpoint of another architecture": (
        lambda tmp, mp: train.load_checkpoint_weights(
            other_architecture_checkpoint(tmp), tiny_unet()
        ),
        ValueError,
        "does not fit the model",
    ),
    "unknown recipe trigger": (
        lambda tmp, mp: attack.BackdoorRecipe(trigger="star"),
        ValueError,
        "'star'",
    ),
    # the cache
    "a cache folder that cannot be written": (
        read_only_cache,
        PermissionError,
        r"not-a-folder.*BADDIFF_CACHE",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_value_and_what_is_allowed(case, tmp_path, monkeypatch):
    call, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern):
        call(tmp_path, monkeypatch)


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25
