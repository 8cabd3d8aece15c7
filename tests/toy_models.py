"""Toy models whose answers are known in closed form, for the inversion tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch


class EchoModel(torch.nn.Module):
    """``eps_theta(x, t) = x - (1 - lam) g``: a model whose mean answer to ``eps + g``
    is exactly ``lam g`` (a perfect backdoor echo); ``g = 0`` is a clean model that
    answers ``x``. Its mean answer to ``eps_i + tau`` is ``m + tau - (1 - lam) g``
    (``m`` the noises' mean), so Elijah's loss is ``mean | m + (1 - lam)(tau - g)|``,
    zero exactly at ``tau* = g - m / (1 - lam)``: the planted ``g`` up to the noises'
    mean. Records every input and timestep."""

    def __init__(self, g: torch.Tensor, lam: float) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("shift", (1 - lam) * g)
        channels, size, _ = g.shape
        self.config = SimpleNamespace(in_channels=channels, sample_size=size)
        self.inputs: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        self.inputs.append(x.detach().clone())
        self.timesteps.append(torch.as_tensor(t).clone())
        return SimpleNamespace(sample=self.scale * x - self.shift)
