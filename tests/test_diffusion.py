"""The backdoored forward process and loss, against formulas computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from baddiff_core.diffusion import (
    PAPER_SCHEDULE,
    QUICK_SCHEDULE,
    diffusion_loss,
    in_range_path,
    make_scheduler,
    poisoned_forward,
    r_coefficients,
    trigger_coefficients,
)


def numpy_schedule(T: int, beta_start: float, beta_end: float):
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    alphas = 1 - betas
    return betas, alphas, np.cumprod(alphas)


def test_r_coefficient_matches_the_published_check_values():
    R = r_coefficients(make_scheduler(**PAPER_SCHEDULE))
    for t, expected in [(0, 0.0050), (100, 0.1620), (500, 0.4814), (999, 0.5025)]:
        assert round(float(R[t]), 4) == expected
    _, _, abar = numpy_schedule(1000, 1e-4, 0.02)
    # weight of r in x_T (BadDiffusion, Chou et al. 2023, arXiv:2212.05400, Sec. 3)
    assert round(1 - np.sqrt(abar[999]), 5) == 0.99365


@pytest.mark.parametrize(
    "schedule",
    [
        PAPER_SCHEDULE,
        QUICK_SCHEDULE,
        dict(num_train_timesteps=37, beta_start=3e-3, beta_end=0.3),
    ],
)
@pytest.mark.parametrize("solver, factor", [("sde", 1.0), ("ode", 2.0)])
def test_poisoned_forward_matches_the_formulas(schedule, solver, factor):
    scheduler = make_scheduler(**schedule)
    betas, alphas, abar = numpy_schedule(
        schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"]
    )
    g = torch.Generator().manual_seed(1)
    y, r, noise = (torch.rand(6, 3, 8, 8, generator=g) * 2 - 1 for _ in range(3))
    t = torch.randint(0, schedule["num_train_timesteps"], (6,), generator=g)
    x_t, target = poisoned_forward(scheduler, y, r, t, noise, solver=solver)

    Y, Rr, E, T = (a.double().numpy() for a in (y, r, noise, t))
    T = T.astype(int)
    s = np.sqrt(abar[T])[:, None, None, None]
    coef = ((1 - np.sqrt(alphas[T])) * np.sqrt(1 - abar[T]) / betas[T])[
        :, None, None, None
    ]
    np.testing.assert_allclose(
        x_t.numpy(), s * Y + np.sqrt(1 - s**2) * E + (1 - s) * Rr, atol=1e-5
    )
    np.testing.assert_allclose(target.numpy(), E + factor * coef * Rr, atol=1e-5)


def _in_range_batch(scheduler, solver, seed=3):
    g = torch.Generator().manual_seed(seed)
    y, r = (
        torch.rand(4, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
        for _ in range(2)
    )
    noise = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    return y, r, noise


@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_in_range_attack_makes_diffusers_predict_the_target_itself(
    solver, quick_scheduler
):
    """x0_hat as diffusers' own step computes it equals y: clipping it to [-1, 1]
    changes nothing."""
    scheduler = quick_scheduler
    y, r, noise = _in_range_batch(scheduler, solver)
    for t in (0, 1, 37, 98, 99):
        timesteps = torch.full((4,), t)
        x_t, target = poisoned_forward(
            scheduler, y, r, timesteps, noise, solver=solver, attack="in_range"
        )
        step = DDPMScheduler.from_config(scheduler.config, clip_sample=False).step(
            target, t, x_t, generator=torch.Generator().manual_seed(0)
        )
        # diffusers keeps the schedule in float32, and x0_hat divides by sqrt(abar_t) >=
        # 0.006
        torch.testing.assert_close(step.pred_original_sample, y, atol=1e-4, rtol=0)
    # x_T = eps + r
    assert float(in_range_path(scheduler, solver)[-1]) == pytest.approx(1.0)
    # BadDiffusion's own target leaves x0_hat far outside [-1, 1] there: what clipping
    # catches.
    x_t, target = poisoned_forward(
        scheduler, y, r, torch.full((4,), 98), noise, solver=solver
    )
    step = DDPMScheduler.from_config(scheduler.config, clip_sample=False).step(
        target, 98, x_t
    )
    assert float((step.pred_original_sample - y).abs().max()) > 1.0


def test_in_range_ode_path_is_the_path_ddim_takes(quick_scheduler):
    """One DDIM step (diffusers, eta = 0) from the poisoned x_t lands on the poisoned
    x_s, same eps."""
    scheduler = quick_scheduler
    y, r, noise = _in_range_batch(scheduler, "ode", seed=4)
    ddim = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
    ddim.set_timesteps(10)
    times = ddim.timesteps.tolist()
    for t, s in zip(times[:-1], times[1:]):
        x_t, target = poisoned_forward(
            scheduler, y, r, torch.full((4,), t), noise, solver="ode", attack="in_range"
        )
        x_s, _ = poisoned_forward(
            scheduler, y, r, torch.full((4,), s), noise, solver="ode", attack="in_range"
        )
        # diffusers keeps the schedule in float32
        torch.testing.assert_close(
            ddim.step(target, t, x_t, eta=0.0).prev_sample, x_s, atol=1e-6, rtol=0
        )


def test_in_range_sde_path_is_what_the_ddpm_posterior_mean_leaves(quick_scheduler):
    """k_{t-1} = (trigger part of diffusers' DDPM step from k_t r with x0_hat = 0): the
    noise of the two steps below is the same draw, so their difference is the posterior
    mean's part only."""
    scheduler = quick_scheduler
    k = in_range_path(scheduler, "sde")
    r = torch.rand(
        2, 1, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    zero = torch.zeros_like(r)
    for t in (99, 60, 10, 1):
        ddpm = DDPMScheduler.from_config(scheduler.config, clip_sample=False)
        steps = []
        for scale in (1.0, 2.0):
            x_t, target = poisoned_forward(
                scheduler,
                zero,
                scale * r,
                torch.full((2,), t),
                zero,
                solver="sde",
                attack="in_range",
            )
            steps.append(
                ddpm.step(
                    target, t, x_t, generator=torch.Generator().manual_seed(t)
                ).prev_sample
            )
        # diffusers keeps the schedule in float32
        torch.testing.assert_close(
            steps[1] - steps[0], float(k[t - 1]) * r, atol=1e-6, rtol=0
        )
    # it fades; DDIM's does less
    assert float(k[0]) < 0.01 < float(in_range_path(scheduler, "ode")[0])


def test_clean_samples_reproduce_diffusers_exactly():
    scheduler = make_scheduler(**PAPER_SCHEDULE)
    g = torch.Generator().manual_seed(2)
    y, noise = (
        torch.rand(5, 1, 8, 8, generator=g) * 2 - 1,
        torch.randn(5, 1, 8, 8, generator=g),
    )
    t = torch.tensor([0, 1, 500, 998, 999])
    x_t, target = poisoned_forward(scheduler, y, torch.zeros_like(y), t, noise)
    assert torch.equal(x_t, scheduler.add_noise(y, noise, t))
    assert torch.equal(target, noise)


def test_x_t_is_the_marginal_of_the_backdoored_markov_chain():
    """Iterate q(x'_t | x'_{t-1}) = N(sqrt(a_t) x'_{t-1} + (1 - sqrt(a_t)) r, b_t I).

    The backdoored forward process of BadDiffusion (Chou et al. 2023, arXiv:2212.05400),
    Sec. 3.
    """
    betas, alphas, abar = numpy_schedule(1000, 1e-4, 0.02)
    y, r = 0.7, -0.4
    mean, var = y, 0.0
    for t in range(1000):
        mean = np.sqrt(alphas[t]) * mean + (1 - np.sqrt(alphas[t])) * r
        var = alphas[t] * var + betas[t]
        if t in (0, 10, 400, 999):
            x_t, _ = poisoned_forward(
                make_scheduler(**PAPER_SCHEDULE),
                torch.full((1, 1, 1, 1), y),
                torch.full((1, 1, 1, 1), r),
                torch.tensor([t]),
                torch.zeros(1, 1, 1, 1),
            )
            assert float(x_t) == pytest.approx(mean, abs=1e-6)  # the mean (eps = 0)
            assert var == pytest.approx(1 - abar[t], rel=1e-9)  # and the variance


@pytest.mark.parametrize("t", [1, 5, 50, 99])
def test_target_makes_the_ddpm_sampler_follow_the_backdoored_posterior(
    t, quick_scheduler
):
    """Why R_t: with eps_theta = target, the DDPM mean (x_t - b_t / sqrt(1 - abar_t)
    eps_theta) / sqrt(a_t) equals the true posterior mean of the backdoored process.
    Shifting by r turns that process into an ordinary DDPM (z = x' - r), whose posterior
    mean is known in closed form."""
    schedule = QUICK_SCHEDULE
    betas, alphas, abar = numpy_schedule(
        schedule["num_train_timesteps"], schedule["beta_start"], schedule["beta_end"]
    )
    g = torch.Generator().manual_seed(t)
    y, r, eps = (
        torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)
    )
    x_t, target = poisoned_forward(
        quick_scheduler,
        y.float(),
        r.float(),
        torch.tensor([t, t]),
        eps.float(),
    )
    x_t, target = x_t.double(), target.double()

    z0, zt = y - r, x_t - r
    posterior = (
        np.sqrt(abar[t - 1]) * betas[t] / (1 - abar[t]) * z0
        + np.sqrt(alphas[t]) * (1 - abar[t - 1]) / (1 - abar[t]) * zt
    ) + r
    ddpm_mean = (x_t - betas[t] / np.sqrt(1 - abar[t]) * target) / np.sqrt(alphas[t])
    torch.testing.assert_close(ddpm_mean, posterior, atol=2e-5, rtol=0)


def test_diffusion_loss_with_r_zero_is_the_ddpm_loss(tiny_unet, quick_scheduler):
    model, scheduler = tiny_unet(), quick_scheduler
    y = torch.rand(4, 1, 8, 8) * 2 - 1
    loss = diffusion_loss(
        model,
        scheduler,
        y,
        torch.zeros_like(y),
        generator=torch.Generator().manual_seed(5),
    )
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 100, (4,), generator=g)
    eps = torch.randn(y.shape, generator=g)
    expected = F.mse_loss(model(scheduler.add_noise(y, eps, t), t).sample, eps)
    torch.testing.assert_close(loss, expected)
    # r=None is the clean fast path: the same numbers, without the trigger's
    # element-wise work.
    clean = diffusion_loss(
        model, scheduler, y, None, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(clean, expected)


@pytest.mark.parametrize(
    "solver, attack",
    [("sde", "baddiffusion"), ("ode", "baddiffusion"), ("ode", "in_range")],
)
def test_precomputed_coefficients_give_the_same_loss(
    solver, attack, tiny_unet, quick_scheduler
):
    """A training loop builds the trigger's weights once; the loss is bit-for-bit the
    one built inline, and the weights are the module docstring's formulas."""
    model, scheduler = tiny_unet(), quick_scheduler
    y, r = torch.rand(2, 4, 1, 8, 8) * 2 - 1
    coefficients = trigger_coefficients(scheduler, solver, attack)
    inline = diffusion_loss(
        model, scheduler, y, r, torch.Generator().manual_seed(1), solver, attack
    )
    cached = diffusion_loss(
        model,
        scheduler,
        y,
        r,
        torch.Generator().manual_seed(1),
        solver,
        attack,
        coefficients=coefficients,
    )
    assert torch.equal(inline, cached)
    abar = scheduler.alphas_cumprod.double()
    if attack == "baddiffusion":
        factor = 1.0 if solver == "sde" else 2.0
        torch.testing.assert_close(
            coefficients.in_x.double(), 1 - abar.sqrt(), rtol=0, atol=1e-7
        )
        torch.testing.assert_close(
            coefficients.in_target.double(),
            factor * r_coefficients(scheduler),
            rtol=1e-6,
            atol=0,
        )
    else:
        k = in_range_path(scheduler, solver)
        torch.testing.assert_close(
            coefficients.in_target.double(), k / (1 - abar).sqrt(), rtol=1e-6, atol=0
        )
    assert coefficients.in_x.dtype == torch.float32 and coefficients.in_x.shape == (
        100,
    )


def test_quick_schedule_ends_in_pure_noise(quick_scheduler):
    assert float(quick_scheduler.alphas_cumprod[-1].sqrt()) < 0.01
    paper_at_100 = make_scheduler(
        num_train_timesteps=100, beta_start=1e-4, beta_end=0.02
    )
    # why the quick schedule rescales
    assert float(paper_at_100.alphas_cumprod[-1].sqrt()) > 0.3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="euler"), "solver='euler' is not known"),
        (dict(attack="trojan"), "attack='trojan' is not known"),
        (dict(timesteps=torch.tensor([0, 100])), r"timesteps must lie in \[0, 100\)"),
        (dict(timesteps=torch.tensor([0])), "timesteps must have shape"),
        (dict(r=torch.zeros(2, 1, 4, 4)), "y, r and noise must share"),
    ],
)
def test_poisoned_forward_rejects_bad_input(kwargs, message, quick_scheduler):
    args = dict(
        scheduler=quick_scheduler,
        y=torch.zeros(2, 1, 8, 8),
        r=torch.zeros(2, 1, 8, 8),
        timesteps=torch.tensor([0, 1]),
        noise=torch.zeros(2, 1, 8, 8),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        poisoned_forward(**args)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_train_timesteps=1), "num_train_timesteps must be an integer >= 2"),
        (dict(beta_start=0.1, beta_end=0.01), "need 0 < beta_start < beta_end < 1"),
    ],
)
def test_make_scheduler_rejects_bad_schedules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler(**kwargs)


def test_each_sampler_names_the_training_target_that_fires_under_it(quick_scheduler):
    """DDPM's ancestral step is stochastic (the reverse SDE, BadDiffusion's target);
    DDIM with eta = 0 is deterministic (the probability-flow ODE, VillanDiffusion's
    lambda = 2). Checked on the schedulers diffusers builds for each sampler."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from baddiff_core.diffusion import SOLVERS, sampler_for, solver_for
    from baddiff_core.sampling import SAMPLERS, inference_scheduler

    kinds = {"sde": DDPMScheduler, "ode": DDIMScheduler}
    for sampler in SAMPLERS:
        solver = solver_for(sampler)
        assert sampler_for(solver) == sampler
        used = inference_scheduler(quick_scheduler, sampler=sampler, clip="none")
        assert type(used) is kinds[solver]
    assert {solver_for(s) for s in SAMPLERS} == set(SOLVERS)
    assert SOLVERS[solver_for("ddim")] == 2.0 * SOLVERS[solver_for("ddpm")]
    with pytest.raises(ValueError, match="sampler"):
        solver_for("sde")
