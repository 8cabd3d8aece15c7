"""Training and fine-tuning (clean or poisoned) on Accelerate, with EMA, checkpoints and
resume.

Introduced in chapter 2 (Denoising diffusion models). One loop serves both: a clean data
set is a poisoned one with poison rate 0, whose loss is the ordinary DDPM loss (DDPM (Ho
et al. 2020, arXiv:2006.11239), eq. (14)).

Data are kept as tensors on the training device; every random number (batch order,
flips, t, eps) comes from one seeded ``torch.Generator``, whose state is saved in
checkpoints, so a run resumed from a checkpoint continues exactly as if it had never
stopped (on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from baddiff_core.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_positive_int,
    check_tensor,
    check_type,
)
from baddiff_core.devices import mixed_precision_for, resolve_device
from baddiff_core.diffusion import (
    ATTACKS,
    SOLVERS,
    diffusion_loss,
    trigger_coefficients,
)
from baddiff_core.files import atomic_folder, write_text_atomically
from baddiff_core.learned_trigger import LEARNED_TRIGGER_RMS, project_trigger
from baddiff_core.poison import PoisonedDataset, poison_pairs

__all__ = [
    "TrainConfig",
    "TrainHistory",
    "COLAB_FINETUNE_STEPS",
    "train",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_weights",
]

MIXED_PRECISION = ("no", "fp16", "bf16")
#: Settings that change how a run is executed, not what it produces: a run resumed from
#: a checkpoint
#: may change them, and they are not part of a model's cache key.
RUN_ONLY_FIELDS = (
    "device",
    "progress",
    "checkpoint_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "channels_last",
    "torch_compile",
)
LR_SCHEDULES = ("cosine", "constant")
#: Optimizer steps of full mode's fine-tune (:meth:`TrainConfig.colab_finetune`), sized
#: for a Colab T4.
COLAB_FINETUNE_STEPS = 1_000


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Defaults suit quick mode on a CPU; :meth:`paper_finetune` is the
    authors' recipe.

    ``steps`` counts optimizer steps; each sees ``batch_size *
    gradient_accumulation_steps`` images. ``ema_decay`` goes to diffusers' ``EMAModel``.
    With ``ema_warmup`` (right for training from scratch) it caps the decay at ``(1 + k)
    / (10 + k)`` at step ``k``, so that below about 1,800 steps a decay of 0.995 or
    0.999 behaves the same. A fine-tune starts from good weights and wants
    ``ema_warmup=False``: the decay is constant from the first step, so the average
    starts at the pre-trained weights and forgets them at the rate ``ema_decay`` says.
    ``solver`` and ``attack`` choose the poisoned training target
    (:mod:`baddiff_core.diffusion`).

    ``trigger_lr > 0`` learns the trigger with the backdoor (chapter 10): the dataset's
    trigger is the start, it joins the optimizer as a second parameter group (learning
    rate ``trigger_lr`` on the same schedule, no weight decay), and after each step it
    is projected back onto ``{mean 0, root mean square trigger_rms}``
    (:func:`~baddiff_core.learned_trigger.project_trigger`). The history returns it.

    The GPU path: ``mixed_precision="bf16"`` (Accelerate's autocast; "fp16" adds loss
    scaling), ``channels_last`` (the NHWC memory format that tensor-core convolutions
    want) and ``torch_compile`` (``torch.compile`` on the UNet's forward; the first
    steps compile). These three change speed, not the recipe: only ``mixed_precision``
    changes the numbers, and it alone of them is part of a model's cache key.
    """

    steps: int = 500
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float | None = None
    ema_warmup: bool = True
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    channels_last: bool = False
    torch_compile: bool = False
    solver: Literal["sde", "ode"] = "sde"
    attack: Literal["baddiffusion", "in_range"] = "baddiffusion"
    trigger_lr: float = 0.0
    trigger_rms: float = LEARNED_TRIGGER_RMS
    hflip: bool = False
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 1
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        # Counts and flags are stored as Python ints and bools (NumPy's are accepted),
        # so that the config goes into JSON (checkpoints, cache keys) as it is.
        checked: dict[str, int | bool] = {}
        for name in (
            "steps",
            "batch_size",
            "gradient_accumulation_steps",
            "log_every",
            "keep_checkpoints",
        ):
            checked[name] = check_positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            checked[name] = check_int(name, getattr(self, name), minimum=0)
        check_float("learning_rate", self.learning_rate, above=0, below=1)
        for name in (
            "ema_warmup",
            "channels_last",
            "torch_compile",
            "hflip",
            "progress",
        ):
            checked[name] = check_bool(name, getattr(self, name))
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_float("ema_decay", self.ema_decay, above=0, below=1, allow_none=True)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("attack", self.attack, ATTACKS)
        check_float("max_grad_norm", self.max_grad_norm, above=0, finite=False)
        check_float("trigger_lr", self.trigger_lr, at_least=0)
        check_float("trigger_rms", self.trigger_rms, above=0)
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # how a frozen dataclass sets a field

    @classmethod
    def paper_finetune(
        cls,
        num_images: int = 50_000,
        *,
        device: str | torch.device = "auto",
        **overrides: Any,
    ) -> TrainConfig:
        """The fine-tuning recipe of BadDiffusion (Chou et al. 2023, arXiv:2212.05400),
        Sec. 4, and of its authors' code (github.com/IBM/BadDiffusion,
        ``baddiffusion.py``): 50 epochs of ``num_images``, Adam lr 2e-4, cosine schedule
        with 500 warm-up steps, batch 128, gradient clipping 1.0, random horizontal
        flips, on ``device`` and in the mixed precision that its hardware runs fast
        (:func:`~baddiff_core.devices.mixed_precision_for`): fp16, the authors'
        precision, on GPUs older than Ampere (Colab's T4), bf16 on compute capability
        8.0 or more, fp32 on a CPU. ``device`` is checked with
        :func:`~baddiff_core.devices.resolve_device` and kept as given (``"auto"`` stays
        ``"auto"``); ``overrides`` replace any other field, ``mixed_precision``
        included."""
        defaults = dict(
            steps=50 * math.ceil(num_images / 128),
            batch_size=128,
            learning_rate=2e-4,
            lr_schedule="cosine",
            warmup_steps=500,
            max_grad_norm=1.0,
            hflip=True,
            mixed_precision=mixed_precision_for(device),
            log_every=50,
            checkpoint_every=2000,
            device=str(device),
        )
        defaults.update(overrides)
        return cls(**defaults)

    @classmethod
    def colab_finetune(
        cls, *, device: str | torch.device = "auto", **overrides: Any
    ) -> TrainConfig:
        """:meth:`paper_finetune` cut to fit a free Colab session on a T4: 1,000 steps
        at batch 128 (128,000 image views, 2.6 epochs of CIFAR-10, where the paper's 50
        epochs are 19,550 steps), 100 warm-up steps, then the paper's cosine decay, and
        a checkpoint every 250 steps so that a disconnected run resumes. About 11
        minutes of a T4 (:mod:`baddiff_core.gpu_time`), against 3.7 hours for the
        paper's."""
        defaults = dict(
            steps=COLAB_FINETUNE_STEPS, warmup_steps=100, checkpoint_every=250
        )
        defaults.update(overrides)
        return cls.paper_finetune(device=device, **defaults)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainHistory:
    """What a run did: the loss of every optimizer step, its learning rates and its
    speed.

    ``trigger`` is the learned trigger (``C,H,W`` on the CPU) of a run with
    ``trigger_lr > 0``, else None.

    ``log_times`` pairs ``(step, seconds since the loop began)`` at every logging point,
    where the loop waits for the device anyway (to read the losses): the steady speed,
    past the first slow steps (warm-up, compilation), is the slope between two of them.
    """

    losses: list[float] = field(default_factory=list)
    log_times: list[tuple[int, float]] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed_from_step: int = 0
    trigger: torch.Tensor | None = None


def train(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    dataset: PoisonedDataset | torch.Tensor,
    config: TrainConfig = TrainConfig(),
    *,
    resume: bool = True,
    run_key: str | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``dataset`` with the (poisoned) DDPM loss; return the
    history.

    Args:
        model: a diffusers ``UNet2DModel`` (its weights are updated; with ``ema_decay`` it ends
            holding the EMA weights).
        scheduler: the training noise schedule.
        dataset: a :class:`~baddiff_core.poison.PoisonedDataset`, or a tensor ``N,C,H,W`` of clean
            images in [-1, 1].
        config: see :class:`TrainConfig`.
        resume: continue from the newest checkpoint in ``config.checkpoint_dir`` if there is one.
        run_key: names what is trained beyond ``config`` (e.g. a backdoor recipe's cache key: data,
            trigger, target, base model). Checkpoints record it with every setting of ``config``
            that shapes the result, and belong to that run only.

    Raises:
        ValueError: ``config.checkpoint_dir`` holds checkpoints of another run (another ``run_key``,
            or another value of a setting outside ``RUN_ONLY_FIELDS``, ``steps`` included): a
            resumed run would return weights of a recipe it was not asked for.
    """
    check_type("config", config, TrainConfig)
    device = resolve_device(config.device)
    accelerator = _accelerator(device, config)
    data = _TrainingData.from_dataset(dataset, accelerator.device)
    if data.images.shape[1:] != (
        model.config.in_channels,
        model.config.sample_size,
        model.config.sample_size,
    ):
        raise ValueError(
            f"images of shape {tuple(data.images.shape[1:])} (C,H,W) do not fit the model, which "
            f"takes {(model.config.in_channels, model.config.sample_size, model.config.sample_size)}"
        )

    learn_trigger = config.trigger_lr > 0
    if learn_trigger:
        if not data.any_poisoned or not data.additive:
            raise ValueError(
                f"trigger_lr={config.trigger_lr} learns an added trigger: the data set "
                "must be a PoisonedDataset with additive=True that poisons some samples"
            )
        # the start, projected, as a leaf of its own (the dataset's tensor is untouched)
        data.trigger = project_trigger(data.trigger, config.trigger_rms)
        data.trigger.requires_grad_(True)

    model.train()
    groups = [{"params": list(model.parameters())}]
    if learn_trigger:  # BadDiffusion's loss is also a loss of the trigger
        groups.append(
            {"params": [data.trigger], "lr": config.trigger_lr, "weight_decay": 0.0}
        )
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=config.adam_betas,
        weight_decay=config.weight_decay,
    )
    lr_scheduler = get_scheduler(
        config.lr_schedule
        if config.lr_schedule == "cosine"
        else "constant_with_warmup",
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The optimizer holds the parameters; a compiled wrapper only replaces the forward
    # pass.
    forward = torch.compile(model) if config.torch_compile else model
    # Built once, on the device: a step only gathers from them. Clean data skip the
    # trigger's terms.
    coefficients = (
        trigger_coefficients(
            scheduler, config.solver, config.attack, device=accelerator.device
        )
        if data.any_poisoned
        else None
    )
    ema = None
    if config.ema_decay:
        ema = EMAModel(
            model.parameters(),
            decay=config.ema_decay,
            min_decay=0.0 if config.ema_warmup else config.ema_decay,
        )
    generator = torch.Generator(device=accelerator.device).manual_seed(
        config.seed + accelerator.process_index
    )
    order = _BatchOrder(len(data.images), generator)
    history = TrainHistory()
    # What a checkpoint saves and a resumed run loads.
    state = _TrainingState(
        accelerator.unwrap_model(model),
        optimizer,
        lr_scheduler,
        ema,
        order,
        generator,
        history,
        data.trigger if learn_trigger else None,
    )

    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    start = 0
    if (
        checkpoint_dir is not None
        and resume
        and latest_checkpoint(checkpoint_dir) is not None
    ):
        _check_same_run(latest_checkpoint(checkpoint_dir), config, run_key)
        start = _load_checkpoint(latest_checkpoint(checkpoint_dir), state)
        history.resumed_from_step = start

    pending: list[
        torch.Tensor
    ] = []  # losses still on the device: read in bulk, not every step
    began = time.perf_counter()
    bar = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc="training",
        disable=not config.progress or not accelerator.is_local_main_process,
    )
    for step in bar:
        for _ in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                indices = order.next(config.batch_size)
                x = data.images[indices]
                # flip before the trigger is pasted (IBM/BadDiffusion dataset.py)
                if config.hflip:
                    flip = (
                        torch.rand(len(x), generator=generator, device=generator.device)
                        < 0.5
                    )
                    x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
                if data.any_poisoned:
                    y, r = poison_pairs(
                        x,
                        data.poisoned[indices],
                        data.trigger,
                        data.target,
                        additive=data.additive,
                    )
                else:
                    y, r = x, None
                if config.channels_last:
                    y = y.contiguous(memory_format=torch.channels_last)
                    r = (
                        r.contiguous(memory_format=torch.channels_last)
                        if r is not None
                        else None
                    )
                with accelerator.autocast():
                    loss = diffusion_loss(
                        forward,
                        scheduler,
                        y,
                        r,
                        generator=generator,
                        solver=config.solver,
                        attack=config.attack,
                        coefficients=coefficients,
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(
                        model.parameters(), config.max_grad_norm
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if learn_trigger and accelerator.sync_gradients:
                    with torch.no_grad():
                        data.trigger.copy_(
                            project_trigger(data.trigger, config.trigger_rms)
                        )
        lr_scheduler.step()
        if ema is not None:
            ema.step(model.parameters())
        pending.append(loss.detach())
        history.learning_rates.append(lr_scheduler.get_last_lr()[0])

        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            history.losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()
            history.log_times.append((done, time.perf_counter() - began))
            bar.set_postfix(loss=f"{history.losses[-1]:.4f}")
        if checkpoint_dir is not None and (
            done == config.steps
            or (config.checkpoint_every and done % config.checkpoint_every == 0)
        ):
            if pending:
                history.losses.extend(torch.stack(pending).float().cpu().tolist())
                pending.clear()
            if accelerator.is_main_process:
                _save_checkpoint(checkpoint_dir, done, state, config, run_key)
    bar.close()

    elapsed = time.perf_counter() - began
    trained = config.steps - start
    history.seconds = elapsed
    history.images_per_second = (
        trained
        * config.batch_size
        * config.gradient_accumulation_steps
        / max(elapsed, 1e-9)
    )
    if learn_trigger:
        history.trigger = data.trigger.detach().float().cpu().clone()
    model = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to(model.parameters())
    if config.channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    model.eval()
    return history


def _accelerator(device: torch.device, config: TrainConfig) -> Accelerator:
    """An Accelerator for ``device`` in ``config.mixed_precision``.

    Accelerate keeps its settings process-wide and refuses a second Accelerator whose
    mixed precision or device differ from the first one's. One process here may train in
    several (the benchmark's fp32 and bf16 modes; a notebook that trains in fp32 after
    bf16), so a single-process state that differs is reset first. A multi-process launch
    (``accelerate launch``) fixes both for all its runs, and a run that asks for others
    is refused.
    """
    state = AcceleratorState._shared_state
    if state:
        same = state.get("_mixed_precision") == config.mixed_precision and (
            state.get("device") is None
            or (state["device"].type == "cpu") == (device.type == "cpu")
        )
        if not same:
            if state.get("num_processes", 1) > 1:
                raise RuntimeError(
                    f"this multi-process launch runs in mixed_precision={state.get('_mixed_precision')!r} "
                    f"on {state.get('device')}; a run with mixed_precision={config.mixed_precision!r} "
                    f"on {device} needs a launch of its own"
                )
            AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
    )


# --------------------------------------------------------------------------- #
# Data on the device, and a reproducible batch order.
# --------------------------------------------------------------------------- #


@dataclass
class _TrainingData:
    images: torch.Tensor  # N,C,H,W in [-1, 1]
    poisoned: torch.Tensor  # (N,) bool
    trigger: torch.Tensor  # C,H,W
    target: torch.Tensor  # C,H,W
    any_poisoned: bool  # False: the plain DDPM loss, no (y, r) pairs to build
    additive: bool = False  # r = trigger (a learned trigger), not the pasted trigger

    @classmethod
    def from_dataset(
        cls, dataset: PoisonedDataset | torch.Tensor, device: torch.device
    ) -> _TrainingData:
        if isinstance(dataset, PoisonedDataset):
            images, poisoned, trigger, target = (
                dataset.images,
                dataset.poisoned,
                dataset.trigger,
                dataset.target,
            )
        elif isinstance(dataset, torch.Tensor):
            dataset = check_tensor("dataset", dataset, layout="N,C,H,W", floating=True)
            if torch.isnan(dataset).any() or dataset.min() < -1 or dataset.max() > 1:
                raise ValueError(
                    "training images must lie in [-1, 1] without NaN, got values from "
                    f"{float(dataset.min()):.3g} to {float(dataset.max()):.3g}"
                )
            images = dataset
            poisoned = torch.zeros(len(dataset), dtype=torch.bool)
            trigger = torch.full(dataset.shape[1:], -1.0)
            target = torch.zeros(dataset.shape[1:])
        else:
            raise TypeError(
                f"dataset must be a PoisonedDataset or an N,C,H,W tensor, got {type(dataset).__name__}"
            )
        if len(images) == 0:
            raise ValueError("the data set is empty")
        return cls(
            images.float().to(device),
            poisoned.to(device),
            trigger.float().to(device),
            target.float().to(device),
            bool(poisoned.any()),
            isinstance(dataset, PoisonedDataset) and dataset.additive,
        )


class _BatchOrder:
    """Epochs of random permutations drawn from ``generator``; batches may straddle two
    epochs."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size, self.generator = size, generator
        self.permutation = torch.randperm(
            size, generator=generator, device=generator.device
        )
        self.cursor = 0

    def next(self, batch_size: int) -> torch.Tensor:
        parts = []
        while batch_size > 0:
            if self.cursor == self.size:
                self.permutation = torch.randperm(
                    self.size, generator=self.generator, device=self.generator.device
                )
                self.cursor = 0
            take = min(batch_size, self.size - self.cursor)
            parts.append(self.permutation[self.cursor : self.cursor + take])
            self.cursor += take
            batch_size -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# --------------------------------------------------------------------------- #
# Checkpoints: safetensors for tensors, JSON for the rest, written atomically.
# --------------------------------------------------------------------------- #

_LATEST = "latest"


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder in ``checkpoint_dir``, or None."""
    pointer = Path(checkpoint_dir) / _LATEST
    if not pointer.is_file():
        return None
    folder = Path(checkpoint_dir) / pointer.read_text().strip()
    return (
        folder
        if (folder / "state.safetensors").is_file()
        and (folder / "state.json").is_file()
        else None
    )


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders in ``checkpoint_dir``, oldest first."""
    folders = sorted(Path(checkpoint_dir).glob("checkpoint-*"))
    return [
        f
        for f in folders
        if (f / "state.safetensors").is_file() and (f / "state.json").is_file()
    ]


def load_checkpoint_weights(
    folder: str | os.PathLike, model: torch.nn.Module, *, ema: bool = True
) -> int:
    """Load a checkpoint's weights into ``model`` (its EMA weights if it has them and
    ``ema``).

    Useful to look at a run part-way, e.g. samples after 150, 300, ... steps. Returns
    the step.
    """
    folder = Path(folder)
    if not (folder / "state.safetensors").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a complete checkpoint: state.safetensors is missing"
        )
    tensors = load_file(str(folder / "state.safetensors"))
    state = {
        k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")
    }
    try:
        model.load_state_dict(state)
    except (
        RuntimeError
    ) as error:  # torch lists every missing, unexpected or mis-shaped tensor
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise ValueError(
            f"the checkpoint {str(folder)!r} does not fit the model (another architecture?): "
            f"{details[0] if details else error}"
        ) from error
    if ema and "ema.0" in tensors:
        with torch.no_grad():
            for index, parameter in enumerate(
                p for p in model.parameters() if p.requires_grad
            ):
                parameter.copy_(tensors[f"ema.{index}"])
    return int(json.loads((folder / "state.json").read_text())["step"])


@dataclass
class _TrainingState:
    """Everything a resumed run needs besides the config: the unwrapped model, the
    optimizer and its schedule, the EMA, the batch order and the random generator, and
    the history so far."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: EMAModel | None
    order: _BatchOrder
    generator: torch.Generator
    history: TrainHistory
    trigger: torch.Tensor | None = None  # a learned trigger, else None


def _save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    state: _TrainingState,
    config: TrainConfig,
    run_key: str | None = None,
) -> Path:
    """Write ``checkpoint-<step>/`` next to the others, then point ``latest`` at it.

    The folder is written under a temporary name and renamed when complete; the
    ``latest`` pointer is replaced atomically afterwards. A crash at any moment leaves
    the previous checkpoint usable.
    """
    ema = state.ema
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"model.{k}": v.detach().clone().contiguous().cpu()
        for k, v in state.model.state_dict().items()
    }
    optimizer_state = state.optimizer.state_dict()
    for pid, slot in optimizer_state["state"].items():
        for name, value in slot.items():
            tensors[f"optimizer.{pid}.{name}"] = (
                torch.as_tensor(value).detach().clone().contiguous().cpu()
            )
    if ema is not None:
        for index, shadow in enumerate(ema.shadow_params):
            tensors[f"ema.{index}"] = shadow.detach().clone().contiguous().cpu()
    if state.trigger is not None:
        tensors["trigger"] = state.trigger.detach().clone().contiguous().cpu()
    tensors["rng.generator"] = state.generator.get_state().cpu()
    tensors["rng.permutation"] = state.order.permutation.cpu()
    meta = dict(
        step=step,
        cursor=state.order.cursor,
        losses=state.history.losses,
        learning_rates=state.history.learning_rates,
        param_groups=optimizer_state["param_groups"],
        optimizer_state_keys=sorted(optimizer_state["state"]),
        lr_scheduler={
            k: v
            for k, v in state.lr_scheduler.state_dict().items()
            if k != "lr_lambdas"
        },
        ema_optimization_step=ema.optimization_step if ema is not None else None,
        config=config.to_dict(),
        run_key=run_key,
        torch_version=torch.__version__,
    )

    name = f"checkpoint-{step:07d}"
    final = checkpoint_dir / name
    with atomic_folder(final) as staging:
        save_file(tensors, str(staging / "state.safetensors"))
        (staging / "state.json").write_text(
            json.dumps(meta, default=_json_default) + "\n"
        )
    write_text_atomically(checkpoint_dir / _LATEST, name + "\n")

    older = sorted(
        p for p in checkpoint_dir.glob("checkpoint-*") if p.is_dir() and p.name != name
    )
    for stale in older[: max(0, len(older) - (config.keep_checkpoints - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _check_same_run(folder: Path, config: TrainConfig, run_key: str | None) -> None:
    """Refuse to resume from ``folder`` unless it was written by this very run (see
    :func:`train`)."""
    meta = json.loads((folder / "state.json").read_text())
    # a setting added to TrainConfig after the checkpoint was written had its default
    defaults = json.loads(json.dumps(TrainConfig().to_dict(), default=_json_default))
    theirs = {
        k: v
        for k, v in {**defaults, **meta.get("config", {})}.items()
        if k not in RUN_ONLY_FIELDS
    }
    ours = {
        k: v
        for k, v in json.loads(
            json.dumps(config.to_dict(), default=_json_default)
        ).items()
        if k not in RUN_ONLY_FIELDS
    }
    differences = [
        f"{k}: checkpoint {theirs.get(k)!r}, this run {ours[k]!r}"
        for k in ours
        if theirs.get(k) != ours[k]
    ]
    if meta.get("run_key") != run_key:
        differences.insert(
            0, f"run: checkpoint {meta.get('run_key')!r}, this run {run_key!r}"
        )
    if differences:
        raise ValueError(
            f"the checkpoints in {str(folder.parent)!r} belong to another run ({'; '.join(differences)}); "
            "resuming would return that run's weights: use another checkpoint folder or delete it"
        )


def _load_checkpoint(folder: Path, training: _TrainingState) -> int:
    """Load ``folder``'s checkpoint into ``training`` in place; return its step."""
    ema, generator = training.ema, training.generator
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    device = next(training.model.parameters()).device
    training.model.load_state_dict(
        {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    )
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            slots.setdefault(int(pid), {})[name] = (
                value if name == "step" else value.to(device)
            )
    training.optimizer.load_state_dict(
        {"state": slots, "param_groups": meta["param_groups"]}
    )
    training.lr_scheduler.load_state_dict(
        {**training.lr_scheduler.state_dict(), **meta["lr_scheduler"]}
    )
    if ema is not None:
        ema.shadow_params = [
            tensors[f"ema.{i}"].to(device) for i in range(len(ema.shadow_params))
        ]
        ema.optimization_step = meta["ema_optimization_step"]
    if training.trigger is not None:
        with torch.no_grad():
            training.trigger.copy_(tensors["trigger"])
    generator.set_state(tensors["rng.generator"].to(torch.uint8))
    training.order.permutation = tensors["rng.permutation"].to(generator.device)
    training.order.cursor = meta["cursor"]
    training.history.losses = list(meta["losses"])
    training.history.learning_rates = list(meta["learning_rates"])
    return int(meta["step"])


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's JSON")
