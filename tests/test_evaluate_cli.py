"""``baddiff evaluate``'s attack-success threshold: one per scale, chosen from the
model, refused outside (0, 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from baddiff_core.cli import BACKDOOR_FILE, main
from baddiff_core.diffusion import make_scheduler
from baddiff_core.evaluation import ASR_THRESHOLDS, QUICK_ASR_THRESHOLD, asr_threshold
from baddiff_core.models import save_model
from baddiff_core.triggers import make_target, make_trigger

WIDTHS = {8: (8, 16), 16: (8, 16, 16), 32: (8, 8, 8, 8)}  # tiny versions of the presets


@pytest.fixture
def saved_backdoor(tmp_path, tiny_unet):
    """``saved_backdoor(image_size, channels)``: a tiny untrained model folder as
    ``baddiff backdoor`` writes it. Its recipe says digits for every shape: the default
    threshold must follow the model's shape, not the recipe's data set."""

    def save(image_size: int, channels: int) -> Path:
        folder = tmp_path / "model"
        save_model(
            folder,
            tiny_unet(image_size, channels, block_out_channels=WIDTHS[image_size]),
            make_scheduler(num_train_timesteps=10, beta_start=1e-2, beta_end=0.5),
            metadata=dict(kind="backdoor", recipe=dict(dataset="digits")),
        )
        save_file(
            {
                "trigger": make_trigger("box", image_size, channels).contiguous(),
                "target": make_target("corner", image_size, channels).contiguous(),
            },
            str(folder / BACKDOOR_FILE),
        )
        return folder

    return save


def evaluate(folder, *extra: str) -> list[str]:
    return [
        "evaluate",
        str(folder),
        "--n",
        "2",
        "--steps",
        "1",
        "--clip",
        "none",
        "--fd-samples",
        "0",
        "--device",
        "cpu",
        *extra,
    ]


def test_one_threshold_per_scale():
    assert ASR_THRESHOLDS == {"quick": 0.01, "full": 0.05}
    assert (
        asr_threshold(True) == QUICK_ASR_THRESHOLD == 0.01
        and asr_threshold(False) == 0.05
    )
    with pytest.raises(TypeError, match="quick must be True or False, got quick='yes'"):
        asr_threshold("yes")


@pytest.mark.parametrize(
    "image_size, channels, expected",
    [
        (16, 1, 0.01),  # the book's digits: quick
        (16, 3, 0.05),
        (8, 1, 0.05),
        (32, 3, 0.05),  # CIFAR-10's shape: full
    ],
)
def test_evaluate_defaults_to_the_threshold_of_the_models_scale(
    image_size, channels, expected, saved_backdoor, capsys
):
    folder = saved_backdoor(image_size, channels)
    assert main(evaluate(folder, "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["attack"]["none"]["threshold"] == expected


def test_evaluate_keeps_a_threshold_it_is_given(saved_backdoor, capsys):
    folder = saved_backdoor(16, 1)
    assert main(evaluate(folder, "--json", "--threshold", "0.2")) == 0
    assert json.loads(capsys.readouterr().out)["attack"]["none"]["threshold"] == 0.2


@pytest.mark.parametrize("value", ["0", "1", "-0.01", "1.5", "nan"])
def test_evaluate_refuses_a_threshold_outside_0_1(value, saved_backdoor, capsys):
    folder = saved_backdoor(16, 1)
    assert main(evaluate(folder, "--threshold", value)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines == [
        f"baddiff evaluate: error: --threshold must be an MSE threshold in (0, 1), got {float(value)}"
    ]


@pytest.mark.parametrize("command", ["evaluate", "sample", "scan"])
def test_a_batch_size_below_1_is_refused(command, saved_backdoor, tmp_path, capsys):
    folder = saved_backdoor(8, 1)
    argv = {
        "evaluate": evaluate(folder),
        "sample": ["sample", str(folder), "--output", str(tmp_path / "s.png")],
        "scan": ["scan", str(folder), "--output", str(tmp_path / "scan")],
    }[command]
    assert main(argv + ["--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer, got 0" in capsys.readouterr().err
