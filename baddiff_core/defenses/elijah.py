"""Elijah as published: trigger inversion, uniformity and total variation.

Elijah (An et al., AAAI 2024, arXiv:2312.00050) with the settings of its authors'
released code (github.com/njuaplusplus/Elijah at a8b3422; ``BadDiffusion/
elijah_helper.py`` for the BadDiffusion/DDPM variant, ``VillanDiffusion/
elijah_helper_ddim.py`` for the DDIM/ODE one). The book's own detector stays beside
it: :func:`~baddiff_core.defenses.inversion.invert_trigger` and
:func:`~baddiff_core.defenses.scanning.scan_model`, scored by the *mode share*, a score
of this book's, not Elijah's. This module is the published pipeline:

1. :func:`elijah_inversion`: find ``tau`` minimising ``| lambda tau - mean_i
   eps_theta(eps_i + tau, T-1) |_1`` (L1 = mean absolute error over the pixels) with
   Adam from a fixed batch of noises, with the released code's lambda, start, step
   count and batch size per sampler family (:func:`elijah_settings`);
2. sample ``n = 16`` images from ``eps + tau`` (DDPM with all ``T`` steps, or
   deterministic DDIM with 50 steps for the ODE variant), no clipping;
3. score them: :func:`uniformity_score` (a trimmed mean of their pairwise LPIPS
   distances; low = alike images = backdoored) and :func:`tv_score` (their total
   variation, torchmetrics' ``TotalVariation(reduction="mean")``).

The released code stops at the two numbers per model: it ships no decision rule. The
paper reports detection accuracy from the scores; :func:`fit_threshold` fits a
threshold on *labelled* models (reusing
:func:`~baddiff_core.defenses.scanning.choose_threshold`), and
:func:`leave_one_out_accuracy` measures such a rule on models it was not fitted on.

LPIPS needs VGG16 and LPIPS weights that piq downloads (full mode only);
:func:`feature_distance` is the book's offline stand-in for it, built on the digits
network of :mod:`baddiff_core.features`. It is not LPIPS, and numbers computed with it
are not comparable with the paper's.
"""

from __future__ import annotations

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
    check_image_batch,
    check_int,
    check_positive_int,
    check_tensor,
)
from baddiff_core.defenses.inversion import (
    InvertedTrigger,
    descend_echo_loss,
    image_shape,
)
from baddiff_core.defenses.scanning import choose_threshold, invert_and_sample
from baddiff_core.metrics import MissingDependencyError, to_unit_range
from baddiff_core.sampling import DEFAULT_BATCH_SIZE, SAMPLERS

__all__ = [
    "ELIJAH_DDPM_LAMBDA",
    "ELIJAH_DDPM_STEPS",
    "ELIJAH_DDIM_LAMBDA",
    "ELIJAH_DDIM_STEPS",
    "ELIJAH_DDIM_SAMPLING_STEPS",
    "ELIJAH_LR",
    "ELIJAH_NUM_NOISE",
    "ELIJAH_NUM_NOISE_BY_SIZE",
    "ELIJAH_SAMPLES",
    "ELIJAH_TRIM_FRACTION",
    "ElijahSettings",
    "elijah_settings",
    "elijah_num_noise",
    "elijah_inversion",
    "trimmed_uniformity",
    "uniformity_score",
    "lpips_distance",
    "feature_distance",
    "tv_score",
    "ElijahScores",
    "elijah_scores",
    "ThresholdRule",
    "fit_threshold",
    "leave_one_out_accuracy",
]

#: lambda of Elijah's BadDiffusion/DDPM inversion: ``R_coef_T = 0.5`` and the loss
#: ``trigger_loss(trigger * R_coef_T, ...)`` (An et al. 2024, arXiv:2312.00050;
#: github.com/njuaplusplus/Elijah, ``BadDiffusion/elijah_helper.py``, lines 149, 184).
ELIJAH_DDPM_LAMBDA = 0.5
#: Adam steps of the DDPM inversion, from ``tau = -U[0, 1)`` (Elijah,
#: arXiv:2312.00050; ``BadDiffusion/elijah_helper.py``, lines 170, 174).
ELIJAH_DDPM_STEPS = 100
#: lambda of Elijah's DDIM/ODE inversion: ``2 * trigger * R_coef_T`` with ``R_coef_T =
#: 0.5`` (Elijah, arXiv:2312.00050; ``VillanDiffusion/elijah_helper_ddim.py``, lines
#: 161, 207).
ELIJAH_DDIM_LAMBDA = 1.0
#: Adam steps of the DDIM/ODE inversion, from ``tau = U[-1, 1)`` (Elijah,
#: arXiv:2312.00050; ``VillanDiffusion/elijah_helper_ddim.py``, lines 187, 196).
ELIJAH_DDIM_STEPS = 10
#: DDIM steps (eta = 0) of the ODE variant's samples (Elijah, arXiv:2312.00050;
#: ``VillanDiffusion/elijah_helper_ddim.py``, line 81); the DDPM variant samples with
#: all ``T`` steps (``BadDiffusion/elijah_helper.py``, lines 52, 68-73).
ELIJAH_DDIM_SAMPLING_STEPS = 50
#: Adam's learning rate in both variants (Elijah, arXiv:2312.00050;
#: ``BadDiffusion/elijah_helper.py`` line 172, ``VillanDiffusion/elijah_helper_ddim.py``
#: line 194).
ELIJAH_LR = 0.1
#: Noises in the inversion's fixed batch at any image side but 128 and 256 px (Elijah,
#: arXiv:2312.00050; ``BadDiffusion/elijah_helper.py``, lines 159-165).
ELIJAH_NUM_NOISE = 100
#: Noises in the inversion's fixed batch at the large sides: 50 at 128 px, 20 at 256 px
#: (Elijah, arXiv:2312.00050; ``BadDiffusion/elijah_helper.py``, lines 159-165).
ELIJAH_NUM_NOISE_BY_SIZE = {128: 50, 256: 20}
#: Images sampled from ``eps + tau`` and scored (Elijah, arXiv:2312.00050;
#: ``BadDiffusion/elijah_helper.py``, lines 62, 116).
ELIJAH_SAMPLES = 16
#: Share of each sorted row, and then of the sorted row means, dropped at *each* end
#: before averaging: ``skip_cnt = 4`` of 16 (Elijah, arXiv:2312.00050;
#: ``BadDiffusion/elijah_helper.py``, ``compute_uniformity``, lines 217-222).
ELIJAH_TRIM_FRACTION = 0.25


@dataclass(frozen=True)
class ElijahSettings:
    """The released code's inversion and sampling settings for one sampler family.

    Attributes:
        sampler: ``"ddpm"`` (BadDiffusion variant) or ``"ddim"`` (ODE variant).
        lam: the lambda of the loss.
        steps: Adam steps.
        init: the start of ``tau``, as the code draws it.
        sampling_steps: sampling steps from ``eps + tau`` (``None``: all ``T``).
    """

    sampler: str
    lam: float
    steps: int
    init: str
    sampling_steps: int | None


_SETTINGS = {
    "ddpm": ElijahSettings(
        "ddpm", ELIJAH_DDPM_LAMBDA, ELIJAH_DDPM_STEPS, "-U[0, 1)", None
    ),
    "ddim": ElijahSettings(
        "ddim",
        ELIJAH_DDIM_LAMBDA,
        ELIJAH_DDIM_STEPS,
        "U[-1, 1)",
        ELIJAH_DDIM_SAMPLING_STEPS,
    ),
}


def elijah_settings(sampler: str) -> ElijahSettings:
    """The released code's settings for ``sampler`` (``"ddpm"`` or ``"ddim"``)."""
    return _SETTINGS[check_choice("sampler", sampler, SAMPLERS)]


def elijah_num_noise(size: int) -> int:
    """The inversion's batch of noises for images of side ``size``
    (:data:`ELIJAH_NUM_NOISE_BY_SIZE`, else :data:`ELIJAH_NUM_NOISE`: 100 at the
    book's 16 px and at CIFAR-10's 32 px)."""
    size = check_positive_int("size", size)
    return ELIJAH_NUM_NOISE_BY_SIZE.get(size, ELIJAH_NUM_NOISE)


def _initial_trigger(
    sampler: str, shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    uniform = torch.rand(shape, generator=generator)
    return -uniform if sampler == "ddpm" else uniform * 2 - 1


def elijah_inversion(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    sampler: str = "ddpm",
    num_noise: int | None = None,
    steps: int | None = None,
    lr: float = ELIJAH_LR,
    lam: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> InvertedTrigger:
    """Elijah's trigger inversion, with its released code's settings for ``sampler``.

    Minimises ``L(tau) = mean_pixels | lam tau - (1/B) sum_i eps_theta(eps_i + tau,
    T-1) |`` (``torch.nn.functional.l1_loss`` of the batch means, as
    ``trigger_loss``) over ``tau`` with Adam, the ``B`` noises ``eps_i`` drawn once
    and reused at every step. Settings (:func:`elijah_settings`):

    - ``"ddpm"`` (BadDiffusion): ``lam = 0.5``, ``tau`` from ``-U[0, 1)``, 100 steps;
    - ``"ddim"`` (ODE variant): ``lam = 1``, ``tau`` from ``U[-1, 1)``, 10 steps;
    - both: lr 0.1, ``B`` from :func:`elijah_num_noise` (100 at 16 and 32 px).

    ``T-1`` is the scheduler's last training step (the released DDIM code hard-codes
    999, which is that step for ``T = 1000``). ``generator`` draws the noises first,
    then ``tau``, in the released code's order; default: seed 0.

    How lambda relates to the book's :func:`~baddiff_core.defenses.inversion.
    inversion_lambda`: that is ``c R_{T-1}`` of the model's own schedule (``c = 1``
    for the DDPM target, 2 for the ODE target). For the paper's CIFAR-10 schedule
    (``PAPER_SCHEDULE``, T = 1000) ``R_999 = 0.50252``: Elijah's 0.5 and ``2 x 0.5 =
    1`` are that value rounded. On the book's quick schedule (``QUICK_SCHEDULE``, T =
    100) ``R_99 = 0.52786``, so the published constants are 5 % below the schedule's
    own lambda there. ``lam=None`` uses the published constant; ``lam=
    inversion_lambda(scheduler, solver)`` gives the variant "Elijah with the
    schedule's own lambda", which should be named as such.

    A model that passes the noise through at ``T-1`` (``eps_theta(x) ~ x``, as a clean
    model does on near-pure noise) makes the loss ``mean | mean_i eps_i + (1 - lam)
    tau |``: with ``lam = 0.5`` it pulls ``tau`` towards ``2 mean_i eps_i ~ 0``; with
    ``lam = 1`` it does not depend on ``tau`` at all, so the ODE variant's ``tau``
    moves only as far as the model's departures from that identity push it.

    Args:
        unet, scheduler: the model under test and its training schedule.
        sampler: ``"ddpm"`` or ``"ddim"``: the family the backdoor is looked for in.
        num_noise, steps, lam: ``None`` for the released code's value.
        lr: Adam's learning rate.
        generator: CPU generator for the noises and the start of ``tau``.
        progress: show a tqdm bar.

    Returns:
        An :class:`~baddiff_core.defenses.inversion.InvertedTrigger` (``trigger`` is
        ``C,H,W``, added raw to the starting noise).
    """
    settings = elijah_settings(sampler)
    shape = image_shape(unet)
    num_noise = check_positive_int("num_noise", num_noise, allow_none=True)
    num_noise = num_noise or elijah_num_noise(shape[-1])
    steps = check_positive_int("steps", steps, allow_none=True) or settings.steps
    lr = check_float("lr", lr, above=0)
    lam = check_float("lam", lam, above=0, allow_none=True)
    lam = settings.lam if lam is None else lam
    check_bool("progress", progress)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise WrongTypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    generator = generator or torch.Generator().manual_seed(0)
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    noise = torch.randn((num_noise, *shape), generator=generator).to(device, dtype)
    tau = _initial_trigger(sampler, shape, generator).to(device, dtype)
    return descend_echo_loss(
        unet,
        scheduler,
        noise,
        tau,
        lam=lam,
        lr=lr,
        steps=steps,
        progress=progress,
        desc=f"Elijah inversion ({sampler})",
    )


# --------------------------------------------------------------------------- #
# Uniformity
# --------------------------------------------------------------------------- #

#: A distance between two equal-sized batches of images in [0, 1]: one value per pair.
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Pairs per call of the distance: one call for Elijah's 16 images (256 pairs).
_PAIR_CHUNK = 256


def _trim(sorted_values: torch.Tensor, cut: int) -> torch.Tensor:
    return sorted_values[..., cut : sorted_values.shape[-1] - cut]


def trimmed_uniformity(distances: torch.Tensor) -> float:
    """Elijah's two-pass trimmed mean of an ``n x n`` distance matrix (n >= 4).

    Each row is sorted and its ``k = floor(n / 4)`` smallest and ``k`` largest values
    are dropped (:data:`ELIJAH_TRIM_FRACTION`); the ``n`` row means are sorted and
    trimmed the same way; the score is the mean of what is left. For Elijah's ``n =
    16``, ``k = 4`` and 8 of 16 are kept in both passes, exactly the released code's
    ``skip_cnt = 4``. With ``k >= 1`` each row's self-distance (its smallest value,
    about 0) is always among the dropped ones.
    """
    distances = check_tensor(
        "distances", distances, layout="n,n", floating=True, finite=True
    )
    n = distances.shape[0]
    if distances.shape[1] != n or n < 4:
        raise ValueError(
            "distances must be a square n x n matrix with n >= 4, "
            f"got distances.shape={tuple(distances.shape)}"
        )
    cut = int(n * ELIJAH_TRIM_FRACTION)
    rows = _trim(distances.double().sort(dim=1).values, cut).mean(dim=1)
    return float(_trim(rows.sort().values, cut).mean())


def uniformity_score(images: torch.Tensor, distance: Distance) -> float:
    """Elijah's uniformity of ``images`` (``n,C,H,W`` in [-1, 1], n >= 4): low = alike.

    The images are mapped to [0, 1] as the released pipeline outputs them
    (``(x / 2 + 0.5).clamp(0, 1)``); ``distance(a, b)`` is computed for all ``n^2``
    ordered pairs, self-pairs included, as the released code does (``a`` row-major,
    ``b`` tiled), and the matrix is reduced by :func:`trimmed_uniformity`.

    Args:
        images: the samples.
        distance: ``(images_a, images_b) -> distances`` for equal-sized batches in [0, 1],
            one value per pair: :func:`lpips_distance` (Elijah's) or
            :func:`feature_distance` (the offline stand-in).
    """
    images = check_image_batch("images", images)
    n = images.shape[0]
    if n < 4:
        raise ValueError(
            f"images must hold n >= 4 images to be trimmed, got images.shape={tuple(images.shape)}"
        )
    if not callable(distance):
        raise WrongTypeError(
            f"distance must be a callable (images_a, images_b) -> distances, got {type(distance).__name__}"
        )
    unit = to_unit_range(images.detach())
    first = unit.repeat_interleave(n, dim=0)  # 'b c h w -> (b tile) c h w'
    second = unit.repeat(n, 1, 1, 1)  # 'b c h w -> (tile b) c h w'
    values = []
    with torch.no_grad():
        for start in range(0, n * n, _PAIR_CHUNK):
            a = first[start : start + _PAIR_CHUNK]
            value = distance(a, second[start : start + _PAIR_CHUNK])
            if not isinstance(value, torch.Tensor) or value.numel() != len(a):
                got = (
                    tuple(value.shape)
                    if isinstance(value, torch.Tensor)
                    else type(value).__name__
                )
                raise ValueError(
                    f"distance must return one value per pair ({len(a)}), got {got}"
                )
            values.append(value.detach().reshape(-1).double().cpu())
    return trimmed_uniformity(torch.cat(values).view(n, n))


def _check_pairs(images_a: object, images_b: object) -> None:
    check_image_batch("images_a", images_a, value_range="[0, 1]")
    check_image_batch("images_b", images_b, value_range="[0, 1]")
    if images_a.shape != images_b.shape:
        raise ValueError(
            "images_a and images_b must have the same shape, got "
            f"{tuple(images_a.shape)} and {tuple(images_b.shape)}"
        )


_LPIPS: dict[str, Any] = {}


def _piq_lpips() -> type:
    """piq's ``LPIPS`` class, or a one-line :class:`MissingDependencyError`."""
    try:
        from piq import LPIPS
    except ImportError:
        pass
    else:
        return LPIPS
    raise MissingDependencyError(
        "lpips_distance is Elijah's LPIPS and needs the optional package piq (with "
        "torchvision) and VGG16/LPIPS weights it downloads on first use: "
        '`pip install "baddiff-core[full]"` (or `pip install piq`); offline, pass '
        "distance=feature_distance (the book's stand-in, not LPIPS)"
    )


def lpips_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """Elijah's distance: piq's LPIPS, VGG16 with average pooling, one value per pair.

    ``piq.LPIPS(replace_pooling=True, reduction="none")`` as in the released code
    (``BadDiffusion/elijah_helper.py``, line 215): unit-normalised VGG16 features
    (relu1_2 ... relu5_3, max pooling replaced by average pooling), squared
    differences weighted by the LPIPS linear layers, ImageNet mean/std, inputs in [0,
    1] at their own size. Grey images are repeated to 3 channels (the released code
    only saw RGB). Needs the optional package piq and downloads its weights on first
    use (full mode); without piq it raises :class:`~baddiff_core.metrics.
    MissingDependencyError`.
    """
    _check_pairs(images_a, images_b)
    metric_class = _piq_lpips()
    key = str(images_a.device)
    if key not in _LPIPS:
        metric = metric_class(replace_pooling=True, reduction="none")
        _LPIPS[key] = metric.to(images_a.device).eval()
    if images_a.shape[1] == 1:
        images_a, images_b = (
            images_a.expand(-1, 3, -1, -1),
            images_b.expand(-1, 3, -1, -1),
        )
    with torch.no_grad():
        return _LPIPS[key](images_a.float(), images_b.float()).reshape(-1)


def feature_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """The book's offline stand-in for LPIPS (not LPIPS): one value per pair.

    ``|| f(a) / |f(a)| - f(b) / |f(b)| ||^2`` with ``f`` the 64-d features of the
    book's digits network (:meth:`~baddiff_core.features.DigitsNet.features`, the ones
    the offline Fréchet distance uses; RGB is turned grey, images resized to 16 px).
    It keeps LPIPS's form, unit-normalised deep features and a squared difference, on
    one layer of a 28k-parameter digits classifier and with no learned weights; its
    values (0 for the same image, at most 2 as the features are non-negative) are not
    comparable with LPIPS values.
    """
    from baddiff_core.features import MIN_SIZE, load_digits_net

    _check_pairs(images_a, images_b)
    if min(images_a.shape[-2:]) < MIN_SIZE:
        raise ValueError(
            f"feature_distance needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
            f"got images_a.shape={tuple(images_a.shape)}"
        )
    net = load_digits_net(images_a.device)

    def unit(features: torch.Tensor) -> torch.Tensor:
        return features / (features.norm(dim=1, keepdim=True) + 1e-10)

    with torch.no_grad():
        a = unit(net.features(images_a.float()))
        b = unit(net.features(images_b.float()))
        return (a - b).square().sum(dim=1)


# --------------------------------------------------------------------------- #
# Total variation
# --------------------------------------------------------------------------- #


def tv_score(images: torch.Tensor) -> float:
    """Elijah's total variation of ``images`` (``N,C,H,W`` in [-1, 1]).

    ``torchmetrics.image.TotalVariation(reduction="mean")`` of the images in [0, 1]
    (``(x / 2 + 0.5).clamp(0, 1)``), as the released code computes it
    (``BadDiffusion/elijah_helper.py``, ``compute_tvloss``): per image, the *sum* of
    ``|x[h+1, w] - x[h, w]|`` and ``|x[h, w+1] - x[h, w]|`` over channels and pixels,
    averaged over the images. The book's
    :func:`~baddiff_core.defenses.scanning.total_variation` averages the same absolute
    differences instead of summing them (and halves the two directions' sum), so for
    square ``H x H`` images ``tv_score = 2 C H (H - 1) total_variation``: the same
    ranking at one image size, but a size-dependent scale (1 x 16 x 16 images: 480).
    """
    from torchmetrics.functional.image import total_variation

    unit = to_unit_range(check_image_batch("images", images).detach().float())
    return float(total_variation(unit, reduction="mean"))


# --------------------------------------------------------------------------- #
# The pipeline
# --------------------------------------------------------------------------- #


@dataclass
class ElijahScores:
    """Elijah's two scores for one model.

    Attributes:
        uniformity: :func:`uniformity_score` of ``samples`` (low = alike = backdoored).
        tv: :func:`tv_score` of ``samples``.
        inversion: the trigger estimate (:func:`elijah_inversion`).
        samples: ``n,C,H,W`` images drawn from ``eps + tau``, in [-1, 1].
        distance: the name of the distance behind ``uniformity`` (``"lpips_distance"``
            is Elijah's; ``"feature_distance"`` the offline stand-in).
        sampler: ``"ddpm"`` or ``"ddim"``.
        seconds: wall time of inversion and sampling (the first run's, when cached).
        score_seconds: wall time of this call's two scores.
    """

    uniformity: float
    tv: float
    inversion: InvertedTrigger
    samples: torch.Tensor
    distance: str
    sampler: str
    seconds: float
    score_seconds: float


def elijah_scores(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    sampler: str = "ddpm",
    n: int = ELIJAH_SAMPLES,
    distance: Distance = lpips_distance,
    seed: int = 0,
    num_noise: int | None = None,
    steps: int | None = None,
    lr: float = ELIJAH_LR,
    lam: float | None = None,
    use_cache: bool = False,
    progress: bool = True,
) -> ElijahScores:
    """Invert a trigger, sample ``n`` images from ``eps + tau`` and score them, as
    Elijah's released code does.

    Sampling: no clipping; ``"ddpm"``: DDPM ancestral steps over all ``T`` training
    steps (``DDPMPipeline``, ``BadDiffusion/elijah_helper.py`` lines 52, 68-73);
    ``"ddim"``: deterministic DDIM (eta = 0) with ``min(50, T)`` steps (line 81 of
    ``VillanDiffusion/elijah_helper_ddim.py``). The noises of the inversion come from
    seed ``seed``, those of the samples from ``seed + 1``. ``distance`` defaults to
    Elijah's :func:`lpips_distance` (checked for piq before any work starts); quick
    mode passes ``distance=feature_distance``, the offline stand-in.

    ``use_cache`` keeps the estimate and the samples in the cache (as
    :func:`~baddiff_core.defenses.scanning.scan_model` does, under ``method="elijah"``
    and the resolved settings, with digests of the weights and the schedule); the
    scores are computed again from them, so either distance reuses one run.
    """
    settings = elijah_settings(sampler)
    check_int("n", n, minimum=4, meaning="the samples scored; the trim needs 4")
    if not callable(distance):
        raise WrongTypeError(
            f"distance must be a callable (images_a, images_b) -> distances, got {type(distance).__name__}"
        )
    if distance is lpips_distance:
        _piq_lpips()  # fail now, not after the inversion
    seed = check_int("seed", seed, minimum=0)
    check_bool("use_cache", use_cache)
    check_bool("progress", progress)
    num_noise = check_positive_int("num_noise", num_noise, allow_none=True)
    num_noise = num_noise or elijah_num_noise(image_shape(unet)[-1])
    steps = check_positive_int("steps", steps, allow_none=True) or settings.steps
    lr = check_float("lr", lr, above=0)
    lam = check_float("lam", lam, above=0, allow_none=True)
    lam = settings.lam if lam is None else lam
    train_steps = scheduler.config.num_train_timesteps
    sampling_steps = min(settings.sampling_steps or train_steps, train_steps)
    per_pass = min(n, DEFAULT_BATCH_SIZE)

    # The inversion's settings, which also name its cached result.
    inverting = dict(num_noise=num_noise, steps=steps, lr=lr, lam=lam)
    inversion, samples, seconds = invert_and_sample(
        unet,
        scheduler,
        lambda generator: elijah_inversion(
            unet,
            scheduler,
            sampler=sampler,
            **inverting,
            generator=generator,
            progress=progress,
        ),
        n=n,
        sampler=sampler,
        cache_key=dict(method="elijah", **inverting) if use_cache else None,
        clip="none",
        num_inference_steps=sampling_steps,
        per_pass=per_pass,
        seed=seed,
        progress=progress,
    )
    began = time.perf_counter()
    uniformity = uniformity_score(samples, distance)
    tv = tv_score(samples)
    return ElijahScores(
        uniformity,
        tv,
        inversion,
        samples,
        getattr(distance, "__name__", type(distance).__name__),
        sampler,
        seconds,
        time.perf_counter() - began,
    )


# --------------------------------------------------------------------------- #
# A decision rule fitted on labelled models
# --------------------------------------------------------------------------- #

#: Which side of the threshold is called backdoored: ``"low"`` (Elijah's uniformity:
#: alike samples), ``"high"``, or ``"either"`` (chosen on the fitting models).
BACKDOORED_WHEN = ("low", "high", "either")


@dataclass(frozen=True)
class ThresholdRule:
    """A threshold on one score, fitted on labelled models.

    Attributes:
        threshold: the boundary.
        backdoored_when: ``"low"`` (at or below is backdoored) or ``"high"`` (at or above).
    """

    threshold: float
    backdoored_when: str

    def backdoored(self, score: float) -> bool:
        if self.backdoored_when == "low":
            return score <= self.threshold
        return score >= self.threshold


def _scores(name: str, values: object) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise WrongTypeError(
            f"{name} must be a sequence of numbers, got {type(values).__name__}"
        )
    return [check_float(f"{name}[{i}]", v) for i, v in enumerate(values)]


def _errors(rule: ThresholdRule, clean: list[float], bad: list[float]) -> int:
    return sum(rule.backdoored(s) for s in clean) + sum(
        not rule.backdoored(s) for s in bad
    )


def fit_threshold(
    clean_scores: Sequence[float],
    backdoored_scores: Sequence[float],
    *,
    backdoored_when: str = "low",
) -> ThresholdRule:
    """Fit a threshold on the scores of models whose labels are known.

    The released code ships no decision rule; this one is
    :func:`~baddiff_core.defenses.scanning.choose_threshold` (the midpoint between
    sorted scores with the fewest errors, widest margin on ties), turned round for
    ``"low"``; ``"either"`` keeps the side with fewer errors on these models (``"low"``
    on a tie). Its accuracy on the models it was fitted on is no evidence that it
    detects anything: judge it on held-out models, or use
    :func:`leave_one_out_accuracy`.
    """
    clean = _scores("clean_scores", clean_scores)
    bad = _scores("backdoored_scores", backdoored_scores)
    check_choice("backdoored_when", backdoored_when, BACKDOORED_WHEN)
    if not clean or not bad:
        raise ValueError(
            f"need at least one score per group, got {len(clean)} clean and {len(bad)} backdoored"
        )
    rules = []
    if backdoored_when in ("low", "either"):
        flipped = choose_threshold([-s for s in clean], [-s for s in bad])
        rules.append(ThresholdRule(-flipped, "low"))
    if backdoored_when in ("high", "either"):
        rules.append(ThresholdRule(choose_threshold(clean, bad), "high"))
    return min(rules, key=lambda rule: _errors(rule, clean, bad))


def leave_one_out_accuracy(
    clean_scores: Sequence[float],
    backdoored_scores: Sequence[float],
    *,
    backdoored_when: str = "low",
) -> float:
    """The share of models judged right by a rule fitted without them.

    For each model in turn, :func:`fit_threshold` is fitted on all the others and
    judges the one left out. Needs at least 2 models per group (so that each fit sees
    both). A threshold that separates the very models it was fitted on can still judge
    a new one wrong: clean ``[1, 2]`` and backdoored ``[10, 20]`` (``"high"``) are
    separated in-sample, but left out, 10 falls below the threshold 11 fitted on the
    rest, so this gives 0.75.
    """
    clean = _scores("clean_scores", clean_scores)
    bad = _scores("backdoored_scores", backdoored_scores)
    check_choice("backdoored_when", backdoored_when, BACKDOORED_WHEN)
    if len(clean) < 2 or len(bad) < 2:
        raise ValueError(
            "leave-one-out needs at least 2 models per group, "
            f"got {len(clean)} clean and {len(bad)} backdoored"
        )
    right = 0
    for group, is_bad in ((clean, False), (bad, True)):
        for i, score in enumerate(group):
            rest = group[:i] + group[i + 1 :]
            rule = fit_threshold(
                clean if is_bad else rest,
                rest if is_bad else bad,
                backdoored_when=backdoored_when,
            )
            right += rule.backdoored(score) == is_bad
    return right / (len(clean) + len(bad))
