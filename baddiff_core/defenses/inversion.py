"""Trigger inversion: estimate a backdoor's trigger from the model alone.

The book's inversion: Elijah's objective (An et al. 2024, arXiv:2312.00050; its
authors' code, github.com/njuaplusplus/Elijah, ``BadDiffusion/elijah_helper.py``,
``opt_r``) with the echo strength ``lambda`` of the model's own schedule, where Elijah
fixes the constant of the paper's schedule (:mod:`baddiff_core.defenses.elijah` runs
Elijah with its published settings). A model backdoored with trigger ``g`` has learnt,
at the last step::

    eps_theta(eps + g, T-1) ~ eps + lambda g,       lambda = c R_{T-1}

(``c = 1`` for the BadDiffusion/DDPM target, 2 for the VillanDiffusion ODE target).
Averaged over many noises ``eps`` the noise cancels, so a trigger estimate ``tau``
minimises::

    | mean_i eps_theta(eps_i + tau, T-1) - lambda tau |_1

A clean model predicts about ``eps + tau`` there, which only ``tau = 0`` satisfies.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from baddiff_core.checks import check_positive_int
from baddiff_core.diffusion import SOLVERS, r_coefficients

__all__ = ["InvertedTrigger", "inversion_lambda", "invert_trigger"]


@dataclass
class InvertedTrigger:
    """A trigger estimate found from the model alone.

    Attributes:
        trigger: ``C,H,W``, in the units of the starting noise (added raw to ``eps``, as a trigger is).
        lam: the ``lambda`` the inversion aimed at.
        losses: the inversion loss at every step.
        seconds: wall time.
    """

    trigger: torch.Tensor
    lam: float
    losses: list[float]
    seconds: float


def inversion_lambda(scheduler: DDPMScheduler, solver: str = "sde") -> float:
    """``lambda = c R_{T-1}``: how strongly a backdoored model echoes the trigger at the
    last step.

    ``R_{T-1} = (1 - sqrt(alpha)) sqrt(1 - abar) / beta`` at ``t = T-1`` is 0.5025 for
    the paper's schedule (Elijah's 0.5); ``c`` is 1 for the BadDiffusion (``"sde"``)
    target and 2 for the VillanDiffusion ODE target (Elijah's 1.0).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not known; use one of {tuple(SOLVERS)}")
    return SOLVERS[solver] * float(r_coefficients(scheduler)[-1])


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode with no parameter gradients; both restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(was_training)


def last_timestep(
    scheduler: DDPMScheduler, batch: int, device: torch.device
) -> torch.Tensor:
    """``T-1`` for each of ``batch`` samples: the step the trigger enters at."""
    return torch.full(
        (batch,),
        scheduler.config.num_train_timesteps - 1,
        device=device,
        dtype=torch.long,
    )


def image_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    """The ``C,H,W`` of the images ``unet`` denoises."""
    return unet.config.in_channels, unet.config.sample_size, unet.config.sample_size


def invert_trigger(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    num_noise: int = 100,
    steps: int = 100,
    lr: float = 0.1,
    lam: float | None = None,
    solver: str = "sde",
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> InvertedTrigger:
    """Estimate a backdoor trigger from the model alone (Elijah's objective, the
    schedule's lambda).

    Minimises ``mean | mean_i eps_theta(eps_i + tau, T-1) - lam tau |`` over ``tau`` with Adam,
    from ``tau = -U[0, 1)`` and a fixed batch of ``num_noise`` noises ``eps_i``, with
    Elijah's optimiser (An et al. 2024, arXiv:2312.00050: B = 100, lr 0.1, 100 steps)
    but ``lam`` from the schedule (:func:`inversion_lambda`) rather than Elijah's
    constant 0.5 (:func:`~baddiff_core.defenses.elijah.elijah_inversion`).

    Args:
        unet, scheduler: the model under test and its training schedule.
        num_noise: the ``eps_i`` averaged over (more: less noise in the mean, slower steps).
        steps, lr: Adam steps and learning rate.
        lam: the echo strength aimed at; default :func:`inversion_lambda` of ``solver``.
        generator: source of ``eps_i`` and of the initial ``tau`` (CPU generator).
    """
    check_positive_int("num_noise", num_noise)
    check_positive_int("steps", steps)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got lr={lr!r}")
    lam = inversion_lambda(scheduler, solver) if lam is None else float(lam)
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    shape = image_shape(unet)
    generator = generator or torch.Generator().manual_seed(0)
    noise = torch.randn((num_noise, *shape), generator=generator).to(device, dtype)
    tau = (-torch.rand(shape, generator=generator)).to(device, dtype)
    return descend_echo_loss(
        unet, scheduler, noise, tau, lam=lam, lr=lr, steps=steps, progress=progress
    )


def descend_echo_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    noise: torch.Tensor,
    tau: torch.Tensor,
    *,
    lam: float,
    lr: float,
    steps: int,
    progress: bool,
    desc: str = "trigger inversion",
) -> InvertedTrigger:
    """Adam on ``tau`` from its given start, ``steps`` times, against Elijah's loss
    ``mean | mean_i eps_theta(eps_i + tau, T-1) - lam tau |`` on the fixed ``noise``
    batch ``eps_i`` (An et al. 2024, arXiv:2312.00050). The loop both inversions
    share: :func:`invert_trigger` (the book's start and lambda) and
    :func:`~baddiff_core.defenses.elijah.elijah_inversion` (the released code's)."""
    tau = tau.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([tau], lr=lr)
    timesteps = last_timestep(scheduler, len(noise), noise.device)
    losses = []
    began = time.perf_counter()
    with frozen(unet):
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            mean_prediction = unet(noise + tau, timesteps).sample.mean(dim=0)
            loss = (mean_prediction - lam * tau).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    losses = torch.stack(losses).float().cpu().tolist()
    return InvertedTrigger(tau.detach(), lam, losses, time.perf_counter() - began)
