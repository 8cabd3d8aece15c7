"""Choosing the device a chapter or a training run uses, and the precision it trains in.

Introduced in chapter 1 (What is diffusion?): every chapter's ``DEVICE`` parameter goes through
:func:`resolve_device`, so a typo fails at once with a message that says what is allowed, instead of
a traceback deep inside torch. :func:`mixed_precision_for` picks the mixed precision that the
device's hardware actually runs fast.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

__all__ = ["resolve_device", "mixed_precision_for", "DEVICE_CHOICES", "BF16_MIN_CAPABILITY"]

#: The spellings :func:`resolve_device` accepts (``cuda:N`` selects GPU number ``N``).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the ``torch.device`` named by ``device``, checking that it exists on this machine.

    ``"auto"`` picks the first CUDA GPU if there is one, then Apple's MPS, then the CPU.

    Raises:
        ValueError: ``device`` is not one of :data:`DEVICE_CHOICES`, or names a device this machine
            does not have (e.g. ``"cuda"`` without a GPU, ``"cuda:3"`` with two GPUs).
        TypeError: ``device`` is neither a string nor a ``torch.device``.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto' or 'cpu', got {device!r} "
                        f"of type {type(device).__name__}")
    name = device.strip().lower()
    if not _DEVICE_PATTERN.match(name):
        raise ValueError(f"device={device!r} is not a known device; use one of "
                         f"{', '.join(repr(c) for c in DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asks for a CUDA GPU, but torch sees none on this "
                             "machine (torch.cuda.is_available() is False); use 'auto' or 'cpu'")
        index = int(name.split(":")[1]) if ":" in name else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device={device!r} asks for GPU {index}, but this machine has "
                             f"{count} (valid: cuda:0 to cuda:{count - 1})")
    if name == "mps" and not _mps_available():
        raise ValueError(f"device={device!r} asks for Apple's MPS backend, which is not available "
                         "here; use 'auto' or 'cpu'")
    return torch.device(name)


#: The CUDA compute capability from which bf16 runs natively (Ampere, 8.0: A100, RTX 30xx; and newer).
BF16_MIN_CAPABILITY = (8, 0)


def mixed_precision_for(device: str | torch.device = "auto") -> Literal["no", "fp16", "bf16"]:
    """The mixed precision to train in on ``device``: ``"bf16"``, ``"fp16"`` or ``"no"`` (fp32).

    - ``"bf16"`` on a CUDA GPU of compute capability 8.0 or more (Ampere and newer), whose tensor
      cores compute in bf16: fp32's range, so no loss scaling.
    - ``"fp16"`` on an older CUDA GPU, such as Colab's T4 (capability 7.5): its tensor cores compute
      in fp16 only (Accelerate adds loss scaling). ``torch.cuda.is_bf16_supported()`` answers True
      there, because bf16 arithmetic is emulated, but below 8.0 the tensor cores have no bf16 and
      cuDNN no bf16 convolutions: the capability decides, not that answer.
    - ``"no"`` (fp32) on a CPU, which has no tensor cores (its bf16 autocast runs slower than fp32),
      and on Apple's MPS, where the book has not measured mixed precision.

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
