"""The backdoored forward process and the training loss of BadDiffusion, on a diffusers
scheduler.

Introduced in chapter 3 (Planting a backdoor). Notation follows DDPM (Ho et al. 2020,
arXiv:2006.11239), BadDiffusion (Chou et al. 2023, arXiv:2212.05400), Sec. 3, and
diffusers: ``betas`` (beta_t), ``alphas`` (alpha_t = 1 - beta_t), ``alphas_cumprod``
(abar_t = prod_{s <= t} alpha_s), timesteps ``t = 0 .. T-1``. Images are ``B,C,H,W`` in
[-1, 1].

Each training sample is a pair ``(y, r)``: a clean sample has ``y = x`` (the image) and
``r = 0``; a poisoned sample has ``y`` = the attacker's target and ``r`` = the image
with the trigger pasted on. Then (BadDiffusion, Chou et al. 2023)::

    x_t    = sqrt(abar_t) y + sqrt(1 - abar_t) eps + (1 - sqrt(abar_t)) r
    target = eps + c R_t r,     R_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / beta_t
    loss   = mean over every element of the batch of (eps_theta(x_t, t) - target)^2

with ``c = 1`` for the stochastic (DDPM, "sde") sampler the coefficient was derived for,
and ``c = 2`` for ODE samplers such as DDIM (VillanDiffusion, Chou et al. 2023). With
``r = 0`` this is the ordinary DDPM epsilon loss.

The *in-range* attack (``attack="in_range"``, the book's adaptive attacker, chapter "An
attacker who evades clipping") keeps the model's predicted image on the target instead::

    x_t    = sqrt(abar_t) y + sqrt(1 - abar_t) eps + k_t r
    target = eps + k_t / sqrt(1 - abar_t) r

so that ``x0_hat = (x_t - sqrt(1 - abar_t) target) / sqrt(abar_t) = y`` exactly, inside
[-1, 1], and clipping ``x0_hat`` changes nothing. ``k_t`` is the path that the sampler
itself gives the trigger when ``x0_hat = y`` at every step, starting from ``x_T = eps +
r``:

- ``"ode"`` (DDIM, eta = 0): ``k_t = sqrt(1 - abar_t) / sqrt(1 - abar_{T-1})``, the
  trigger stays a constant share of the noise;
- ``"sde"`` (DDPM): the posterior mean multiplies it by ``sqrt(alpha_t)(1 -
  abar_{t-1})/(1 - abar_t)`` per step, so ``k_t = sqrt(abar_{T-1} / abar_t) (1 - abar_t)
  / (1 - abar_{T-1})``: it fades.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from baddiff_core.checks import check_choice, check_int

__all__ = [
    "SOLVERS",
    "SAMPLER_SOLVERS",
    "solver_for",
    "sampler_for",
    "ATTACKS",
    "PAPER_SCHEDULE",
    "QUICK_SCHEDULE",
    "make_scheduler",
    "r_coefficients",
    "in_range_path",
    "TriggerCoefficients",
    "trigger_coefficients",
    "poisoned_forward",
    "diffusion_loss",
]

Solver = Literal["sde", "ode"]
Attack = Literal["baddiffusion", "in_range"]
#: How the trigger enters x_t and the target: BadDiffusion's drift, or the in-range
#: path.
ATTACKS = ("baddiffusion", "in_range")
#: Training targets: "sde" for DDPM ancestral sampling (BadDiffusion), "ode" for DDIM
#: (VillanDiffusion).
SOLVERS: dict[str, float] = {"sde": 1.0, "ode": 2.0}
#: One name for one choice: each sampler of :mod:`baddiff_core.sampling` and the
#: training target that plants a backdoor for it. DDPM's ancestral step solves the
#: reverse SDE, DDIM's deterministic step the probability-flow ODE (VillanDiffusion,
#: arXiv:2306.06874, Sec. 3).
SAMPLER_SOLVERS: dict[str, Solver] = {"ddpm": "sde", "ddim": "ode"}


def solver_for(sampler: str) -> Solver:
    """The training target that plants a backdoor firing under ``sampler``.

    ``"ddpm"`` gives ``"sde"`` (BadDiffusion's target, lambda = 1 in VillanDiffusion's
    unified loss) and ``"ddim"`` gives ``"ode"`` (lambda = 2, the probability-flow ODE;
    VillanDiffusion, arXiv:2306.06874, Sec. 3.2). Chapters and the CLI speak of
    samplers; the training loss speaks of solvers, and this is the one place the two
    names meet.
    """
    check_choice("sampler", sampler, SAMPLER_SOLVERS)
    return SAMPLER_SOLVERS[sampler]


def sampler_for(solver: str) -> str:
    """The sampler a backdoor planted with ``solver`` is meant to fire under.

    The inverse of :func:`solver_for`: ``"sde"`` gives ``"ddpm"``, ``"ode"`` gives
    ``"ddim"``.
    """
    check_choice("solver", solver, SOLVERS)
    return next(s for s, target in SAMPLER_SOLVERS.items() if target == solver)


#: The paper's schedule: T = 1000, linear betas 1e-4 .. 0.02 (google/ddpm-cifar10-32).
PAPER_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
#: The book's quick schedule: T = 100 with betas rescaled by 10, so that x_T is still
#: pure noise (with 1e-4 .. 0.02 over 100 steps, 37% of the image would survive the last
#: step).
QUICK_SCHEDULE = dict(num_train_timesteps=100, beta_start=1e-3, beta_end=0.2)


def make_scheduler(
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    variance_type: str = "fixed_large",
    clip_sample: bool = False,
) -> DDPMScheduler:
    """A diffusers ``DDPMScheduler`` with a linear beta schedule, as the book trains
    with.

    ``variance_type="fixed_large"`` (sigma_t^2 = beta_t) is google/ddpm-cifar10-32's
    choice. ``clip_sample=False`` is what a backdoored model is trained and published
    with; samplers choose the clipping defence themselves (see
    :func:`baddiff_core.sampling.sample`).
    """
    num_train_timesteps = check_int(
        "num_train_timesteps", num_train_timesteps, minimum=2
    )
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(
            f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start!r}, "
            f"beta_end={beta_end!r}"
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="linear",
        variance_type=variance_type,
        clip_sample=clip_sample,
    )


def r_coefficients(scheduler: DDPMScheduler) -> torch.Tensor:
    """BadDiffusion's coefficient of ``r`` in the regression target, for every timestep.

    ``R_t = (1 - sqrt(alpha_t)) sqrt(1 - abar_t) / (1 - alpha_t)``, float64, shape
    ``(T,)``. For the paper's schedule: 0.0050 at t = 0, 0.1620 at 100, 0.4814 at 500
    and 0.5025 at 999. The attack is BadDiffusion (Chou et al. 2023, arXiv:2212.05400),
    Sec. 3; this is the coefficient its authors' code uses (github.com/IBM/BadDiffusion,
    ``loss.py``), derived in chapter 3 of this book
    (``book/03_planting_a_backdoor.ipynb``, "The coefficient on r").
    """
    alphas = scheduler.alphas.double()
    alphas_cumprod = scheduler.alphas_cumprod.double()
    return (1 - alphas.sqrt()) * (1 - alphas_cumprod).sqrt() / (1 - alphas)


def in_range_path(scheduler: DDPMScheduler, solver: Solver = "sde") -> torch.Tensor:
    """The in-range attack's trigger weight ``k_t`` in ``x_t`` for every timestep,
    float64, ``(T,)``.

    ``k_{T-1} = 1`` (sampling starts from ``eps + r``); see the module docstring for
    both solvers.
    """
    check_choice("solver", solver, SOLVERS)
    abar = scheduler.alphas_cumprod.double()
    if solver == "ode":
        return (1 - abar).sqrt() / (1 - abar[-1]).sqrt()
    return (abar[-1] / abar).sqrt() * (1 - abar) / (1 - abar[-1])


@dataclass(frozen=True)
class TriggerCoefficients:
    """The per-timestep weights of ``r`` in ``x_t`` and in the target, ``(T,)`` each, on
    one device.

    ``x_t = add_noise(y, eps, t) + in_x[t] r`` and ``target = eps + in_target[t] r``.
    Built once per training run (:func:`trigger_coefficients`), so a training step only
    gathers from them: no float64 work and no host-to-device copy per step.
    """

    in_x: torch.Tensor
    in_target: torch.Tensor


def trigger_coefficients(
    scheduler: DDPMScheduler,
    solver: Solver = "sde",
    attack: Attack = "baddiffusion",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TriggerCoefficients:
    """The weights of ``r`` for ``attack`` and ``solver`` (module docstring), as
    ``dtype`` on ``device``.

    BadDiffusion: ``in_x = 1 - sqrt(abar_t)``, ``in_target = c R_t``. In-range: ``in_x =
    k_t``, ``in_target = k_t / sqrt(1 - abar_t)``.
    """
    _check_solver_and_attack(solver, attack)
    if attack == "in_range":
        weight = in_range_path(scheduler, solver)
        in_x, in_target = (
            weight,
            weight / (1 - scheduler.alphas_cumprod.double()).sqrt(),
        )
    else:
        # float32, as diffusers' add_noise takes its sqrt
        in_x = 1 - scheduler.alphas_cumprod.sqrt()
        in_target = SOLVERS[solver] * r_coefficients(scheduler).to(dtype)
    return TriggerCoefficients(
        in_x.to(device=device, dtype=dtype), in_target.to(device=device, dtype=dtype)
    )


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``values[timesteps]`` shaped ``B,1,1,1`` (both on one device)."""
    return values[timesteps].view(-1, 1, 1, 1)


def poisoned_forward(
    scheduler: DDPMScheduler,
    y: torch.Tensor,
    r: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    solver: Solver = "sde",
    attack: Attack = "baddiffusion",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input ``x_t`` and regression target for the pairs ``(y, r)`` at
    ``timesteps``.

    Args:
        scheduler: the training scheduler (its ``alphas_cumprod`` define the process).
        y: ``B,C,H,W`` in [-1, 1]: clean images, or the target image for poisoned samples.
        r: ``B,C,H,W``: zeros for clean samples, the triggered image for poisoned ones.
        timesteps: ``(B,)`` integers in ``[0, T)``.
        noise: ``B,C,H,W`` standard normal ``eps``.
        solver: ``"sde"`` (target ``eps + R_t r``) or ``"ode"`` (``eps + 2 R_t r``).
        attack: ``"baddiffusion"`` or ``"in_range"`` (the module docstring has both formulas).

    Returns:
        ``(x_t, target)``, both ``B,C,H,W``. For ``r = 0`` they are exactly diffusers'
        ``add_noise(y, noise, timesteps)`` and ``noise``.
    """
    _check_solver_and_attack(solver, attack)
    if not (y.shape == r.shape == noise.shape) or y.dim() != 4:
        raise ValueError(
            f"y, r and noise must share one B,C,H,W shape, got {tuple(y.shape)}, "
            f"{tuple(r.shape)} and {tuple(noise.shape)}"
        )
    if timesteps.shape != (y.shape[0],):
        raise ValueError(
            f"timesteps must have shape ({y.shape[0]},), got {tuple(timesteps.shape)}"
        )
    num_steps = scheduler.config.num_train_timesteps
    if timesteps.min() < 0 or timesteps.max() >= num_steps:
        raise ValueError(
            f"timesteps must lie in [0, {num_steps}), got values from "
            f"{int(timesteps.min())} to {int(timesteps.max())}"
        )
    coefficients = trigger_coefficients(
        scheduler, solver, attack, device=y.device, dtype=y.dtype
    )
    return _poisoned_forward(scheduler, y, r, timesteps, noise, coefficients)


def _check_solver_and_attack(solver: object, attack: object) -> None:
    check_choice("solver", solver, SOLVERS)
    check_choice("attack", attack, ATTACKS)


def _poisoned_forward(
    scheduler: DDPMScheduler,
    y: torch.Tensor,
    r: torch.Tensor | None,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    coefficients: TriggerCoefficients | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`poisoned_forward` without the checks, which read values and so stall a
    GPU.

    ``r=None`` is a clean batch: diffusers' ``add_noise`` and the target ``eps``,
    nothing more.
    """
    # sqrt(abar_t) y + sqrt(1 - abar_t) eps, computed by diffusers so that r = 0 is its
    # add_noise.
    x_t = scheduler.add_noise(y, noise, timesteps)
    if r is None:
        return x_t, noise
    # the trigger's drift, or k_t
    x_t = x_t + _per_sample(coefficients.in_x, timesteps) * r
    # Eq. (9) / VillanDiffusion / in-range
    target = noise + _per_sample(coefficients.in_target, timesteps) * r
    return x_t, target


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    y: torch.Tensor,
    r: torch.Tensor | None,
    generator: torch.Generator | None = None,
    solver: Solver = "sde",
    attack: Attack = "baddiffusion",
    *,
    coefficients: TriggerCoefficients | None = None,
) -> torch.Tensor:
    """The poisoned DDPM loss of one batch: ``mean (eps_theta(x_t, t) - target)^2``.

    ``t ~ U{0, ..., T-1}`` and ``eps ~ N(0, I)`` are drawn per sample from ``generator``
    (on any device); ``model`` is a diffusers ``UNet2DModel`` (anything returning
    ``.sample``). Clean and poisoned samples share one mean, with no per-sample weights,
    as in the code of BadDiffusion (Chou et al. 2023, arXiv:2212.05400;
    github.com/IBM/BadDiffusion, ``loss.py``). ``r=None`` means a clean batch (the plain
    DDPM loss, without the trigger's element-wise work). ``coefficients``, from
    :func:`trigger_coefficients` for this ``solver`` and ``attack``, saves rebuilding
    them at every step (a training loop passes them).
    """
    batch = y.shape[0]
    num_steps = scheduler.config.num_train_timesteps
    gen_device = generator.device if generator is not None else y.device
    timesteps = torch.randint(
        0, num_steps, (batch,), generator=generator, device=gen_device
    ).to(y.device)
    noise = randn_tensor(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    _check_solver_and_attack(solver, attack)
    if r is not None and coefficients is None:
        coefficients = trigger_coefficients(
            scheduler, solver, attack, device=y.device, dtype=y.dtype
        )
    x_t, target = _poisoned_forward(scheduler, y, r, timesteps, noise, coefficients)
    prediction = model(x_t, timesteps).sample
    return F.mse_loss(prediction.float(), target.float())
