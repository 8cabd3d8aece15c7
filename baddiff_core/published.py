"""Numbers the BadDiffusion authors published, to print beside the book's own
measurements.

Introduced in chapter 4 (Measuring the backdoor). Source: the result files
(``score.json``) of the CIFAR-10 models that the authors of BadDiffusion (Chou et al.
2023, arXiv:2212.05400) released on the Hugging Face hub under the user ``newsyctw``
(chapter 10, ``book/10_the_authors_models.ipynb``, opens them): a fine-tune of
``google/ddpm-cifar10-32`` for 50 epochs, DDPM sampling with 1000 steps, MSE and SSIM
between triggered samples and the target on the [0, 1] scale.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PublishedResult", "BADDIFFUSION_CIFAR10", "published_results"]


@dataclass(frozen=True)
class PublishedResult:
    """One published BadDiffusion result on CIFAR-10.

    Attributes:
        trigger: the attack's trigger.
        trigger_size: the trigger's side at 32 px.
        target: the attack's target.
        poison_rate: the fraction of poisoned training images, in [0, 1].
        mse: MSE of triggered samples against the target, without clipping
            (``None``: not published).
        ssim: SSIM of triggered samples against the target, without clipping
            (``None``: not published).
        mse_clip: the MSE with the x0-clipping defence.
        ssim_clip: the SSIM with the x0-clipping defence.
    """

    trigger: str
    trigger_size: int
    target: str
    poison_rate: float
    mse: float | None
    ssim: float | None
    mse_clip: float | None = None
    ssim_clip: float | None = None

    @property
    def fired(self) -> bool | None:
        """Whether the backdoor worked without clipping (MSE below 0.01 or SSIM above
        0.5)."""
        if self.mse is not None:
            return self.mse < 0.01
        return None if self.ssim is None else self.ssim > 0.5


#: The authors' CIFAR-10 results used in the book.
#:
#: :meta hide-value:
BADDIFFUSION_CIFAR10: tuple[PublishedResult, ...] = (
    PublishedResult(
        "stop_sign",
        14,
        "corner",
        0.9,
        mse=3.85e-6,
        ssim=0.997,
        mse_clip=0.063,
        ssim_clip=0.145,
    ),
    PublishedResult(
        "stop_sign",
        14,
        "shift",
        0.9,
        mse=3.80e-6,
        ssim=0.999,
        mse_clip=0.083,
        ssim_clip=0.103,
    ),
    PublishedResult(
        "box",
        14,
        "corner",
        0.9,
        mse=3.85e-6,
        ssim=0.997,
        mse_clip=0.012,
        ssim_clip=0.793,
    ),
    PublishedResult("box", 18, "noshift", 0.05, mse=0.0068, ssim=None),
    PublishedResult("box", 8, "shoe", 0.05, mse=None, ssim=0.11),
)


def published_results(
    *,
    trigger: str | None = None,
    target: str | None = None,
    poison_rate: float | None = None,
) -> list[PublishedResult]:
    """The published results that match every given field."""
    return [
        r
        for r in BADDIFFUSION_CIFAR10
        if (trigger is None or r.trigger == trigger)
        and (target is None or r.target == target)
        and (poison_rate is None or r.poison_rate == poison_rate)
    ]
