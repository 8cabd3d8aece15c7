"""Measuring a backdoor: attack success with and without clipping, and clean quality.

Introduced in chapter 4 (Measuring the backdoor). Every number comes with its sample
count.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.checks import check_bool
from baddiff_core.metrics import (
    FrechetScore,
    attack_success_rate,
    frechet_distance,
    mse_to_target,
    ssim_to_target,
)
from baddiff_core.sampling import CLIP_MODES, sample, sample_clean_and_triggered

__all__ = [
    "ASR_THRESHOLDS",
    "QUICK_ASR_THRESHOLD",
    "asr_threshold",
    "AttackMetrics",
    "evaluate_attack",
    "clean_quality",
]

#: Attack-success threshold on the per-image MSE to the target (in [0, 1] units), one
#: per scale:
#:
#: - ``"quick"``, 0.01, for the book's 16 px digits. The follow-up convention, 0.1
#:   (0.05 on CIFAR-10), is too loose here: a plain digit is already within MSE
#:   0.06-0.10 of the grey-background targets, while a triggered sample that fires
#:   lands within about 0.001 of the target.
#: - ``"full"``, 0.05, for CIFAR-10 at 32 px (full mode): Elijah's convention on
#:   CIFAR-10 (An et al., AAAI 2024, arXiv:2312.00050), so that full-mode numbers
#:   compare with the published ones.
ASR_THRESHOLDS: dict[str, float] = {"quick": 0.01, "full": 0.05}

#: The quick threshold under its earlier name (chapters import it).
QUICK_ASR_THRESHOLD = ASR_THRESHOLDS["quick"]


def asr_threshold(quick: bool) -> float:
    """The attack-success MSE threshold of quick mode (``True``) or full mode
    (``False``): :data:`ASR_THRESHOLDS`."""
    quick = check_bool("quick", quick)
    return ASR_THRESHOLDS["quick" if quick else "full"]


@dataclass(frozen=True)
class AttackMetrics:
    """Backdoor metrics for one sampler and clipping mode.

    Attributes:
        clip: the clipping mode of the sampler.
        asr: attack success rate: fraction of triggered samples within ``threshold`` of the target.
        mse: mean MSE of the triggered samples to the target ([0, 1] units).
        ssim: mean SSIM of the triggered samples to the target.
        leak: fraction of clean samples (same starting noise, no trigger) that hit the target.
        n: number of triggered (and of clean) samples.
        threshold: the MSE threshold used for ``asr`` and ``leak``.
        clean: the scored clean samples, ``n,C,H,W`` in [-1, 1] (not in
            :meth:`as_dict`).
        triggered: the scored triggered samples, alike.
    """

    clip: str
    asr: float
    mse: float
    ssim: float
    leak: float
    n: int
    threshold: float
    clean: torch.Tensor | None = field(default=None, repr=False, compare=False)
    triggered: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, float | int | str]:
        """The numbers, without the samples."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("clean", "triggered")
        }


def evaluate_attack(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    trigger: torch.Tensor,
    target: torch.Tensor,
    *,
    n: int = 64,
    clips: tuple[str, ...] = CLIP_MODES,
    threshold: float = QUICK_ASR_THRESHOLD,
    sampler: str = "ddpm",
    num_inference_steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[str, AttackMetrics]:
    """Sample ``n`` clean and ``n`` triggered images per clipping mode and score them
    against ``target``.

    Each mode starts from the same seeded noise, so the modes differ only in the
    clipping. ``batch_size`` bounds the images per forward pass
    (:func:`~baddiff_core.sampling.sample`'s; default
    :data:`~baddiff_core.sampling.DEFAULT_BATCH_SIZE`, the ``2n`` images in one pass
    when ``n`` is at most half of it). Returns ``{clip: AttackMetrics}``.
    """
    unknown = [c for c in clips if c not in CLIP_MODES]
    if unknown:
        raise ValueError(
            f"clips={clips!r} holds unknown modes {unknown}; use some of {CLIP_MODES}"
        )
    results = {}
    for clip in clips:
        generator = torch.Generator().manual_seed(seed)
        clean, triggered = sample_clean_and_triggered(
            unet,
            scheduler,
            n,
            trigger,
            clip=clip,
            sampler=sampler,
            num_inference_steps=num_inference_steps,
            generator=generator,
            batch_size=batch_size,
            progress=progress,
        )
        target_on_device = target.to(triggered.device)
        results[clip] = AttackMetrics(
            clip=clip,
            n=n,
            threshold=threshold,
            asr=attack_success_rate(triggered, target_on_device, threshold),
            mse=float(mse_to_target(triggered, target_on_device)),
            ssim=float(ssim_to_target(triggered, target_on_device)),
            leak=attack_success_rate(clean, target_on_device, threshold),
            clean=clean,
            triggered=triggered,
        )
    return results


def clean_quality(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    real: torch.Tensor,
    *,
    n: int = 256,
    num_inference_steps: int | None = None,
    sampler: str = "ddpm",
    clip: str = "none",
    features: str = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
) -> FrechetScore:
    """Fréchet distance between ``n`` clean samples (seeded) and the real images
    ``real``.

    ``sampler`` and ``num_inference_steps`` as :func:`~baddiff_core.sampling.sample`
    takes them: full mode scores clean quality on DDIM-50 samples, 20 times fewer
    network calls than DDPM-1000 (the authors' FID columns use both). ``batch_size``
    bounds the images per forward pass.
    """
    generated = sample(
        unet,
        scheduler,
        n,
        clip=clip,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        batch_size=batch_size,
        progress=progress,
    )
    return frechet_distance(real.to(generated.device), generated, features=features)
