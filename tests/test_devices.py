"""Choosing the mixed precision from the GPU's compute capability, on faked GPUs (no GPU
needed).

A T4 (compute capability 7.5) answers ``torch.cuda.is_bf16_supported() == True`` through
emulation, but has neither bf16 tensor cores nor bf16 convolutions in cuDNN: every fake
GPU here answers True, so a choice that trusted that answer would pick bf16 on the T4
and fail these tests.
"""

from __future__ import annotations

import pytest
import torch

from baddiff_core import devices
from baddiff_core.benchmark import SIZES, measured_modes
from baddiff_core.devices import mixed_precision_for
from baddiff_core.train import TrainConfig


@pytest.fixture
def fake_gpu(monkeypatch):
    """``fake_gpu(capability)`` makes torch see one CUDA GPU of that compute
    capability."""

    def install(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(
            torch.cuda, "get_device_capability", lambda device=None: capability
        )
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True
        )

    return install


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    "capability, expected",
    [
        ((7, 0), "fp16"),  # V100
        ((7, 5), "fp16"),  # T4 (Colab's free GPU)
        ((8, 0), "bf16"),  # A100
        ((8, 6), "bf16"),  # RTX 30xx, A10
        ((9, 0), "bf16"),  # H100
    ],
)
def test_mixed_precision_follows_the_compute_capability(fake_gpu, capability, expected):
    fake_gpu(capability)
    assert torch.cuda.is_bf16_supported()  # what the choice must not trust
    for device in ("auto", "cuda", "cuda:0", torch.device("cuda")):
        assert mixed_precision_for(device) == expected, device
    # a GPU in the machine does not make the CPU a GPU
    assert mixed_precision_for("cpu") == "no"


def test_no_mixed_precision_on_a_cpu(no_gpu):
    assert mixed_precision_for() == mixed_precision_for("cpu") == "no"
    with pytest.raises(ValueError, match="asks for a CUDA GPU"):
        mixed_precision_for("cuda")


@pytest.mark.parametrize(
    "capability, expected", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_paper_finetune_trains_in_the_gpus_precision(fake_gpu, capability, expected):
    fake_gpu(capability)
    config = TrainConfig.paper_finetune()
    assert config.mixed_precision == expected and config.device == "auto"
    assert TrainConfig.paper_finetune(device="cuda:0").device == "cuda:0"
    assert TrainConfig.paper_finetune(device="cpu").mixed_precision == "no"
    # overrides win
    assert TrainConfig.paper_finetune(mixed_precision="no").mixed_precision == "no"


def test_paper_finetune_on_a_cpu_trains_in_fp32(no_gpu):
    config = TrainConfig.paper_finetune(num_images=1280, steps=7)
    assert (
        config.mixed_precision == "no"
        and config.steps == 7
        and config.checkpoint_every == 2000
    )
    with pytest.raises(ValueError, match="device='tpu9'"):
        TrainConfig.paper_finetune(device="tpu9")


@pytest.mark.parametrize(
    "capability, mixed", [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_the_benchmark_measures_the_gpus_own_mixed_precision(
    fake_gpu, capability, mixed
):
    fake_gpu(capability)
    assert measured_modes(SIZES["full"].flops_modes, "cuda") == (
        "fp32",
        mixed,
        f"{mixed}+channels_last",
        f"{mixed}+channels_last+compile",
    )


def test_the_benchmark_measures_fp32_only_on_a_cpu(no_gpu):
    assert measured_modes(SIZES["full"].flops_modes, "cpu") == ("fp32",)
    assert measured_modes(SIZES["small"].flops_modes, "cpu") == ("fp32",)
    with pytest.raises(ValueError, match="mode='fp8' is not known"):
        measured_modes(("fp32", "fp8"), "cpu")


# --------------------------------------------------------------------------- #
# CPU threads: affinity capped by a cgroup quota, written here as Linux lays it out.
# --------------------------------------------------------------------------- #


def _cgroups(tmp_path, proc_lines: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_lines)
    return root, proc


def test_a_cgroup_v2_quota_caps_the_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(
        devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False
    )
    # 150000 us per 100000 us: 1.5 CPUs, rounded down to 1 thread.
    root, proc = _cgroups(tmp_path, "0::/build\n", {"build/cpu.max": "150000 100000\n"})
    assert devices.available_cpus(root, proc) == 1
    root, proc = _cgroups(tmp_path, "0::/build\n", {"build/cpu.max": "max 100000\n"})
    assert devices.available_cpus(root, proc) == 4  # no quota: the affinity mask


def test_a_cgroup_v1_quota_caps_the_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(
        devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False
    )
    root, proc = _cgroups(
        tmp_path,
        "4:memory:/\n3:cpu,cpuacct:/slow\n",
        {
            "cpu,cpuacct/slow/cpu.cfs_quota_us": "200000\n",
            "cpu,cpuacct/slow/cpu.cfs_period_us": "100000\n",
        },
    )
    assert devices.available_cpus(root, proc) == 2
    root, proc = _cgroups(
        tmp_path,
        "3:cpu:/slow\n",
        {
            "cpu/slow/cpu.cfs_quota_us": "20000\n",
            "cpu/slow/cpu.cfs_period_us": "100000\n",
        },
    )
    assert devices.available_cpus(root, proc) == 1  # 0.2 CPU still runs one thread


def test_without_cgroups_the_affinity_mask_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert devices.available_cpus(tmp_path / "none", tmp_path / "none") == 1


def test_use_available_cpus_sets_torch_threads_unless_the_user_chose(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(devices, "available_cpus", lambda: 1)
        assert devices.use_available_cpus() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv(devices.THREADS_ENV, "2")
        assert devices.use_available_cpus() == 2 and torch.get_num_threads() == 2
        for bad in ("0", "two", "-1"):
            monkeypatch.setenv(devices.THREADS_ENV, bad)
            with pytest.raises(ValueError, match="BADDIFF_THREADS"):
                devices.use_available_cpus()
        monkeypatch.delenv(devices.THREADS_ENV)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        # OMP_NUM_THREADS set: torch's own choice stands
        assert devices.use_available_cpus() == 2
    finally:
        torch.set_num_threads(before)
