"""The book's noise test: is a starting noise drawn from N(0, I)?

A sampling service that lets users send their own starting noise ``x_T`` can look at it
before it runs the model. An honest ``x_T`` is a draw of ``N(0, I)``: its ``d = C H W``
entries are ``d`` independent standard normal numbers. A BadDiffusion trigger is added
raw, ``x_T = eps + g`` with ``g``'s transparent background at -1 (Chou et al. 2023,
arXiv:2212.05400, Sec. 3), so most entries of a triggered noise are shifted by -1.

DisDet (Sui et al. 2024, arXiv:2402.02739) proposes to detect triggered inputs by the
discrepancy between their distribution and the benign noise's; its exact statistic is
not used here. This module's test is **the book's own**, the simplest test of that
idea: the one-sample Kolmogorov-Smirnov test of an input's ``d`` entries against the
standard normal distribution::

    D = sup_z | F_d(z) - Phi(z) |,        F_d: the entries' empirical distribution,

which rejects at level ``alpha`` when its p-value is below ``alpha``. The null
distribution of ``D`` does not depend on ``Phi`` (the entries are continuous), so on
honest noise the test flags a fraction ``alpha`` of the inputs, exactly: that is the
false-positive rate, set by the defender. It looks at one input at a time, needs no
model, and sees the entries' distribution only, not where in the image they are: a
trigger that keeps the entries' histogram standard normal (a permutation of the noise,
say) passes it by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import stats

from baddiff_core.checks import check_float, check_tensor

__all__ = ["NoiseTest", "noise_test"]


@dataclass(frozen=True)
class NoiseTest:
    """The noise test of a batch of starting noises.

    Attributes:
        statistic: the Kolmogorov-Smirnov distance ``D`` of each input, shape ``(n,)``.
        p_value: the probability of a distance at least ``D`` under ``N(0, I)``,
            shape ``(n,)``.
        alpha: the test's level, the false-positive rate on honest noise.
        flagged: ``p_value < alpha``, shape ``(n,)``: the inputs judged triggered.
    """

    statistic: torch.Tensor
    p_value: torch.Tensor
    alpha: float
    flagged: torch.Tensor

    @property
    def flagged_share(self) -> float:
        """The fraction of the inputs flagged."""
        return float(self.flagged.float().mean())


def noise_test(noise: torch.Tensor, *, alpha: float = 0.01) -> NoiseTest:
    """Test each starting noise ``x_T`` of ``noise`` (``n,C,H,W``) against ``N(0, I)``.

    The one-sample Kolmogorov-Smirnov test (``scipy.stats.kstest``, exact p-values) of
    each input's ``C H W`` entries against the standard normal distribution; an input is
    flagged when its p-value is below ``alpha``, so honest noise is flagged with
    probability ``alpha``.
    """
    noise = check_tensor("noise", noise, layout="n,C,H,W", finite=True)
    alpha = check_float("alpha", alpha, above=0, below=1, meaning="the test's level")
    entries = noise.detach().flatten(1).double().cpu().numpy()
    result = stats.kstest(entries, stats.norm.cdf, axis=1)
    statistic = torch.as_tensor(result.statistic, dtype=torch.float64).reshape(-1)
    p_value = torch.as_tensor(result.pvalue, dtype=torch.float64).reshape(-1)
    return NoiseTest(statistic, p_value, alpha, p_value < alpha)
