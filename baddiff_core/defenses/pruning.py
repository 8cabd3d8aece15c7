"""Adversarial neuron pruning (ANP): prune the channels a backdoor leans on.

ANP is Wu & Wang's defence for classifiers (NeurIPS 2021, arXiv:2110.14430, Algorithm 1,
with its settings: budget ``eps = 0.4``, trade-off ``alpha = 0.2``, SGD with learning
rate 0.2 and momentum 0.9, one signed-gradient step for the perturbation; its batch of
128 and 2,000 steps are 64 and 200 here by default). This module is *this book's*
adaptation of it to a diffusion model: the masks and the perturbations sit on the output
channels of the UNet's convolutions (ANP's sit on the neurons of a classifier's
batch-norm layers), and the clean loss is the DDPM loss on clean images in place of the
cross-entropy. It learns a mask ``m`` in [0, 1] per channel that keeps the clean loss
low even under a worst-case per-channel perturbation ``(delta, xi)`` of size ``eps``;
channels whose mask falls are the fragile ones, and pruning them
(:func:`prune_channels`) may remove the backdoor. It needs no trigger estimate.

It is not the "ANP" that the BadDiffusion authors ran (Chou et al. 2023,
arXiv:2212.05400, Sec. 4.6.1, and ``anp_defense.py`` in github.com/IBM/BadDiffusion).
Theirs puts a free per-channel scale and shift on every convolution, trains them with
Adam (learning rate 1e-4) to *maximise* the clean DDPM loss while the model stays
frozen, clamps them to [-4, 4], and prunes nothing: it is a detection probe, which
checks whether the perturbed model's clean samples drift to the backdoor target. The
book does not run that variant.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from baddiff_core.checks import check_float, check_positive_int
from baddiff_core.defenses.inversion import frozen
from baddiff_core.defenses.removal import check_clean_images
from baddiff_core.diffusion import diffusion_loss

__all__ = ["ChannelMasks", "adversarial_neuron_masks", "prune_channels"]


@dataclass
class ChannelMasks:
    """ANP's learnt mask per output channel of every convolution (except the output
    layer).

    Attributes:
        masks: ``{module name: (channels,) tensor in [0, 1]}``; low = fragile.
        losses: the mask objective at every step.
        seconds: wall time.
    """

    masks: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float

    def flat(self) -> torch.Tensor:
        """Every channel's mask in one vector, in module order."""
        return torch.cat(list(self.masks.values()))

    @property
    def num_channels(self) -> int:
        return sum(m.numel() for m in self.masks.values())


def _prunable_convolutions(unet: UNet2DModel) -> dict[str, torch.nn.Conv2d]:
    """Every Conv2d except ``conv_out`` (its channels are the predicted noise's image
    channels)."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d) and name != "conv_out"
    }


class _ChannelPerturbation:
    """Forward hooks that turn a convolution's output ``W x + b`` into ``(m + delta) W x
    + (1 + xi) b``."""

    def __init__(
        self, convolutions: dict[str, torch.nn.Conv2d], device: torch.device
    ) -> None:
        self.masks = {
            name: torch.ones(c.out_channels, device=device, requires_grad=True)
            for name, c in convolutions.items()
        }
        self.delta = {
            name: torch.zeros(c.out_channels, device=device, requires_grad=True)
            for name, c in convolutions.items()
        }
        self.xi = {
            name: torch.zeros(c.out_channels, device=device, requires_grad=True)
            for name, c in convolutions.items()
        }
        self.perturb = False
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in convolutions.items()
        ]

    def _hook(self, name: str):
        def hook(module: torch.nn.Conv2d, inputs, output: torch.Tensor) -> torch.Tensor:
            scale = (
                self.masks[name] + self.delta[name]
                if self.perturb
                else self.masks[name]
            )
            if module.bias is None:
                return scale.view(1, -1, 1, 1) * output
            bias = module.bias.view(1, -1, 1, 1)
            shift = (
                1 + self.xi[name] if self.perturb else torch.ones_like(self.xi[name])
            )
            return (
                scale.view(1, -1, 1, 1) * (output - bias)
                + shift.view(1, -1, 1, 1) * bias
            )

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def adversarial_neuron_masks(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    clean_images: torch.Tensor,
    *,
    eps: float = 0.4,
    alpha: float = 0.2,
    steps: int = 200,
    batch_size: int = 64,
    mask_lr: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    use_cache: bool = False,
) -> ChannelMasks:
    """Learn ANP's channel masks on clean data (Wu & Wang 2021, Algorithm 1; this
    book's adaptation: convolution channels, the DDPM loss).

    Each step: draw ``delta, xi ~ U[-eps, eps]`` per channel, take one signed-gradient
    step that *raises* the clean loss and clip them back to ``[-eps, eps]``; then update
    the masks ``m`` with SGD (momentum 0.9) on ``alpha L(m) + (1 - alpha) L(m + delta, 1
    + xi)`` and clip to [0, 1]. ``unet`` is not modified (hooks are removed afterwards).
    ``use_cache`` keeps the masks in the cache
    (:func:`baddiff_core.defenses.cached.cached_masks`), keyed as
    :func:`~baddiff_core.defenses.removal.remove_backdoor` keys a repair.
    """
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    eps = check_float(
        "eps", eps, at_least=0, at_most=1, meaning="the perturbation budget"
    )
    alpha = check_float(
        "alpha", alpha, at_least=0, at_most=1, meaning="the unperturbed loss's weight"
    )
    mask_lr = check_float("mask_lr", mask_lr, above=0)
    images = check_clean_images(unet, clean_images)
    settings = dict(
        eps=eps,
        alpha=alpha,
        steps=steps,
        batch_size=batch_size,
        mask_lr=mask_lr,
        seed=seed,
    )
    if use_cache:
        # Imported here: the cache layer sits above this module and imports it.
        from baddiff_core.defenses.cached import cached_masks

        return cached_masks(unet, scheduler, images, progress=progress, **settings)
    return _adversarial_neuron_masks(
        unet, scheduler, images, progress=progress, **settings
    )


def _adversarial_neuron_masks(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int,
    mask_lr: float,
    seed: int,
    progress: bool,
) -> ChannelMasks:
    """The mask learning itself, on checked inputs (see
    :func:`adversarial_neuron_masks`)."""
    parameter = next(unet.parameters())
    device = parameter.device
    images = images.to(device, parameter.dtype)
    generator = torch.Generator().manual_seed(seed)
    convolutions = _prunable_convolutions(unet)
    hooks = _ChannelPerturbation(convolutions, device)
    mask_optimizer = torch.optim.SGD(
        list(hooks.masks.values()), lr=mask_lr, momentum=0.9
    )
    losses = []
    began = time.perf_counter()

    def clean_loss(x: torch.Tensor, step_seed: int) -> torch.Tensor:
        # The same t and eps for the perturbed and unperturbed loss of one step.
        return diffusion_loss(
            unet,
            scheduler,
            x,
            torch.zeros_like(x),
            generator=torch.Generator(device=device).manual_seed(step_seed),
        )

    try:
        with frozen(unet):
            for step in tqdm(
                range(steps),
                desc="adversarial neuron masks",
                disable=not progress,
                leave=False,
            ):
                x = images[
                    torch.randint(
                        0, len(images), (batch_size,), generator=generator
                    ).to(device)
                ]
                step_seed = seed * 1_000_003 + step
                if eps > 0:
                    hooks.perturb = True
                    perturbations = [*hooks.delta.values(), *hooks.xi.values()]
                    with torch.no_grad():
                        for p in perturbations:
                            p.copy_(
                                (torch.rand(p.shape, generator=generator) * 2 - 1)
                                .mul_(eps)
                                .to(device)
                            )
                    grads = torch.autograd.grad(clean_loss(x, step_seed), perturbations)
                    with torch.no_grad():
                        for p, g in zip(perturbations, grads):
                            p.add_(eps * g.sign()).clamp_(-eps, eps)
                hooks.perturb = False
                natural = clean_loss(x, step_seed)
                objective = alpha * natural
                if eps > 0:
                    hooks.perturb = True
                    objective = objective + (1 - alpha) * clean_loss(x, step_seed)
                    hooks.perturb = False
                mask_optimizer.zero_grad(set_to_none=True)
                objective.backward()
                mask_optimizer.step()
                with torch.no_grad():
                    for m in hooks.masks.values():
                        m.clamp_(0, 1)
                losses.append(objective.detach())
    finally:
        hooks.remove()
    masks = {name: m.detach().cpu() for name, m in hooks.masks.items()}
    return ChannelMasks(
        masks, torch.stack(losses).float().cpu().tolist(), time.perf_counter() - began
    )


def prune_channels(
    unet: UNet2DModel, masks: ChannelMasks, *, fraction: float
) -> tuple[UNet2DModel, int]:
    """A copy of ``unet`` with the ``fraction`` of channels of lowest mask pruned (their
    convolution weights set to zero; biases kept, as ANP's ``m = 0``). Returns ``(pruned
    copy, channels pruned)``."""
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1) or math.isnan(
        fraction
    ):
        raise ValueError(
            f"fraction must be in [0, 1) (the share of channels to prune), got fraction={fraction!r}"
        )
    pruned = copy.deepcopy(unet).eval()
    convolutions = _prunable_convolutions(pruned)
    if set(convolutions) != set(masks.masks):
        raise ValueError(
            "masks were learnt on a model with other convolutions than this one"
        )
    count = int(round(fraction * masks.num_channels))
    if count == 0:
        return pruned, 0
    flat = masks.flat()
    cutoff = flat.sort().values[count - 1]
    # Every channel below the cutoff is pruned; channels tied at it fill the rest of
    # ``count`` in module order (so a lower mask is never skipped for a tied one).
    ties_left = count - int((flat < cutoff).sum())
    pruned_so_far = 0
    with torch.no_grad():
        for name, conv in convolutions.items():
            m = masks.masks[name]
            tied = m == cutoff
            tied &= torch.cumsum(tied.int(), 0) <= ties_left
            ties_left -= int(tied.sum())
            chosen = (m < cutoff) | tied
            conv.weight[chosen.to(conv.weight.device)] = 0
            pruned_so_far += int(chosen.sum())
    return pruned, pruned_so_far
