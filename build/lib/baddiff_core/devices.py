"""Choosing the device a chapter or a training run uses.

Introduced in chapter 1 (What is diffusion?): every chapter's ``DEVICE`` parameter goes through
:func:`resolve_device`, so a typo fails at once with a message that says what is allowed, instead of
a traceback deep inside torch.
"""

from __future__ import annotations

import re

import torch

__all__ = ["resolve_device", "DEVICE_CHOICES"]

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


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
