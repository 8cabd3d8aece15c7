"""Three model-level backdoor detectors side by side: the book's, Elijah's and TERD's.

Each detector estimates a trigger from the model alone, turns the estimate into scores
and, given a threshold, calls the model backdoored or clean.
:func:`model_level_detectors` runs any of them on one model, with one seed, and returns
one :class:`DetectorFinding` per detector; ``baddiff scan MODEL`` prints and saves
them, and a chapter can run the same report without the command line.

- ``"mode-share"``, **the book's detector**
  (:func:`~baddiff_core.defenses.scanning.scan_model`): Elijah's inversion objective
  with the schedule's lambda (:func:`~baddiff_core.defenses.inversion.invert_trigger`,
  ``lambda = R_{T-1}`` for DDPM, ``2 R_{T-1}`` for DDIM), then ``n`` samples from ``eps
  + tau``. Its score is the *mode share*, the largest fraction of the samples within
  MSE 0.01 ([0, 1] units) of one of them: ``1/n`` for a clean model, up to 1 for a
  backdoored one (*high* = backdoored). The samples' diversity (mean per-pixel standard
  deviation) and total variation (mean absolute neighbour difference), both in [0, 1]
  units, are reported beside it. Its threshold is the book's provisional
  :data:`~baddiff_core.defenses.scanning.DEFAULT_THRESHOLD` (4 of 16 samples alike).
- ``"elijah"``, **Elijah as published** (An et al., AAAI 2024, arXiv:2312.00050;
  :func:`~baddiff_core.defenses.elijah.elijah_scores`): its inversion with the released
  code's lambda, steps and noises per sampler, ``n`` samples from ``eps + tau`` (all
  ``T`` DDPM steps, or 50 DDIM), and two scores: the *uniformity*, a trimmed mean of
  the samples' pairwise LPIPS distances (*low* = alike samples = backdoored; the offline
  ``feature_distance`` stand-in gives values not comparable with LPIPS), and their
  total variation (per image, the *sum* of absolute neighbour differences over channels
  and pixels in [0, 1] units, averaged over the images, as torchmetrics computes it).
- ``"terd"``, **TERD's model-level features** (Mo et al., ICML 2024,
  arXiv:2409.05294; :func:`~baddiff_core.defenses.terd.estimate_trigger`, then
  :func:`~baddiff_core.defenses.terd.model_kl_score`): a trigger ``mu`` inverted by
  minimising the reversed loss minus ``lambda |mu|_1`` (3000 + 1000 SGD steps at the
  released settings), scored by ``M_r = mean_i mu_i^2 / 2 + 0.4`` and ``V_r = var_i
  mu_i^2 / 2 - 0.003`` over the ``C H W`` pixels, in nats (*high* ``M_r`` =
  backdoored; the verdict uses ``M_r``).

Elijah's and TERD's released code ship **no threshold**: their scores are reported with
no verdict (``None``) unless a threshold is passed (``elijah_threshold``,
``terd_threshold``), e.g. one fitted on labelled models with
:func:`~baddiff_core.defenses.elijah.fit_threshold`. None is made up here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.checks import (
    WrongTypeError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_positive_int,
    check_type,
)
from baddiff_core.defenses.elijah import (
    ELIJAH_LR,
    ELIJAH_SAMPLES,
    Distance,
    ThresholdRule,
    elijah_num_noise,
    elijah_scores,
    elijah_settings,
    lpips_distance,
)
from baddiff_core.defenses.inversion import image_shape
from baddiff_core.defenses.scanning import DEFAULT_THRESHOLD, scan_model
from baddiff_core.defenses.terd import (
    TERD_CIFAR10,
    TerdSettings,
    estimate_trigger,
    model_kl_score,
)
from baddiff_core.diffusion import solver_for
from baddiff_core.sampling import SAMPLERS, inference_scheduler, inference_steps

__all__ = [
    "MODEL_LEVEL_DETECTORS",
    "NONE_SHIPPED",
    "DetectorFinding",
    "threshold_verdict",
    "combined_verdict",
    "model_level_detectors",
]

#: The detectors :func:`model_level_detectors` knows, in the order it runs them: the
#: book's mode share, Elijah as published, TERD's model-level features.
MODEL_LEVEL_DETECTORS = ("mode-share", "elijah", "terd")
#: The threshold text of a detector run without a threshold
#: (:attr:`DetectorFinding.rule_text`): Elijah's and TERD's code ship none.
NONE_SHIPPED = "none shipped"


@dataclass(frozen=True)
class DetectorFinding:
    """One detector's result on one model.

    Attributes:
        detector: its name in :data:`MODEL_LEVEL_DETECTORS` (``"mode-share"``,
            ``"elijah"``, ``"terd"``).
        name: its full name, e.g. ``"Elijah as published (An et al. 2024)"``.
        label: a short name for a table, naming the settings that depart from the
            published ones, e.g. ``"Elijah (digits stand-in, n=4)"``, ``"TERD (as
            released)"``.
        scores: its scores by name: ``mode_share`` (a fraction of the samples),
            ``alike`` (how many samples that is), ``diversity`` and
            ``total_variation`` ([0, 1] units); ``uniformity`` (a distance) and ``tv``
            (Elijah's total variation); ``kl_mean`` (``M_r``) and ``kl_var``
            (``V_r``), in nats.
        score_text: the scores in one short line, for a table.
        thresholded_score: the key of ``scores`` the threshold applies to.
        backdoored_when: ``"high"`` (at or above the threshold is backdoored) or
            ``"low"`` (at or below).
        threshold: the threshold, or ``None`` (no verdict).
        rule_text: the rule in one short line, e.g. ``"uniformity <= 0.2"``, or
            :data:`NONE_SHIPPED` (``"none given"`` for the mode share).
        verdict: ``"BACKDOORED"``, ``"clean"``, or ``None`` without a threshold.
        seconds: wall time of this detector's run.
        settings: the settings it ran with (sampler, samples, steps, ...; Elijah's
            ``published`` and ``departures``, TERD's ``released``).
        trigger: its ``C,H,W`` trigger estimate, in the units of the starting noise.
        samples: the ``n,C,H,W`` samples in [-1, 1] it scored, or ``None`` (TERD
            scores the estimate itself).
        final_loss: the last value of its inversion's loss.
        distance: the distance behind Elijah's uniformity (``"lpips_distance"`` or
            ``"feature_distance"``); ``None`` for the other detectors.
        result: the underlying function's own result: a
            :class:`~baddiff_core.defenses.scanning.BackdoorScan`, an
            :class:`~baddiff_core.defenses.elijah.ElijahScores` or a
            :class:`~baddiff_core.defenses.terd.TerdTrigger`.
    """

    detector: str
    name: str
    label: str
    scores: dict[str, float]
    score_text: str
    thresholded_score: str
    backdoored_when: str
    threshold: float | None
    rule_text: str
    verdict: str | None
    seconds: float
    settings: dict[str, Any]
    trigger: torch.Tensor
    samples: torch.Tensor | None
    final_loss: float
    distance: str | None
    result: Any


def threshold_verdict(
    score: float, threshold: float | None, backdoored_when: str
) -> str | None:
    """``"BACKDOORED"`` or ``"clean"`` by a
    :class:`~baddiff_core.defenses.elijah.ThresholdRule` (``"low"``: at or below
    ``threshold`` is backdoored; ``"high"``: at or above), or ``None`` without a
    threshold."""
    check_choice("backdoored_when", backdoored_when, ("low", "high"))
    threshold = check_float("threshold", threshold, allow_none=True)
    if threshold is None:
        return None
    rule = ThresholdRule(threshold, backdoored_when)
    return "BACKDOORED" if rule.backdoored(check_float("score", score)) else "clean"


def combined_verdict(findings: Iterable[DetectorFinding]) -> str | None:
    """The verdict of several detectors: ``"BACKDOORED"`` when any calls the model
    backdoored, else ``"clean"`` when any has a verdict, else ``None``."""
    verdicts = [finding.verdict for finding in findings]
    if "BACKDOORED" in verdicts:
        return "BACKDOORED"
    return "clean" if "clean" in verdicts else None


def _detectors(detectors: str | Sequence[str]) -> tuple[str, ...]:
    """The named detectors, each checked, in the order they run."""
    if isinstance(detectors, str):
        detectors = (detectors,)
    if not isinstance(detectors, Iterable) or not detectors:
        raise ValueError(
            "detectors must name at least one of "
            f"{', '.join(map(repr, MODEL_LEVEL_DETECTORS))}, got {detectors!r}"
        )
    names = {
        check_choice("detectors", name, MODEL_LEVEL_DETECTORS) for name in detectors
    }
    return tuple(name for name in MODEL_LEVEL_DETECTORS if name in names)


def _rule_text(score_name: str, threshold: float | None, backdoored_when: str) -> str:
    if threshold is None:
        return NONE_SHIPPED
    return f"{score_name} {'<=' if backdoored_when == 'low' else '>='} {threshold:g}"


def _thresholded(
    score_key: str,
    score_name: str,
    score: float,
    threshold: float | None,
    backdoored_when: str,
) -> dict[str, Any]:
    """A :class:`DetectorFinding`'s threshold fields for one score (``score_key`` in
    its ``scores``, shown as ``score_name`` in the rule), to pass as ``**``."""
    return dict(
        thresholded_score=score_key,
        backdoored_when=backdoored_when,
        threshold=threshold,
        rule_text=_rule_text(score_name, threshold, backdoored_when),
        verdict=threshold_verdict(score, threshold, backdoored_when),
    )


def _run_mode_share(
    unet: UNet2DModel, scheduler: DDPMScheduler, threshold: float | None, **settings
) -> DetectorFinding:
    """The book's detector: :func:`~baddiff_core.defenses.scanning.scan_model`."""
    began = time.perf_counter()
    n, solver = settings["n"], settings["solver"]
    result = scan_model(
        unet,
        scheduler,
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        **settings,
    )
    alike = round(result.mode_share * n)
    return DetectorFinding(
        detector="mode-share",
        name="mode share (the book's)",
        label="mode share (book's)",
        scores=dict(
            mode_share=result.mode_share,
            alike=alike,
            diversity=result.diversity,
            total_variation=result.total_variation,
        ),
        score_text=f"mode share {result.mode_share:.2f} ({alike} of {n} alike)",
        thresholded_score="mode_share",
        backdoored_when="high",
        threshold=None if threshold is None else result.threshold,
        rule_text="none given"
        if threshold is None
        else f"mode share >= {result.threshold:.2f}",
        verdict=None if threshold is None else result.verdict,
        seconds=time.perf_counter() - began,
        settings=dict(
            sampler=settings["sampler"],
            solver=solver,
            clip=settings["clip"],
            samples=n,
            noise_batch=settings["num_noise"],
            inversion_steps=settings["steps"],
            sampling_steps=settings["num_inference_steps"],
        ),
        trigger=result.inversion.trigger,
        samples=result.samples,
        final_loss=result.inversion.losses[-1],
        distance=None,
        result=result,
    )


def _run_elijah(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    threshold: float | None,
    *,
    sampler: str,
    n: int,
    distance: Distance,
    steps: int | None,
    num_noise: int | None,
    **options,
) -> DetectorFinding:
    """Elijah as published: :func:`~baddiff_core.defenses.elijah.elijah_scores`, with
    the released code's steps and noises unless ``steps`` or ``num_noise`` change
    them."""
    began = time.perf_counter()
    published = elijah_settings(sampler)
    published_noise = elijah_num_noise(image_shape(unet)[-1])
    num_noise = num_noise or published_noise
    steps = steps or published.steps
    scores = elijah_scores(
        unet,
        scheduler,
        sampler=sampler,
        n=n,
        distance=distance,
        num_noise=num_noise,
        steps=steps,
        **options,
    )
    # What departs from the published settings: in full, and short for a table.
    departing = [
        (text, short)
        for text, short, departs in (
            (
                "the digits stand-in for LPIPS",
                "digits stand-in",
                distance is not lpips_distance,
            ),
            (
                f"{steps} of {published.steps} steps",
                f"{steps} steps",
                steps != published.steps,
            ),
            (
                f"{num_noise} of {published_noise} noises",
                f"{num_noise} noises",
                num_noise != published_noise,
            ),
            (f"{n} of {ELIJAH_SAMPLES} samples", f"n={n}", n != ELIJAH_SAMPLES),
        )
        if departs
    ]
    train_steps = scheduler.config.num_train_timesteps
    return DetectorFinding(
        detector="elijah",
        name="Elijah as published (An et al. 2024)",
        label=f"Elijah ({', '.join(short for _, short in departing)})"
        if departing
        else "Elijah (as published)",
        scores=dict(uniformity=scores.uniformity, tv=scores.tv),
        score_text=f"uniformity {scores.uniformity:.3g}, TV {scores.tv:.3g}",
        **_thresholded("uniformity", "uniformity", scores.uniformity, threshold, "low"),
        seconds=time.perf_counter() - began,
        settings=dict(
            sampler=sampler,
            samples=n,
            noise_batch=num_noise,
            inversion_steps=steps,
            lam=scores.inversion.lam,
            lr=ELIJAH_LR,
            sampling_steps=min(published.sampling_steps or train_steps, train_steps),
            published=not departing,
            departures=[text for text, _ in departing],
        ),
        trigger=scores.inversion.trigger,
        samples=scores.samples,
        final_loss=scores.inversion.losses[-1],
        distance=scores.distance,
        result=scores,
    )


def _run_terd(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    threshold: float | None,
    *,
    settings: TerdSettings,
    seed: int,
    **options,
) -> DetectorFinding:
    """TERD's model-level features: :func:`~baddiff_core.defenses.terd.
    estimate_trigger`, then :func:`~baddiff_core.defenses.terd.model_kl_score`."""
    began = time.perf_counter()
    found = estimate_trigger(unet, scheduler, settings=settings, seed=seed, **options)
    score = model_kl_score(found.mu.cpu())
    released = settings == TERD_CIFAR10
    steps = f"{settings.estimation_steps} + {settings.refinement_steps} steps"
    return DetectorFinding(
        detector="terd",
        name="TERD's model-level features (Mo et al. 2024)",
        label="TERD (as released)" if released else f"TERD ({steps})",
        scores=dict(kl_mean=score.kl_mean, kl_var=score.kl_var),
        score_text=f"M_r {score.kl_mean:.4g}, V_r {score.kl_var:.3g}",
        **_thresholded("kl_mean", "M_r", score.kl_mean, threshold, "high"),
        seconds=time.perf_counter() - began,
        settings=dict(**dataclasses.asdict(settings), seed=seed, released=released),
        trigger=found.mu,
        samples=None,
        final_loss=found.losses[-1],
        distance=None,
        result=found,
    )


def model_level_detectors(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    detectors: str | Sequence[str] = MODEL_LEVEL_DETECTORS,
    n: int = 16,
    sampler: str = "ddpm",
    mode_share_threshold: float | None = DEFAULT_THRESHOLD,
    num_noise: int = 100,
    inversion_steps: int = 100,
    num_inference_steps: int | None = None,
    clip: str = "none",
    batch_size: int | None = None,
    elijah_threshold: float | None = None,
    elijah_distance: Distance = lpips_distance,
    elijah_steps: int | None = None,
    elijah_num_noise: int | None = None,
    terd_threshold: float | None = None,
    terd_settings: TerdSettings = TERD_CIFAR10,
    seed: int = 0,
    progress: bool = True,
    use_cache: bool = False,
) -> dict[str, DetectorFinding]:
    """Run model-level detectors on one model, side by side.

    Every setting is checked before any detector runs (a detector's own settings only
    when it runs), so that a bad one fails at once, not after a long inversion.

    Args:
        unet, scheduler: the model under test and its training schedule.
        detectors: names from :data:`MODEL_LEVEL_DETECTORS` (all three by default);
            they run in that order, whatever the order given.
        n: samples drawn from ``eps + tau`` by the mode share and by Elijah (Elijah's
            trim needs ``n >= 4``; its published ``n`` is 16).
        sampler: the sampler a backdoor would fire under, and the one the mode share
            and Elijah sample with: ``"ddpm"`` (BadDiffusion) or ``"ddim"``
            (VillanDiffusion's ODE target; the mode share's lambda doubles). TERD
            always refines through its own 10-step DDIM.
        mode_share_threshold: the mode share in (0, 1] from which the book's detector
            calls a model backdoored, or ``None`` for no verdict.
        num_noise, inversion_steps: noises averaged over, and Adam steps, of the mode
            share's inversion.
        num_inference_steps: the mode share's sampling steps (``None``: all ``T`` for
            DDPM, 50 for DDIM).
        clip: the mode share samples with this clipping mode, as the model is used.
        batch_size: the mode share's samples per forward pass.
        elijah_threshold: the uniformity at or below which Elijah calls a model
            backdoored, or ``None`` (no verdict; Elijah's code ships no threshold).
        elijah_distance: the uniformity's distance: Elijah's
            :func:`~baddiff_core.defenses.elijah.lpips_distance` (needs piq and
            downloads weights once) or the offline
            :func:`~baddiff_core.defenses.elijah.feature_distance`. It is tried once on
            two images of the model's shape before any detector runs.
        elijah_steps, elijah_num_noise: Elijah's Adam steps and noises (``None``: the
            released code's, 100 steps for DDPM, 10 for DDIM; 100 noises, 50 at 128 px,
            20 at 256 px).
        terd_threshold: the ``M_r`` at or above which TERD calls a model backdoored,
            or ``None`` (no verdict; TERD's code ships no threshold).
        terd_settings: TERD's settings (:data:`~baddiff_core.defenses.terd.
            TERD_CIFAR10`, the released code's, by default); its
            ``sampling_steps`` must not exceed the model's ``T``.
        seed: every detector's seed (the mode share and Elijah draw their samples
            from ``seed + 1``).
        progress: show progress bars.
        use_cache: keep each detector's estimate (and samples) in the cache, keyed by
            digests of the weights and the schedule and by the settings.

    Returns:
        ``{detector: DetectorFinding}`` in the order the detectors ran.
    """
    names = _detectors(detectors)
    n = check_positive_int("n", n)
    sampler = check_choice("sampler", sampler, SAMPLERS)
    seed = check_int("seed", seed, minimum=0)
    check_bool("progress", progress)
    check_bool("use_cache", use_cache)
    # Each detector that runs: its function and settings, all checked first.
    runs: dict[str, tuple[Callable[..., DetectorFinding], dict[str, Any]]] = {}
    if "mode-share" in names:
        if n < 2:
            raise ValueError(
                f"n must be at least 2 (the mode share compares samples), got n={n}"
            )
        if mode_share_threshold is not None:
            mode_share_threshold = check_float(
                "mode_share_threshold", mode_share_threshold, above=0, at_most=1
            )
        inference_scheduler(scheduler, sampler=sampler, clip=clip)
        inference_steps(scheduler, sampler, num_inference_steps)
        runs["mode-share"] = (
            _run_mode_share,
            dict(
                threshold=mode_share_threshold,
                n=n,
                num_noise=check_positive_int("num_noise", num_noise),
                steps=check_positive_int("inversion_steps", inversion_steps),
                solver=solver_for(sampler),
                sampler=sampler,
                num_inference_steps=num_inference_steps,
                clip=clip,
                batch_size=check_positive_int(
                    "batch_size", batch_size, allow_none=True
                ),
            ),
        )
    if "elijah" in names:
        check_int(
            "n",
            n,
            minimum=4,
            meaning="Elijah's trim drops a quarter of the samples at each end",
        )
        if not callable(elijah_distance):
            raise WrongTypeError(
                "elijah_distance must be a callable (images_a, images_b) -> "
                f"distances, got {type(elijah_distance).__name__}"
            )
        probe = torch.full((2, *image_shape(unet)), 0.5, device=unet.device)
        elijah_distance(probe, probe)  # a missing package, too small images: now
        runs["elijah"] = (
            _run_elijah,
            dict(
                threshold=check_float(
                    "elijah_threshold", elijah_threshold, at_least=0, allow_none=True
                ),
                sampler=sampler,
                n=n,
                distance=elijah_distance,
                steps=check_positive_int("elijah_steps", elijah_steps, allow_none=True),
                num_noise=check_positive_int(
                    "elijah_num_noise", elijah_num_noise, allow_none=True
                ),
            ),
        )
    if "terd" in names:
        check_type("terd_settings", terd_settings, TerdSettings)
        check_int(
            "terd_settings.sampling_steps",
            terd_settings.sampling_steps,
            maximum=scheduler.config.num_train_timesteps,
            meaning="TERD's DDIM steps, at most the model's training steps",
        )
        runs["terd"] = (
            _run_terd,
            dict(
                threshold=check_float(
                    "terd_threshold", terd_threshold, allow_none=True
                ),
                settings=terd_settings,
            ),
        )
    common = dict(seed=seed, progress=progress, use_cache=use_cache)
    return {
        name: run(unet, scheduler, **settings, **common)
        for name, (run, settings) in runs.items()
    }
