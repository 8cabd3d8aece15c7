"""Our sampling loop against hand-written loops over diffusers' schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from baddiff_core.diffusion import make_scheduler
from baddiff_core.evaluation import clean_quality, evaluate_attack
from baddiff_core.sampling import (
    DEFAULT_BATCH_SIZE,
    inference_scheduler,
    sample,
    sample_clean_and_triggered,
)
from baddiff_core.triggers import make_target, make_trigger
from conftest import seeded_sample


@pytest.fixture(scope="module")
def model(tiny_unet):
    return tiny_unet().eval()


@pytest.fixture(scope="module")
def scheduler():
    return make_scheduler(num_train_timesteps=20, beta_start=1e-2, beta_end=0.5)


def hand_loop(model, scheduler_cls, config, n, seed, steps, **step_kwargs):
    """The textbook loop: x_T ~ N(0, I), then scheduler.step for every timestep."""
    scheduler = scheduler_cls(**config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 8, 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(
                model(x, t).sample, t, x, generator=generator, **step_kwargs
            ).prev_sample
    return x.clamp(-1, 1)


def ddpm_config(scheduler, clip_sample):
    return dict(
        num_train_timesteps=20,
        beta_start=1e-2,
        beta_end=0.5,
        beta_schedule="linear",
        variance_type=scheduler.config.variance_type,
        clip_sample=clip_sample,
    )


def test_no_clip_equals_a_hand_written_ddpm_loop(model, scheduler):
    ours = seeded_sample(model, scheduler, 4, seed=3)
    theirs = hand_loop(model, DDPMScheduler, ddpm_config(scheduler, False), 4, 3, 20)
    torch.testing.assert_close(ours, theirs)


def test_x0_clip_equals_diffusers_clip_sample(model, scheduler):
    ours = seeded_sample(model, scheduler, 4, seed=3, clip="x0")
    theirs = hand_loop(model, DDPMScheduler, ddpm_config(scheduler, True), 4, 3, 20)
    torch.testing.assert_close(ours, theirs)
    unclipped = seeded_sample(model, scheduler, 4, seed=3)
    assert not torch.allclose(ours, unclipped), (
        "clipping the predicted x0 should change an untrained model's samples"
    )


def test_ddim_equals_a_hand_written_ddim_loop(model, scheduler):
    ours = seeded_sample(
        model, scheduler, 3, seed=4, sampler="ddim", num_inference_steps=5
    )
    config = {
        k: v for k, v in ddpm_config(scheduler, False).items() if k != "variance_type"
    }
    theirs = hand_loop(model, DDIMScheduler, config, 3, 4, 5, eta=0.0)
    torch.testing.assert_close(ours, theirs)


def test_ddim_x0_clip_steps_from_the_clipped_image(model, scheduler):
    """Under DDIM, clip="x0" re-derives the noise from the clamped x0 (diffusers'
    use_clipped_model_output=True); the stock pipeline's raw-noise variant gives other
    samples."""
    ours = seeded_sample(
        model, scheduler, 3, seed=4, sampler="ddim", clip="x0", num_inference_steps=5
    )
    config = {
        k: v for k, v in ddpm_config(scheduler, True).items() if k != "variance_type"
    }
    theirs = hand_loop(
        model, DDIMScheduler, config, 3, 4, 5, eta=0.0, use_clipped_model_output=True
    )
    torch.testing.assert_close(ours, theirs)
    stock = hand_loop(model, DDIMScheduler, config, 3, 4, 5, eta=0.0)
    assert not torch.allclose(ours, stock)


def test_xt_clip_keeps_every_step_in_range(model, scheduler):
    def draw(**options):
        """4 samples from a start shifted by 3, and the largest |x_t| of every step."""
        seen = []
        out = seeded_sample(
            model,
            scheduler,
            4,
            seed=0,
            trigger=torch.full((1, 8, 8), 3.0),
            callback=lambda t, x, x0: seen.append(x.abs().max().item()),
            **options,
        )
        return out, seen

    out, seen = draw(clip="xt")
    assert len(seen) == 20 and max(seen) <= 1.0 and out.abs().max() <= 1.0
    _, free = draw()  # the default: no clipping
    assert max(free) > 1.0, "without clipping, a start shifted by 3 leaves [-1, 1]"


def test_trigger_is_added_raw_to_the_starting_noise(model, scheduler):
    eps = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    trigger = torch.full((1, 8, 8), -1.0)
    trigger[:, 5:7, 5:7] = 0.0
    a = seeded_sample(model, scheduler, 2, seed=1, noise=eps, trigger=trigger)
    b = seeded_sample(model, scheduler, 2, seed=1, noise=eps + trigger)
    torch.testing.assert_close(a, b)


def test_clean_and_triggered_in_one_pass_share_their_noise(model, scheduler):
    trigger = torch.full((1, 8, 8), -1.0)
    clean, triggered = sample_clean_and_triggered(
        model,
        scheduler,
        3,
        trigger,
        sampler="ddim",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(2),
        progress=False,
    )
    eps = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))

    def ddim_from(noise):
        """DDIM with 4 steps from this start, without a generator (DDIM draws no
        noise after the start)."""
        return sample(
            model,
            scheduler,
            3,
            noise=noise,
            sampler="ddim",
            num_inference_steps=4,
            progress=False,
        )

    alone, alone_triggered = ddim_from(eps), ddim_from(eps + trigger)
    torch.testing.assert_close(clean, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(triggered, alone_triggered, atol=1e-5, rtol=0)


def test_batches_cover_every_image_in_range(model, scheduler):
    out = seeded_sample(model, scheduler, 5, seed=0, batch_size=2)
    assert out.shape == (5, 1, 8, 8) and out.min() >= -1 and out.max() <= 1


def test_inference_scheduler_sets_only_the_clipping(quick_scheduler):
    base = quick_scheduler
    for clip, expected in [("none", False), ("x0", True), ("xt", False)]:
        made = inference_scheduler(base, clip=clip)
        assert made.config.clip_sample is expected
        torch.testing.assert_close(made.alphas_cumprod, base.alphas_cumprod)
    assert isinstance(inference_scheduler(base, sampler="ddim"), DDIMScheduler)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n=0), ValueError, "n must be a positive integer"),
        (dict(clip="x1"), ValueError, "clip='x1' is not known; use one of"),
        (dict(sampler="euler"), ValueError, "sampler='euler' is not known"),
        (
            dict(num_inference_steps=21),
            ValueError,
            r"num_inference_steps must be an integer in \[1, 20\]",
        ),
        (dict(batch_size=0), ValueError, "batch_size must be a positive integer"),
        (
            dict(trigger=torch.zeros(3, 8, 8)),
            ValueError,
            r"trigger must have shape \(1, 8, 8\)",
        ),
        (dict(noise=torch.zeros(1, 1, 8, 8)), ValueError, "noise must have shape"),
    ],
)
def test_bad_sampling_arguments(model, scheduler, kwargs, error, message):
    args = dict(n=2, progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        sample(model, scheduler, **args)


@pytest.mark.parametrize(
    "sampler, clip", [("ddpm", "none"), ("ddpm", "x0"), ("ddim", "xt")]
)
def test_same_seed_same_samples_other_seed_other_samples(
    model, scheduler, sampler, clip
):
    def draw(seed):
        return seeded_sample(
            model,
            scheduler,
            3,
            seed=seed,
            trigger=torch.zeros(1, 8, 8),
            sampler=sampler,
            clip=clip,
            num_inference_steps=10,
        )

    first, again, other = draw(7), draw(7), draw(8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


# --------------------------------------------------------------------------- #
# Bounded memory: images per forward pass.
# --------------------------------------------------------------------------- #


class BatchSizes:
    """The batch size of every forward pass of ``model`` while in a ``with`` block (a
    forward hook)."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    def __enter__(self):
        self.handle = self.model.register_forward_hook(
            lambda module, args, output: self.sizes.append(len(args[0]))
        )
        return self.sizes

    def __exit__(self, *exc):
        self.handle.remove()


def test_many_images_are_sampled_in_batches_of_at_most_the_default(model, scheduler):
    """300 images without a batch size: a pass of DEFAULT_BATCH_SIZE (256), then the 44
    others; up to 256 images stay in one pass, so the book's quick mode (at most 256 per
    call) samples what it sampled before the bound."""
    assert DEFAULT_BATCH_SIZE == 256
    with BatchSizes(model) as sizes:
        seeded_sample(model, scheduler, 300, seed=0, num_inference_steps=1)
    assert sizes == [256, 44]
    with BatchSizes(model) as sizes:
        one_pass = seeded_sample(model, scheduler, 256, seed=0, num_inference_steps=2)
    assert sizes == [256, 256]  # two steps of one batch
    explicit = seeded_sample(
        model, scheduler, 256, seed=0, num_inference_steps=2, batch_size=256
    )
    assert torch.equal(one_pass, explicit)


def test_sample_clean_and_triggered_splits_its_2n_images_in_batches(model, scheduler):
    """The 2n images of the paired call go through the same bound: 2 x 150 = 300 is 256
    + 44."""
    with BatchSizes(model) as sizes:
        clean, triggered = sample_clean_and_triggered(
            model,
            scheduler,
            150,
            torch.zeros(1, 8, 8),
            num_inference_steps=1,
            progress=False,
        )
    assert sizes == [256, 44] and clean.shape == triggered.shape == (150, 1, 8, 8)


def test_evaluate_attack_and_clean_quality_pass_the_batch_size(model, scheduler):
    trigger = make_trigger("box", 8, 1)
    target = make_target("corner", 8, 1)
    args = dict(n=6, clips=("none", "x0"), num_inference_steps=3, seed=4)

    def asked(batch_size, sampler="ddpm"):
        with BatchSizes(model) as sizes:
            results = evaluate_attack(
                model,
                scheduler,
                trigger,
                target,
                sampler=sampler,
                batch_size=batch_size,
                **args,
            )
        return results, sizes

    default, default_sizes = asked(None)
    whole, _ = asked(12)
    split, split_sizes = asked(4)
    # 2n = 12 images in one pass, 3 steps, 2 clipping modes
    assert default_sizes == [12] * 6
    assert split_sizes == [4] * 18 and max(split_sizes) <= 4
    for clip in args["clips"]:
        # One batch of 12 either way: the same random numbers, the same images, the same
        # scores.
        assert torch.equal(default[clip].triggered, whole[clip].triggered)
        assert torch.equal(default[clip].clean, whole[clip].clean)
        assert default[clip].as_dict() == whole[clip].as_dict()
        assert split[clip].triggered.shape == (6, 1, 8, 8)
    # DDIM draws no noise after the start, so three batches of 4 give the images of one
    # batch of 12.
    ddim_whole, _ = asked(None, "ddim")
    ddim_split, ddim_sizes = asked(4, "ddim")
    assert max(ddim_sizes) <= 4
    for clip in args["clips"]:
        torch.testing.assert_close(
            ddim_split[clip].triggered, ddim_whole[clip].triggered, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            ddim_split[clip].clean, ddim_whole[clip].clean, atol=1e-5, rtol=0
        )

    real = torch.rand(16, 1, 8, 8) * 2 - 1
    with BatchSizes(model) as sizes:
        clean_quality(
            model, scheduler, real, n=6, seed=1, batch_size=4, features="digits"
        )
    # the 6 images in batches of 4 and 2, each through 20 DDPM steps
    assert sizes == [4] * 20 + [2] * 20
