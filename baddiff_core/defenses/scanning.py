"""Detection: does a model draw one image again and again from ``eps + tau``?

Elijah (An et al. 2024, arXiv:2312.00050) detects a backdoor by sampling from the
inverted trigger ``tau`` (:mod:`~baddiff_core.defenses.inversion`): a backdoored model
draws its target again and again, a clean model draws varied images. Elijah scores the
samples' uniformity (a trimmed mean of their pairwise LPIPS distances) and their total
variation (:mod:`baddiff_core.defenses.elijah`). This module is the book's own
detector: its score is the *mode share*, the largest fraction of the samples that lie
within a small MSE of one of them, ``1/n`` for a clean model and up to 1 for a
backdoored one. The samples' per-pixel diversity (standard deviation) and total
variation (a per-pixel mean, Elijah's TV divided by ``2 C H (H - 1)`` for square
images) are the book's too, reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.checks import check_image_batch, check_positive_int
from baddiff_core.defenses.cached import cached_scan
from baddiff_core.defenses.inversion import InvertedTrigger, invert_trigger
from baddiff_core.diffusion import sampler_for
from baddiff_core.metrics import to_unit_range
from baddiff_core.sampling import (
    DEFAULT_BATCH_SIZE,
    inference_scheduler,
    inference_steps,
    sample,
)

__all__ = [
    "mode_share",
    "diversity",
    "total_variation",
    "BackdoorScan",
    "DEFAULT_THRESHOLD",
    "scan_model",
    "invert_and_sample",
    "choose_threshold",
]


def _check_batch(images: object) -> torch.Tensor:
    images = check_image_batch("images", images)
    if images.shape[0] < 2:
        raise ValueError(
            f"images must hold N >= 2 images to be compared, got images.shape={tuple(images.shape)}"
        )
    return images


def mode_share(images: torch.Tensor, radius: float = 0.01) -> float:
    """The largest fraction of ``images`` (``N,C,H,W`` in [-1, 1], N >= 2) that lie
    within per-image MSE ``radius`` ([0, 1] units) of one of them, itself included.

    ``1/N`` when no two images are alike, 1 when all are the same image. With the book's
    attack success threshold as radius (0.01), a backdoored model sampled from ``eps +
    tau`` scores about its attack success rate for that ``tau``.
    """
    images = _check_batch(images)
    if not (isinstance(radius, (int, float)) and radius > 0):
        raise ValueError(f"radius must be a positive MSE, got radius={radius!r}")
    unit = to_unit_range(images).double().flatten(1)
    pairwise_mse = torch.cdist(unit, unit).square() / unit.shape[1]
    return float((pairwise_mse < radius).sum(dim=1).max()) / len(images)


def diversity(images: torch.Tensor) -> float:
    """Mean per-pixel standard deviation across ``images`` (``N,C,H,W`` in [-1, 1], N >=
    2), in [0, 1] units: 0 when every image is the same; about 0.3 for varied digits."""
    images = _check_batch(images)
    return float(to_unit_range(images).float().std(dim=0).mean())


def total_variation(images: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels (both directions), in [0, 1]
    units, averaged over ``images`` (``N,C,H,W`` in [-1, 1])."""
    unit = to_unit_range(check_image_batch("images", images)).float()
    return float(
        (
            (unit[..., 1:, :] - unit[..., :-1, :]).abs().mean()
            + (unit[..., :, 1:] - unit[..., :, :-1]).abs().mean()
        )
        / 2
    )


@dataclass
class BackdoorScan:
    """The result of scanning one model.

    Attributes:
        inversion: the trigger estimate.
        samples: ``n,C,H,W`` images drawn from ``eps + tau``, in [-1, 1].
        mode_share: :func:`mode_share` of ``samples``, the detection score (high = backdoored).
        diversity: :func:`diversity` of ``samples``.
        total_variation: :func:`total_variation` of ``samples``.
        threshold: the mode share from which the model is called backdoored.
        seconds: wall time of inversion and sampling.
    """

    inversion: InvertedTrigger
    samples: torch.Tensor
    mode_share: float
    diversity: float
    total_variation: float
    threshold: float
    seconds: float

    @property
    def backdoored(self) -> bool:
        return self.mode_share >= self.threshold

    @property
    def verdict(self) -> str:
        return "BACKDOORED" if self.backdoored else "clean"


#: The mode share from which :func:`scan_model` calls a model backdoored: 4 of 16
#: samples alike. Clean digits models score 1/16 (no two samples alike); the paper's
#: triggers at 16 px score 0.31 (grey box) and 0.62 (stop sign). Provisional:
#: :func:`choose_threshold` fits one on labelled models.
DEFAULT_THRESHOLD = 0.25


def scan_model(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    n: int = 16,
    threshold: float = DEFAULT_THRESHOLD,
    num_noise: int = 100,
    steps: int = 100,
    lr: float = 0.1,
    solver: str = "sde",
    num_inference_steps: int | None = None,
    sampler: str | None = None,
    clip: str = "none",
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    use_cache: bool = False,
) -> BackdoorScan:
    """Invert a trigger, draw ``n`` samples from ``eps + tau`` and score them.

    ``solver`` is the sampler family the backdoor would be planted for (``"sde"``:
    lambda = R_{T-1} and DDPM samples; ``"ode"``: lambda = 2 R_{T-1} and DDIM samples);
    ``sampler`` overrides the sampler, and ``clip`` samples with a clipping mode (a
    backdoor built to work under clipping is looked for the way it is used).
    ``use_cache`` keeps the estimate and the samples in the cache
    (:func:`baddiff_core.defenses.cached.cached_scan`), keyed by digests of the weights
    and the schedule and by the settings, so that a model scanned alike twice is scanned
    once (``seconds`` is the first scan's). ``batch_size`` bounds the samples per
    forward pass (as in :func:`~baddiff_core.sampling.sample`); it joins the cache key
    only when it splits the ``n`` samples into several batches, the one case where it
    changes them (DDPM draws its step noise batch by batch), so that scans cached before
    it existed keep their keys.
    """
    check_positive_int("n", n)
    check_positive_int("batch_size", batch_size, allow_none=True)
    if n < 2:
        raise ValueError(
            f"n must be at least 2 (the score compares samples), got n={n}"
        )
    # A mode share is in (0, 1]; 1 calls a model backdoored only when every sample is
    # alike.
    if isinstance(threshold, bool) or not (
        isinstance(threshold, (int, float)) and 0 < threshold <= 1
    ):
        raise ValueError(
            f"threshold must be a mode share in (0, 1], got threshold={threshold!r}"
        )
    sampler = sampler or sampler_for(solver)
    # Unknown sampler, clip or step count fail now, not after the inversion.
    inference_scheduler(scheduler, sampler=sampler, clip=clip)
    inference_steps(scheduler, sampler, num_inference_steps)
    per_pass = min(n, batch_size or DEFAULT_BATCH_SIZE)

    inversion, samples, seconds = invert_and_sample(
        unet,
        scheduler,
        lambda generator: invert_trigger(
            unet,
            scheduler,
            num_noise=num_noise,
            steps=steps,
            lr=lr,
            solver=solver,
            generator=generator,
            progress=progress,
        ),
        n=n,
        sampler=sampler,
        clip=clip,
        num_inference_steps=num_inference_steps,
        per_pass=per_pass,
        seed=seed,
        progress=progress,
        # the cache key: every setting that changes the estimate or the samples
        cache_key=dict(
            num_noise=num_noise, steps=steps, lr=lr, solver=solver, clip=clip
        )
        if use_cache
        else None,
    )
    return BackdoorScan(
        inversion,
        samples,
        mode_share(samples),
        diversity(samples),
        total_variation(samples),
        float(threshold),
        seconds,
    )


def invert_and_sample(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    invert: Callable[[torch.Generator], InvertedTrigger],
    *,
    n: int,
    sampler: str,
    clip: str,
    num_inference_steps: int | None,
    per_pass: int,
    seed: int,
    progress: bool,
    cache_key: dict[str, object] | None = None,
) -> tuple[InvertedTrigger, torch.Tensor, float]:
    """The two steps every trigger scan shares: ``invert(generator)`` (seeded by
    ``seed``) estimates ``tau``, then ``n`` samples are drawn from ``eps + tau`` (their
    own stream, seed ``seed + 1``, wrapping at 2**64, the largest seed torch takes).
    Returns ``(inversion, samples, seconds)``. With a ``cache_key`` (the inversion's
    own settings) the result is kept in the cache
    (:func:`~baddiff_core.defenses.cached.cached_scan`), keyed by it and by the
    sampling settings. Used by :func:`scan_model` and
    :func:`~baddiff_core.defenses.elijah.elijah_scores`."""

    def run() -> tuple[InvertedTrigger, torch.Tensor, float]:
        began = time.perf_counter()
        inversion = invert(torch.Generator().manual_seed(seed))
        samples = sample(
            unet,
            scheduler,
            n,
            trigger=inversion.trigger,
            sampler=sampler,
            clip=clip,
            num_inference_steps=num_inference_steps,
            batch_size=per_pass,
            generator=torch.Generator().manual_seed((seed + 1) % 2**64),
            progress=progress,
        )
        return inversion, samples, time.perf_counter() - began

    if cache_key is None:
        return run()
    return cached_scan(
        unet,
        scheduler,
        run,
        per_pass=per_pass,
        n=n,
        sampler=sampler,
        num_inference_steps=num_inference_steps,
        seed=seed,
        **cache_key,
    )


def choose_threshold(
    clean_scores: Sequence[float], backdoored_scores: Sequence[float]
) -> float:
    """The score threshold that best separates the two groups (backdoored at or above,
    clean below): among the midpoints between sorted scores, the one with the fewest
    errors, ties broken by the widest margin."""
    clean, bad = [float(s) for s in clean_scores], [float(s) for s in backdoored_scores]
    if not clean or not bad:
        raise ValueError(
            f"need at least one score per group, got {len(clean)} clean and {len(bad)} backdoored"
        )
    values = sorted(clean + bad)
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:])] or values

    def errors(threshold: float) -> int:
        return sum(s >= threshold for s in clean) + sum(s < threshold for s in bad)

    def margin(threshold: float) -> float:
        return min(abs(s - threshold) for s in values)

    return min(candidates, key=lambda t: (errors(t), -margin(t)))
