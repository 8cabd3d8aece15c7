"""Sampling a (possibly backdoored) diffusion model, with and without the clipping
defence.

Introduced in chapter 2 (Denoising diffusion models); the clipping variants are the
subject of the inference-time clipping chapter. Stock diffusers pipelines always start
from pure noise, so the core has its own loop around the scheduler's ``step``. Backdoor
sampling and the clipping defence are those of BadDiffusion (Chou et al. 2023,
arXiv:2212.05400), Secs. 3 and 4, as its authors' code runs them
(github.com/IBM/BadDiffusion):

- clean generation starts from ``x_T = eps``; backdoor generation from ``x_T = eps +
  g``, the raw trigger ``g`` including its -1 background;
- ``clip="x0"`` clamps the predicted ``x_0`` to [-1, 1] at every step before the
  posterior mean is formed (the authors' defence; diffusers' ``clip_sample=True``, the
  DDPMScheduler default). Under DDIM the step is then taken as if the model had
  predicted the clamped image: the noise is re-derived from it (diffusers'
  ``use_clipped_model_output=True``, GLIDE's choice). diffusers' DDIM pipeline leaves
  that off: its ``clip_sample=True`` keeps the raw predicted noise (chapter 9 measures
  both; neither stops a backdoor planted for DDIM);
- ``clip="xt"`` clamps ``x_t`` itself after every step (a cruder variant);
- ``sampler="ddim"`` uses diffusers' ``DDIMScheduler`` (deterministic, ``eta = 0``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from baddiff_core.checks import (
    check_choice,
    check_int,
    check_positive_int,
    check_tensor,
)

__all__ = [
    "CLIP_MODES",
    "SAMPLERS",
    "DEFAULT_BATCH_SIZE",
    "inference_scheduler",
    "sample",
    "sample_clean_and_triggered",
]

#: ``"none"``: no clipping (how the attack is evaluated); ``"x0"``: clamp the predicted
#: x_0 (the defence); ``"xt"``: clamp x_t after each step.
CLIP_MODES = ("none", "x0", "xt")
#: The samplers :func:`sample` runs: ``"ddpm"``, the ancestral (stochastic) sampler of
#: DDPM (Ho et al. 2020, arXiv:2006.11239, Algorithm 2), and ``"ddim"``, the
#: deterministic sampler of DDIM (Song et al. 2021, arXiv:2010.02502, eq. (12) with
#: eta = 0).
SAMPLERS = ("ddpm", "ddim")

ClipMode = Literal["none", "x0", "xt"]
Sampler = Literal["ddpm", "ddim"]
#: ``callback(t, x_t, x0_pred)`` after every step, for measuring trajectories.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]

#: Images per forward pass when :func:`sample` is given no ``batch_size``: memory stays
#: bounded however many images are asked for. Sized for the 35.7 M-parameter CIFAR-10
#: UNet (``google/ddpm-cifar10-32``) in fp32 on a 16 GB card: we measured the peak of
#: the tensors alive during one forward pass without gradients (a dispatch mode summing
#: live storages, on the CPU) at 128 MB for 16 images and 240 MB for 32 (the 136 MB of
#: weights apart), so 7 MB per image, and 256 images with the weights take about 2 GB.
#: That leaves most of the card to cuDNN's workspaces, the caching allocator's slack and
#: whatever else a notebook holds; the sampler's own state is a few ``3 x 32 x 32``
#: tensors per image. The book's quick mode never samples more than 256 images in one
#: call, so its samples are those of a single batch, as before this bound.
DEFAULT_BATCH_SIZE = 256


def inference_scheduler(
    scheduler: DDPMScheduler, *, sampler: Sampler = "ddpm", clip: ClipMode = "none"
) -> DDPMScheduler | DDIMScheduler:
    """A fresh scheduler for sampling: the training schedule, ``sampler``'s update rule
    and the predicted-x_0 clipping of ``clip`` (``clip_sample=True`` only for
    ``"x0"``)."""
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("clip", clip, CLIP_MODES)
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in scheduler.config.items() if k in accepted}
    config.update(clip_sample=clip == "x0", clip_sample_range=1.0, thresholding=False)
    return cls(**config)


def inference_steps(
    scheduler: DDPMScheduler, sampler: Sampler, num_inference_steps: int | None
) -> int:
    """The number of sampling steps: ``num_inference_steps``, checked against the
    training ``T``, or the default (``T`` for DDPM, ``min(50, T)`` for DDIM). Call it
    before expensive work.

    Raises:
        ValueError: not an integer in [1, T].
    """
    train_steps = scheduler.config.num_train_timesteps
    if num_inference_steps is None:
        return train_steps if sampler == "ddpm" else min(50, train_steps)
    return check_int(
        "num_inference_steps",
        num_inference_steps,
        minimum=1,
        maximum=train_steps,
        meaning="the training steps",
    )


@torch.no_grad()
def sample(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    n: int,
    *,
    trigger: torch.Tensor | None = None,
    clip: ClipMode = "none",
    sampler: Sampler = "ddpm",
    num_inference_steps: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    noise: torch.Tensor | None = None,
    progress: bool = True,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Draw ``n`` images from ``model``, optionally starting from triggered noise.

    Args:
        model: the noise predictor ``eps_theta(x_t, t)``; sampling runs on its device and dtype.
        scheduler: the training scheduler (its betas); its own ``clip_sample`` is ignored.
        n: number of images.
        trigger: ``C,H,W`` (the same for every image) or ``n,C,H,W`` (per image; rows of zeros give
            clean samples), added raw to the starting noise: ``x_T = eps + trigger``.
        clip: one of :data:`CLIP_MODES`.
        sampler: ``"ddpm"`` (ancestral, stochastic) or ``"ddim"`` (deterministic).
        num_inference_steps: defaults to the training ``T`` for DDPM and ``min(50, T)`` for DDIM.
        generator: the source of every random number (starting noise and DDPM's step noise).
        batch_size: images per forward pass (default ``min(n, DEFAULT_BATCH_SIZE)``). Batches are
            sampled one after the other from the same ``generator``, so the images depend on it:
            under DDPM, ``n`` images in one batch are not those of two (its step noise is drawn batch
            by batch); the starting noise is drawn for all ``n`` at once either way, and DDIM draws
            no other.
        noise: optional starting ``eps`` of shape ``n,C,H,W`` (default: drawn from ``generator``).
        progress: show a tqdm bar over the steps.
        callback: called as ``callback(t, x_t, x0_pred)`` after every step (of each batch in turn,
            with that batch's rows).

    Returns:
        ``n,C,H,W`` images in [-1, 1] (clamped at the end), on the model's device.
    """
    check_positive_int("n", n, meaning="the number of images")
    check_positive_int("batch_size", batch_size, allow_none=True)
    sampler_scheduler = inference_scheduler(scheduler, sampler=sampler, clip=clip)
    num_inference_steps = inference_steps(scheduler, sampler, num_inference_steps)

    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    config = model.config
    shape = (n, config.in_channels, config.sample_size, config.sample_size)
    start = _starting_noise(shape, noise, generator, device, dtype)
    if trigger is not None:
        start = start + _broadcast_trigger(trigger, shape).to(device, dtype)

    batch_size = min(n, batch_size or DEFAULT_BATCH_SIZE)
    images = []
    for first in range(0, n, batch_size):
        x = start[first : first + batch_size]
        sampler_scheduler.set_timesteps(num_inference_steps, device=device)
        for t in tqdm(
            sampler_scheduler.timesteps,
            desc=f"sampling ({sampler}, clip={clip})",
            disable=not progress,
            leave=False,
        ):
            eps = model(x, t).sample
            kwargs = (
                {"eta": 0.0, "use_clipped_model_output": clip == "x0"}
                if sampler == "ddim"
                else {}
            )
            out = sampler_scheduler.step(eps, t, x, generator=generator, **kwargs)
            x = out.prev_sample
            if clip == "xt":
                x = x.clamp(-1.0, 1.0)
            if callback is not None:
                callback(int(t), x, out.pred_original_sample)
        images.append(x.clamp(-1.0, 1.0))
    return torch.cat(images)


def sample_clean_and_triggered(
    model: UNet2DModel,
    scheduler: DDPMScheduler,
    n: int,
    trigger: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` clean and ``n`` triggered samples in one call to :func:`sample` (``2n``
    images, batched by its ``batch_size``: one pass up to :data:`DEFAULT_BATCH_SIZE`),
    from the same starting ``eps``.

    Pairing the noise shows exactly what the trigger changes. ``kwargs`` go to
    :func:`sample`. Returns ``(clean, triggered)``, each ``n,C,H,W`` in [-1, 1].
    """
    check_positive_int("n", n, meaning="the number of images")
    config = model.config
    shape = (n, config.in_channels, config.sample_size, config.sample_size)
    parameter = next(model.parameters())
    eps = randn_tensor(
        shape, generator=generator, device=parameter.device, dtype=parameter.dtype
    )
    trigger = _broadcast_trigger(trigger, shape).to(parameter.device, parameter.dtype)
    both = sample(
        model,
        scheduler,
        2 * n,
        trigger=torch.cat([torch.zeros_like(trigger), trigger]),
        noise=torch.cat([eps, eps]),
        generator=generator,
        **kwargs,
    )
    return both[:n], both[n:]


def _starting_noise(
    shape: tuple[int, ...],
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    if noise is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    noise = check_tensor(
        "noise",
        noise,
        layout="n,C,H,W",
        shape=shape,
        finite=True,
        meaning="n images of the model's size",
    )
    return noise.to(device, dtype)


def _broadcast_trigger(trigger: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    trigger = check_tensor("trigger", trigger, finite=True)
    if tuple(trigger.shape) == shape[1:]:
        return trigger.expand(shape)
    if tuple(trigger.shape) == shape:
        return trigger
    raise ValueError(
        f"trigger must have shape {shape[1:]} (C,H,W) or {shape} (n,C,H,W) to match the model, "
        f"got {tuple(trigger.shape)}"
    )
