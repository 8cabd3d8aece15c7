"""Choosing the mixed precision from the GPU's compute capability, on faked GPUs (no GPU needed).

A T4 (compute capability 7.5) answers ``torch.cuda.is_bf16_supported() == True`` through emulation,
but has neither bf16 tensor cores nor bf16 convolutions in cuDNN: every fake GPU here answers True,
so a choice that trusted that answer would pick bf16 on the T4 and fail these tests.
"""

from __future__ import annotations

import pytest
import torch

from baddiff_core.benchmark import SIZES, measured_modes
from baddiff_core.devices import mixed_precision_for
from baddiff_core.train import TrainConfig


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(capability)`` makes torch see one CUDA GPU of that compute capability."""

    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)

    return install


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), "fp16"),   # V100
    ((7, 5), "fp16"),   # T4 (Colab's free GPU)
    ((8, 0), "bf16"),   # A100
    ((8, 6), "bf16"),   # RTX 30xx, A10
    ((9, 0), "bf16"),   # H100
])
def test_mixed_precision_follows_the_compute_capability(fake_gpu, capability, expected):
    fake_gpu(capability)
    assert torch.cuda.is_bf16_supported()   # what the choice must not trust
    for device in ("auto", "cuda", "cuda:0", torch.device("cuda")):
        assert mixed_precision_for(device) == expected, device
    assert mixed_precision_for("cpu") == "no"   # a GPU in the machine does not make the CPU a GPU


def test_no_mixed_precision_on_a_cpu(no_gpu):
    assert mixed_precision_for() == mixed_precision_for("cpu") == "no"
    with pytest.raises(ValueError, match="asks for a CUDA GPU"):
        mixed_precision_for("cuda")


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_paper_finetune_trains_in_the_gpus_precision(fake_gpu, capability, expected):
    fake_gpu(capability)
    config = TrainConfig.paper_finetune()
    assert config.mixed_precision == expected and config.device == "auto"
    assert TrainConfig.paper_finetune(device="cuda:0").device == "cuda:0"
    assert TrainConfig.paper_finetune(device="cpu").mixed_precision == "no"
    assert TrainConfig.paper_finetune(mixed_precision="no").mixed_precision == "no"   # overrides win


def test_paper_finetune_on_a_cpu_trains_in_fp32(no_gpu):
    config = TrainConfig.paper_finetune(num_images=1280, steps=7)
    assert config.mixed_precision == "no" and config.steps == 7 and config.checkpoint_every == 2000
    with pytest.raises(ValueError, match="device='tpu9'"):
        TrainConfig.paper_finetune(device="tpu9")


@pytest.mark.parametrize("capability, mixed", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_the_benchmark_measures_the_gpus_own_mixed_precision(fake_gpu, capability, mixed):
    fake_gpu(capability)
    assert measured_modes(SIZES["full"].flops_modes, "cuda") == (
        "fp32", mixed, f"{mixed}+channels_last", f"{mixed}+channels_last+compile")


def test_the_benchmark_measures_fp32_only_on_a_cpu(no_gpu):
    assert measured_modes(SIZES["full"].flops_modes, "cpu") == ("fp32",)
    assert measured_modes(SIZES["small"].flops_modes, "cpu") == ("fp32",)
    with pytest.raises(ValueError, match="mode='fp8' is not known"):
        measured_modes(("fp32", "fp8"), "cpu")
