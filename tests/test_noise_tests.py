"""The book's noise test (a Kolmogorov-Smirnov test of a starting noise against
N(0, I)), checked against hand-derived cases and its exact false-positive rate."""

from __future__ import annotations

import math

import pytest
import torch

from baddiff_core.checks import WrongTypeError
from baddiff_core.defenses.noise_tests import noise_test
from baddiff_core.triggers import make_trigger


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_one_entry_has_the_hand_derived_distance_and_p_value():
    # With one entry x, F_1 jumps from 0 to 1 at x, so D = max(Phi(x), 1 - Phi(x)),
    # and for n = 1 the exact null law is P(D >= d) = 2 (1 - d) for d >= 1/2.
    values = torch.tensor([-1.3, 0.2, 2.0]).view(3, 1, 1, 1)
    result = noise_test(values, alpha=0.05)
    for x, d, p in zip(values.flatten(), result.statistic, result.p_value):
        expected = max(_phi(float(x)), 1 - _phi(float(x)))
        assert float(d) == pytest.approx(expected, abs=1e-9)
        assert float(p) == pytest.approx(2 * (1 - expected), abs=1e-9)
    assert result.flagged.tolist() == [False, False, True]  # p = 0.19, 0.84, 0.046


def test_a_constant_noise_is_half_a_distribution_away():
    # All d entries at 0: F jumps 0 -> 1 at 0, where Phi is 1/2.
    result = noise_test(torch.zeros(1, 3, 8, 8))
    assert float(result.statistic[0]) == pytest.approx(0.5)
    assert bool(result.flagged[0])


def test_honest_noise_is_flagged_at_the_rate_alpha():
    n, alpha = 4000, 0.05
    noise = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    share = noise_test(noise, alpha=alpha).flagged_share
    standard_error = math.sqrt(alpha * (1 - alpha) / n)
    assert abs(share - alpha) < 3 * standard_error, share


@pytest.mark.parametrize("kind", ["box", "stop_sign", "white_box"])
def test_every_baddiffusion_trigger_is_flagged(kind):
    # x_T = eps + g with g's -1 background: most entries shift by -1.
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    triggered = noise + make_trigger(kind, 32, 3)
    assert noise_test(triggered, alpha=0.001).flagged_share == 1.0


def test_a_permuted_noise_passes_whatever_it_hides():
    # The test sees the entries' histogram only: reordering honest noise keeps it.
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    shuffled = noise.flatten()[torch.randperm(noise.numel())].view_as(noise)
    a, b = noise_test(noise), noise_test(shuffled)
    assert torch.equal(a.statistic, b.statistic)


def test_bad_arguments_fail_in_one_line():
    with pytest.raises(ValueError, match=r"alpha must be a real number in \(0, 1\)"):
        noise_test(torch.zeros(1, 1, 2, 2), alpha=1.0)
    with pytest.raises(ValueError, match="noise"):
        noise_test(torch.zeros(2, 2, 2))
    with pytest.raises((ValueError, WrongTypeError), match="noise"):
        noise_test(torch.tensor([[[[float("nan")]]]]))
