"""Elijah as published (An et al. 2024, arXiv:2312.00050): the released code's settings,
its inversion on toy models with a known optimum, its two scores against independent
computations (hand-made matrices, torchmetrics' TotalVariation, hand-derived totals),
the pipeline on a small UNet, and the fitted rule judged leave-one-out.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch
from toy_models import EchoModel

from baddiff_core.defenses import elijah, scanning
from baddiff_core.defenses.elijah import (
    ELIJAH_DDIM_LAMBDA,
    ELIJAH_DDPM_LAMBDA,
    ELIJAH_LR,
    ELIJAH_SAMPLES,
    ElijahScores,
    elijah_inversion,
    elijah_num_noise,
    elijah_scores,
    elijah_settings,
    feature_distance,
    fit_threshold,
    leave_one_out_accuracy,
    lpips_distance,
    trimmed_uniformity,
    tv_score,
    uniformity_score,
)
from baddiff_core.defenses.inversion import inversion_lambda
from baddiff_core.diffusion import PAPER_SCHEDULE, QUICK_SCHEDULE, make_scheduler
from baddiff_core.metrics import MissingDependencyError
from baddiff_core.models import make_unet


def first_draws(num_noise: int, shape: tuple[int, ...], seed: int = 0):
    """The noises and the start of ``tau`` that seed ``seed`` gives, in the released
    code's order (noises first)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_noise, *shape), generator=generator)
    return noise, torch.rand(shape, generator=generator)


PLANTED = torch.linspace(-1, 1, 64).view(
    1, 8, 8
)  # both signs, unlike the -U[0, 1) start


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #


def test_the_released_settings_per_sampler():
    ddpm, ddim = elijah_settings("ddpm"), elijah_settings("ddim")
    assert (ddpm.lam, ddpm.steps, ddpm.init, ddpm.sampling_steps) == (
        0.5,
        100,
        "-U[0, 1)",
        None,
    )
    assert (ddim.lam, ddim.steps, ddim.init, ddim.sampling_steps) == (
        1.0,
        10,
        "U[-1, 1)",
        50,
    )
    assert ELIJAH_LR == 0.1 and ELIJAH_SAMPLES == 16
    # BadDiffusion/elijah_helper.py 159-165: 20 at 256, 50 at 128, else 100
    assert [elijah_num_noise(s) for s in (16, 32, 64, 128, 256)] == [
        100,
        100,
        100,
        50,
        20,
    ]
    with pytest.raises(ValueError, match="sampler='euler' is not known"):
        elijah_settings("euler")


def test_the_published_lambdas_are_the_paper_schedule_s_rounded():
    paper, quick = make_scheduler(**PAPER_SCHEDULE), make_scheduler(**QUICK_SCHEDULE)
    # R_999 = 0.50252 (paper's schedule), R_99 = 0.52786 (the book's quick one)
    assert inversion_lambda(paper) == pytest.approx(0.50252, abs=1e-5)
    assert round(inversion_lambda(paper), 1) == ELIJAH_DDPM_LAMBDA
    assert round(inversion_lambda(paper, "ode"), 1) == ELIJAH_DDIM_LAMBDA
    assert inversion_lambda(quick) == pytest.approx(0.52786, abs=1e-5)
    assert inversion_lambda(quick) - ELIJAH_DDPM_LAMBDA > 0.02


# --------------------------------------------------------------------------- #
# Inversion
# --------------------------------------------------------------------------- #


def test_ddpm_inversion_reaches_the_closed_form_optimum():
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    model = EchoModel(PLANTED, ELIJAH_DDPM_LAMBDA)
    result = elijah_inversion(model, scheduler, progress=False)
    noise, uniform = first_draws(100, PLANTED.shape)
    optimum = PLANTED - noise.mean(0) / (1 - ELIJAH_DDPM_LAMBDA)
    start = -uniform
    assert result.lam == 0.5 and len(result.losses) == 100
    # Adam at lr 0.1 ends within 0.05 of the optimum per pixel, from 0.7 away
    assert (result.trigger - optimum).abs().mean() < 0.05
    assert (start - optimum).abs().mean() > 0.5
    # the optimum is g up to 2 x the mean of 100 noises (std 0.2 per pixel)
    assert (result.trigger - PLANTED).abs().mean() < 0.25
    assert model.scale.requires_grad  # the model is left as it was


def test_the_inversion_uses_one_fixed_batch_at_the_last_step_from_the_start():
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    for sampler, low, high, steps in (("ddpm", -1, 0, 100), ("ddim", -1, 1, 10)):
        model = EchoModel(PLANTED, 0.5)
        elijah_inversion(model, scheduler, sampler=sampler, progress=False)
        noise, uniform = first_draws(100, PLANTED.shape)
        start = model.inputs[0][0] - noise[0]
        assert len(model.inputs) == steps
        expected = -uniform if sampler == "ddpm" else uniform * 2 - 1
        assert torch.allclose(start, expected, atol=1e-6)
        assert low <= float(start.min()) and float(start.max()) <= high
        # every step: the same noises, shifted by the current tau
        for x in model.inputs[1:]:
            shift = x - model.inputs[0]
            assert torch.allclose(shift, shift[:1].expand_as(shift), atol=1e-5)
        assert all(bool((t == 99).all()) for t in model.timesteps)


def test_with_lambda_one_a_pass_through_model_leaves_the_loss_flat():
    """eps_theta(x) = x (lam = 1 in EchoModel): the ODE variant's loss is | mean eps |
    whatever tau, derived in elijah_inversion's docstring."""
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    model = EchoModel(PLANTED, 1.0)
    result = elijah_inversion(model, scheduler, sampler="ddim", progress=False)
    noise, _ = first_draws(100, PLANTED.shape)
    flat = float(noise.mean(0).abs().mean())
    assert result.lam == 1.0
    assert result.losses == pytest.approx([flat] * 10, rel=1e-5)


def test_lam_overrides_the_published_constant():
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    own = inversion_lambda(scheduler)
    model = EchoModel(PLANTED, own)
    result = elijah_inversion(model, scheduler, lam=own, steps=150, progress=False)
    noise, _ = first_draws(100, PLANTED.shape)
    optimum = PLANTED - noise.mean(0) / (1 - own)
    assert result.lam == own
    assert (result.trigger - optimum).abs().mean() < 0.05


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(sampler="euler"), r"^sampler='euler' is not known"),
        (dict(steps=0), r"^steps must be a positive integer"),
        (dict(num_noise=2.5), r"^num_noise must be a positive integer"),
        (dict(lr=-1), r"^lr must be a real number > 0"),
        (dict(lam=0), r"^lam must be a real number > 0"),
        (dict(generator=0), r"^generator must be a torch.Generator"),
    ],
)
def test_inversion_refuses_bad_arguments_in_one_line(kwargs, pattern):
    model = EchoModel(PLANTED, 0.5)
    with pytest.raises(ValueError, match=pattern) as info:
        elijah_inversion(model, make_scheduler(**QUICK_SCHEDULE), **kwargs)
    assert "\n" not in str(info.value) and not model.inputs


# --------------------------------------------------------------------------- #
# Uniformity
# --------------------------------------------------------------------------- #


def test_trimmed_uniformity_by_hand():
    # row i holds 16 i + 0 .. 15: each row keeps 16 i + 4 .. 11 (mean 16 i + 7.5), the
    # row means keep i = 4 .. 11 (mean 16 x 7.5 + 7.5 = 127.5)
    matrix = torch.arange(256.0).view(16, 16)
    assert trimmed_uniformity(matrix) == 127.5
    # the order within a row and of the rows does not matter
    shuffled = matrix[torch.randperm(16)][:, torch.randperm(16)]
    assert trimmed_uniformity(shuffled) == 127.5
    # 4 outliers at each end of every row, 4 outlying rows at each end: all trimmed
    alike = torch.ones(16, 16)
    alike[:, :4], alike[:, -4:] = 0.0, 100.0
    alike[:4] -= 0.5
    alike[-4:] += 50.0
    assert trimmed_uniformity(alike) == 1.0
    # n = 5: floor(5 / 4) = 1 dropped at each end of [0, 1, 2, 3, 4] (mean 2)
    assert trimmed_uniformity(torch.arange(5.0).expand(5, 5)) == 2.0


def index_images(n: int) -> torch.Tensor:
    """n images whose constant value encodes their index i (``2 i / 100 - 1``)."""
    return (torch.arange(n).float() * 2 / 100 - 1).view(n, 1, 1, 1).expand(n, 1, 8, 8)


def test_uniformity_score_fills_the_matrix_row_by_row():
    """A distance that looks up a hand-made matrix by the images' values: the score is
    that matrix's trimmed mean, so pair (i, j) is distance(images[i], images[j])."""
    matrix = torch.rand(16, 16, generator=torch.Generator().manual_seed(1))

    def lookup(a, b):
        i = (a[:, 0, 0, 0] * 100).round().long()  # back from [0, 1] to the index
        j = (b[:, 0, 0, 0] * 100).round().long()
        return matrix[i, j]

    assert uniformity_score(index_images(16), lookup) == pytest.approx(
        trimmed_uniformity(matrix), abs=1e-12
    )
    assert uniformity_score(index_images(16), lookup) != pytest.approx(
        trimmed_uniformity(matrix.T), abs=1e-6
    )


def varied_digits() -> torch.Tensor:
    from baddiff_core.data import load_images

    return load_images("digits", 16)[:16]


def test_sixteen_copies_are_more_uniform_than_sixteen_digits():
    digits = varied_digits()
    copies = digits[:1].expand(16, -1, -1, -1)
    varied = uniformity_score(digits, feature_distance)
    assert uniformity_score(copies, feature_distance) == pytest.approx(0.0, abs=1e-6)
    assert varied > 0.05

    def mse(a, b):
        return (a - b).square().flatten(1).mean(dim=1)

    assert uniformity_score(copies, mse) == 0.0 < uniformity_score(digits, mse)


def test_feature_distance_is_the_unit_feature_distance_of_the_digits_net():
    from baddiff_core.features import load_digits_net

    digits = (varied_digits()[:4] + 1) / 2
    features = load_digits_net().features(digits)
    unit = features / features.norm(dim=1, keepdim=True)
    expected = (unit[0] - unit[1:]).square().sum(dim=1)
    got = feature_distance(digits[:1].expand(3, -1, -1, -1), digits[1:])
    assert torch.allclose(got, expected, atol=1e-5)
    assert bool((got > 0).all() and (got <= 2).all())


@pytest.mark.parametrize(
    "images, distance, pattern",
    [
        (torch.zeros(3, 1, 8, 8), feature_distance, r"^images must hold n >= 4"),
        ("images", feature_distance, r"^images must be a torch.Tensor"),
        (torch.zeros(4, 1, 8, 8), "lpips", r"^distance must be a callable"),
        (
            torch.zeros(4, 1, 8, 8),
            lambda a, b: torch.zeros(2),
            r"^distance must return one value per pair \(16\), got \(2,\)",
        ),
    ],
)
def test_uniformity_refuses_bad_input_in_one_line(images, distance, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        uniformity_score(images, distance)
    assert "\n" not in str(info.value)


def test_trimmed_uniformity_refuses_a_small_or_non_square_matrix():
    for bad in (torch.zeros(3, 3), torch.zeros(4, 5)):
        with pytest.raises(ValueError, match="square n x n matrix with n >= 4"):
            trimmed_uniformity(bad)


# --------------------------------------------------------------------------- #
# LPIPS: the call path, with piq missing and with a stand-in piq
# --------------------------------------------------------------------------- #


def test_lpips_without_piq_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "piq", None)  # import piq raises ImportError
    monkeypatch.setattr(elijah, "_LPIPS", {})
    with pytest.raises(MissingDependencyError, match="piq") as info:
        lpips_distance(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    message = str(info.value)
    assert "\n" not in message and "feature_distance" in message
    assert "[full]" in message


def test_elijah_scores_checks_for_piq_before_inverting(monkeypatch):
    monkeypatch.setitem(sys.modules, "piq", None)
    calls = []
    monkeypatch.setattr(elijah, "elijah_inversion", lambda *a, **k: calls.append(k))
    with pytest.raises(MissingDependencyError, match="piq"):
        elijah_scores(EchoModel(PLANTED, 0.5), make_scheduler(**QUICK_SCHEDULE))
    assert not calls


def test_lpips_calls_piq_as_the_released_code_does(monkeypatch):
    made, seen = [], []

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            made.append(kwargs)

        def forward(self, x, y):
            seen.append((x.shape, float(x.min()), float(x.max())))
            return (x - y).abs().flatten(1).mean(dim=1)

    piq = ModuleType("piq")
    piq.LPIPS = FakeLPIPS
    monkeypatch.setitem(sys.modules, "piq", piq)
    monkeypatch.setattr(elijah, "_LPIPS", {})
    images = index_images(4)  # grey, in [-1, 1]
    score = uniformity_score(images, lpips_distance)
    # BadDiffusion/elijah_helper.py line 215
    assert made == [dict(replace_pooling=True, reduction="none")]
    shape, low, high = seen[0]
    assert shape == (16, 3, 8, 8) and 0 <= low <= high <= 1  # RGB, in [0, 1]
    # values 0, .01, .02, .03: row i sorted drops one at each end
    by_hand = torch.tensor(
        [[abs(i - j) / 100 for j in range(4)] for i in range(4)], dtype=torch.float64
    )
    assert score == pytest.approx(trimmed_uniformity(by_hand))


# --------------------------------------------------------------------------- #
# Total variation
# --------------------------------------------------------------------------- #


def test_tv_by_hand_on_a_2x2_checkerboard():
    # [[0, 1], [1, 0]] in [0, 1]: two vertical and two horizontal steps of 1 -> 4;
    # a flat image -> 0; the mean over the two images -> 2
    checker = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).view(1, 1, 2, 2)
    assert tv_score(checker) == 4.0
    assert tv_score(torch.cat([checker, torch.zeros_like(checker)])) == 2.0


def test_tv_is_torchmetrics_total_variation_mean():
    from torchmetrics.image import TotalVariation

    images = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = TotalVariation(reduction="mean")(images / 2 + 0.5)
    assert tv_score(images) == pytest.approx(float(reference), rel=1e-6)


def test_tv_is_the_scanning_total_variation_times_2_c_h_h_minus_1():
    images = (
        torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    scale = 2 * 1 * 16 * 15
    assert scale == 480
    assert tv_score(images) == pytest.approx(
        scale * scanning.total_variation(images), rel=1e-5
    )


def test_tv_refuses_bad_input_in_one_line():
    for bad, pattern in (
        (torch.zeros(1, 2, 4, 4), "C in {1, 3}"),
        (torch.full((1, 1, 4, 4), float("nan")), "finite"),
    ):
        with pytest.raises(ValueError, match=pattern) as info:
            tv_score(bad)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- #
# The pipeline
# --------------------------------------------------------------------------- #


def record(monkeypatch, name):
    calls, real = [], getattr(elijah, name)

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(elijah, name, recording)
    return calls


@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(0)
    return make_unet(8, 1, block_out_channels=(16, 32)).eval()


@pytest.mark.slow
def test_a_cached_run_is_loaded_and_scored_again(monkeypatch, small_unet, tmp_path):
    monkeypatch.setenv("BADDIFF_CACHE", str(tmp_path))
    scheduler = make_scheduler(num_train_timesteps=10, beta_start=0.01, beta_end=0.5)
    inversions = record(monkeypatch, "elijah_inversion")
    settings = dict(distance=feature_distance, num_noise=4, steps=2, progress=False)
    first = elijah_scores(small_unet, scheduler, use_cache=True, **settings)
    again = elijah_scores(small_unet, scheduler, use_cache=True, **settings)
    assert isinstance(first, ElijahScores) and first.samples.shape == (16, 1, 8, 8)
    assert len(inversions) == 1  # the second call loaded the first one's run
    assert torch.equal(again.samples, first.samples)
    assert torch.equal(again.inversion.trigger, first.inversion.trigger)
    assert (again.uniformity, again.tv) == (first.uniformity, first.tv)
    assert first.uniformity == uniformity_score(first.samples, feature_distance)
    assert first.tv == tv_score(first.samples)
    assert first.distance == "feature_distance" and first.sampler == "ddpm"
    elijah_scores(small_unet, scheduler, use_cache=True, seed=1, **settings)
    assert len(inversions) == 2  # another seed runs again


def test_elijah_scores_sample_as_the_released_code(monkeypatch, small_unet):
    """DDPM over all T steps, DDIM with 50, no clipping, 16 images from eps + tau
    (sampling itself replaced: its steps are what is checked)."""
    calls = []

    def fake_sample(model, scheduler, n, **kwargs):
        calls.append(dict(kwargs, n=n))
        return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(scanning, "sample", fake_sample)  # where it is looked up
    inversions = record(monkeypatch, "elijah_inversion")
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    settings = dict(distance=feature_distance, num_noise=4, steps=2, progress=False)
    ddpm = elijah_scores(small_unet, scheduler, **settings)
    ddim = elijah_scores(small_unet, scheduler, sampler="ddim", **settings)
    assert [c["num_inference_steps"] for c in calls] == [100, 50]
    assert [c["sampler"] for c in calls] == ["ddpm", "ddim"]
    assert all(c["clip"] == "none" and c["n"] == 16 for c in calls)
    assert torch.equal(calls[0]["trigger"], ddpm.inversion.trigger)
    assert (ddpm.inversion.lam, ddim.inversion.lam) == (0.5, 1.0)
    assert [c["sampler"] for c in inversions] == ["ddpm", "ddim"]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(n=3), r"^n must be an integer >= 4"),
        (dict(distance="lpips"), r"^distance must be a callable"),
        (dict(seed=-1), r"^seed must be a non-negative integer"),
        (dict(use_cache="yes"), r"^use_cache must be True or False"),
        (dict(sampler="heun"), r"^sampler='heun' is not known"),
    ],
)
def test_elijah_scores_refuses_bad_arguments_in_one_line(kwargs, pattern, small_unet):
    settings = dict(distance=feature_distance) | kwargs
    with pytest.raises(ValueError, match=pattern) as info:
        elijah_scores(small_unet, make_scheduler(**QUICK_SCHEDULE), **settings)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- #
# The rule: fitted on labelled models, judged on held-out ones
# --------------------------------------------------------------------------- #


def test_fit_threshold_turns_choose_threshold_round_for_low_scores():
    low = fit_threshold([0.5, 0.6], [0.1, 0.2])  # Elijah: low uniformity = backdoored
    assert low.backdoored_when == "low" and low.threshold == pytest.approx(0.35)
    assert low.backdoored(0.2) and not low.backdoored(0.5)
    high = fit_threshold([1, 2], [10, 20], backdoored_when="high")
    assert high.threshold == scanning.choose_threshold([1, 2], [10, 20]) == 6.0
    either = fit_threshold([1, 2], [10, 20], backdoored_when="either")
    assert either.backdoored_when == "high"


def test_leave_one_out_is_not_the_in_sample_accuracy():
    # separated in-sample, but held out: 10 falls below the 11 fitted on 1, 2 and 20
    clean, bad = [1, 2], [10, 20]
    rule = fit_threshold(clean, bad, backdoored_when="high")
    in_sample = sum(not rule.backdoored(s) for s in clean) + sum(
        rule.backdoored(s) for s in bad
    )
    assert in_sample == 4
    assert leave_one_out_accuracy(clean, bad, backdoored_when="high") == 0.75
    assert leave_one_out_accuracy([0.5, 0.6, 0.7], [0.1, 0.15, 0.2]) == 1.0


def test_the_rule_refuses_too_few_models_in_one_line():
    with pytest.raises(ValueError, match="at least 2 models per group") as info:
        leave_one_out_accuracy([1.0], [2.0, 3.0])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="backdoored_when='up' is not known"):
        fit_threshold([1.0], [2.0], backdoored_when="up")
    with pytest.raises(ValueError, match=r"clean_scores\[1\] must be a real number"):
        fit_threshold([1.0, float("nan")], [2.0])
