"""A trigger learned with the backdoor, kept where a test of the starting noise cannot
see it.

Introduced in chapter 10 (Detecting triggered inputs). BadDiffusion's triggers add
``-1`` to most entries of the starting noise, and a test of the noise's histogram (the
book's noise test, :mod:`baddiff_core.defenses.noise_tests`) flags every one of them.
An attacker who expects that test chooses a trigger ``delta`` whose stamped noise
``x_T = eps + delta`` has the histogram of honest noise, and learns it together with
the backdoor: each training step moves ``delta`` down the gradient of the same
poisoned DDPM loss that trains the model, then projects it back onto::

    C_rho = { delta : mean(delta) = 0,  rms(delta) = sqrt(mean(delta_i^2)) = rho }.

Why this set. The entries of ``eps + delta`` follow the mixture ``F(z) = (1/d)
sum_i Phi(z - delta_i)``. Taylor's theorem with ``Phi' = phi`` and ``|phi'(x)| = |x|
phi(x) <= phi(1)`` gives ``|Phi(z - delta_i) - Phi(z) + delta_i phi(z)| <= delta_i^2
phi(1) / 2``; the zero mean cancels the first-order terms, so::

    sup_z |F(z) - Phi(z)| <= phi(1) / 2 * mean(delta_i^2) = 0.121 rho^2,

a bound on the Kolmogorov-Smirnov distance that the noise test estimates from ``d``
entries (:func:`ks_distance_bound`). Its critical value at level ``alpha`` is about
``sqrt(-log(alpha / 2) / 2) / sqrt(d)`` (0.10 for ``d = 256`` at 1 %), so ``rho =
0.5`` keeps a 16 x 16 trigger under a third of the way there. The norm is held fixed,
not only bounded: descending the loss alone shrinks the trigger towards zero (a smaller
``delta`` asks less of the model), and at ``delta = 0`` every honest noise would carry
the trigger.

What the set does not hide. ``||delta|| = rho sqrt(d)`` (8 for ``rho = 0.5``, ``d =
256``): a defender who knew ``delta`` would catch it almost always (Neyman-Pearson,
chapter 10), and the squared norm of ``eps + delta`` exceeds an honest noise's by
``||delta||^2`` on average. The constraint is tailored to the test it evades.

This is the book's own attack, in the spirit of the learned triggers of Sui et al.
(DisDet, arXiv:2402.02739), who evade their own detector with a trigger that keeps
the noise near Gaussian, and of UIBDiffusion (CVPR 2025), whose trigger is a universal
adversarial perturbation; neither paper's algorithm is used here.
"""

from __future__ import annotations

import math

import torch

from baddiff_core.checks import check_float, check_int, check_tensor

__all__ = [
    "LEARNED_TRIGGER_RMS",
    "project_trigger",
    "initial_trigger",
    "ks_distance_bound",
]

#: The default root mean square ``rho`` of a learned trigger's entries.
LEARNED_TRIGGER_RMS = 0.5

#: ``phi(1)``, the largest value of ``|phi'(x)| = |x| phi(x)``.
_PHI_OF_ONE = math.exp(-0.5) / math.sqrt(2 * math.pi)


def project_trigger(delta: torch.Tensor, rms: float) -> torch.Tensor:
    """The nearest point of ``C_rho = {mean 0, rms rho}`` to ``delta``: subtract the
    mean, then rescale to root mean square ``rho``.

    ``C_rho`` is the sphere of radius ``rho sqrt(d)`` in the hyperplane ``sum_i x_i =
    0``; the nearest point of a sphere is along the ray from its centre, and the
    centring is the projection onto the hyperplane. Computed in float64.

    Args:
        delta: any float tensor (``C,H,W`` for a trigger) whose entries are not all
            equal; one projection over all its entries.
        rms: ``rho > 0``.

    Returns:
        a new tensor of ``delta``'s shape, dtype and device, in ``C_rho``.
    """
    delta = check_tensor("delta", delta, floating=True, finite=True)
    rms = check_float("rms", rms, above=0)
    centred = delta.detach().double()
    centred = centred - centred.mean()
    spread = float(centred.pow(2).mean().sqrt())
    if spread == 0:
        raise ValueError("delta's entries are all equal: no direction to project along")
    return (centred * (rms / spread)).to(delta.dtype)


def initial_trigger(
    shape: tuple[int, ...], rms: float, *, seed: int = 0, cells: int = 4
) -> torch.Tensor:
    """Where the learned trigger starts: a smooth random pattern, Gaussian values on a
    ``cells x cells`` grid per channel, bilinearly upsampled to the image and projected
    onto ``C_rho`` (:func:`project_trigger`), from a seeded generator.

    Smooth because a convolutional network picks up a pattern of large patches in a
    few hundred steps, where a pattern of independent pixels with the same histogram
    (and the same invisibility to the noise test) it barely learns.

    Args:
        shape: the trigger's shape, ``C,H,W``.
        rms: ``rho > 0``.
        seed: seeds the grid's values.
        cells: the grid's side.

    Returns:
        a float32 ``C,H,W`` tensor in ``C_rho``.
    """
    rms = check_float("rms", rms, above=0)
    seed = check_int("seed", seed, minimum=0)
    cells = check_int("cells", cells, minimum=2)
    if len(shape) != 3:
        raise ValueError(f"a trigger has shape C,H,W, got {shape}")
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn((1, shape[0], cells, cells), generator=generator)
    smooth = torch.nn.functional.interpolate(
        grid, size=tuple(shape[1:]), mode="bilinear", align_corners=False
    )
    return project_trigger(smooth[0], rms)


def ks_distance_bound(delta: torch.Tensor) -> float:
    """The bound ``phi(1) / 2 * mean(delta_i^2)`` on the Kolmogorov-Smirnov distance
    between the entries of ``eps + delta`` (``eps ~ N(0, I)``) and ``N(0, 1)``, for a
    zero-mean ``delta`` (see the module docstring).

    Args:
        delta: a float tensor whose entries sum to zero (to float32 rounding).

    Returns:
        the bound, a distance in units of probability.
    """
    delta = check_tensor("delta", delta, floating=True, finite=True).double()
    scale = max(1.0, float(delta.abs().max()))
    if abs(float(delta.mean())) > 1e-6 * scale:
        raise ValueError(
            f"the bound holds for a zero-mean delta, got mean {float(delta.mean()):.3g}"
        )
    return _PHI_OF_ONE / 2 * float(delta.pow(2).mean())
