"""Defences: trigger inversion, detection scores, removal and adversarial neuron
pruning.

Inversion is checked on hand-built "echo" models whose optimum is known in closed form;
the scores on hand-computed images; pruning and removal on a small random UNet. The real
backdoored model is scanned in ``test_end_to_end.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy_models import EchoModel

from baddiff_core.defenses import (
    ChannelMasks,
    adversarial_neuron_masks,
    choose_threshold,
    clean_subset,
    diversity,
    inversion_lambda,
    invert_trigger,
    mode_share,
    prune_channels,
    pruning,
    removal,
    remove_backdoor,
    scan_model,
    scanning,
    total_variation,
)
from baddiff_core.diffusion import PAPER_SCHEDULE, QUICK_SCHEDULE, make_scheduler
from baddiff_core.models import make_unet
from baddiff_core.triggers import make_trigger
from conftest import same_weights


def invert_echo(model, scheduler):
    """The inversion both echo tests run: 300 steps at lr 0.05, tau drawn from seed 0."""
    return invert_trigger(
        model,
        scheduler,
        steps=300,
        lr=0.05,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )


def record_calls(monkeypatch, module, name: str) -> list[dict]:
    """Replace ``module.name`` by a wrapper that calls it and appends each call's
    keyword arguments to the list returned."""
    calls = []
    real = getattr(module, name)

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


def test_inversion_lambda_is_the_last_r_coefficient():
    # R_999 = 0.5025 for the paper's schedule (derived in chapter 3 of this book,
    # book/03_planting_a_backdoor.ipynb, "The coefficient on r"; Elijah, An et al. 2024,
    # arXiv:2312.00050, rounds it to 0.5).
    scheduler = make_scheduler(**PAPER_SCHEDULE)
    assert inversion_lambda(scheduler) == pytest.approx(0.5025, abs=1e-4)
    assert inversion_lambda(scheduler, "ode") == pytest.approx(1.005, abs=2e-4)
    with pytest.raises(ValueError, match="solver='euler'"):
        inversion_lambda(scheduler, "euler")


def test_inversion_recovers_a_planted_trigger_far_better_than_a_guess():
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    lam = inversion_lambda(scheduler)
    g = make_trigger("stop_sign", 16, 1, size=18)
    model = EchoModel(g, lam)
    result = invert_echo(model, scheduler)
    # the initial tau
    guess = -torch.rand(g.shape, generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity(result.trigger.flatten(), g.flatten(), dim=0).item()
    cos_guess = F.cosine_similarity(guess.flatten(), g.flatten(), dim=0).item()
    # The exact optimum is g - mean(eps)/(1 - lam): g up to noise of std 0.1 / (1 - lam)
    # per pixel.
    assert cos > 0.95 and cos > cos_guess + 0.1
    assert (result.trigger - g).abs().mean() < 0.25
    assert result.losses[-1] < result.losses[0] / 5
    assert model.scale.requires_grad  # the model's parameters are left as they were


def test_inversion_on_a_clean_model_finds_no_trigger():
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    g = make_trigger("stop_sign", 16, 1, size=18)
    clean = EchoModel(torch.zeros_like(g), inversion_lambda(scheduler))
    result = invert_echo(clean, scheduler)
    # Optimum -mean(eps)/(1 - lam): about 0.1 * 0.8 / 0.47 = 0.17 per pixel, against |g|
    # = 0.85.
    assert result.trigger.abs().mean() < 0.3 < g.abs().mean()


def test_diversity_and_total_variation_by_hand():
    same = torch.full((4, 1, 4, 4), 0.2)
    assert diversity(same) == 0.0 and total_variation(same) == 0.0
    # 0 and 1 on the [0, 1] scale
    two = torch.stack([-torch.ones(1, 4, 4), torch.ones(1, 4, 4)])
    assert diversity(two) == pytest.approx(2**-0.5)  # sample std of {0, 1}
    checker = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2 * 2.0 - 1
    assert total_variation(checker.view(1, 1, 4, 4)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="N >= 2"):
        diversity(same[:1])


def test_mode_share_counts_the_largest_group_of_alike_images():
    # steps of 1/7 on [0, 1]
    varied = torch.linspace(-1, 1, 8).view(8, 1, 1, 1).expand(8, 1, 4, 4)
    assert mode_share(varied) == pytest.approx(1 / 8)  # MSE 0.02 apart at least
    target = torch.full((1, 4, 4), -0.5)  # 0.25 on [0, 1], far from the 3 images kept
    mixed = varied.clone()
    mixed[:5] = target + 0.05 * torch.arange(5).view(5, 1, 1, 1) / 5  # five near-copies
    assert mode_share(mixed) == pytest.approx(5 / 8)
    assert mode_share(varied, radius=1.0) == 1.0
    with pytest.raises(ValueError, match="radius=0"):
        mode_share(varied, radius=0)


def test_choose_threshold_separates_and_minimises_errors():
    assert choose_threshold([0.0625, 0.125], [0.5, 0.75]) == pytest.approx(0.3125)
    # One clean model scores like a backdoored one: the threshold still makes only that
    # one error.
    threshold = choose_threshold([0.0625, 0.125, 0.6], [0.5, 0.75])
    assert 0.125 < threshold <= 0.5
    with pytest.raises(ValueError, match="0 clean"):
        choose_threshold([], [0.1])


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return make_unet(16, 1).eval()


def one_step_masks(unet):
    """ANP masks after one step on blank images: only their layout (which layers,
    how many channels) matters to the pruning tests, which then set their values."""
    return adversarial_neuron_masks(
        unet,
        make_scheduler(**QUICK_SCHEDULE),
        torch.zeros(8, 1, 16, 16),
        steps=1,
        batch_size=2,
        progress=False,
    )


def test_prune_channels_zeroes_exactly_the_lowest_masks(tiny_unet):
    masks = one_step_masks(tiny_unet)
    # Replace the learnt masks by known ones: channel k of every layer gets a distinct
    # value.
    generator = torch.Generator().manual_seed(1)
    known = ChannelMasks(
        {
            name: torch.rand(m.shape, generator=generator)
            for name, m in masks.masks.items()
        },
        [],
        0.0,
    )
    pruned, count = prune_channels(tiny_unet, known, fraction=0.1)
    assert count == round(0.1 * known.num_channels)
    cutoff = known.flat().sort().values[count - 1]
    for name, module in pruned.named_modules():
        if name in known.masks:
            zero = module.weight.flatten(1).abs().sum(1) == 0
            assert torch.equal(zero, known.masks[name] <= cutoff), name
    # original untouched
    assert all(p.abs().sum() > 0 for p in tiny_unet.parameters() if p.dim() == 4)
    same, none = prune_channels(tiny_unet, known, fraction=0.0)
    assert none == 0
    with pytest.raises(ValueError, match="fraction=1.5"):
        prune_channels(tiny_unet, known, fraction=1.5)


def test_pruning_never_skips_a_lower_mask_for_a_tied_one(tiny_unet):
    """Masks tied at the cutoff in an early layer must not use up the budget before a
    strictly lower mask in a later layer: every mask below the cutoff is pruned, ties
    fill the rest in layer order. Hand case: two layers, count = 2."""
    masks = one_step_masks(tiny_unet)
    names = list(masks.masks)
    known = {name: torch.ones_like(m) for name, m in masks.masks.items()}
    known[names[0]][:3] = 0.5  # three ties at the cutoff, first in module order
    known[names[-1]][0] = 0.1  # the lowest mask, in the last layer
    known = ChannelMasks(known, [], 0.0)
    count = 2
    pruned, pruned_count = prune_channels(
        tiny_unet, known, fraction=count / known.num_channels
    )
    zero = {
        name: module.weight.flatten(1).abs().sum(1) == 0
        for name, module in pruned.named_modules()
        if name in known.masks
    }
    assert pruned_count == count
    assert bool(zero[names[-1]][0]), "the lowest mask is pruned"
    assert zero[names[0]].tolist()[:3] == [True, False, False], "one tie fills the rest"
    assert sum(int(z.sum()) for z in zero.values()) == count


def test_anp_masks_stay_in_range_and_leave_the_model_untouched(tiny_unet):
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    images = (
        torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    masks = adversarial_neuron_masks(
        tiny_unet,
        make_scheduler(**QUICK_SCHEDULE),
        images,
        steps=3,
        batch_size=4,
        progress=False,
    )
    values = masks.flat()
    assert values.min() >= 0 and values.max() <= 1 and len(masks.losses) == 3
    assert (values < 1).any()  # the masks moved
    assert "conv_out" not in masks.masks and masks.num_channels > 100
    assert all(torch.equal(before[k], v) for k, v in tiny_unet.state_dict().items())
    assert not any(m._forward_hooks for m in tiny_unet.modules())


def test_cached_anp_masks_are_learnt_once_and_come_back_in_order(
    tiny_unet, tmp_path, monkeypatch
):
    monkeypatch.setenv("BADDIFF_CACHE", str(tmp_path))
    runs = record_calls(monkeypatch, pruning, "_adversarial_neuron_masks")
    images = (
        torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    settings = dict(steps=2, batch_size=4, progress=False)
    fresh = adversarial_neuron_masks(
        tiny_unet, scheduler, images, use_cache=True, **settings
    )
    again = adversarial_neuron_masks(
        tiny_unet, scheduler, images, use_cache=True, **settings
    )
    uncached = adversarial_neuron_masks(tiny_unet, scheduler, images, **settings)
    # the second cached call loaded; the uncached one learnt again
    assert len(runs) == 2
    for other in (again, uncached):
        assert list(other.masks) == list(fresh.masks)
        assert all(torch.equal(other.masks[k], fresh.masks[k]) for k in fresh.masks)
    assert again.losses == fresh.losses and again.seconds == fresh.seconds
    adversarial_neuron_masks(
        tiny_unet, scheduler, images, use_cache=True, eps=0.2, **settings
    )
    assert len(runs) == 3  # another budget, other masks


def test_anp_rejects_bad_budgets(tiny_unet):
    with pytest.raises(ValueError, match="eps=2"):
        adversarial_neuron_masks(
            tiny_unet,
            make_scheduler(**QUICK_SCHEDULE),
            torch.zeros(2, 1, 16, 16),
            eps=2,
        )
    with pytest.raises(ValueError, match="N,1,16,16"):
        adversarial_neuron_masks(
            tiny_unet, make_scheduler(**QUICK_SCHEDULE), torch.zeros(2, 3, 16, 16)
        )


def test_remove_backdoor_tunes_a_copy(tiny_unet):
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    images = (
        torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    tuned, history = remove_backdoor(
        tiny_unet,
        make_scheduler(**QUICK_SCHEDULE),
        -torch.ones(1, 16, 16),
        images,
        steps=3,
        batch_size=4,
        progress=False,
    )
    assert len(history.total) == 3
    assert history.total[0] == pytest.approx(
        history.ddpm[0] + history.trigger[0] + history.clean[0], rel=1e-5
    )
    assert all(torch.equal(before[k], v) for k, v in tiny_unet.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        remove_backdoor(
            tiny_unet,
            make_scheduler(**QUICK_SCHEDULE),
            -torch.ones(1, 16, 16),
            images,
            steps=0,
        )


def test_a_cached_removal_is_computed_once_per_inputs(tiny_unet, tmp_path, monkeypatch):
    """Two chapters repairing one model with one trigger estimate and one clean set
    share the result; any other input is another repair."""
    monkeypatch.setenv("BADDIFF_CACHE", str(tmp_path))
    runs = record_calls(monkeypatch, removal, "_remove_backdoor")
    images = (
        torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    )
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    settings = dict(steps=2, batch_size=4, progress=False, use_cache=True)
    first, history = remove_backdoor(
        tiny_unet, scheduler, -torch.ones(1, 16, 16), images, **settings
    )
    again, history_again = remove_backdoor(
        tiny_unet, scheduler, -torch.ones(1, 16, 16), images.clone(), **settings
    )
    assert len(runs) == 1 and history_again == history
    assert same_weights(first, again)
    assert not any(p.requires_grad for p in again.parameters()) and not again.training
    uncached, _ = remove_backdoor(
        tiny_unet,
        scheduler,
        -torch.ones(1, 16, 16),
        images,
        steps=2,
        batch_size=4,
        progress=False,
    )
    assert same_weights(first, uncached)
    # another trigger
    remove_backdoor(tiny_unet, scheduler, torch.zeros(1, 16, 16), images, **settings)
    # other clean data
    remove_backdoor(
        tiny_unet, scheduler, -torch.ones(1, 16, 16), images[:8], **settings
    )
    assert len(runs) == 4


@pytest.mark.parametrize(
    "solver, override, expected",
    [("sde", None, "ddpm"), ("ode", None, "ddim"), ("ode", "ddpm", "ddpm")],
)
def test_scan_samples_with_the_sampler_its_solver_is_planted_for(
    tiny_unet, monkeypatch, solver, override, expected
):
    seen = {}

    def fake_sample(model, scheduler, n, **kwargs):
        seen.update(kwargs)
        return torch.zeros(n, 1, 16, 16)

    monkeypatch.setattr(scanning, "sample", fake_sample)
    result = scan_model(
        tiny_unet,
        make_scheduler(**QUICK_SCHEDULE),
        n=4,
        num_noise=2,
        steps=1,
        solver=solver,
        sampler=override,
        progress=False,
    )
    assert seen["sampler"] == expected
    assert result.mode_share == 1.0  # four identical images


def test_clean_subset_draws_a_share_without_replacement():
    images = (
        torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1).expand(50, 1, 4, 4) / 50
    )
    subset = clean_subset(images, 0.1, generator=torch.Generator().manual_seed(3))
    picked = subset[:, 0, 0, 0] * 50
    assert subset.shape == (5, 1, 4, 4)
    assert len(set(picked.round().tolist())) == 5  # no image twice
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:5]
    assert torch.equal(picked.round().long(), expected)  # the documented draw
    again = clean_subset(images, 0.1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(subset, again)
    everything = clean_subset(images, 1, generator=torch.Generator().manual_seed(0))
    # a permutation
    assert torch.equal(everything[:, 0, 0, 0].sort().values, images[:, 0, 0, 0])


@pytest.mark.parametrize(
    "share, pattern",
    [
        (0, r"share must be a fraction in \(0, 1\], got share=0"),
        (1.5, r"got share=1.5"),
        (True, r"got share=True"),
        (0.01, r"share=0.01 of 50 images is less than one image"),
    ],
)
def test_clean_subset_refuses_a_bad_share(share, pattern):
    with pytest.raises(ValueError, match=pattern):
        clean_subset(torch.zeros(50, 1, 4, 4), share, generator=torch.Generator())


def test_a_cached_scan_is_run_once_per_model_and_settings(
    tiny_unet, tmp_path, monkeypatch
):
    """Chapters 7, 8 and 9 scan one model alike: the second scan loads the first one's
    estimate and samples, and scores them the same; another model or other settings scan
    again."""
    monkeypatch.setenv("BADDIFF_CACHE", str(tmp_path))
    runs = record_calls(monkeypatch, scanning, "invert_trigger")
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    settings = dict(n=4, num_noise=4, steps=3, num_inference_steps=5, progress=False)
    first = scan_model(tiny_unet, scheduler, use_cache=True, **settings)
    again = scan_model(tiny_unet, scheduler, use_cache=True, threshold=0.5, **settings)
    uncached = scan_model(tiny_unet, scheduler, **settings)
    assert len(runs) == 2  # the second cached scan loaded; the uncached one ran
    for other in (again, uncached):
        assert torch.equal(other.inversion.trigger, first.inversion.trigger)
        assert torch.equal(other.samples, first.samples)
        assert (
            other.inversion.losses == first.inversion.losses
            and other.inversion.lam == first.inversion.lam
        )
        assert (other.mode_share, other.diversity) == (
            first.mode_share,
            first.diversity,
        )
    # the threshold is the caller's
    assert again.seconds == first.seconds and again.threshold == 0.5
    scan_model(tiny_unet, scheduler, use_cache=True, seed=1, **settings)
    scan_model(tiny_unet, scheduler, use_cache=True, clip="x0", **settings)
    other_model = make_unet(16, 1).eval()
    scan_model(other_model, scheduler, use_cache=True, **settings)
    assert len(runs) == 5
