"""baddiff_core.gpu_time: FLOPs of a UNet pass, plans of GPU work, and the counter that
checks them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baddiff_core import gpu_time
from baddiff_core.attack import BackdoorRecipe
from baddiff_core.diffusion import make_scheduler
from baddiff_core.models import PRETRAINED_CIFAR10, make_unet
from baddiff_core.train import COLAB_FINETUNE_STEPS, TrainConfig
from conftest import seeded_sample


def test_cifar10_unet_flops_match_the_published_count():
    # The (and torch.utils.flop_counter's) count for google/ddpm-cifar10-32:
    # 12.1-12.5 GFLOP forward; a backward pass costs twice the forward (gradients of
    # activations and of weights).
    config = gpu_time.unet_config(PRETRAINED_CIFAR10)
    forward = gpu_time.pass_flops(config)
    both = gpu_time.pass_flops(config, grad=True)
    assert 12.0e9 < forward < 12.6e9
    assert both == pytest.approx(3 * forward, rel=0.01)


def test_a_pass_is_one_image_of_a_batch(tiny_unet):
    # pass_flops counts a batch of one; a batch of two, counted directly, costs exactly
    # twice that.
    config = gpu_time.unet_config(tiny_unet())
    one = gpu_time.pass_flops(config)
    assert one > 0
    with torch.device("meta"):
        from diffusers import UNet2DModel
        from torch.utils.flop_counter import FlopCounterMode

        unet = UNet2DModel.from_config(config)
        with FlopCounterMode(display=False) as counter:
            unet(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert counter.get_total_flops() == 2 * one


def test_architectures_of_recipes():
    assert tuple(
        gpu_time.unet_config(BackdoorRecipe.paper())["block_out_channels"]
    ) == (128, 256, 256, 256)
    scratch = BackdoorRecipe.paper(base="scratch")
    assert gpu_time.unet_config(scratch) == gpu_time.unet_config(make_unet(32, 3))
    assert gpu_time.unet_config("shipped")["sample_size"] == 16
    with pytest.raises(ValueError, match="cannot tell the architecture"):
        gpu_time.unet_config("/no/such/model")


def test_timesteps_of_a_sampling_chain():
    assert gpu_time.train_timesteps(BackdoorRecipe.paper()) == 1000
    assert gpu_time.train_timesteps(BackdoorRecipe()) == 100  # the shipped digits model
    scratch = BackdoorRecipe(
        base="scratch",
        schedule=dict(num_train_timesteps=40, beta_start=1e-3, beta_end=0.2),
    )
    assert gpu_time.train_timesteps(scratch) == 40
    assert gpu_time.sampling_passes(3, scratch, "three").passes == 120
    assert gpu_time.sampling_passes(3, scratch, "DDIM", steps=5).passes == 15
    with pytest.raises(ValueError, match="cannot tell the timesteps"):
        gpu_time.train_timesteps("/no/such/model")


def test_plan_minutes_by_hand(tiny_unet):
    config = gpu_time.unet_config(tiny_unet())
    per_pass, per_grad = (
        gpu_time.pass_flops(config),
        gpu_time.pass_flops(config, grad=True),
    )
    plan = gpu_time.Plan(
        [
            gpu_time.sampling_passes(10, config, "ten samples", steps=100),
            gpu_time.training(
                TrainConfig(steps=3, batch_size=4, gradient_accumulation_steps=2),
                config,
                "a short run",
            ),
            gpu_time.gradient_passes(7, config, "inversion"),
        ]
    )
    flops = 1000 * per_pass + 24 * per_grad + 7 * per_grad
    assert plan.flops == flops
    assert plan.passes(grad=False) == 1000 and plan.passes(grad=True) == 31
    assert plan.minutes("T4") == pytest.approx(flops / 7e12 / 60)
    assert plan.minutes("A100") == pytest.approx(flops / 42e12 / 60)
    assert [row["image passes"] for row in plan.rows()] == [1000, 24, 7]


def test_the_papers_fine_tune_and_full_modes_fine_tune():
    paper = gpu_time.Plan([gpu_time.fine_tune(BackdoorRecipe.paper())])
    # 19,550 steps x 128 images x 37.3 GFLOP = 93 PFLOP: 3.7 hours at 7 TFLOP/s.
    assert paper.work[0].passes == 19_550 * 128
    assert 200 < paper.minutes("T4") < 240
    colab = BackdoorRecipe.colab()
    assert colab.train.steps == COLAB_FINETUNE_STEPS == 1_000
    assert (
        dataclasses.replace(
            colab.train, steps=19_550, warmup_steps=500, checkpoint_every=2000
        )
        == BackdoorRecipe.paper().train
    )
    assert (
        dataclasses.replace(colab, train=BackdoorRecipe.paper().train)
        == BackdoorRecipe.paper()
    )
    minutes = gpu_time.Plan([gpu_time.fine_tune(colab)]).minutes("T4")
    assert 10 < minutes < 12
    assert "about 11 minutes on a T4, 2 on an A100" in str(
        gpu_time.Plan([gpu_time.fine_tune(colab)])
    )


def test_counter_counts_images_per_pass_and_autograd(tiny_unet):
    unet = tiny_unet()
    x, t = torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)
    with gpu_time.WorkCounter() as counter:
        with torch.no_grad():
            unet(x, t)
        unet(x[:3], t[:3], return_dict=False)
        torch.nn.Conv2d(1, 1, 1)(x)  # not a UNet: not counted
        # meta device: not counted
        gpu_time.pass_flops(dict(tiny_unet(8, 3).config), grad=True)
    unet(x, t)  # after stop(): not counted
    assert counter.passes(grad=False) == 5 and counter.passes(grad=True) == 3


def test_counter_sees_every_step_of_a_sampling_chain(tiny_unet):
    # Independent count: DDPM runs the scheduler's T steps, DDIM the steps it is asked
    # for.
    unet, scheduler = (
        tiny_unet(),
        make_scheduler(num_train_timesteps=12, beta_start=1e-3, beta_end=0.2),
    )
    with gpu_time.WorkCounter() as counter:
        seeded_sample(unet, scheduler, 3, seed=0)
        seeded_sample(unet, scheduler, 2, seed=0, sampler="ddim", num_inference_steps=4)
    assert counter.passes(grad=False) == 3 * 12 + 2 * 4
    assert counter.passes(grad=True) == 0


def test_check_fails_when_the_chapter_does_more_than_planned(tiny_unet):
    config = gpu_time.unet_config(tiny_unet())
    plan = gpu_time.Plan([gpu_time.sampling_passes(2, config, "six passes", steps=3)])
    counter = gpu_time.WorkCounter()
    counter.counts[False] = 6
    plan.check(counter)
    counter.counts[False] = 7
    with pytest.raises(
        AssertionError, match="7 image passes forward-only, more than the 6"
    ):
        plan.check(counter)
    counter.counts[False], counter.counts[True] = 0, 1
    with pytest.raises(AssertionError, match="with a backward pass"):
        plan.check(counter)
