"""The defences' results kept in the cache (:mod:`baddiff_core.cache`), apart from the
algorithms that compute them.

A scan, a repair or a set of ANP masks takes minutes, and chapters 7, 8 and 9 ask for
the same ones. Called with ``use_cache=True``,
:func:`~baddiff_core.defenses.scanning.scan_model`,
:func:`~baddiff_core.defenses.removal.remove_backdoor` and
:func:`~baddiff_core.defenses.pruning.adversarial_neuron_masks` come here: the result is
keyed by digests of the model's weights and schedule, of the clean data and of the
trigger estimate it used, and by the defence's settings (:func:`defence_recipe`); it is
loaded when found, and computed by the plain algorithm and stored when not.

The keys are those the results were first stored under: a changed key would compute
every reader's cached scans, repairs and masks again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.cache import cached_model, cached_tensors, tensor_digest
from baddiff_core.defenses import pruning, removal
from baddiff_core.defenses.inversion import InvertedTrigger
from baddiff_core.defenses.pruning import ChannelMasks
from baddiff_core.defenses.removal import RemovalHistory

__all__ = ["defence_recipe", "cached_scan", "cached_removal", "cached_masks"]


def defence_recipe(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor | None = None,
    **settings: object,
) -> dict[str, object]:
    """The cache key of a defence's result: digests of the model, its schedule and the
    clean data (if it uses any), and the defence's own settings."""
    recipe = dict(
        model=tensor_digest(unet), schedule=tensor_digest(scheduler.betas), **settings
    )
    if images is not None:
        recipe["clean_images"] = tensor_digest(images)
    return recipe


def cached_scan(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    run: Callable[[], tuple[InvertedTrigger, torch.Tensor, float]],
    *,
    per_pass: int,
    **settings: object,
) -> tuple[InvertedTrigger, torch.Tensor, float]:
    """``run()``'s trigger estimate, samples and seconds, stored as tensors under the
    scan's ``settings`` (``n``, ``num_noise``, ``steps``, ``lr``, ``solver``,
    ``num_inference_steps``, ``sampler``, ``clip``, ``seed``), on ``unet``'s device.

    ``per_pass`` (samples per forward pass) joins the key only when it splits the ``n``
    samples into several batches, the one case where it changes them (DDPM draws its
    step noise batch by batch), so that scans cached before it existed keep their keys.
    """
    settings = dict(settings)
    if per_pass < settings["n"]:  # one batch: the samples of earlier scans, same key
        settings["batch_size"] = per_pass

    def build() -> tuple[dict[str, torch.Tensor], dict]:
        inversion, samples, seconds = run()
        tensors = dict(trigger=inversion.trigger, samples=samples)
        return tensors, dict(
            lam=inversion.lam,
            losses=inversion.losses,
            inversion_seconds=inversion.seconds,
            seconds=seconds,
        )

    tensors, info = cached_tensors(
        "scan", defence_recipe(unet, scheduler, **settings), build
    )
    device = next(unet.parameters()).device
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    report = info["report"]
    inversion = InvertedTrigger(
        tensors["trigger"], report["lam"], report["losses"], report["inversion_seconds"]
    )
    return inversion, tensors["samples"], report["seconds"]


def cached_removal(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    trigger: torch.Tensor,
    images: torch.Tensor,
    *,
    progress: bool,
    **settings: object,
) -> tuple[UNet2DModel, RemovalHistory]:
    """:func:`~baddiff_core.defenses.removal.remove_backdoor`'s repaired copy and loss
    history, kept in the model cache (the history with the seconds the first run
    took), keyed by the removal's ``settings`` (``steps``, ``batch_size``, ``lr``,
    ``seed``) and digests of the model, the trigger and the clean images."""
    recipe = defence_recipe(
        unet, scheduler, images, trigger=tensor_digest(trigger), **settings
    )

    def build() -> tuple[UNet2DModel, DDPMScheduler, dict]:
        repaired, history = removal._remove_backdoor(
            unet, scheduler, trigger, images, progress=progress, **settings
        )
        return repaired, scheduler, dataclasses.asdict(history)

    device = next(unet.parameters()).device
    repaired, _, info = cached_model("removal", recipe, build, device=device)
    return repaired.requires_grad_(False), RemovalHistory(**info["report"])


def cached_masks(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    progress: bool,
    **settings: object,
) -> ChannelMasks:
    """:func:`~baddiff_core.defenses.pruning.adversarial_neuron_masks`'s masks (in
    module order), losses and seconds, stored as tensors and keyed as a repair is."""
    recipe = defence_recipe(unet, scheduler, images, **settings)

    def build() -> tuple[dict[str, torch.Tensor], dict]:
        masks = pruning._adversarial_neuron_masks(
            unet, scheduler, images, progress=progress, **settings
        )
        return masks.masks, dict(
            order=list(masks.masks), losses=masks.losses, seconds=masks.seconds
        )

    tensors, info = cached_tensors("anp-masks", recipe, build)
    report = info["report"]
    return ChannelMasks(
        {name: tensors[name] for name in report["order"]},
        report["losses"],
        report["seconds"],
    )
