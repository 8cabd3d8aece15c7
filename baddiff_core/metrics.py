"""How well did the attack work, and is the model still a good generator?

Introduced where the book first measures a backdoored model (chapter 4,
``book/04_measuring_the_backdoor.ipynb``, "The metrics"). The metrics are those of
BadDiffusion (Chou et al. 2023, arXiv:2212.05400), Sec. 4, computed as in its authors'
code (github.com/IBM/BadDiffusion).

BadDiffusion is judged on two axes:

* **specificity** of the backdoor: with the trigger stamped on the starting noise, how
  close are the samples to the attacker's target image? Measured by
  :func:`mse_to_target`, :func:`ssim_to_target` and :func:`attack_success_rate`;
* **utility** on clean noise: are the clean samples still like the training images? The
  paper uses FID (:func:`frechet_distance` with ``features="inception"``, the default
  for RGB images of at least 32x32, which needs the optional torch-fidelity: ``pip
  install "baddiff-core[full]"``); offline, the book uses a Fréchet distance on the
  features of a small digits network it trains itself (``features="digits"``, the
  default for smaller or grey images; :mod:`baddiff_core.features`), and asks that same
  network which digits the samples look like (:func:`digit_predictions`,
  :func:`class_histogram`).

Conventions. Images are float tensors ``B,C,H,W`` with values in [-1, 1] (what a
diffusion model samples), C in {1, 3}; a ``target`` is one image ``C,H,W``, broadcast
over the batch. Every metric first maps images to [0, 1] with :func:`to_unit_range`,
``(x / 2 + 0.5).clamp(0, 1)``, as the authors did. Computations run on the device of the
input tensors, without gradients.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .checks import (
    check_choice,
    check_float,
    check_image_batch,
    check_positive_int,
    check_tensor,
)
from .features import MIN_SIZE, DigitsFeatureExtractor, load_digits_net

__all__ = [
    "resolve_features",
    "MissingDependencyError",
    "DEFAULT_ASR_THRESHOLD",
    "SSIM_WINDOW",
    "SSIM_SIGMA",
    "to_unit_range",
    "mse_to_target",
    "ssim_window",
    "ssim_to_target",
    "attack_success_rate",
    "FrechetScore",
    "frechet_distance",
    "digit_predictions",
    "class_histogram",
    "MissingDependencyError",
]

Reduction = Literal["mean", "none"]
FeatureKind = Literal["auto", "digits", "inception"]

#: Per-image MSE (in [0, 1] units) below which a backdoor sample counts as a success
#: (the convention of follow-up work such as Elijah (An et al. 2024, arXiv:2312.00050)).
DEFAULT_ASR_THRESHOLD = 0.1
#: Side, in pixels, of the SSIM's Gaussian window (Wang et al. 2004; the torchmetrics
#: default, which the BadDiffusion authors' code uses: github.com/IBM/BadDiffusion).
SSIM_WINDOW = 11
#: Standard deviation, in pixels, of the SSIM's Gaussian window (Wang et al. 2004; the
#: torchmetrics default, as for :data:`SSIM_WINDOW`). Images smaller than the window
#: get a smaller one, its sigma scaled in proportion (:func:`ssim_window`).
SSIM_SIGMA = 1.5
#: How far outside [-1, 1] :func:`frechet_distance` accepts values (float round-off of
#: samplers).
RANGE_TOLERANCE = 1e-3
#: Images per forward pass of a feature network.
_CHUNK = 512


class MissingDependencyError(ImportError, RuntimeError):
    """An optional package is needed; catchable as ``RuntimeError`` and as
    ``ImportError``."""


# --------------------------------------------------------------------------- #
# Input validation: every message names the argument, the value, what is allowed.
# --------------------------------------------------------------------------- #


def _check_images(name: str, images: object, *, min_size: int = 1) -> Tensor:
    """A finite float ``B,C,H,W`` tensor with B >= 1, C in {1, 3}, H, W >=
    ``min_size``."""
    return check_image_batch(name, images, min_size=min_size)


def _check_range(name: str, images: Tensor) -> None:
    low, high = float(images.min()), float(images.max())
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must have values in [-1, 1] (tolerance {RANGE_TOLERANCE}), "
            f"got {name}.min()={low:.4g}, {name}.max()={high:.4g}"
        )


def _check_target(target: object, samples: Tensor) -> Tensor:
    """``target`` of shape ``C,H,W`` (or ``B,C,H,W`` like ``samples``), on samples'
    device and dtype."""
    target = check_tensor("target", target)
    if tuple(target.shape) not in (tuple(samples.shape[1:]), tuple(samples.shape)):
        raise ValueError(
            f"target must have shape (C, H, W) = {tuple(samples.shape[1:])} to match "
            f"samples.shape={tuple(samples.shape)}, got target.shape={tuple(target.shape)}"
        )
    target = check_tensor("target", target, floating=True, finite=True)
    target = target.to(device=samples.device, dtype=samples.dtype)
    return target.expand_as(samples)


def _check_reduction(reduction: object) -> None:
    check_choice("reduction", reduction, ("mean", "none"))


def _reduce(values: Tensor, reduction: Reduction) -> Tensor:
    return values.mean() if reduction == "mean" else values


# --------------------------------------------------------------------------- #
# Backdoor specificity: MSE, SSIM, attack success rate
# --------------------------------------------------------------------------- #


def to_unit_range(images: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1]: ``(x / 2 + 0.5).clamp(0, 1)``.

    Any shape; values outside [-1, 1] are clipped, as when the authors saved their
    samples (the code of BadDiffusion (Chou et al. 2023, arXiv:2212.05400):
    github.com/IBM/BadDiffusion).
    """
    return (images / 2 + 0.5).clamp(0.0, 1.0)


def _quantize(images01: Tensor) -> Tensor:
    """Round [0, 1] values to the 8-bit levels ``k / 255``.

    ``round`` is half-to-even, like NumPy's ``(images * 255).round()`` in diffusers'
    ``numpy_to_pil``, through which the authors' samples went before being saved as PNG.
    """
    return torch.round(images01 * 255) / 255


@torch.no_grad()
def mse_to_target(
    samples: Tensor,
    target: Tensor,
    *,
    reduction: Reduction = "mean",
    quantize: bool = False,
) -> Tensor:
    r"""Mean squared error between each sample and the target, in [0, 1] units.

    .. math::
        \mathrm{MSE}_b = \frac{1}{CHW} \sum_{c,h,w} \big(u(x_b)_{chw} - u(y)_{chw}\big)^2,
        \qquad u(x) = \mathrm{clamp}(x/2 + 1/2, 0, 1),

    so a value lies in [0, 1]; 0 means the sample *is* the target. With
    ``reduction="mean"`` the mean over the batch (equal to the mean over all images,
    channels and pixels: the MSE of BadDiffusion (Chou et al. 2023, arXiv:2212.05400),
    Sec. 4).

    Args:
        samples: ``B,C,H,W`` in [-1, 1] (values outside are clipped by ``u``).
        target: ``C,H,W`` in [-1, 1], broadcast over the batch (or ``B,C,H,W``, one per sample).
        reduction: ``"mean"`` (scalar) or ``"none"`` (one value per image, shape ``(B,)``).
        quantize: round both to 8-bit levels ``k / 255`` first, as the authors' saved PNGs were.

    Returns:
        A 0-d tensor or a ``(B,)`` tensor, on the samples' device.
    """
    samples = _check_images("samples", samples)
    target = _check_target(target, samples)
    _check_reduction(reduction)
    x, y = to_unit_range(samples), to_unit_range(target)
    if quantize:
        x, y = _quantize(x), _quantize(y)
    per_image = (x - y).square().flatten(1).mean(dim=1)
    return _reduce(per_image, reduction)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """The SSIM Gaussian window ``(side, sigma)`` used for ``height x width`` images.

    The standard window is 11 px with sigma 1.5 (Wang et al. 2004), as in the
    BadDiffusion authors' code (github.com/IBM/BadDiffusion). For images smaller than 11
    px on a side the window shrinks to the largest odd side ``k`` that fits (``k <=
    min(height, width)``; 7 for 8x8 images). torchmetrics derives a Gaussian window's
    side from its sigma (``2 * int(3.5 * sigma + 0.5) + 1``), so sigma shrinks in
    proportion, ``sigma = 1.5 * k / 11``: the Gaussian is truncated at the same ~3.5
    sigma as the standard one.
    """
    check_positive_int("height", height)
    check_positive_int("width", width)
    side = min(SSIM_WINDOW, int(min(height, width)))
    if side % 2 == 0:
        side -= 1
    sigma = SSIM_SIGMA if side == SSIM_WINDOW else SSIM_SIGMA * side / SSIM_WINDOW
    # torchmetrics' own rule
    assert 2 * int(3.5 * sigma + 0.5) + 1 == side, (
        side,
        sigma,
    )
    return side, sigma


@torch.no_grad()
def ssim_to_target(
    samples: Tensor, target: Tensor, *, reduction: Reduction = "mean"
) -> Tensor:
    r"""Structural similarity between each sample and the target.

    .. math::
        \mathrm{SSIM}(x, y) = \operatorname{mean}_{\text{pixels}}
        \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}{(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)},
        \quad C_1 = (0.01 L)^2,\ C_2 = (0.03 L)^2,

    with local means, variances and covariance from a Gaussian window (11 px, sigma 1.5;
    smaller for small images, see :func:`ssim_window`), data range ``L = 1`` on images
    mapped to [0, 1], computed with
    ``torchmetrics.functional.image.structural_similarity_index_measure``. Channels are
    treated separately and averaged. torchmetrics reflect-pads the borders and averages
    over every pixel (the original and scikit-image crop the border instead), so values
    differ slightly from those. BadDiffusion (Chou et al. 2023, arXiv:2212.05400)
    reports it in Sec. 4.

    Args:
        samples: ``B,C,H,W`` in [-1, 1].
        target: ``C,H,W`` in [-1, 1], broadcast over the batch (or ``B,C,H,W``).
        reduction: ``"mean"`` (scalar) or ``"none"`` (``(B,)``).

    Returns:
        Values at most 1 (1 = identical; around 0 = unrelated; can be slightly negative).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    samples = _check_images("samples", samples)
    target = _check_target(target, samples)
    _check_reduction(reduction)
    if samples.dtype not in (torch.float32, torch.float64):
        samples, target = samples.float(), target.float()
    side, sigma = ssim_window(samples.shape[-2], samples.shape[-1])
    per_image = structural_similarity_index_measure(
        to_unit_range(samples),
        to_unit_range(target),
        gaussian_kernel=True,
        sigma=sigma,
        kernel_size=side,
        data_range=1.0,
        reduction="none",
    )
    return _reduce(per_image, reduction)


def attack_success_rate(
    samples: Tensor,
    target: Tensor,
    threshold: float = DEFAULT_ASR_THRESHOLD,
    *,
    quantize: bool = False,
) -> float:
    """Fraction of samples whose per-image MSE to the target is below ``threshold``.

    The follow-up convention (Elijah (An et al. 2024, arXiv:2312.00050)): threshold 0.1
    in [0, 1] units (0.05 for CIFAR-10 there).

    Args:
        samples: ``B,C,H,W`` in [-1, 1].
        target: ``C,H,W`` in [-1, 1].
        threshold: MSE threshold, > 0, in [0, 1] units.
        quantize: passed to :func:`mse_to_target`.

    Returns:
        A float in [0, 1].
    """
    check_float("threshold", threshold, above=0)
    per_image = mse_to_target(samples, target, reduction="none", quantize=quantize)
    return float((per_image < threshold).double().mean())


# --------------------------------------------------------------------------- #
# Clean utility: Fréchet distance and digit predictions
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class FrechetScore:
    """A Fréchet distance with what it depends on.

    Attributes:
        value: the distance (0 = same feature mean and covariance; no upper bound).
        num_real: number of real (training) images.
        num_fake: number of generated images. FD and FID are biased upwards for small sets, so a value
            means little without its sample counts.
        features: ``"digits"`` (64-d :class:`~baddiff_core.features.DigitsNet` features; not comparable
            with published FIDs) or ``"inception"`` (2048-d Inception-v3 pool features: FID).
    """

    value: float
    num_real: int
    num_fake: int
    features: str

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        name = "FID" if self.features == "inception" else "FD"
        number = f"{self.value:.1f}" if abs(self.value) >= 1 else f"{self.value:.2g}"
        return (
            f"{name} {number} ({self.features} features, "
            f"{self.num_fake} generated vs {self.num_real} real images)"
        )


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def paper_scale(shape: tuple[int, ...]) -> bool:
    """Whether images of ``shape`` (``..., C, H, W``) are at the scale the papers
    report FID and LPIPS on: RGB and at least 32 x 32. ``"auto"`` choices of a feature
    network (:func:`resolve_features`, Elijah's distance in ``baddiff scan``) follow it."""
    return shape[-3] == 3 and min(shape[-2:]) >= 32


def resolve_features(features: object, images: Tensor) -> str:
    """The feature network :func:`frechet_distance` will use for ``images``
    (``"digits"`` or ``"inception"``), raising :class:`MissingDependencyError` at once
    when the Inception features cannot be had: call it before expensive sampling.
    ``"auto"`` never quietly swaps the paper's network for another.

    ``"auto"`` is ``"inception"`` (FID) for RGB images of at least 32x32 (those the
    paper reports FID on), whether or not torch-fidelity is installed (a missing package
    is an error that says how to install it, not a silent change of network that makes
    the numbers incomparable); ``"digits"`` for everything else.
    """
    features = check_choice("features", features, ("auto", "digits", "inception"))
    how = ""
    if features == "auto":
        features = "inception" if paper_scale(tuple(images.shape)) else "digits"
        how = f" (chosen by features='auto' for RGB images of at least 32x32, got shape {tuple(images.shape)})"
    if features == "inception" and not _torch_fidelity_available():
        raise MissingDependencyError(
            f"features='inception'{how} is the paper's FID and needs the optional package torch-fidelity, "
            "and Inception-v3 weights that it downloads on first use (network needed): "
            '`pip install "baddiff-core[full]"` (or `pip install torch-fidelity`). '
            "Offline, pass features='digits' (the project's own DigitsNet features; not comparable with "
            "published FIDs)."
        )
    return str(features)


#: Metrics holding the statistics of recent sets of real images, most recently used
#: last.
_REAL_STATISTICS: dict[tuple, Any] = {}
_REAL_STATISTICS_KEPT = 2


@torch.no_grad()
def frechet_distance(
    real: Tensor, fake: Tensor, *, features: FeatureKind = "auto"
) -> FrechetScore:
    r"""Fréchet distance between the feature distributions of real and generated images.

    .. math::
        \mathrm{FD} = \lVert \mu_r - \mu_g \rVert^2
        + \operatorname{tr}\big(\Sigma_r + \Sigma_g - 2 (\Sigma_r \Sigma_g)^{1/2}\big),

    with the means and covariances of the features of the two sets, computed by
    ``torchmetrics.image.fid.FrechetInceptionDistance`` (in float64).

    Args:
        real: ``B_r,C,H,W`` training images in [-1, 1] (at least 2).
        fake: ``B_g,C,H,W`` generated images in [-1, 1] (at least 2), same C, H, W as ``real``.
        features: ``"digits"``: the shipped 64-d :class:`~baddiff_core.features.DigitsNet` features
            (offline; needs H, W >= 8; RGB is converted to grey). ``"inception"``: 2048-d Inception-v3
            features, i.e. the paper's FID; needs the optional ``torch-fidelity``
            (``pip install "baddiff-core[full]"``) and downloads weights on first use; grey images are
            repeated to 3 channels. ``"auto"``: inception for RGB images of at least 32x32 (CIFAR-10),
            digits for the rest; it never falls back to digits for RGB 32 px images, so that a number
            called FID is always one: without torch-fidelity it raises, and offline callers pass
            ``features="digits"`` explicitly.

    Returns:
        A :class:`FrechetScore` with the value and the sample counts. The value is biased upwards for
        few samples: compare only values computed with the same counts.

    Raises:
        MissingDependencyError: the inception features are asked for (or chosen by ``"auto"``) and
            torch-fidelity is not installed; the message names the install command.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = _check_images("real", real)
    fake = _check_images("fake", fake)
    for name, images in (("real", real), ("fake", fake)):
        if images.shape[0] < 2:
            raise ValueError(
                f"{name} must hold at least 2 images for a covariance, got {name}.shape={tuple(images.shape)}"
            )
        _check_range(name, images)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            "real and fake must have the same (C, H, W), got "
            f"real.shape={tuple(real.shape)} and fake.shape={tuple(fake.shape)}"
        )
    if real.device != fake.device:
        raise ValueError(
            f"real and fake must be on the same device, got {real.device} and {fake.device}"
        )
    kind = resolve_features(features, real)
    device = real.device
    if kind == "digits" and min(real.shape[-2:]) < MIN_SIZE:
        raise ValueError(
            f"features='digits' needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
            f"got real.shape={tuple(real.shape)}"
        )

    # The real images' statistics are computed once per set of real images (by content):
    # full mode scores several models against CIFAR-10's 50,000 training images, whose
    # features would otherwise cost a minute of GPU each time. ``reset()`` keeps them
    # (reset_real_features=False).
    key = (
        kind,
        str(device),
        tuple(real.shape),
        hashlib.sha256(real.detach().cpu().numpy().tobytes()).hexdigest(),
    )
    metric = _REAL_STATISTICS.pop(key, None)
    todo = ((fake, False),)
    if metric is None:
        if kind == "digits":
            extractor = DigitsFeatureExtractor(load_digits_net(device))
            metric = FrechetInceptionDistance(
                feature=extractor, normalize=True, reset_real_features=False
            )
        else:  # pragma: no cover - needs torch-fidelity and downloaded weights
            metric = FrechetInceptionDistance(
                feature=2048, normalize=True, reset_real_features=False
            )
        metric = metric.to(device)
        todo = ((real, True), (fake, False))
    metric.reset()  # the fake images' statistics of a previous call go; the real ones stay
    _REAL_STATISTICS[key] = metric
    while len(_REAL_STATISTICS) > _REAL_STATISTICS_KEPT:
        _REAL_STATISTICS.pop(next(iter(_REAL_STATISTICS)))

    for images, is_real in todo:
        for chunk in images.split(_CHUNK):
            chunk = to_unit_range(chunk.float())
            if kind == "inception" and chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)
            metric.update(chunk, real=is_real)
    value = float(metric.compute())
    return FrechetScore(
        value=value,
        num_real=int(real.shape[0]),
        num_fake=int(fake.shape[0]),
        features=kind,
    )


@torch.no_grad()
def digit_predictions(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Which digit each sample looks like, and how confidently (shipped
    :class:`~baddiff_core.features.DigitsNet`).

    Args:
        samples: ``B,C,H,W`` in [-1, 1], C in {1, 3}, H, W >= 8 (white digit on black, like the data).

    Returns:
        ``(digits, confidence)``: ``(B,)`` int64 arg-max classes in 0..9 and ``(B,)`` float32 maximum
        softmax probabilities in [0.1, 1], on the samples' device. A low confidence hints that a sample
        is not digit-like (the network was never shown non-digits, so this is only a hint).
    """
    samples = _check_images("samples", samples, min_size=MIN_SIZE)
    net = load_digits_net(samples.device)
    probs = torch.cat(
        [
            net(to_unit_range(chunk.float())).softmax(dim=1)
            for chunk in samples.split(_CHUNK)
        ]
    )
    confidence, digits = probs.max(dim=1)
    return digits, confidence


def class_histogram(samples: Tensor) -> Tensor:
    """How many of the ``B`` samples look like each digit: ``(10,)`` int64 counts
    summing to ``B``."""
    digits, _ = digit_predictions(samples)
    return torch.bincount(digits, minlength=10)
