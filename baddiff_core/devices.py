"""Choosing the device a chapter or a training run uses, and the precision it trains in.

Introduced in chapter 1 (What is diffusion?): every chapter's ``DEVICE`` parameter goes
through :func:`resolve_device`, so a typo fails at once with a message that says what is
allowed, instead of a traceback deep inside torch. :func:`mixed_precision_for` picks the
mixed precision that the device's hardware actually runs fast.
:func:`use_available_cpus` gives torch as many CPU threads as the process may really
use, so that a CPU quota or a pinned core set does not make torch's threads fight over
too few cores.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "resolve_device",
    "mixed_precision_for",
    "available_cpus",
    "use_available_cpus",
    "DEVICE_CHOICES",
    "BF16_MIN_CAPABILITY",
    "THREADS_ENV",
]

#: The spellings :func:`resolve_device` accepts (``cuda:N`` selects GPU number ``N``).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the ``torch.device`` named by ``device``, checking that it exists on this
    machine.

    ``"auto"`` picks the first CUDA GPU if there is one, then Apple's MPS, then the CPU.

    Raises:
        ValueError: ``device`` is not one of :data:`DEVICE_CHOICES`, or names a device this machine
            does not have (e.g. ``"cuda"`` without a GPU, ``"cuda:3"`` with two GPUs).
        TypeError: ``device`` is neither a string nor a ``torch.device``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(
            f"device must be a string such as 'auto' or 'cpu', got {device!r} "
            f"of type {type(device).__name__}"
        )
    name = device.strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise ValueError(
            f"device={device!r} is not a known device; use one of "
            f"{', '.join(repr(c) for c in DEVICE_CHOICES)}"
        )
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} asks for a CUDA GPU, but torch sees none on this "
                "machine (torch.cuda.is_available() is False); use 'auto' or 'cpu'"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"device={device!r} asks for GPU {index}, but this machine has "
                f"{count} (valid: cuda:0 to cuda:{count - 1})"
            )
    if name == "mps" and not _mps_available():
        raise ValueError(
            f"device={device!r} asks for Apple's MPS backend, which is not available "
            "here; use 'auto' or 'cpu'"
        )
    return torch.device(name)


#: The CUDA compute capability from which bf16 runs natively (Ampere, 8.0: A100, RTX
#: 30xx; and newer).
BF16_MIN_CAPABILITY = (8, 0)


def mixed_precision_for(
    device: str | torch.device = "auto",
) -> Literal["no", "fp16", "bf16"]:
    """The mixed precision to train in on ``device``: ``"bf16"``, ``"fp16"`` or ``"no"``
    (fp32).

    - ``"bf16"`` on a CUDA GPU of compute capability 8.0 or more (Ampere and newer),
      whose tensor cores compute in bf16: fp32's range, so no loss scaling.
    - ``"fp16"`` on an older CUDA GPU, such as Colab's T4 (capability 7.5): its tensor
      cores compute in fp16 only (Accelerate adds loss scaling).
      ``torch.cuda.is_bf16_supported()`` answers True there, because bf16 arithmetic is
      emulated, but below 8.0 the tensor cores have no bf16 and cuDNN no bf16
      convolutions: the capability decides, not that answer.
    - ``"no"`` (fp32) on a CPU, which has no tensor cores (its bf16 autocast runs slower
      than fp32), and on Apple's MPS, where the book has not measured mixed precision.

    ``device`` is resolved with :func:`resolve_device` (``"auto"`` by default).
    """
    device = resolve_device(device)
    if device.type != "cuda":
        return "no"
    capability = tuple(torch.cuda.get_device_capability(device))
    return "bf16" if capability >= BF16_MIN_CAPABILITY else "fp16"


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


#: Set to a positive integer to choose torch's CPU thread count yourself (as
#: ``OMP_NUM_THREADS`` does).
THREADS_ENV = "BADDIFF_THREADS"


def available_cpus(
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
) -> int:
    """How many CPUs this process may keep busy: its affinity mask, capped by a cgroup
    CPU quota.

    torch starts one thread per physical core of the machine. It does not see a CPU
    quota (the cgroup ``cpu.max`` of cgroup v2, or ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` of v1: what ``docker --cpus``, systemd's ``CPUQuota`` or a
    Kubernetes limit set), and on some builds not a core set pinned with ``taskset``
    either. With a quota of 0.7 CPU, two threads run in turns and wait on each other at
    every parallel section; several times slower than one thread.

    Returns ``floor(quota / period)`` (at least 1) when a quota is set, else the number
    of CPUs in the affinity mask. ``cgroup_root`` and ``proc_cgroup`` are read as on
    Linux; elsewhere the answer is ``os.cpu_count()``.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root), Path(proc_cgroup))
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroups, v2 or v1; None when
    unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.lstrip("/")
        # cgroup v2: "0::/path", the file cpu.max holds "QUOTA PERIOD" or "max PERIOD"
        if controllers == "":
            for folder in {root / relative, root}:
                quotas.append(_read_quota(folder / "cpu.max"))
        elif "cpu" in controllers.split(","):  # cgroup v1: "N:cpu,cpuacct:/path"
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                for folder in {root / mount / relative, root / mount}:
                    quotas.append(
                        _read_quota(
                            folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
                        )
                    )
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _read_quota(quota_file: Path, period_file: Path | None = None) -> float | None:
    try:
        if period_file is None:
            quota, period = quota_file.read_text().split()[:2]
        else:
            quota, period = (
                quota_file.read_text().strip(),
                period_file.read_text().strip(),
            )
        if quota in ("max", "-1") or float(period) <= 0:
            return None
        return float(quota) / float(period)
    except (OSError, ValueError):
        return None


def use_available_cpus() -> int:
    """Give torch as many CPU threads as :func:`available_cpus`, and return that count.

    Left alone when the user chose: ``BADDIFF_THREADS`` (a positive integer) is used as
    given, and when ``OMP_NUM_THREADS`` is set torch already follows it. Every chapter
    (through :func:`~baddiff_core.book.chapter_settings`) and the ``baddiff`` command
    call this.

    Raises:
        ValueError: ``BADDIFF_THREADS`` is not a positive integer.
    """
    chosen = os.environ.get(THREADS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(
                f"{THREADS_ENV} must be a positive integer (torch's CPU threads), got {chosen!r}"
            )
        threads = int(chosen)
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    else:
        threads = available_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
