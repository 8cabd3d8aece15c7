"""Numbers the BadDiffusion authors published, to print beside the book's own
measurements.

Introduced in chapter 4 (Measuring the backdoor). Source: the result files
(``score.json``) of the CIFAR-10 models that the authors of BadDiffusion (Chou et al.
2023, arXiv:2212.05400) released on the Hugging Face hub under the user ``newsyctw``
(chapter 10, ``book/10_the_authors_models.ipynb``, opens them): a fine-tune of
``google/ddpm-cifar10-32`` for 50 epochs, DDPM sampling with 1000 steps, MSE and SSIM
between triggered samples and the target on the [0, 1] scale, the samples saved as 8-bit
PNG files before they were scored (so that a perfect hit scores
:data:`~baddiff_core.authors.EIGHT_BIT_FLOOR`, not 0).

Each result names the released model whose ``score.json`` holds it
(:attr:`PublishedResult.source`, one of the repositories of
:data:`~baddiff_core.authors.AUTHORS_MODELS`, which records every score of that file).
Each is one model: one trigger, target and poison rate, trained once. The paper reports
its CIFAR-10 results in figures and tables over poison rates; which of them holds each
number here was not established from this repository, so the ``score.json`` is the
citation.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PublishedResult", "BADDIFFUSION_CIFAR10", "published_results"]

_PREFIX = "newsyctw/res_DDPM-CIFAR10-32_CIFAR10_ep50_c1.0_"


@dataclass(frozen=True)
class PublishedResult:
    """One published BadDiffusion result on CIFAR-10: the scores of one released model.

    Attributes:
        trigger: the attack's trigger.
        trigger_size: the trigger's side at 32 px.
        target: the attack's target.
        poison_rate: the fraction of poisoned training images, in [0, 1].
        mse: MSE of triggered samples against the target, without clipping
            (``None``: not carried over here; the model's entry in
            :data:`~baddiff_core.authors.AUTHORS_MODELS` has every score).
        ssim: SSIM of triggered samples against the target, without clipping
            (``None``: alike).
        mse_clip: the MSE with the x0-clipping defence.
        ssim_clip: the SSIM with the x0-clipping defence.
        source: the Hugging Face repository id (``newsyctw/...``) of the released model
            whose ``score.json`` holds these numbers.
    """

    trigger: str
    trigger_size: int
    target: str
    poison_rate: float
    mse: float | None
    ssim: float | None
    mse_clip: float | None = None
    ssim_clip: float | None = None
    source: str | None = None

    @property
    def fired(self) -> bool | None:
        """Whether the backdoor worked without clipping (MSE below 0.01 or SSIM above
        0.5)."""
        if self.mse is not None:
            return self.mse < 0.01
        return None if self.ssim is None else self.ssim > 0.5

    @property
    def score_url(self) -> str | None:
        """Where readers can open the ``score.json`` these numbers come from."""
        if self.source is None:
            return None
        return f"https://huggingface.co/{self.source}/blob/main/score.json"


#: The authors' CIFAR-10 results used in the book: three models at 90 % poison, two at
#: 5 %, each a single released model.
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
        source=f"{_PREFIX}p0.9_SM_STOP_SIGN-BOX_new-set-1",
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
        source=f"{_PREFIX}p0.9_SM_STOP_SIGN-SHIFT",
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
        source=f"{_PREFIX}p0.9_SM_BOX_MED-BOX",
    ),
    PublishedResult(
        "box",
        18,
        "noshift",
        0.05,
        mse=0.0068,
        ssim=None,
        source=f"{_PREFIX}p0.05_BIG_BOX_MED-TRIGGER",
    ),
    PublishedResult(
        "box",
        8,
        "shoe",
        0.05,
        mse=None,
        ssim=0.11,
        source=f"{_PREFIX}p0.05_XXSM_BOX_MED-FASHION",
    ),
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
