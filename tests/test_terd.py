"""TERD as released (Mo et al. 2024, arXiv:2409.05294): the reversed loss against hand
values and its closed-form expectation, the two-stage inversion on toy models with a
known answer (and its draws replayed by hand), the input test against scipy and
Monte-Carlo counts, the model-level features against torch's KL, the cache, and the
argument checks.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import multivariate_normal, norm

from baddiff_core.defenses.terd import (
    TERD_CIFAR10,
    TERD_TIMESTEP_WINDOW,
    TerdModelScore,
    TerdSettings,
    TerdTrigger,
    detect_inputs,
    estimate_trigger,
    input_detection_rates,
    input_log_likelihood_ratio,
    model_kl_score,
    reversed_loss,
)
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler

# --------------------------------------------------------------------------- #
# Toy models whose noise prediction is a known function of the input
# --------------------------------------------------------------------------- #


class PointwiseModel(torch.nn.Module):
    """``eps_theta(x, t) = f(x)`` pixel by pixel; records inputs and timesteps."""

    def __init__(self, shape: tuple[int, int, int], f) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))  # so the model has a device
        self.f = f
        self.config = SimpleNamespace(in_channels=shape[0], sample_size=shape[1])
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.with_graph: list[bool] = []  # whether each input carried a graph

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        self.inputs.append(x.detach().clone())
        self.with_graph.append(x.requires_grad)
        self.timesteps.append(torch.as_tensor(t).clone())
        return SimpleNamespace(sample=self.scale * self.f(x))


def affine(shape, w: float, b: float) -> PointwiseModel:
    return PointwiseModel(shape, lambda x: w * x + b)


def quadratic(g: torch.Tensor, beta: float) -> PointwiseModel:
    """``eps_theta(x) = x + beta (x - g)^2``: its residual's variance over the noise
    is least for inputs centred near ``g``."""
    return PointwiseModel(tuple(g.shape), lambda x: x + beta * (x - g) ** 2)


def echo_toy(g: torch.Tensor, beta: float = 1.0) -> PointwiseModel:
    """``eps_theta(x) = x - beta sqrt(1 + (x - g)^2)``: the residual ``eps - eps_theta``
    varies least over the noise when the input is ``eps + g`` (``Var sqrt(1 + (e +
    d)^2)`` over ``e ~ N(0, 1)`` grows with ``|d|``), so a model "backdoored" with
    ``g``; ``g = 0`` is its clean twin. It grows linearly, so DDIM stays finite."""
    return PointwiseModel(
        tuple(g.shape), lambda x: x - beta * (1 + (x - g) ** 2).sqrt()
    )


PLANTED = -torch.ones(1, 4, 4)
PLANTED[:, 1:3, 1:3] = 0.5  # a -1 background and a bright box, as a trigger
QUICK = TerdSettings(estimation_steps=40, refinement_steps=4)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))


@pytest.fixture
def schedule():
    return make_scheduler(**QUICK_SCHEDULE)


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


def test_the_released_cifar10_settings():
    assert TERD_CIFAR10 == TerdSettings(3000, 1000, 16, 0.5, 5e-5, 0.01, 10)
    assert TERD_TIMESTEP_WINDOW == 10


def test_scaled_cuts_only_the_steps():
    quick = TERD_CIFAR10.scaled(0.05)
    assert (quick.estimation_steps, quick.refinement_steps) == (150, 50)
    assert quick.batch_size == 16 and quick.lr == 0.5 and quick.sampling_steps == 10
    assert TERD_CIFAR10.scaled(1) == TERD_CIFAR10
    tiny = TERD_CIFAR10.scaled(1e-6)
    assert (tiny.estimation_steps, tiny.refinement_steps) == (1, 1)


# --------------------------------------------------------------------------- #
# The reversed loss
# --------------------------------------------------------------------------- #


def test_reversed_loss_of_an_affine_model_is_the_hand_value(schedule):
    """``eps_theta = w x + b``: the residuals differ by ``(1 - w s_t)(eps_1 - eps_2)``
    with ``s_t = sqrt(1 - abar_t)``, whatever ``x0`` and ``mu`` are."""
    shape, w = (2, 3, 3), 0.7
    model = affine(shape, w, 0.3)
    x0 = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([0, 10, 50, 98, 99])
    s = (1 - schedule.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    replay = torch.Generator().manual_seed(7)
    eps_1 = torch.randn(x0.shape, generator=replay)
    eps_2 = torch.randn(x0.shape, generator=replay)
    hand = 0.5 * ((1 - w * s) ** 2 * (eps_1 - eps_2) ** 2).sum(dim=(1, 2, 3)).mean()
    for mu, add in [(torch.zeros(shape), True), (-torch.ones(shape), False)]:
        generator = torch.Generator().manual_seed(7)
        loss = reversed_loss(
            model, schedule, x0, mu, timesteps, generator=generator, with_trigger=add
        )
        assert torch.allclose(loss, hand, rtol=1e-5)


def test_reversed_loss_adds_mu_raw_to_both_noisy_inputs(schedule):
    shape = (1, 2, 2)
    model = affine(shape, 1.0, 0.0)
    x0, mu = torch.full((3, *shape), 0.5), torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])
    timesteps = torch.tensor([99, 95, 90])
    reversed_loss(
        model, schedule, x0, mu, timesteps, generator=torch.Generator().manual_seed(3)
    )
    replay = torch.Generator().manual_seed(3)
    for seen in model.inputs:
        eps = torch.randn(x0.shape, generator=replay)
        assert torch.allclose(seen, schedule.add_noise(x0, eps, timesteps) + mu)
    assert all(torch.equal(t, timesteps) for t in model.timesteps)


@pytest.mark.parametrize("with_trigger", [True, False])
def test_reversed_loss_expectation_on_a_quadratic_model(schedule, with_trigger):
    """``eps_theta(x) = x + beta (x - g)^2`` with ``x = a x0 + s eps + mu``: per pixel
    the residual is ``(1 - s - 2 beta s u) eps - beta s^2 eps^2 + const`` with ``u = a
    x0 + mu - g``, whose variance over ``eps`` is ``(1 - s - 2 beta s u)^2 + 2 beta^2
    s^4``; ``E[L]`` sums it over the pixels and averages it over the batch."""
    beta, batch = 0.3, 20_000
    g = torch.tensor([[[0.5, -1.0], [-1.0, 0.2]]])
    mu = torch.tensor([[[0.1, -0.4], [0.8, 0.0]]])
    model = quadratic(g, beta)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, *g.shape, generator=generator)
    timesteps = torch.randint(0, 100, (batch,), generator=generator)
    loss = reversed_loss(
        model,
        schedule,
        x0,
        mu,
        timesteps,
        generator=generator,
        with_trigger=with_trigger,
    )
    abar = schedule.alphas_cumprod[timesteps].double().view(-1, 1, 1, 1)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    u = a * x0.double() + (mu if with_trigger else 0) - g
    variance = (1 - s - 2 * beta * s * u) ** 2 + 2 * beta**2 * s**4
    expected = variance.sum(dim=(1, 2, 3)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=0.03)


# --------------------------------------------------------------------------- #
# The two-stage inversion
# --------------------------------------------------------------------------- #


def test_estimate_points_along_the_planted_trigger(schedule):
    found = estimate_trigger(
        echo_toy(PLANTED), schedule, settings=QUICK, progress=False
    )
    assert isinstance(found, TerdTrigger) and found.settings == QUICK
    assert cosine(found.mu, PLANTED) > 0.9
    assert len(found.losses) == QUICK.estimation_steps + QUICK.refinement_steps
    assert all(math.isfinite(loss) for loss in found.losses) and found.seconds > 0


def test_a_clean_toy_gives_about_zero(schedule):
    """From ``-U[0, 1)`` (norm about 2.3 here) to a tenth of the trigger's norm."""
    found = estimate_trigger(
        echo_toy(torch.zeros_like(PLANTED)), schedule, settings=QUICK, progress=False
    )
    assert float(found.mu.norm()) < 0.1 * float(PLANTED.norm())


def test_the_draws_and_timesteps_of_both_stages(schedule):
    """Replays the first input by hand (start, timesteps, stand-in, noise, in that
    order from the seed) and checks the timesteps every UNet call saw: stage 1 in
    ``T-10 .. T-1``, stage 2's DDIM at 90, 80, ..., 0, then the high and the low
    window, all differentiable in ``mu``."""
    batch, shape = 3, tuple(PLANTED.shape)
    model = echo_toy(PLANTED)
    settings = TerdSettings(estimation_steps=2, refinement_steps=1, batch_size=batch)
    model.train()
    estimate_trigger(model, schedule, settings=settings, seed=5, progress=False)
    assert model.training and model.scale.requires_grad  # restored after freezing

    replay = torch.Generator().manual_seed(5)
    mu = -torch.rand(shape, generator=replay)
    t = torch.randint(90, 100, (batch,), generator=replay)
    x0 = torch.randn((batch, *shape), generator=replay)
    eps = torch.randn((batch, *shape), generator=replay)
    assert torch.equal(model.timesteps[0], t)
    assert torch.allclose(model.inputs[0], schedule.add_noise(x0, eps, t) + mu)

    seen = [t.reshape(-1) for t in model.timesteps]
    assert len(seen) == 2 * 2 + 10 + 4
    assert all(((90 <= t) & (t < 100)).all() for t in seen[:4])
    assert [int(t) for t in seen[4:14]] == list(range(90, -1, -10))
    assert all(((90 <= t) & (t < 100)).all() for t in seen[14:16])
    assert all((t < 10).all() for t in seen[16:18])
    # stage 2 keeps the graph through the sampler: even the trigger-free low-t
    # inputs, add_noise(images) with no mu added, depend on mu
    assert all(model.with_graph[4:])


def test_the_refinement_step_is_clipped(schedule):
    """Two runs with the same seed share stage 1; in stage 2 one moves ``mu`` by ``lr``
    times a gradient clipped to norm 0.01 (the released CIFAR-10 clip), the other
    clipped to almost nothing."""
    model = echo_toy(PLANTED)
    clipped = TerdSettings(estimation_steps=1, refinement_steps=1, lam=0.0)
    still = dataclasses.replace(clipped, grad_clip=1e-12)
    moved = estimate_trigger(model, schedule, settings=clipped, progress=False).mu
    kept = estimate_trigger(model, schedule, settings=still, progress=False).mu
    assert float((moved - kept).norm()) == pytest.approx(0.5 * 0.01, rel=1e-4)


def test_seeds_reproduce_on_a_small_unet(tiny_unet, schedule):
    unet = tiny_unet()
    settings = TerdSettings(2, 1, batch_size=2, sampling_steps=2)
    runs = [
        estimate_trigger(unet, schedule, settings=settings, seed=s, progress=False)
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0].mu, runs[1].mu) and runs[0].losses == runs[1].losses
    assert not torch.equal(runs[0].mu, runs[2].mu)
    assert runs[0].mu.shape == (1, 8, 8)


def test_the_estimate_is_cached(schedule, cache):
    model = echo_toy(PLANTED)
    settings = TerdSettings(3, 1, batch_size=2)
    first = estimate_trigger(
        model, schedule, settings=settings, progress=False, use_cache=True
    )
    assert len(list((cache / "tensors").glob("terd-*"))) == 1
    model.inputs.clear()
    again = estimate_trigger(
        model, schedule, settings=settings, progress=False, use_cache=True
    )
    assert not model.inputs  # loaded, not computed
    assert torch.equal(first.mu, again.mu) and first.losses == again.losses
    assert first.seconds == again.seconds and again.settings == settings
    other = estimate_trigger(
        model, schedule, settings=settings, seed=1, progress=False, use_cache=True
    )
    assert not torch.equal(first.mu, other.mu)


# --------------------------------------------------------------------------- #
# Input-level detection
# --------------------------------------------------------------------------- #


def test_log_likelihood_ratio_is_scipys():
    generator = torch.Generator().manual_seed(0)
    shape = (1, 2, 3)
    mu = torch.randn(shape, generator=generator, dtype=torch.float64)
    noise = torch.randn((7, *shape), generator=generator, dtype=torch.float64)
    d = mu.numel()
    x = noise.flatten(1).numpy()
    expected = multivariate_normal(mu.flatten().numpy(), 1.0).logpdf(
        x
    ) - multivariate_normal(torch.zeros(d).numpy(), 1.0).logpdf(x)
    llr = input_log_likelihood_ratio(noise, mu)
    assert llr.shape == (7,)
    assert torch.allclose(llr, torch.from_numpy(expected), atol=1e-10)
    assert torch.equal(detect_inputs(noise, mu), llr > 0)


def test_detection_rates_match_counts_within_three_standard_errors():
    generator = torch.Generator().manual_seed(0)
    shape, n = (1, 4, 4), 20_000
    mu_hat = torch.randn(shape, generator=generator) * 0.5  # |mu_hat| about 2
    trigger = mu_hat + 0.3 * torch.randn(shape, generator=generator)
    fpr, tpr = input_detection_rates(mu_hat, trigger)
    m, g = mu_hat.double().flatten(), trigger.double().flatten()
    assert fpr == pytest.approx(norm.cdf(-m.norm().item() / 2), abs=1e-12)
    assert tpr == pytest.approx(
        norm.cdf((g @ m - m @ m / 2).item() / m.norm().item()), abs=1e-12
    )
    benign = torch.randn((n, *shape), generator=generator)
    poisoned = torch.randn((n, *shape), generator=generator) + trigger
    for rate, inputs in [(fpr, benign), (tpr, poisoned)]:
        assert 0.05 < rate < 0.95
        counted = detect_inputs(inputs, mu_hat).double().mean().item()
        assert abs(counted - rate) < 3 * math.sqrt(rate * (1 - rate) / n)


def test_detection_rates_at_the_extremes():
    g = -torch.ones(3, 16, 16)
    fpr, tpr = input_detection_rates(g, g)
    assert fpr < 1e-40 and tpr == 1.0
    assert input_detection_rates(torch.zeros_like(g), g) == (0.0, 0.0)
    assert not detect_inputs(torch.randn(5, 3, 16, 16), torch.zeros_like(g)).any()


# --------------------------------------------------------------------------- #
# Model-level detection
# --------------------------------------------------------------------------- #


def test_model_kl_score_is_torchs_kl_with_the_released_offsets():
    mu = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, torch.ones_like(mu)),
        torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu)),
    )
    score = model_kl_score(mu)
    assert isinstance(score, TerdModelScore)
    assert torch.allclose(score.kl, kl, atol=1e-6)
    assert score.kl_mean == pytest.approx(float(kl.double().mean()) + 0.4, abs=1e-6)
    assert score.kl_var == pytest.approx(
        float(kl.double().var(unbiased=False)) - 0.003, abs=1e-6
    )


# --------------------------------------------------------------------------- #
# Bad arguments: one line that names the argument
# --------------------------------------------------------------------------- #


def one_line(error: pytest.ExceptionInfo, name: str) -> None:
    message = str(error.value)
    assert "\n" not in message and name in message, message


@pytest.mark.parametrize(
    "field, value",
    [
        ("estimation_steps", 0),
        ("refinement_steps", 2.5),
        ("batch_size", True),
        ("lr", 0.0),
        ("lam", -1.0),
        ("grad_clip", float("nan")),
        ("sampling_steps", 0),
    ],
)
def test_bad_settings(field, value):
    with pytest.raises(ValueError) as error:
        TerdSettings(**{field: value})
    one_line(error, f"{field}=")


@pytest.mark.parametrize("fraction", [0, 1.5, "half"])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError) as error:
        TERD_CIFAR10.scaled(fraction)
    one_line(error, "fraction")


def test_bad_estimate_arguments(schedule):
    model = echo_toy(PLANTED)
    for kwargs, name in [
        (dict(settings={"lr": 0.5}), "settings"),
        (dict(seed=-1), "seed"),
        (dict(use_cache="yes"), "use_cache"),
        (dict(settings=TerdSettings(sampling_steps=101)), "settings.sampling_steps"),
    ]:
        with pytest.raises(ValueError) as error:
            estimate_trigger(model, schedule, progress=False, **kwargs)
        one_line(error, name)


def test_bad_loss_and_detection_arguments(schedule):
    model = echo_toy(PLANTED)
    x0, mu = torch.zeros(2, 1, 4, 4), torch.zeros(1, 4, 4)
    generator = torch.Generator()
    cases = [
        (lambda: reversed_loss(model, schedule, x0, mu, torch.tensor([0, 100]), generator=generator), "timesteps"),
        (lambda: reversed_loss(model, schedule, x0[:, :, :2], mu, torch.tensor([0, 1]), generator=generator), "x0"),
        (lambda: reversed_loss(model, schedule, x0, mu[0], torch.tensor([0, 1]), generator=generator), "mu"),
        (lambda: reversed_loss(model, schedule, x0, mu, torch.tensor([0, 1]), generator=0), "generator"),
        (lambda: input_log_likelihood_ratio(x0, torch.zeros(1, 2, 2)), "mu"),
        (lambda: input_log_likelihood_ratio(x0[0], mu), "noise"),
        (lambda: input_detection_rates(mu, torch.zeros(3, 4, 4)), "trigger"),
        (lambda: model_kl_score(mu.long()), "mu"),
    ]  # fmt: skip
    for call, name in cases:
        with pytest.raises(ValueError) as error:
            call()
        one_line(error, name)
