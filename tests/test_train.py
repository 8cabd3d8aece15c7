"""Training: it learns, it checkpoints atomically, and a resumed run ends where an
uninterrupted one does."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from baddiff_core import train as train_module
from baddiff_core.data import load_images
from baddiff_core.poison import PoisonedDataset
from baddiff_core.train import latest_checkpoint, train
from baddiff_core.triggers import make_target, make_trigger
from conftest import same_weights, small_train_config, train_until_killed


@pytest.fixture(scope="module")
def digits8():
    return load_images("digits", 8, limit=256)


small_config = small_train_config  # 6 steps of batch 16 (conftest.py)


def test_training_lowers_the_loss(digits8, fresh_model, quick_scheduler):
    model, scheduler = fresh_model(), quick_scheduler
    history = train(
        model, scheduler, digits8, small_config(steps=60, batch_size=32, ema_decay=None)
    )
    assert len(history.losses) == 60 and len(history.learning_rates) == 60
    first, last = sum(history.losses[:10]) / 10, sum(history.losses[-10:]) / 10
    assert last < 0.5 * first, f"the loss should fall: {first:.3f} -> {last:.3f}"
    assert history.images_per_second > 0 and not model.training


def test_cosine_schedule_with_warmup(digits8, fresh_model, quick_scheduler):
    history = train(
        fresh_model(),
        quick_scheduler,
        digits8,
        small_config(steps=10, warmup_steps=4, learning_rate=1e-3),
    )
    lrs = history.learning_rates
    # linear warm-up
    assert lrs[0] == pytest.approx(1e-3 * 1 / 4) and lrs[3] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(
        0.0, abs=1e-12
    )


def test_same_seed_same_weights(digits8, fresh_model, quick_scheduler):
    a, b = fresh_model(), fresh_model()
    train(a, quick_scheduler, digits8, small_config())
    train(b, quick_scheduler, digits8, small_config())
    assert same_weights(a, b)


@pytest.mark.parametrize("solver", ["sde", "ode"])
def test_the_training_target_follows_solver_and_attack(
    digits8, solver, fresh_model, quick_scheduler
):
    """One step's loss is the diffusion_loss of the configured target: poisoned data
    tell the BadDiffusion and in-range targets apart; clean data (r = 0) cannot."""
    scheduler = quick_scheduler
    trigger, target = make_trigger("white_box", 8, 1, size=18), make_target("hat", 8, 1)

    def first_loss(attack: str, poison_rate: float) -> float:
        data = PoisonedDataset(
            digits8, trigger=trigger, target=target, poison_rate=poison_rate, seed=0
        )
        config = small_config(
            steps=1, log_every=1, ema_decay=None, solver=solver, attack=attack
        )
        return train(fresh_model(), scheduler, data, config).losses[0]

    assert first_loss("in_range", 1.0) != pytest.approx(
        first_loss("baddiffusion", 1.0), rel=1e-3
    )
    assert first_loss("in_range", 0.0) == first_loss("baddiffusion", 0.0)


def test_resumed_run_equals_an_uninterrupted_one(
    digits8, tmp_path, monkeypatch, fresh_model, quick_scheduler
):
    trigger = make_trigger("box", 8, 1)
    dataset = PoisonedDataset(
        digits8,
        trigger=trigger,
        target=make_target("corner", 8, 1),
        poison_rate=0.3,
        seed=0,
    )
    config = small_config(
        steps=8, checkpoint_every=3, hflip=True, checkpoint_dir=str(tmp_path / "ckpt")
    )

    reference = fresh_model()
    train(
        reference,
        quick_scheduler,
        dataset,
        small_config(steps=8, hflip=True),
    )

    train_until_killed(6, fresh_model(), quick_scheduler, dataset, config)
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-0000006"

    # other initial weights: everything must come from the checkpoint
    resumed = fresh_model(seed=99)
    history = train(resumed, quick_scheduler, dataset, config)
    assert history.resumed_from_step == 6 and len(history.losses) == 8
    for (name, x), y in zip(
        reference.state_dict().items(), resumed.state_dict().values()
    ):
        torch.testing.assert_close(x, y, msg=name, atol=0, rtol=0)


def test_checkpoints_are_complete_and_pruned(
    digits8, tmp_path, fresh_model, quick_scheduler
):
    config = small_config(
        steps=6, checkpoint_every=2, keep_checkpoints=2, checkpoint_dir=str(tmp_path)
    )
    train(fresh_model(), quick_scheduler, digits8, config)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == ["checkpoint-0000004", "checkpoint-0000006"], (
        "older checkpoints are removed"
    )
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-0000006"
    meta = json.loads((tmp_path / "checkpoint-0000006" / "state.json").read_text())
    assert (
        meta["step"] == 6 and len(meta["losses"]) == 6 and meta["config"]["seed"] == 3
    )
    assert not list(tmp_path.glob(".*")), "no temporary files are left"


def test_an_unfinished_checkpoint_is_ignored(
    digits8, tmp_path, fresh_model, quick_scheduler
):
    config = small_config(steps=4, checkpoint_every=2, checkpoint_dir=str(tmp_path))
    train(fresh_model(), quick_scheduler, digits8, config)
    # A crash while writing a later checkpoint leaves only a hidden staging folder
    # behind.
    (tmp_path / ".checkpoint-0000006.partial").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-0000004"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps=0), "steps must be a positive integer, got steps=0"),
        (dict(batch_size=-4), "batch_size must be a positive integer"),
        (dict(learning_rate=0.0), r"learning_rate must be a real number in \(0, 1\)"),
        (dict(ema_decay=1.5), r"ema_decay must be a real number in \(0, 1\) or None"),
        (dict(mixed_precision="fp8"), "mixed_precision='fp8' is not known"),
        (dict(solver="euler"), "solver='euler' is not known"),
        (dict(attack="trojan"), "attack='trojan' is not known"),
        (dict(lr_schedule="linear"), "lr_schedule='linear' is not known"),
        (
            dict(channels_last="yes"),
            "channels_last must be True or False, got channels_last='yes'",
        ),
        (dict(torch_compile=1), "torch_compile must be True or False"),
    ],
)
def test_bad_configurations(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_clean_data_take_the_plain_ddpm_loss_with_the_same_result(
    digits8, fresh_model, quick_scheduler
):
    """A data set with no poisoned sample skips the (y, r) pairs; the weights are those
    of a poisoned set with poison rate 0, which builds them (zeros) and adds them."""
    unpoisoned = PoisonedDataset(
        digits8,
        trigger=make_trigger("white_box", 8, 1, size=18),
        target=make_target("hat", 8, 1),
        poison_rate=0.0,
        seed=0,
    )
    a, b = fresh_model(), fresh_model()
    train(a, quick_scheduler, digits8, small_config())
    train(b, quick_scheduler, unpoisoned, small_config())
    assert same_weights(a, b)


def test_gpu_path_options_train_the_same_model(
    digits8, monkeypatch, fresh_model, quick_scheduler
):
    """channels_last and torch_compile change how a step runs, not what it computes: the
    weights match the default run's to float rounding, and the model comes back in the
    usual memory format and uncompiled. (torch.compile itself is replaced by a recorder
    here: compiling takes minutes on a CPU; the benchmark measures the real thing.)"""
    compiled = []

    def fake_compile(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(train_module.torch, "compile", fake_compile)
    reference, fast = fresh_model(), fresh_model()
    train(reference, quick_scheduler, digits8, small_config())
    train(
        fast,
        quick_scheduler,
        digits8,
        small_config(channels_last=True, torch_compile=True),
    )
    assert (
        len(compiled) == 1
        and compiled[0] is fast
        and type(fast).__name__ == "UNet2DModel"
    )
    for name, parameter in fast.named_parameters():
        torch.testing.assert_close(
            parameter, reference.get_parameter(name), atol=1e-4, rtol=1e-3
        )
        assert parameter.dim() != 4 or parameter.is_contiguous(), name


def test_bf16_mixed_precision_runs_the_unet_in_bf16_and_keeps_fp32_weights(
    digits8, fresh_model, quick_scheduler
):
    """The GPU path's autocast, exercised on the CPU (Accelerate autocasts to bf16 there
    too): the UNet's convolutions compute in bf16, the weights and the optimiser stay
    fp32, and the losses follow the fp32 run's to bf16 rounding. fp32, bf16, fp32 in one
    process, as the benchmark's modes run (Accelerate keeps its settings process-wide):
    the last run is the first one again."""
    first = fresh_model()
    reference = train(first, quick_scheduler, digits8, small_config())
    seen = []
    model = fresh_model()
    hook = model.conv_in.register_forward_hook(
        lambda module, args, output: seen.append(output.dtype)
    )
    history = train(
        model,
        quick_scheduler,
        digits8,
        small_config(mixed_precision="bf16"),
    )
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    torch.testing.assert_close(
        torch.tensor(history.losses),
        torch.tensor(reference.losses),
        rtol=0.05,
        atol=0.01,
    )
    again = fresh_model()
    assert (
        train(again, quick_scheduler, digits8, small_config()).losses
        == reference.losses
    )
    assert same_weights(first, again)


def test_images_must_fit_the_model(digits8, fresh_model, quick_scheduler, tiny_unet):
    with pytest.raises(ValueError, match="do not fit the model"):
        train(tiny_unet(16, 1), quick_scheduler, digits8, small_config())
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        train(fresh_model(), quick_scheduler, digits8 * 3, small_config())


def test_checkpoint_weights_reproduce_the_final_model(
    digits8, tmp_path, fresh_model, quick_scheduler
):
    model = fresh_model()
    train(
        model,
        quick_scheduler,
        digits8,
        small_config(
            steps=4,
            checkpoint_every=2,
            keep_checkpoints=5,
            checkpoint_dir=str(tmp_path),
        ),
    )
    folders = train_module.list_checkpoints(tmp_path)
    assert [f.name for f in folders] == ["checkpoint-0000002", "checkpoint-0000004"]
    loaded = fresh_model(seed=5)
    assert train_module.load_checkpoint_weights(folders[-1], loaded) == 4
    # The trained model ends holding its EMA weights, which the last checkpoint stores.
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_is_the_moving_average_of_the_raw_weights(
    digits8, tmp_path, warmup, fresh_model, quick_scheduler
):
    """The EMA weights equal an EMA computed by hand from the raw weights after every
    step.

    Without warm-up (a fine-tune) the decay is ``ema_decay`` from the first step; with
    it, diffusers' ``min(ema_decay, (1 + k) / (10 + k))`` (0 at the first step, so the
    average starts there).
    """
    decay, steps = 0.7, 4
    raw = fresh_model()
    start = [p.detach().clone() for p in raw.parameters()]
    train(
        raw,
        quick_scheduler,
        digits8,
        small_config(
            steps=steps,
            ema_decay=None,
            checkpoint_every=1,
            keep_checkpoints=steps,
            checkpoint_dir=str(tmp_path),
        ),
    )
    expected = start
    for k, folder in enumerate(train_module.list_checkpoints(tmp_path), start=1):
        snapshot = fresh_model(seed=9)
        train_module.load_checkpoint_weights(folder, snapshot, ema=False)
        d = (
            min(decay, (k - 1 + 1) / (k - 1 + 10))
            if warmup and k > 1
            else (0.0 if warmup else decay)
        )
        expected = [
            d * e + (1 - d) * p.detach()
            for e, p in zip(expected, snapshot.parameters())
        ]

    averaged = fresh_model()
    train(
        averaged,
        quick_scheduler,
        digits8,
        small_config(steps=steps, ema_decay=decay, ema_warmup=warmup),
    )
    for e, p in zip(expected, averaged.parameters()):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


_KILLED_RUN = r'''
import os, signal, sys
import torch
from baddiff_core import train as train_module
from baddiff_core.data import load_images
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler
from baddiff_core.models import make_unet

checkpoint_dir, kill_at_step, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
real_save_file = train_module.save_file

def save_file_then_die(tensors, path):
    """Die by SIGKILL half-way through writing the checkpoint of ``kill_at_step``."""
    if f"checkpoint-{kill_at_step:07d}" in path:
        with open(path, "wb") as handle:
            handle.write(b"half a file")
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save_file(tensors, path)

train_module.save_file = save_file_then_die
torch.manual_seed(0)
model = make_unet(8, 1, block_out_channels=(16, 32), norm_num_groups=8)
config = train_module.TrainConfig(steps=8, batch_size=16, learning_rate=2e-3, warmup_steps=2, ema_decay=0.9,
                                  device="cpu", progress=False, log_every=2, seed=3, checkpoint_every=1,
                                  keep_checkpoints=2, checkpoint_dir=checkpoint_dir)
train_module.train(model, make_scheduler(**QUICK_SCHEDULE), load_images("digits", 8, limit=256), config)
'''


@pytest.mark.slow
def test_sigkill_mid_checkpoint_then_resume_equals_an_uninterrupted_run(
    digits8, tmp_path, fresh_model, quick_scheduler
):
    """A training process killed with SIGKILL while writing a checkpoint loses nothing:
    the previous checkpoint is intact, and resuming from it ends with the weights of a
    run that was never killed."""
    import subprocess
    import sys

    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    checkpoints = tmp_path / "ckpt"
    child = subprocess.run(
        [
            sys.executable,
            str(script),
            str(checkpoints),
            "6",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr[-2000:]
    assert latest_checkpoint(checkpoints).name == "checkpoint-0000005", (
        "the half-written one is ignored"
    )
    assert not (checkpoints / "checkpoint-0000006").exists()

    config = small_config(
        steps=8, checkpoint_every=1, keep_checkpoints=2, checkpoint_dir=str(checkpoints)
    )
    resumed = fresh_model(seed=99)
    history = train(resumed, quick_scheduler, digits8, config)
    assert history.resumed_from_step == 5

    reference = fresh_model()
    train(reference, quick_scheduler, digits8, small_config(steps=8))
    for (name, x), y in zip(
        reference.state_dict().items(), resumed.state_dict().values()
    ):
        torch.testing.assert_close(x, y, msg=name, atol=0, rtol=0)


def test_checkpoints_belong_to_one_run(digits8, tmp_path, fresh_model, quick_scheduler):
    """A checkpoint folder left by one run is never resumed by another: its weights
    would come back under the other run's name (another recipe, more or fewer steps)."""
    scheduler = quick_scheduler
    folder = str(tmp_path / "ckpt")
    train(
        fresh_model(),
        scheduler,
        digits8,
        small_config(steps=4, checkpoint_dir=folder, checkpoint_every=2),
        run_key="box-shoe",
    )
    refusals = [
        (small_config(steps=4, seed=4), "box-shoe", "seed: checkpoint 3, this run 4"),
        (small_config(steps=10), "box-shoe", "steps: checkpoint 4, this run 10"),
        (small_config(steps=2), "box-shoe", "steps: checkpoint 4, this run 2"),
        (
            small_config(steps=4),
            "stop-hat",
            "run: checkpoint 'box-shoe', this run 'stop-hat'",
        ),
    ]
    for config, key, message in refusals:
        config = dataclasses.replace(config, checkpoint_dir=folder, checkpoint_every=2)
        with pytest.raises(ValueError, match=re.escape(message)):
            train(fresh_model(), scheduler, digits8, config, run_key=key)
    # The same run resumes; run-only settings (logging, checkpoint frequency, progress)
    # may change.
    same = small_config(steps=4, checkpoint_dir=folder, checkpoint_every=1, log_every=1)
    history = train(fresh_model(), scheduler, digits8, same, run_key="box-shoe")
    assert history.resumed_from_step == 4
