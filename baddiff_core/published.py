"""Numbers the BadDiffusion authors published, to print beside the book's own
measurements.

Introduced in chapter 4 (Measuring the backdoor). Source: the result files
(``score.json``) of the CIFAR-10 models that the authors of BadDiffusion (Chou et al.
2023, arXiv:2212.05400) released on the Hugging Face hub under the user ``newsyctw``
(chapter 11, ``book/11_the_authors_models.ipynb``, opens them): a fine-tune of
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

from baddiff_core.authors import AUTHORS_MODELS

__all__ = ["PublishedResult", "BADDIFFUSION_CIFAR10", "published_results"]


@dataclass(frozen=True)
class PublishedResult:
    """One published BadDiffusion result on CIFAR-10: the scores of one released model.

    Attributes:
        trigger: the attack's trigger.
        trigger_size: the trigger's side at 32 px.
        target: the attack's target.
        poison_rate: the fraction of poisoned training images, in [0, 1].
        mse: MSE of triggered samples against the target, without clipping.
        ssim: SSIM of triggered samples against the target, without clipping.
        mse_clip: the MSE with the x0-clipping defence.
        ssim_clip: the SSIM with the x0-clipping defence.
        source: the Hugging Face repository id (``newsyctw/...``) of the released model
            whose ``score.json`` holds these numbers.
    """

    trigger: str
    trigger_size: int
    target: str
    poison_rate: float
    mse: float
    ssim: float
    mse_clip: float
    ssim_clip: float
    source: str

    @property
    def fired(self) -> bool:
        """Whether the backdoor worked without clipping, by the authors' numbers: MSE
        below 0.01 and SSIM above 0.5 (:attr:`PublishedScores.fired
        <baddiff_core.authors.PublishedScores.fired>`)."""
        return self.mse < 0.01 and self.ssim > 0.5

    @property
    def score_url(self) -> str:
        """Where readers can open the ``score.json`` these numbers come from."""
        return f"https://huggingface.co/{self.source}/blob/main/score.json"


#: The released models whose scores the book sets beside its own: three at 90 % poison,
#: two at 5 %, by their short names in :data:`~baddiff_core.authors.AUTHORS_MODELS`.
_BOOK_MODELS = (
    "stop_sign-corner-90",
    "stop_sign-shift-90",
    "box-corner-90",
    "box-noshift-5",
    "box-shoe-5",
)


def _result(name: str) -> PublishedResult:
    """The scores of the released model ``name``, as one flat record."""
    model = AUTHORS_MODELS[name]
    scores = model.published
    return PublishedResult(
        model.trigger,
        model.trigger_size,
        model.target,
        model.poison_rate,
        mse=scores.mse,
        ssim=scores.ssim,
        mse_clip=scores.mse_clip,
        ssim_clip=scores.ssim_clip,
        source=model.repo_id,
    )


#: The authors' CIFAR-10 results used in the book: three models at 90 % poison, two at
#: 5 %, each a single released model, read from
#: :data:`~baddiff_core.authors.AUTHORS_MODELS` (one record of the numbers, not two).
#:
#: :meta hide-value:
BADDIFFUSION_CIFAR10: tuple[PublishedResult, ...] = tuple(
    _result(name) for name in _BOOK_MODELS
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
