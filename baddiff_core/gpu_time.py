"""How long a chapter's full mode takes on a GPU: a plan of its work, its FLOPs, and a
count of what ran.

A chapter in full mode declares its work as a :class:`Plan` of :class:`Work` items, each
a number of *image passes* through a UNet: one image through the network once. Training
an image for one step is a pass with a backward pass (``grad=True``), as is one step of
a trigger inversion; sampling ``n`` images with ``k`` denoising steps is ``n k`` passes
without one.

**FLOPs.** :func:`pass_flops` counts the FLOPs of one pass of an architecture with
``torch.utils.flop_counter`` on PyTorch's meta device (shapes only: no memory, no
compute). For the architecture of ``google/ddpm-cifar10-32`` (Ho et al. 2020,
arXiv:2006.11239, 35.7 M parameters) at 32 px it counts 12.4 GFLOP forward and 37.3
GFLOP forward and backward (three times the forward: the backward pass computes
gradients for both the activations and the weights).

**Time.** GPU time is FLOPs over a sustained rate, :data:`ASSUMED_RATES`: 7 TFLOP/s on a
T4 (16 GB, fp16 autocast; about a ninth of its 65 TFLOP/s fp16 tensor-core peak, as
power-limited T4s sustain on a 32 px UNet) and 42 TFLOP/s on an A100 (bf16; about an
eighth of its 312). These are assumptions, not measurements of this book:
``benchmarks/gpu_check.sh`` measures the rate where a GPU is at hand. Data loading,
downloads and the FID's Inception features (5.7 GFLOP an image) are left out.

**A plan that cannot lie.** :class:`WorkCounter` counts every pass that actually runs,
through a global forward hook on ``diffusers.UNet2DModel`` (the batch size of each call,
and whether autograd was on). :meth:`Plan.check` asserts that the chapter did no more
passes of either kind than it planned, at every scale, so that the estimate printed in a
chapter's first cell bounds the work its code does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ASSUMED_RATES",
    "COLAB_MINUTES",
    "Work",
    "Plan",
    "WorkCounter",
    "pass_flops",
    "unet_config",
    "train_timesteps",
    "training",
    "fine_tune",
    "sampling_passes",
    "gradient_passes",
]

#: Sustained FLOP/s assumed for a 32 px UNet in PyTorch with mixed precision (see the
#: module docstring).
ASSUMED_RATES: dict[str, float] = {"T4": 7e12, "A100": 42e12}
#: The GPU time a chapter's full mode may take: one sitting of Colab's free tier on a
#: T4.
COLAB_MINUTES = 30


@functools.lru_cache(maxsize=32)
def _pass_flops(config_json: str, grad: bool) -> int:
    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DModel.from_config(config)
        x = torch.zeros(
            1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size
        )
        t = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        out = unet(x, t).sample
        if grad:
            out.sum().backward()
    return int(counter.get_total_flops())


def pass_flops(config: Mapping[str, Any], *, grad: bool = False) -> int:
    """FLOPs of one image through the ``UNet2DModel`` of ``config`` (a diffusers
    config), forward only or forward and backward (``grad=True``), as
    ``torch.utils.flop_counter`` counts them (matmuls and convolutions) on the meta
    device."""
    keys = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return _pass_flops(json.dumps(keys, sort_keys=True, default=list), bool(grad))


def unet_config(base: Any) -> dict[str, Any]:
    """The architecture of a model: a ``UNet2DModel`` or its config, a
    :class:`~baddiff_core.attack.BackdoorRecipe` (the base it fine-tunes, or the preset
    it trains from scratch), ``"google/ddpm-cifar10-32"`` (built from its config, no
    download), ``"shipped"`` or a model folder in diffusers' layout."""
    from baddiff_core.attack import BackdoorRecipe
    from baddiff_core.models import PRETRAINED_CIFAR10, ddpm_cifar10_unet, make_unet
    from baddiff_core.pretrained import clean_digits_path

    if isinstance(base, UNet2DModel):
        return dict(base.config)
    if isinstance(base, Mapping):
        return dict(base)
    if isinstance(base, BackdoorRecipe):
        if base.base == "scratch":
            with torch.device("meta"):
                return dict(make_unet(base.image_size, base.channels).config)
        return unet_config(base.base)
    if base == PRETRAINED_CIFAR10:
        with torch.device("meta"):
            return dict(ddpm_cifar10_unet().config)
    folder = clean_digits_path() if base == "shipped" else Path(base)
    file = folder / "unet" / "config.json"
    if not file.is_file():
        raise ValueError(f"cannot tell the architecture of {base!r}: no {file}")
    return json.loads(file.read_text(encoding="utf-8"))


def train_timesteps(base: Any) -> int:
    """T, the DDPM steps of a model (what a DDPM sampling chain costs in passes): a
    recipe trained from scratch has its ``schedule``'s; a fine-tune keeps its base's
    (``google/ddpm-cifar10-32``: 1000; the shipped digits model and model folders: their
    ``scheduler_config.json``)."""
    from baddiff_core.attack import BackdoorRecipe
    from baddiff_core.models import PRETRAINED_CIFAR10
    from baddiff_core.pretrained import clean_digits_path

    if isinstance(base, BackdoorRecipe):
        if base.base == "scratch":
            return int(base.schedule["num_train_timesteps"])
        base = base.base
    if base == PRETRAINED_CIFAR10:
        return 1000
    folder = clean_digits_path() if base == "shipped" else Path(base)
    file = folder / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise ValueError(f"cannot tell the timesteps of {base!r}: no {file}")
    return int(json.loads(file.read_text(encoding="utf-8"))["num_train_timesteps"])


@dataclass(frozen=True)
class Work:
    """One item of a chapter's work: ``passes`` image passes through the UNet of
    ``config``.

    ``grad``: with a backward pass (training, trigger inversion) or not (sampling).
    """

    what: str
    passes: int
    grad: bool
    config: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def flops(self) -> int:
        return self.passes * pass_flops(self.config, grad=self.grad)


def training(train: Any, base: Any, what: str) -> Work:
    """A run of :func:`~baddiff_core.train.train` with the
    :class:`~baddiff_core.train.TrainConfig` ``train``: ``steps`` optimizer steps of
    ``batch_size * gradient_accumulation_steps`` images."""
    passes = train.steps * train.batch_size * train.gradient_accumulation_steps
    return Work(what, int(passes), True, unet_config(base))


def fine_tune(recipe: Any, what: str | None = None) -> Work:
    """Training the backdoored model of a :class:`~baddiff_core.attack.BackdoorRecipe`
    (when the model cache does not hold it yet)."""
    return training(
        recipe.train,
        recipe,
        what
        or f"{recipe.trigger} -> {recipe.target}, "
        f"{recipe.poison_rate:.0%} poison, {recipe.train.steps} steps",
    )


def sampling_passes(
    images: int, base: Any, what: str, *, steps: int | None = None
) -> Work:
    """``images`` samples of ``steps`` denoising steps each: by default a DDPM chain of
    the model's T steps (:func:`train_timesteps`); 50 for DDIM-50."""
    steps = train_timesteps(base) if steps is None else steps
    return Work(what, int(images) * int(steps), False, unet_config(base))


def gradient_passes(passes: int, base: Any, what: str) -> Work:
    """``passes`` image passes with a backward pass that are not training: trigger
    inversion, ANP."""
    return Work(what, int(passes), True, unet_config(base))


@dataclass(frozen=True)
class Plan:
    """The GPU work of a chapter's full mode (see the module docstring)."""

    work: tuple[Work, ...]

    def __init__(self, work: Iterable[Work]) -> None:
        object.__setattr__(self, "work", tuple(work))

    @property
    def flops(self) -> int:
        return sum(item.flops for item in self.work)

    def passes(self, *, grad: bool) -> int:
        return sum(item.passes for item in self.work if item.grad == grad)

    def minutes(self, gpu: str = "T4") -> float:
        """Estimated GPU minutes: FLOPs over the rate :data:`ASSUMED_RATES` gives
        ``gpu``."""
        return self.flops / ASSUMED_RATES[gpu] / 60

    def rows(self) -> list[dict[str, Any]]:
        """One row per item: passes, PFLOP and minutes on each GPU of
        :data:`ASSUMED_RATES`."""
        return [
            {
                "work": item.what,
                "image passes": item.passes,
                "backward": "yes" if item.grad else "no",
                "PFLOP": item.flops / 1e15,
                **{
                    f"min on {gpu}": item.flops / rate / 60
                    for gpu, rate in ASSUMED_RATES.items()
                },
            }
            for item in self.work
        ]

    def __str__(self) -> str:
        if not self.flops:
            return "no GPU work"
        t4, a100 = self.minutes("T4"), self.minutes("A100")
        t4_text = "under a minute" if t4 < 0.5 else f"about {t4:.0f} minutes"
        return f"{t4_text} on a T4, {max(round(a100), 1)} on an A100 ({self.flops / 1e15:.2g} PFLOP)"

    def check(self, counter: WorkCounter) -> None:
        """Assert that the passes ``counter`` saw are no more than planned, of either
        kind."""
        for grad, kind in [(False, "forward-only"), (True, "with a backward pass")]:
            done, planned = counter.passes(grad=grad), self.passes(grad=grad)
            assert done <= planned, (
                f"the chapter ran {done:,} image passes {kind}, more than the "
                f"{planned:,} its GPU-time estimate plans: update the plan"
            )


class WorkCounter:
    """Counts the image passes through every ``UNet2DModel`` while it is active.

    ``start()`` installs a global forward hook
    (``torch.nn.modules.module.register_module_forward_hook``); ``stop()`` removes it.
    Also a context manager. A forward call with autograd on counts as a pass with a
    backward pass: the counter cannot see whether ``backward`` follows, so it errs on
    the high side.
    """

    def __init__(self) -> None:
        self.counts = {False: 0, True: 0}
        self._handle: Any = None

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, UNet2DModel):
            sample = output[0] if isinstance(output, tuple) else output.sample
            # pass_flops' shape-only passes cost nothing
            if sample.device.type != "meta":
                self.counts[torch.is_grad_enabled()] += int(sample.shape[0])

    def start(self) -> WorkCounter:
        if self._handle is None:
            self._handle = torch.nn.modules.module.register_module_forward_hook(
                self._hook
            )
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def passes(self, *, grad: bool) -> int:
        return self.counts[bool(grad)]

    def __enter__(self) -> WorkCounter:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
