"""The small clean pre-trained model that ships with the package, and the recipe that
made it.

Introduced in chapter 2 (Denoising diffusion models). The paper's cheap attack
fine-tunes a clean pre-trained model (google/ddpm-cifar10-32, downloaded in full mode).
Offline, the book fine-tunes this one instead: a 16 x 16 digits model trained by
:func:`baddiff_core.train.train` with :data:`CLEAN_DIGITS_RECIPE`. Regenerate it with
``python -m baddiff_core.pretrained``.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.data import load_images
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler
from baddiff_core.models import load_model, make_unet, save_model
from baddiff_core.train import TrainConfig, train

__all__ = [
    "CLEAN_DIGITS_RECIPE",
    "clean_digits_path",
    "load_clean_digits",
    "train_clean_digits",
]

#: Everything that determines the shipped model (CPU, 2 threads, about 8 minutes).
CLEAN_DIGITS_RECIPE: dict[str, Any] = dict(
    dataset="digits",
    image_size=16,
    channels=1,
    schedule=QUICK_SCHEDULE,
    unet_preset=16,
    init_seed=0,
    train=dict(
        steps=4000,
        batch_size=64,
        learning_rate=1e-3,
        lr_schedule="cosine",
        warmup_steps=100,
        ema_decay=0.999,
        max_grad_norm=1.0,
        seed=0,
    ),
)


def clean_digits_path() -> Path:
    """The folder of the shipped model (diffusers layout) inside the installed
    package."""
    return Path(str(resources.files("baddiff_core") / "assets" / "clean-digits16"))


def load_clean_digits(
    device: str | torch.device = "cpu",
) -> tuple[UNet2DModel, DDPMScheduler]:
    """The shipped clean 16 x 16 digits model and its training scheduler (T = 100)."""
    path = clean_digits_path()
    if not path.is_dir():
        raise FileNotFoundError(
            f"the shipped clean model is missing at {path}; regenerate it with "
            "`python -m baddiff_core.pretrained`"
        )
    return load_model(path, device=device)


def train_clean_digits(
    recipe: dict[str, Any] = CLEAN_DIGITS_RECIPE,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
    """Train a clean model from scratch with ``recipe``; return it, its scheduler and a
    report."""
    images = load_images(
        recipe["dataset"], recipe["image_size"], channels=recipe["channels"]
    )
    torch.manual_seed(recipe["init_seed"])
    unet = make_unet(recipe["unet_preset"], recipe["channels"])
    scheduler = make_scheduler(**recipe["schedule"])
    config = TrainConfig(**recipe["train"], device=device, progress=progress)
    history = train(unet, scheduler, images, config)
    report = dict(
        final_loss=sum(history.losses[-100:]) / 100,
        seconds=round(history.seconds, 1),
        images_per_second=round(history.images_per_second, 1),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
    return unet, scheduler, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Regenerate the shipped clean digits model."
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=clean_digits_path(),
        help="folder to write (default: the package's own asset folder)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    began = time.time()
    unet, scheduler, report = train_clean_digits(device=args.device)
    save_model(
        args.output,
        unet.to("cpu"),
        scheduler,
        metadata=dict(
            kind="clean",
            recipe=CLEAN_DIGITS_RECIPE,
            report=report,
            regenerate="python -m baddiff_core.pretrained",
        ),
    )
    print(json.dumps(report, indent=2))
    print(f"wrote {args.output} in {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
