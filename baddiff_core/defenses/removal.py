"""Removal: fine-tune a copy of the model so that ``eps + tau`` behaves like ``eps``.

Elijah (An et al. 2024, arXiv:2312.00050), its backdoor removal. With the trigger
estimate ``tau`` (:mod:`~baddiff_core.defenses.inversion`) and a little clean data, a
copy ``f`` of the model is tuned with the DDPM loss plus two terms that make it answer
``eps + tau`` and ``eps`` at the last step as the frozen original ``f0`` answers
``eps``::

    loss = ddpm_loss(f, x) + mse(f(eps + tau, T-1), f0(eps, T-1)) + mse(f(eps, T-1), f0(eps, T-1))

The defender holds a small share of clean training data (:func:`clean_subset`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from baddiff_core.checks import check_image_batch, check_positive_int
from baddiff_core.defenses.inversion import image_shape, last_timestep
from baddiff_core.diffusion import diffusion_loss

__all__ = ["RemovalHistory", "clean_subset", "remove_backdoor"]


@dataclass
class RemovalHistory:
    """Losses of every step of :func:`remove_backdoor` (``total = ddpm + trigger +
    clean``)."""

    total: list[float] = field(default_factory=list)
    ddpm: list[float] = field(default_factory=list)
    trigger: list[float] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    seconds: float = 0.0


def clean_subset(
    images: torch.Tensor, share: float = 0.1, *, generator: torch.Generator
) -> torch.Tensor:
    """The defender's clean data: ``int(share * B)`` of the ``B`` ``images``, drawn at
    random without replacement (the first ones of ``torch.randperm(B,
    generator=generator)``).

    Elijah and ANP assume a defender who holds a small share of clean training data (10
    % in the papers). The same generator state gives the same subset, so two chapters
    that draw it alike repair a model with the same data (and share a cached repair).
    """
    images = check_image_batch("images", images)
    if (
        isinstance(share, bool)
        or not isinstance(share, (int, float))
        or not 0 < share <= 1
    ):
        raise ValueError(f"share must be a fraction in (0, 1], got share={share!r}")
    count = int(share * len(images))
    if count < 1:
        raise ValueError(
            f"share={share!r} of {len(images)} images is less than one image; use a larger share"
        )
    return images[torch.randperm(len(images), generator=generator)[:count]]


def check_clean_images(unet: UNet2DModel, images: object) -> torch.Tensor:
    """``images`` if they are a batch of the model's ``C,H,W`` in [-1, 1]: the clean
    data of removal and of ANP."""
    images = check_image_batch("clean_images", images)
    shape = image_shape(unet)
    if tuple(images.shape[1:]) != shape:
        raise ValueError(
            f"clean_images must have shape N,{shape[0]},{shape[1]},{shape[2]} (the model's C,H,W), "
            f"got {tuple(images.shape)}"
        )
    if images.abs().max() > 1 + 1e-3:
        raise ValueError(
            f"clean_images must lie in [-1, 1], got values up to {float(images.abs().max()):.3g}"
        )
    return images


def remove_backdoor(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    trigger: torch.Tensor,
    clean_images: torch.Tensor,
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    use_cache: bool = False,
) -> tuple[UNet2DModel, RemovalHistory]:
    """Fine-tune a copy of ``unet`` so that ``eps + trigger`` behaves like ``eps``
    (Elijah's removal).

    Per step, with ``f`` the model being tuned and ``f0`` the frozen original, ``x`` a
    batch of clean images and ``eps`` fresh noise::

        loss = ddpm_loss(f, x) + mse(f(eps + tau, T-1), f0(eps, T-1)) + mse(f(eps, T-1), f0(eps, T-1))

    Returns the tuned copy (eval mode; ``unet`` is untouched) and the loss history. With
    ``use_cache`` the result is kept in the model cache
    (:func:`baddiff_core.defenses.cached.cached_removal`), keyed by digests of the
    model's weights, the trigger and the clean images and by the settings, so that a
    second chapter repairing the same model with the same inputs loads it (the history
    too, with the seconds the first run took).
    """
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    images = check_clean_images(unet, clean_images)
    settings = dict(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress
    )
    if use_cache:
        # Imported here: the cache layer sits above this module and imports it.
        from baddiff_core.defenses.cached import cached_removal

        return cached_removal(unet, scheduler, trigger, images, **settings)
    return _remove_backdoor(unet, scheduler, trigger, images, **settings)


def _remove_backdoor(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    trigger: torch.Tensor,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> tuple[UNet2DModel, RemovalHistory]:
    """The removal itself, on checked inputs (see :func:`remove_backdoor`)."""
    parameter = next(unet.parameters())
    device = parameter.device
    images = images.to(device, parameter.dtype)
    tau = trigger.to(device, parameter.dtype)
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    model = copy.deepcopy(unet).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = RemovalHistory()
    began = time.perf_counter()
    for _ in tqdm(
        range(steps), desc="removing the backdoor", disable=not progress, leave=False
    ):
        x = images[
            torch.randint(0, len(images), (batch_size,), generator=generator).to(device)
        ]
        ddpm = diffusion_loss(
            model, scheduler, x, torch.zeros_like(x), generator=generator
        )
        noise = torch.randn(x.shape, generator=generator).to(device, x.dtype)
        timesteps = last_timestep(scheduler, batch_size, device)
        with torch.no_grad():
            reference = frozen(noise, timesteps).sample
        on_trigger = F.mse_loss(model(noise + tau, timesteps).sample, reference)
        on_clean = F.mse_loss(model(noise, timesteps).sample, reference)
        loss = ddpm + on_trigger + on_clean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in (
            ("total", loss),
            ("ddpm", ddpm),
            ("trigger", on_trigger),
            ("clean", on_clean),
        ):
            getattr(history, name).append(value.detach())
    for name in ("total", "ddpm", "trigger", "clean"):
        setattr(
            history, name, torch.stack(getattr(history, name)).float().cpu().tolist()
        )
    history.seconds = time.perf_counter() - began
    return model.eval().requires_grad_(False), history
