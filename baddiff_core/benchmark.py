"""What training and sampling cost: speed ratios measured side by side, memory,
throughput and MFU.

Introduced in the Performance page; ``benchmarks/run.py`` is the command. A machine's
speed drifts (other processes, clocks, caches), so a figure on its own says little.
Every comparison here runs its two candidates alternately, ``A B B A A B ...``, and
reports the median of the per-pair ratios: drift that is slow next to one repeat cancels
out. Where a claim is about the work a change adds, not its time, :func:`torch_calls`
counts that work exactly: the torch functions a call makes.

Sizes: ``"small"`` (the book's 16 px model, a few steps; under a minute or two on a
2-core CPU, what CI runs) and ``"full"`` (CIFAR-10 size, batch 128, for a GPU). The
throughput section trains the ``google/ddpm-cifar10-32`` architecture (built from its
config, nothing downloaded) and reports images/s and model FLOP utilisation: the FLOP/s
its training steps reach, counted by ``torch.utils.flop_counter``, over the matrix rate
this device reaches on a large matmul (bf16 on a GPU of compute capability 8.0 or more,
fp16 on an older one, fp32 on a CPU).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from baddiff_core.cache import trainings
from baddiff_core.checks import check_choice, check_int, check_positive_int
from baddiff_core.devices import mixed_precision_for, resolve_device
from baddiff_core.diffusion import PAPER_SCHEDULE, QUICK_SCHEDULE, make_scheduler
from baddiff_core.files import write_text_atomically
from baddiff_core.gpu_time import Plan, sampling_passes, training
from baddiff_core.models import ddpm_cifar10_unet, make_unet
from baddiff_core.poison import PoisonedDataset
from baddiff_core.sampling import DEFAULT_BATCH_SIZE, sample, sample_clean_and_triggered
from baddiff_core.train import TrainConfig, train
from baddiff_core.triggers import make_target, make_trigger

__all__ = [
    "BenchmarkSize",
    "SIZES",
    "Comparison",
    "interleaved",
    "reference_training_loop",
    "torch_calls",
    "clipping_calls",
    "gpu_plan",
    "fine_tune_cost",
    "sampling_cost",
    "peak_memory",
    "matmul_rate",
    "training_flops",
    "training_throughput",
    "measured_modes",
    "book_times",
    "run_benchmarks",
    "write_results",
    "results_markdown",
    "cache_summary",
]


@dataclass(frozen=True)
class BenchmarkSize:
    """How big each measurement is.

    ``image_size``/``channels``: the UNet preset
    (:func:`~baddiff_core.models.make_unet`) that the ratios use; ``train_batch``,
    ``train_steps``: one training repeat; ``sample_n``, ``sample_steps``: images per
    sampling call and its DDPM steps (the quick schedule's 100, or fewer: a ratio of
    per-step costs needs no whole chain); ``long_n``: images for the DDIM-50 against
    DDPM-1000 comparison (paper schedule); ``repeats``: pairs per comparison with a
    target (a quarter as many, at least 2, for the batching comparison, whose effect is
    large); ``flops_batch``, ``flops_steps``, ``flops_modes``: the CIFAR-10 UNet's
    throughput runs. ``cifar_unet``: the ratios use the ``google/ddpm-cifar10-32``
    architecture (32 px, 3 channels) instead of the small preset.
    """

    name: str
    image_size: int
    channels: int
    train_batch: int
    train_steps: int
    sample_n: int
    sample_steps: int
    long_n: int
    repeats: int
    flops_batch: int
    flops_steps: int
    flops_modes: tuple[str, ...]
    cifar_unet: bool = False

    def unet(self) -> torch.nn.Module:
        """A freshly initialised UNet of this size (seed torch first)."""
        return (
            ddpm_cifar10_unet()
            if self.cifar_unet
            else make_unet(self.image_size, self.channels)
        )


#: ``"small"`` runs in CI on a 2-core CPU; ``"full"`` is meant for a GPU; ``"smoke"``
#: is full's code at a few steps.
#:
#: :meta hide-value:
SIZES: dict[str, BenchmarkSize] = {
    "small": BenchmarkSize(
        "small",
        image_size=16,
        channels=1,
        train_batch=32,
        train_steps=4,
        sample_n=16,
        sample_steps=40,
        long_n=2,
        repeats=8,
        flops_batch=2,
        flops_steps=4,
        flops_modes=("fp32",),
    ),
    "full": BenchmarkSize(
        "full",
        image_size=32,
        channels=3,
        train_batch=128,
        train_steps=20,
        sample_n=128,
        sample_steps=100,
        long_n=64,
        repeats=7,
        flops_batch=128,
        flops_steps=30,
        flops_modes=(
            "fp32",
            "bf16",
            "bf16+channels_last",
            "bf16+channels_last+compile",
        ),
        cifar_unet=True,
    ),
    # benchmarks/gpu_check.py on a GPU: every precision a reader's GPU may train in
    # (fp16 on a T4, bf16 from Ampere on), memory at the evaluation batch (256 images at
    # 32 px), a few minutes in all.
    "check": BenchmarkSize(
        "check",
        image_size=32,
        channels=3,
        train_batch=128,
        train_steps=10,
        sample_n=256,
        sample_steps=20,
        long_n=64,
        repeats=3,
        flops_batch=128,
        flops_steps=20,
        flops_modes=("fp32", "fp16", "bf16", "bf16+channels_last+compile"),
        cifar_unet=True,
    ),
    # The full size's shapes and modes at a few steps: CI's smoke run of full mode
    # (BADDIFF_SCALE=smoke) on a CPU. The ratios use the small 32 px preset: the
    # CIFAR-10 UNet's DDPM-1000 chain alone would take a CPU minutes.
    "smoke": BenchmarkSize(
        "smoke",
        image_size=32,
        channels=3,
        train_batch=4,
        train_steps=1,
        sample_n=2,
        sample_steps=4,
        long_n=1,
        repeats=2,
        flops_batch=1,
        flops_steps=2,
        flops_modes=(
            "fp32",
            "bf16",
            "bf16+channels_last",
            "bf16+channels_last+compile",
        ),
    ),
}

#: The issue's targets: ratios that must stay at or below these (None: reported, no
#: target).
TARGETS: dict[str, float | None] = {
    "train: poisoned / clean step": 1.03,
    "train: ours / minimal diffusers step": 1.05,
    "sample: x0 clip / no clip": 1.02,
    "sample: one batched call / two calls": None,
    "sample: DDIM-50 / DDPM-1000": None,
}


@dataclass
class Comparison:
    """Seconds of each repeat of ``candidate`` and ``baseline``, measured
    alternately."""

    name: str
    candidate: list[float]
    baseline: list[float]
    target: float | None = None

    @property
    def ratio(self) -> float:
        """Median over repeats of ``candidate / baseline`` (paired, so slow drift
        cancels)."""
        return statistics.median(c / b for c, b in zip(self.candidate, self.baseline))

    @property
    def spread(self) -> tuple[float, float]:
        """The smallest and largest per-pair ratio: how noisy the machine was."""
        ratios = [c / b for c, b in zip(self.candidate, self.baseline)]
        return min(ratios), max(ratios)

    @property
    def passed(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        return dict(
            name=self.name,
            ratio=self.ratio,
            spread=list(self.spread),
            target=self.target,
            passed=self.passed,
            candidate_seconds=self.candidate,
            baseline_seconds=self.baseline,
        )


def interleaved(
    name: str,
    candidate: Callable[[], float],
    baseline: Callable[[], float],
    repeats: int,
    *,
    warmup: bool = True,
) -> Comparison:
    """Run ``candidate`` and ``baseline`` ``repeats`` times each, as ``A B B A A B
    ...``.

    Each callable returns the seconds it measured itself (so that set-up can stay
    outside the timing). ``warmup`` runs each once first, unrecorded (allocations, lazy
    initialisation).
    """
    check_positive_int("repeats", repeats)
    if warmup:
        candidate(), baseline()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for index in range(repeats):
        order = (
            (("a", candidate), ("b", baseline))
            if index % 2 == 0
            else (("b", baseline), ("a", candidate))
        )
        for key, run in order:
            times[key].append(float(run()))
    return Comparison(name, times["a"], times["b"], TARGETS.get(name))


class _CallCounter(TorchFunctionMode):
    """Counts every torch function called from Python (``torch.*``, ``F.*`` and tensor
    methods)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple = (),
        kwargs: dict | None = None,
    ) -> Any:
        self.calls[getattr(func, "__name__", repr(func))] += 1
        return func(*args, **(kwargs or {}))


def torch_calls(fn: Callable[[], Any]) -> Counter[str]:
    """How many times ``fn()`` calls each torch function, by name (``"conv2d"``,
    ``"clamp"``, ...).

    Counted with :class:`torch.overrides.TorchFunctionMode`, which sees every call made
    from Python (not the kernels inside one call). The difference of two counts is the
    work one variant adds to another, exactly and on any machine, where a timing ratio
    is blurred by the machine's noise.
    """
    with _CallCounter() as counter:
        fn()
    return counter.calls


def clipping_calls(
    size: str | BenchmarkSize = "small", *, steps: int = 5
) -> Counter[str]:
    """The torch calls that ``clip="x0"`` adds to ``steps`` DDPM steps of sampling (one
    image).

    The defence of the inference-time clipping chapter clamps the predicted ``x_0`` to
    [-1, 1] at each step (diffusers' ``clip_sample=True``), so the answer is ``{"clamp":
    steps}``: an element-wise operation on the image, next to a UNet pass per step.
    """
    check_positive_int("steps", steps)
    size = SIZES[size] if isinstance(size, str) else size
    torch.manual_seed(0)
    model = size.unet().eval()
    scheduler = make_scheduler(**QUICK_SCHEDULE)

    def draw(clip: str) -> Counter[str]:
        generator = torch.Generator().manual_seed(0)
        return torch_calls(
            lambda: sample(
                model,
                scheduler,
                1,
                generator=generator,
                clip=clip,
                num_inference_steps=steps,
                progress=False,
            )
        )

    with_clip, without = draw("x0"), draw("none")
    if without - with_clip:
        raise AssertionError(f"clipping removed calls: {dict(without - with_clip)}")
    return with_clip - without


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- #
# Training: our loop against the loop of diffusers' unconditional example.
# --------------------------------------------------------------------------- #


def reference_training_loop(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """The training loop of diffusers' ``train_unconditional.py``, minimal; returns its
    seconds.

    ``add_noise``, the UNet, MSE to the noise, ``accelerator.backward``, gradient
    clipping at 1.0, AdamW, a cosine learning-rate schedule: what our
    :func:`~baddiff_core.train.train` does for clean data without EMA. Data sit on the
    device, as ours do, so the two differ only in the loop.
    """
    device = resolve_device(device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    lr_scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=0, num_training_steps=steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    images = images.to(accelerator.device)
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    num_steps = scheduler.config.num_train_timesteps
    losses = []
    began = time.perf_counter()
    for _ in range(steps):
        clean = images[
            torch.randint(
                0,
                len(images),
                (batch_size,),
                generator=generator,
                device=generator.device,
            )
        ]
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        timesteps = torch.randint(
            0, num_steps, (batch_size,), generator=generator, device=clean.device
        )
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with accelerator.accumulate(model):
            loss = F.mse_loss(model(noisy, timesteps).sample.float(), noise.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.stack(
        losses
    ).cpu()  # wait for the device, as our loop does when it reads its losses
    return time.perf_counter() - began


def _our_training_loop(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    dataset: Any,
    *,
    steps: int,
    batch_size: int,
    device: torch.device,
    **overrides: Any,
) -> float:
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        learning_rate=1e-3,
        lr_schedule="cosine",
        log_every=steps,
        progress=False,
        device=str(device),
        **overrides,
    )
    return train(model, scheduler, dataset, config).seconds


def _training_comparisons(
    size: BenchmarkSize, device: torch.device
) -> list[Comparison]:
    torch.manual_seed(0)
    images = torch.rand(256, size.channels, size.image_size, size.image_size) * 2 - 1
    trigger = make_trigger("stop_sign", size.image_size, size.channels, size=14)
    poisoned = PoisonedDataset(
        images,
        trigger=trigger,
        target=make_target("hat", size.image_size, size.channels),
        poison_rate=0.1,
        seed=0,
    )
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    model = size.unet().to(device)
    run = dict(steps=size.train_steps, batch_size=size.train_batch, device=device)
    return [
        interleaved(
            "train: poisoned / clean step",
            lambda: _our_training_loop(model, scheduler, poisoned, **run),
            lambda: _our_training_loop(model, scheduler, images, **run),
            size.repeats,
        ),
        interleaved(
            "train: ours / minimal diffusers step",
            lambda: _our_training_loop(model, scheduler, images, **run),
            lambda: reference_training_loop(model, scheduler, images, **run),
            size.repeats,
        ),
    ]


# --------------------------------------------------------------------------- #
# Sampling.
# --------------------------------------------------------------------------- #


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    began = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - began


def _sampling_comparisons(
    size: BenchmarkSize, device: torch.device
) -> list[Comparison]:
    torch.manual_seed(0)
    model = size.unet().to(device).eval()
    quick, paper = make_scheduler(**QUICK_SCHEDULE), make_scheduler(**PAPER_SCHEDULE)
    trigger = make_trigger("stop_sign", size.image_size, size.channels, size=14).to(
        device
    )
    n = size.sample_n

    def draw(
        count: int, scheduler: DDPMScheduler = quick, **kwargs: Any
    ) -> Callable[[], float]:
        kwargs.setdefault("num_inference_steps", size.sample_steps)
        generator = torch.Generator(device=device).manual_seed(0)
        return lambda: _timed(
            lambda: sample(
                model, scheduler, count, generator=generator, progress=False, **kwargs
            ),
            device,
        )

    def batched() -> float:
        generator = torch.Generator(device=device).manual_seed(0)
        return _timed(
            lambda: sample_clean_and_triggered(
                model,
                quick,
                n,
                trigger,
                generator=generator,
                num_inference_steps=size.sample_steps,
                progress=False,
            ),
            device,
        )

    def two_calls() -> float:
        return draw(n)() + draw(n, trigger=trigger)()

    return [
        interleaved(
            "sample: x0 clip / no clip",
            draw(n, clip="x0"),
            draw(n, clip="none"),
            size.repeats,
        ),
        interleaved(
            "sample: one batched call / two calls",
            batched,
            two_calls,
            max(2, size.repeats // 4),
        ),
        # 50 steps against 1000: one pair measures a 20-fold difference well enough.
        interleaved(
            "sample: DDIM-50 / DDPM-1000",
            draw(size.long_n, paper, sampler="ddim", num_inference_steps=50),
            draw(size.long_n, paper, sampler="ddpm", num_inference_steps=1000),
            1,
            warmup=False,
        ),
    ]


# --------------------------------------------------------------------------- #
# Memory.
# --------------------------------------------------------------------------- #


def _resident_bytes() -> int | None:
    """This process's resident memory now, and reset its peak to it (Linux; None
    elsewhere)."""
    try:
        with open(
            "/proc/self/clear_refs", "w"
        ) as handle:  # "5" resets VmHWM (the peak) to VmRSS
            handle.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def _status_bytes(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(
    fn: Callable[[], Any], device: torch.device | str = "cpu"
) -> int | None:
    """Bytes that ``fn()`` needed above what was in use before it: its peak, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the process's peak
    resident memory (Linux ``VmHWM``, reset before the call) above its resident memory
    before; freed heap is given back first (``malloc_trim``) so that earlier work does
    not hide the peak. Returns None where neither can be read.
    """
    device = resolve_device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
    before = _resident_bytes()
    if before is None:
        fn()
        return None
    fn()
    peak = _status_bytes("VmHWM")
    return None if peak is None else max(0, peak - before)


def _memory(size: BenchmarkSize, device: torch.device) -> dict[str, int | None]:
    torch.manual_seed(0)
    images = torch.rand(256, size.channels, size.image_size, size.image_size) * 2 - 1
    scheduler = make_scheduler(**QUICK_SCHEDULE)
    model = size.unet().to(device)
    training = peak_memory(
        lambda: _our_training_loop(
            model,
            scheduler,
            images,
            steps=2,
            batch_size=size.train_batch,
            device=device,
        ),
        device,
    )
    model.eval()
    sampling = peak_memory(
        lambda: sample(
            model,
            scheduler,
            size.sample_n,
            progress=False,
            generator=torch.Generator(device=device).manual_seed(0),
        ),
        device,
    )
    return {
        f"training, batch {size.train_batch}": training,
        f"sampling, batch {size.sample_n}": sampling,
    }


# --------------------------------------------------------------------------- #
# Throughput and model FLOP utilisation of the CIFAR-10 UNet.
# --------------------------------------------------------------------------- #


def matmul_rate(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    n: int | None = None,
    repeats: int = 5,
) -> float:
    """The FLOP/s of the best of ``repeats`` ``n x n`` matmuls (``2 n^3`` FLOPs each) in
    ``dtype``.

    The reference for model FLOP utilisation: what this device's matrix units reach on
    the easiest work there is. ``n`` defaults to 8192 on a GPU and 2048 on a CPU.
    """
    device = resolve_device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n**3 / best


def training_flops(
    model: torch.nn.Module, batch: torch.Tensor, scheduler: DDPMScheduler
) -> int:
    """FLOPs of one training step's forward and backward pass on ``batch`` (matmuls and
    convolutions, as ``torch.utils.flop_counter`` counts them; the optimizer's
    element-wise work is not counted)."""
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (len(batch),), device=batch.device
    )
    counter = FlopCounterMode(display=False)
    with counter:
        F.mse_loss(model(batch, timesteps).sample, batch).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


#: The training modes the throughput section can measure. A size names its mixed modes
#: in bf16;
#: :func:`measured_modes` swaps in fp16 on a GPU older than Ampere.
_MODES = {
    "fp32": dict(),
    **{
        name: settings
        for precision in ("bf16", "fp16")
        for name, settings in (
            (precision, dict(mixed_precision=precision)),
            (
                f"{precision}+channels_last",
                dict(mixed_precision=precision, channels_last=True),
            ),
            (
                f"{precision}+channels_last+compile",
                dict(mixed_precision=precision, channels_last=True, torch_compile=True),
            ),
        )
    },
}
_PEAK_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def measured_modes(
    modes: tuple[str, ...], device: torch.device | str
) -> tuple[str, ...]:
    """The modes of ``modes`` (a size's ``flops_modes``) that the throughput section
    runs on ``device``.

    fp32 always; the mixed modes after the precision
    :func:`~baddiff_core.devices.mixed_precision_for` gives the device: as named on a
    GPU of compute capability 8.0 or more, with fp16 in place of bf16 on an older GPU (a
    T4's tensor cores have no bf16), and none on a CPU or MPS (no tensor cores to
    measure; a CPU's bf16 autocast is slower than its fp32).
    """
    precision = mixed_precision_for(device)
    chosen = []
    for mode in modes:
        check_choice("mode", mode, _MODES)
        if mode == "fp32":
            chosen.append(mode)
        elif precision != "no":
            chosen.append(mode.replace("bf16", "fp16") if precision == "fp16" else mode)
    return tuple(dict.fromkeys(chosen))


def _timed_training(
    model: torch.nn.Module, data: Any, config: TrainConfig
) -> tuple[float, float]:
    """Train ``model`` on ``data`` under the paper's schedule and return ``(seconds per
    step after the first, seconds of the first step)``: the slope of
    :attr:`~baddiff_core.train.TrainHistory.log_times` (``config.log_every`` must be
    1), so that warm-up and compilation do not count."""
    history = train(model, make_scheduler(**PAPER_SCHEDULE), data, config)
    (first_step, first_time), (last_step, last_time) = (
        history.log_times[0],
        history.log_times[-1],
    )
    return (last_time - first_time) / (last_step - first_step), first_time


def training_throughput(
    model: torch.nn.Module,
    images: torch.Tensor,
    mode: str,
    *,
    steps: int,
    device: torch.device,
) -> dict[str, float]:
    """Images/s of our training loop in ``mode`` (a key of the modes table: fp32; bf16
    or fp16, + channels last, + compile), from the steps after the first (warm-up,
    compilation): the slope of :attr:`~baddiff_core.train.TrainHistory.log_times`."""
    check_choice("mode", mode, _MODES)
    check_int("steps", steps, minimum=2, meaning="the first is warm-up")
    batch = len(images)
    config = TrainConfig(
        steps=steps,
        batch_size=batch,
        learning_rate=1e-4,
        log_every=1,
        progress=False,
        device=str(device),
        **_MODES[mode],
    )
    step_seconds, first_time = _timed_training(model, images, config)
    return dict(
        step_seconds=step_seconds,
        images_per_second=batch / step_seconds,
        first_step_seconds=first_time,
    )


def _throughput(size: BenchmarkSize, device: torch.device) -> dict[str, Any]:
    modes = measured_modes(size.flops_modes, device)
    peak_dtype = _PEAK_DTYPES[mixed_precision_for(device)]
    peak = matmul_rate(device, peak_dtype)
    torch.manual_seed(0)
    model = ddpm_cifar10_unet().to(device)
    images = (torch.rand(size.flops_batch, 3, 32, 32) * 2 - 1).to(device)
    flops = training_flops(model, images, make_scheduler(**PAPER_SCHEDULE))
    rows = []
    for mode in modes:  # mixed modes measure a GPU's tensor cores; a CPU has none
        measured = training_throughput(
            model, images, mode, steps=size.flops_steps, device=device
        )
        rows.append(
            dict(
                mode=mode,
                batch=size.flops_batch,
                **measured,
                mfu=flops / measured["step_seconds"] / peak,
            )
        )
    return dict(
        model="google/ddpm-cifar10-32 architecture (35.7 M parameters)",
        flops_per_step=flops,
        peak_matmul_flops=peak,
        peak_dtype=str(peak_dtype).replace("torch.", ""),
        modes=rows,
    )


# --------------------------------------------------------------------------- #
# Full mode's costs: the paper's fine-tune and sampling, per step, projected.
# --------------------------------------------------------------------------- #


def fine_tune_cost(
    device: torch.device | str = "auto",
    *,
    steps: int = 20,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Seconds per step of the paper's backdoor fine-tune on ``device``, and what its
    steps would take.

    The step is :meth:`~baddiff_core.attack.BackdoorRecipe.paper`'s:
    ``google/ddpm-cifar10-32``'s architecture, batch 128, 10% of the images poisoned
    with the stop sign and the hat, Adam, the precision
    :func:`~baddiff_core.devices.mixed_precision_for` picks for the device. The weights
    are random and the images random numbers (nothing is downloaded): a step costs the
    same arithmetic. The rate is the slope of the steps after the first (warm-up); the
    projection multiplies it by the recipe's 19,550 steps (50 epochs of CIFAR-10's
    50,000 images). ``batch_size`` replaces 128 (a dry run on a CPU).
    """
    from baddiff_core.attack import BackdoorRecipe

    check_int("steps", steps, minimum=2, meaning="the first is warm-up")
    device = resolve_device(device)
    recipe = BackdoorRecipe.paper()
    batch = batch_size or recipe.train.batch_size
    torch.manual_seed(0)
    model = ddpm_cifar10_unet().to(device)
    images = torch.rand(4 * batch, 3, 32, 32) * 2 - 1
    dataset = PoisonedDataset(
        images,
        trigger=recipe.trigger_image(),
        target=recipe.target_image(),
        poison_rate=recipe.poison_rate,
        seed=0,
    )
    config = dataclasses.replace(
        recipe.train,
        steps=steps,
        batch_size=batch,
        warmup_steps=0,
        log_every=1,
        checkpoint_every=0,
        progress=False,
        device=str(device),
        mixed_precision=mixed_precision_for(device),
    )
    step_seconds, first_time = _timed_training(model, dataset, config)
    paper_steps = recipe.train.steps
    precision = {"no": "fp32"}.get(config.mixed_precision, config.mixed_precision)
    return dict(
        batch=batch,
        steps=steps,
        mixed_precision=precision,
        step_seconds=step_seconds,
        images_per_second=batch / step_seconds,
        paper_steps=paper_steps,
        paper_hours=paper_steps
        * step_seconds
        * (recipe.train.batch_size / batch)
        / 3600,
    )


def sampling_cost(
    device: torch.device | str = "auto",
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps: int = 20,
) -> dict[str, Any]:
    """Seconds per UNet step at ``batch_size`` images (the evaluation batch) of the
    CIFAR-10 UNet, in fp32, and what that makes per image for DDPM-1000 and DDIM-50 (one
    UNet pass per step, at any ``t``), with the peak memory of the batch
    (:func:`peak_memory`): the largest any chapter or command draws at once."""
    check_positive_int("batch_size", batch_size)
    check_positive_int("steps", steps)
    device = resolve_device(device)
    torch.manual_seed(0)
    model = ddpm_cifar10_unet().to(device).eval()
    scheduler = make_scheduler(**PAPER_SCHEDULE)

    def draw() -> None:
        sample(
            model,
            scheduler,
            batch_size,
            num_inference_steps=steps,
            progress=False,
            generator=torch.Generator(device=device).manual_seed(0),
        )

    draw()  # warm-up (cuDNN's choice of algorithms, allocations)
    memory = peak_memory(draw, device)
    seconds = min(_timed(draw, device) for _ in range(2)) / steps
    return dict(
        batch=batch_size,
        steps=steps,
        step_seconds=seconds,
        peak_memory_bytes=memory,
        ddpm_1000_seconds_per_image=1000 * seconds / batch_size,
        ddim_50_seconds_per_image=50 * seconds / batch_size,
    )


# --------------------------------------------------------------------------- #
# The book: chapter times from a build's execution cache.
# --------------------------------------------------------------------------- #


def book_times(jupyter_cache: str | os.PathLike) -> dict[str, float]:
    """Seconds each chapter took to execute in the book build whose cache is
    ``jupyter_cache`` (``_build/.jupyter_cache``), by notebook file name, in book
    order."""
    folder = Path(jupyter_cache)
    if not (folder / "global.db").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} holds no jupyter-cache (global.db is missing): build the book "
            "first (make book)"
        )
    from jupyter_cache import get_cache  # the book's dependency, not the core's

    latest: dict[str, tuple[Any, float]] = {}
    for record in get_cache(str(folder)).list_cache_records():
        seconds = (record.data or {}).get("execution_seconds")
        name = Path(record.uri).name
        if seconds is not None and (
            name not in latest or record.created > latest[name][0]
        ):
            latest[name] = (record.created, float(seconds))
    return {name: latest[name][1] for name in sorted(latest)}


# --------------------------------------------------------------------------- #
# All of it.
# --------------------------------------------------------------------------- #


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device: torch.device) -> dict[str, Any]:
    info = dict(
        device=str(device),
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=_cpu_name(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def gpu_plan(
    size: str | BenchmarkSize,
    sections: tuple[str, ...] = ("training", "sampling", "memory", "throughput"),
    *,
    clipping_steps: int = 5,
) -> Plan:
    """The UNet work of :func:`run_benchmarks` for ``size`` and of
    :func:`clipping_calls`, as a :class:`~baddiff_core.gpu_time.Plan`: an upper bound
    (every mode of the throughput section, warm-up runs included), so that the
    Performance page can state its GPU time and check it."""
    size = SIZES[size] if isinstance(size, str) else size
    with torch.device("meta"):
        ratios_unet, cifar = size.unet(), ddpm_cifar10_unet()
    quick_t = QUICK_SCHEDULE["num_train_timesteps"]
    train = TrainConfig(steps=size.train_steps, batch_size=size.train_batch)
    work = []
    # two comparisons, each (repeats + a warm-up) pairs of two loops
    if "training" in sections:
        runs = 2 * 2 * (size.repeats + 1)
        work.append(
            training(
                dataclasses.replace(train, steps=runs * size.train_steps),
                ratios_unet,
                "training ratios",
            )
        )
    if "sampling" in sections:
        # (what, pairs of runs, images per pair in units of n): a clipping pair is a
        # clipped and an unclipped call of n; a batching pair one batched call of 2n
        # and two calls of n
        for what, pairs, images in (
            ("clipping ratio", size.repeats + 1, 2),
            ("batching ratio", max(2, size.repeats // 4) + 1, 4),
        ):
            work.append(
                sampling_passes(
                    pairs * images * size.sample_n,
                    ratios_unet,
                    what,
                    steps=size.sample_steps,
                )
            )
        work.append(
            sampling_passes(
                size.long_n, ratios_unet, "DDIM-50 / DDPM-1000", steps=50 + 1000
            )
        )
    if "memory" in sections:
        work.append(
            training(
                dataclasses.replace(train, steps=2),
                ratios_unet,
                "peak memory, training",
            )
        )
        work.append(
            sampling_passes(
                size.sample_n, ratios_unet, "peak memory, sampling", steps=quick_t
            )
        )
    if "throughput" in sections:
        throughput = TrainConfig(
            steps=size.flops_steps * len(size.flops_modes) + 1,
            batch_size=size.flops_batch,
        )
        work.append(training(throughput, cifar, "CIFAR-10 UNet throughput, every mode"))
    work.append(
        sampling_passes(2, ratios_unet, "clipping's torch calls", steps=clipping_steps)
    )
    return Plan(work)


def run_benchmarks(
    size: str = "small",
    device: str | torch.device = "auto",
    *,
    jupyter_cache: str | None = None,
    model_cache: str | os.PathLike | None = None,
    sections: tuple[str, ...] = ("training", "sampling", "memory", "throughput"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmarks of ``size`` (a key of :data:`SIZES`) on ``device``; return the
    results.

    ``sections`` picks among training, sampling (the ratios), memory and throughput;
    ``jupyter_cache`` adds the chapter times of a built book, ``model_cache`` the models
    that cache trained (:func:`~baddiff_core.cache.trainings`). ``log`` receives a line
    per section.
    """
    check_choice("size", size, SIZES)
    unknown = set(sections) - {"training", "sampling", "memory", "throughput"}
    if unknown:
        raise ValueError(
            f"sections {sorted(unknown)} are not known; use training, sampling, memory, throughput"
        )
    chosen, device = SIZES[size], resolve_device(device)
    results: dict[str, Any] = dict(
        size=dataclasses.asdict(chosen),
        machine=_machine(device),
        when=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        comparisons=[],
    )
    began = time.perf_counter()
    if "training" in sections:
        for comparison in _training_comparisons(chosen, device):
            results["comparisons"].append(comparison.to_dict())
            log(_comparison_line(comparison))
    if "sampling" in sections:
        for comparison in _sampling_comparisons(chosen, device):
            results["comparisons"].append(comparison.to_dict())
            log(_comparison_line(comparison))
    if "memory" in sections:
        results["peak_memory_bytes"] = _memory(chosen, device)
        log(
            "peak memory: "
            + ", ".join(
                f"{k} {_mib(v)}" for k, v in results["peak_memory_bytes"].items()
            )
        )
    if "throughput" in sections:
        results["throughput"] = _throughput(chosen, device)
        for row in results["throughput"]["modes"]:
            log(
                f"CIFAR-10 UNet, {row['mode']}, batch {row['batch']}: {row['images_per_second']:.1f} images/s, "
                f"MFU {100 * row['mfu']:.1f}% of {results['throughput']['peak_dtype']} matmul rate "
                f"{results['throughput']['peak_matmul_flops'] / 1e12:.2f} TFLOP/s"
            )
    if jupyter_cache is not None:
        times = book_times(jupyter_cache)
        results["book"] = dict(chapter_seconds=times, total_seconds=sum(times.values()))
        log(
            f"book: {sum(times.values()) / 60:.1f} min in all, slowest chapter "
            f"{max(times.values()):.0f} s ({max(times, key=times.get)})"
        )
    if model_cache is not None:
        trained = trainings(model_cache)
        twice = sorted(name for name, runs in trained.items() if len(runs) > 1)
        results["models"] = dict(
            cache=str(model_cache),
            trained=len(trained),
            trained_twice=twice,
            training_seconds=sum(sum(runs) for runs in trained.values()),
        )
        log(f"model cache {model_cache}: {cache_summary(results['models'])}")
    results["seconds"] = time.perf_counter() - began
    return results


def _comparison_line(comparison: Comparison) -> str:
    low, high = comparison.spread
    verdict = (
        ""
        if comparison.target is None
        else (
            f"  target <= {comparison.target:.2f}: {'met' if comparison.passed else 'NOT MET'}"
        )
    )
    return f"{comparison.name}: {comparison.ratio:.3f} (pairs {low:.3f} to {high:.3f}){verdict}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown tables: ratios, memory, throughput, chapter times."""
    from baddiff_core.book import markdown_table

    machine = results["machine"]
    lines = [
        f"Measured {results['when']} on {machine.get('gpu', machine['cpu'])} ({machine['cores']} cores, "
        f"torch {machine['torch']}), size {results['size']['name']!r}.",
        "",
    ]
    if results["comparisons"]:
        lines += [
            markdown_table(
                [
                    dict(
                        comparison=c["name"],
                        ratio=c["ratio"],
                        pairs=f"{c['spread'][0]:.3f} to {c['spread'][1]:.3f}",
                        target="-" if c["target"] is None else f"<= {c['target']:.2f}",
                        met="-"
                        if c["passed"] is None
                        else ("yes" if c["passed"] else "no"),
                    )
                    for c in results["comparisons"]
                ],
                {"ratio": ".3f"},
            ),
            "",
        ]
    if "peak_memory_bytes" in results:
        lines += [
            markdown_table(
                [
                    dict(run=k, peak=_mib(v))
                    for k, v in results["peak_memory_bytes"].items()
                ]
            ),
            "",
        ]
    if "throughput" in results and results["throughput"]["modes"]:
        lines += [
            markdown_table(
                [
                    dict(
                        mode=r["mode"],
                        batch=r["batch"],
                        images_per_s=r["images_per_second"],
                        step_ms=1000 * r["step_seconds"],
                        mfu_percent=100 * r["mfu"],
                    )
                    for r in results["throughput"]["modes"]
                ],
                {"images_per_s": ".1f", "step_ms": ".0f", "mfu_percent": ".1f"},
            ),
            "",
        ]
    if "fine_tune" in results:
        f = results["fine_tune"]
        lines += [
            f"The paper's backdoor fine-tune ({f['mixed_precision']}, batch {f['batch']}): "
            f"{1000 * f['step_seconds']:.0f} ms per step, {f['images_per_second']:.0f} images/s; its "
            f"{f['paper_steps']:,} steps would take {f['paper_hours']:.1f} h.",
            "",
        ]
    if "sampling_cost" in results:
        c = results["sampling_cost"]
        lines += [
            f"Sampling at batch {c['batch']} (fp32): {1000 * c['step_seconds']:.0f} ms per UNet step; "
            f"DDPM-1000 {c['ddpm_1000_seconds_per_image']:.2f} s per image, DDIM-50 "
            f"{c['ddim_50_seconds_per_image']:.3f} s per image; peak memory {_mib(c['peak_memory_bytes'])}.",
            "",
        ]
    if "book" in results:
        times = results["book"]["chapter_seconds"]
        lines += [
            markdown_table(
                [dict(chapter=k, seconds=v) for k, v in times.items()]
                + [
                    dict(chapter="whole book", seconds=results["book"]["total_seconds"])
                ],
                {"seconds": ".0f"},
            ),
            "",
        ]
    if "models" in results:
        lines += [f"Model cache: {cache_summary(results['models'])}.", ""]
    return "\n".join(lines)


def cache_summary(models: Mapping[str, Any]) -> str:
    """One line on the model cache's log, from the ``"models"`` entry of
    :func:`run_benchmarks`."""
    twice = models["trained_twice"]
    return (
        f"{models['trained']} entries computed (models, repairs, masks, scans; "
        f"{models['training_seconds']:.0f} s), {len(twice)} of them more than once"
        + (f": {', '.join(twice)}" if twice else "")
    )


def write_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``results`` as JSON to ``path`` and as Markdown beside it (``.md``), each
    atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in (
        (path, json.dumps(results, indent=2) + "\n"),
        (path.with_suffix(".md"), results_markdown(results) + "\n"),
    ):
        write_text_atomically(target, text)
    return path
