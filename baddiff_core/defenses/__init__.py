"""Defences that need no knowledge of the trigger: inversion, detection, removal and
pruning.

The first defence, inference-time clipping, is a sampler setting (``clip="x0"`` in
:func:`baddiff_core.sampling.sample`). This package holds the defences that look inside
a model, one module per idea:

- :mod:`~baddiff_core.defenses.inversion`, the book's **trigger inversion** (Elijah's
  objective, An et al. 2024, arXiv:2312.00050, with the schedule's lambda; chapter 7,
  "Detecting a backdoor"). A
  backdoored model has learnt ``eps_theta(eps + g, T-1) ~ eps + lambda g`` with ``lambda
  = c R_{T-1}`` (``c = 1`` for the BadDiffusion/DDPM target, 2 for the ODE target).
  Averaged over many ``eps`` the noise cancels, so a trigger estimate ``tau`` is found
  by minimising ``| mean_i eps_theta(eps_i + tau, T-1) - lambda tau |_1``. A clean model
  predicts about ``eps + tau`` there, which only ``tau = 0`` satisfies.
- :mod:`~baddiff_core.defenses.scanning`, the book's **detection**: sample from
  ``eps + tau``. A
  backdoored model draws one image (the target) again and again; a clean model draws
  varied images. The score is the *mode share*: the largest fraction of the samples that
  lie within a small MSE of one of them (1/n for a clean model, up to 1 for a backdoored
  one). The samples' diversity (per-pixel standard deviation) and total variation are
  reported beside it.
- :mod:`~baddiff_core.defenses.elijah`, **Elijah as published** (An et al. 2024,
  arXiv:2312.00050), beside the book's detector: its inversion with the released code's
  settings per sampler, samples from ``eps + tau``, and its two scores, the trimmed
  pairwise LPIPS *uniformity* (an offline digits-feature stand-in in quick mode) and the
  *total variation*; a threshold fitted on labelled models, judged leave-one-out.
- :mod:`~baddiff_core.defenses.terd`, **TERD as released** (Mo et al., ICML 2024,
  arXiv:2409.05294): a trigger ``mu`` inverted by minimising a *reversed loss* (the
  variance over the noise of the model's residual) minus ``lambda |mu|_1``, first on
  Gaussian stand-ins, then through the model's own differentiable DDIM samples; an input
  test (log likelihood ratio of ``N(mu, I)`` against ``N(0, I)``) and two model-level
  features (mean and variance of the per-pixel KL ``mu_i^2 / 2``), with the released
  code's settings (github.com/PKU-ML/TERD).
- :mod:`~baddiff_core.defenses.side_by_side`, **the three model-level detectors side by
  side** (the book's mode share, Elijah as published, TERD's model-level features) on
  one model, one finding each: scores, threshold and verdict (none for Elijah and
  TERD, whose code ships no threshold, unless one is given). ``baddiff scan`` prints it.
- :mod:`~baddiff_core.defenses.noise_tests`, **the book's noise test** of a starting
  noise (in the spirit of DisDet, Sui et al. 2024, arXiv:2402.02739, whose statistic is
  not used): a one-sample Kolmogorov-Smirnov test of its entries against N(0, 1), whose
  false-positive rate on honest noise is its level ``alpha``.
- :mod:`~baddiff_core.defenses.removal` (Elijah): fine-tune a copy on a little clean
  data with the DDPM loss plus two terms that make the model treat ``eps + tau`` like
  ``eps``, as the frozen original treats ``eps``.
- :mod:`~baddiff_core.defenses.pruning`, **adversarial neuron pruning** (ANP, Wu & Wang
  2021, arXiv:2110.14430, adapted to diffusion models by this book, with the DDPM loss as
  the clean loss; the BadDiffusion authors' released variant only perturbs per-channel
  scales and shifts to raise the clean loss and prunes nothing): learn a mask ``m`` in
  [0, 1] per convolution channel that keeps the clean loss low even under a worst-case
  per-channel perturbation ``(delta, xi)`` of size ``eps``; channels whose mask falls
  are the fragile ones, and pruning them may remove the backdoor.

:mod:`~baddiff_core.defenses.cached` keeps their results in the cache
(``use_cache=True``), apart from the algorithms.

Used by ``baddiff scan``; the defence chapters after "Samplers change the attack" build on
it.
"""

# Each module's ``__all__`` is the package's: a name is defined, and listed, once.
from baddiff_core.defenses import (
    elijah,
    inversion,
    noise_tests,
    pruning,
    removal,
    scanning,
    side_by_side,
    terd,
)
from baddiff_core.defenses.elijah import *  # noqa: F403
from baddiff_core.defenses.inversion import *  # noqa: F403
from baddiff_core.defenses.noise_tests import *  # noqa: F403
from baddiff_core.defenses.pruning import *  # noqa: F403
from baddiff_core.defenses.removal import *  # noqa: F403
from baddiff_core.defenses.scanning import *  # noqa: F403
from baddiff_core.defenses.side_by_side import *  # noqa: F403
from baddiff_core.defenses.terd import *  # noqa: F403

__all__ = [
    *inversion.__all__,
    *scanning.__all__,
    *elijah.__all__,
    *removal.__all__,
    *pruning.__all__,
    *terd.__all__,
    *noise_tests.__all__,
    *side_by_side.__all__,
]
