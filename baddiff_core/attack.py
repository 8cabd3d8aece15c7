"""Planting a backdoor: a recipe says everything about the attack; the cache trains it
once.

Introduced in chapter 3 (Planting a backdoor). Two ways in (BadDiffusion, Chou et al.
2023):

- from scratch (``base="scratch"``): a new model is trained on the poisoned data set;
- by fine-tuning (``base="shipped"``, a folder, or a hub id): a clean pre-trained model
  is trained a little more on the poisoned data set, the paper's cheap attack.

Quick mode fine-tunes the package's shipped clean 16 x 16 digits model on CPU in about a
minute and a half, with a white box (18 at 32 px, so 9 x 9 pixels) and a hat target at
10% poison. At 16 px the paper's stop sign is a blob a few pixels wide; in our
calibration runs (600 steps, 30% poison) the grey box and the stop sign reached an
attack success rate of 0.80 with 20% of clean samples turning into the target, the white
box 0.97 with 6%: the highest-contrast trigger is what quick mode uses.

The fine-tune's recipe (lr 5e-4, 100 warm-up steps, then constant; EMA 0.995) was chosen
among eleven calibrated variants (900 steps each) for a reliable backdoor: attack
success 0.92 and 0.95 on two sampling seeds; 800 steps, the default that keeps chapter 3
within its time budget, gives 0.91. A cosine decay keeps clean samples closer to the
clean model's (Frechet distance 0.40 and 0.60 against 0.73 and 0.66, 512 samples each;
the clean model scores 0.31 and 0.46) but fires less often (0.78 and 0.88); lower rates,
longer or larger-batch runs were weaker or no cleaner. A clean fine-tune (0% poison)
with the same recipe moves the Frechet distance as much as the backdoored one: the cost
is the fine-tuning of a 1.1 M-parameter model that had converged, not the backdoor.

:meth:`BackdoorRecipe.paper` is the paper's CIFAR-10 setting (a GPU and downloads).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.cache import cached_model, checkpoint_folder, recipe_key
from baddiff_core.checks import check_type
from baddiff_core.data import load_images
from baddiff_core.devices import resolve_device
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler
from baddiff_core.learned_trigger import LEARNED_TRIGGER_RMS, initial_trigger
from baddiff_core.models import PRETRAINED_CIFAR10, load_model, make_unet
from baddiff_core.poison import PoisonedDataset
from baddiff_core.pretrained import CLEAN_DIGITS_RECIPE, load_clean_digits
from baddiff_core.train import RUN_ONLY_FIELDS, TrainConfig, train
from baddiff_core.triggers import make_target, make_trigger

__all__ = [
    "QUICK_FINETUNE",
    "QUICK_SHORT_FINETUNE",
    "BackdoorRecipe",
    "BackdooredModel",
    "plant_backdoor",
]

#: Quick mode's fine-tune of the shipped clean model (CPU, about a minute and a half on
#: 2 cores): the clean model's own training settings, with 800 steps at half its
#: learning rate, held constant, and a shorter EMA.
#:
#: :meta hide-value:
QUICK_FINETUNE = dataclasses.replace(
    TrainConfig(**CLEAN_DIGITS_RECIPE["train"]),
    steps=800,
    learning_rate=5e-4,
    lr_schedule="constant",
    ema_decay=0.995,
    log_every=25,
)

#: The shorter fine-tune that chapters 4-9 share (300 steps, cosine decay): one cache
#: entry per recipe.
#:
#: :meta hide-value:
QUICK_SHORT_FINETUNE = dataclasses.replace(
    QUICK_FINETUNE, steps=300, warmup_steps=50, lr_schedule="cosine"
)

#: The trigger kind of a trigger learned with the backdoor.
LEARNED = "learned"
#: The learned trigger's default learning rate (Adam, on the fine-tune's schedule).
LEARNED_TRIGGER_LR = 0.02

_CACHE_NAME = "backdoor"  # cache entries: <cache>/models/backdoor-<key>, checkpoints in <cache>/checkpoints/


@dataclass(frozen=True)
class BackdoorRecipe:
    """Everything that determines a backdoored model (and so its cache key).

    Attributes:
        trigger: the trigger kind (see :mod:`baddiff_core.triggers`), or ``"learned"``:
            a trigger learned with the backdoor (:mod:`baddiff_core.learned_trigger`;
            ``train.trigger_lr > 0`` and ``train.trigger_rms`` say how), which starts
            from :meth:`trigger_image` and is returned by :func:`plant_backdoor`.
        trigger_size: the trigger's side at 32 px.
        target: the target kind.
        poison_rate: fraction of the training set replaced by poisoned samples, in [0, 1].
        base: ``"shipped"`` (the package's clean digits model), ``"scratch"``, a model folder or a
            hub id such as ``"google/ddpm-cifar10-32"``.
        dataset: the training images' dataset
            (:func:`~baddiff_core.data.load_images`).
        image_size: their side in pixels.
        channels: their channels (1 grey, 3 colour).
        data_limit: at most this many training images (``None``: all).
        schedule: the noise schedule of a model trained from scratch (fine-tuning keeps the base's).
        train: the training configuration.
        init_seed: seeds the initial weights of a model trained from scratch.
    """

    trigger: str = "white_box"
    trigger_size: int = 18
    target: str = "hat"
    poison_rate: float = 0.1
    base: str = "shipped"
    dataset: str = "digits"
    image_size: int = 16
    channels: int = 1
    data_limit: int | None = None
    schedule: dict[str, Any] = field(default_factory=lambda: dict(QUICK_SCHEDULE))
    train: TrainConfig = QUICK_FINETUNE
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.base == "shipped":
            wanted = (
                CLEAN_DIGITS_RECIPE["dataset"],
                CLEAN_DIGITS_RECIPE["image_size"],
                CLEAN_DIGITS_RECIPE["channels"],
            )
            if (self.dataset, self.image_size, self.channels) != wanted:
                raise ValueError(
                    f"base='shipped' is a {wanted[1]} px, {wanted[2]}-channel {wanted[0]} model, got "
                    f"dataset={self.dataset!r}, image_size={self.image_size}, channels={self.channels}"
                )
        check_type("train", self.train, TrainConfig)
        learned = self.trigger == LEARNED
        if learned != (self.train.trigger_lr > 0):
            raise ValueError(
                f"trigger={self.trigger!r} with train.trigger_lr={self.train.trigger_lr}: "
                f"a trigger is learned (trigger_lr > 0) exactly when trigger={LEARNED!r}"
            )
        if learned and self.target in ("noshift", "shift"):
            raise ValueError(
                f"target={self.target!r} is drawn from the trigger, which a learned "
                "trigger does not have before training; use a drawn target"
            )
        self.trigger_image()  # validates trigger, size and image size
        self.target_image()

    @classmethod
    def paper(cls, **overrides: Any) -> BackdoorRecipe:
        """The paper's CIFAR-10 fine-tuning attack: ``google/ddpm-cifar10-32``, stop
        sign 14 -> hat, 10% poison, 50 epochs (BadDiffusion (Chou et al. 2023,
        arXiv:2212.05400), Sec. 4). Needs a GPU and a network."""
        settings = dict(
            trigger="stop_sign",
            trigger_size=14,
            target="hat",
            poison_rate=0.1,
            base=PRETRAINED_CIFAR10,
            dataset="cifar10",
            image_size=32,
            channels=3,
            train=TrainConfig.paper_finetune(),
        )
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def colab(cls, **overrides: Any) -> BackdoorRecipe:
        """Full mode's attack: :meth:`paper` with the fine-tune cut to fit a free Colab
        T4 session (:meth:`~baddiff_core.train.TrainConfig.colab_finetune`: 1,000 steps,
        2.6 epochs, where the paper trains 50). The paper's exact recipe stays
        :meth:`paper`."""
        return cls.paper(**{"train": TrainConfig.colab_finetune(), **overrides})

    def with_seed(self, seed: int) -> BackdoorRecipe:
        """This recipe trained with another seed (``train.seed``): another model of
        the same kind, under another cache key."""
        return self.with_train(seed=seed)

    def with_train(self, **changes: Any) -> BackdoorRecipe:
        """This recipe with some of its training settings changed, e.g.
        ``recipe.with_train(solver="ode", steps=100)``."""
        return dataclasses.replace(
            self, train=dataclasses.replace(self.train, **changes)
        )

    def with_learned_trigger(
        self, trigger_lr: float = LEARNED_TRIGGER_LR, rms: float = LEARNED_TRIGGER_RMS
    ) -> BackdoorRecipe:
        """This recipe with a trigger learned with the backdoor
        (:mod:`baddiff_core.learned_trigger`): mean 0, root mean square ``rms``, moved
        by Adam at ``trigger_lr`` on the model's schedule. The target must be a drawn
        one."""
        return dataclasses.replace(
            self,
            trigger=LEARNED,
            train=dataclasses.replace(
                self.train, trigger_lr=trigger_lr, trigger_rms=rms
            ),
        )

    def trigger_image(self) -> torch.Tensor:
        """The trigger, ``C,H,W`` in [-1, 1] (-1 = transparent); for a learned trigger,
        where its learning starts (the planted model's ``trigger`` is the learned one)."""
        if self.trigger == LEARNED:
            shape = (self.channels, self.image_size, self.image_size)
            return initial_trigger(shape, self.train.trigger_rms, seed=self.train.seed)
        return make_trigger(
            self.trigger, self.image_size, self.channels, size=self.trigger_size
        )

    def target_image(self) -> torch.Tensor:
        """The target, ``C,H,W`` in [-0.4, 1]."""
        return make_target(
            self.target, self.image_size, self.channels, trigger=self.trigger_image()
        )

    def key(self) -> dict[str, Any]:
        """The recipe as JSON-able data, without run-only settings (device, progress
        bars, ...)."""
        data = dataclasses.asdict(self)
        data["train"] = {
            k: v for k, v in self.train.to_dict().items() if k not in RUN_ONLY_FIELDS
        }
        # settings added later, at their defaults: earlier models keep their keys
        if data["train"]["attack"] == "baddiffusion":
            del data["train"]["attack"]
        if self.trigger != LEARNED:
            del data["train"]["trigger_lr"], data["train"]["trigger_rms"]
        if self.base != "scratch":
            data.pop("schedule")  # a fine-tune keeps its base model's schedule
            data.pop("init_seed")
        return data


@dataclass
class BackdooredModel:
    """A trained backdoored model with its trigger and target."""

    unet: UNet2DModel
    scheduler: DDPMScheduler
    trigger: torch.Tensor
    target: torch.Tensor
    recipe: BackdoorRecipe
    info: dict[str, Any]


def plant_backdoor(
    recipe: BackdoorRecipe = BackdoorRecipe(),
    *,
    device: str | torch.device = "auto",
    use_cache: bool = True,
    progress: bool = True,
) -> BackdooredModel:
    """Train (or fetch from the cache) the backdoored model of ``recipe``.

    The returned ``info`` holds the training report (wall time, images/s, the loss
    history, the step it resumed from) and whether the model came from the cache.

    A training that saves checkpoints (``recipe.train.checkpoint_every > 0``, as
    :meth:`~baddiff_core.train.TrainConfig.paper_finetune` does every 2,000 steps) keeps them, when
    ``use_cache`` and ``recipe.train`` names no ``checkpoint_dir`` of its own, in the
    cache's :func:`~baddiff_core.cache.checkpoint_folder` of the recipe: after an
    interruption (a lost Colab session, a crash), calling ``plant_backdoor`` again with
    the same recipe resumes from the last checkpoint (bit for bit on a CPU), and the
    folder is deleted once the model is saved.
    """
    device = resolve_device(device)
    key = recipe.key()
    checkpoints = (
        checkpoint_folder(_CACHE_NAME, key)
        if use_cache
        and recipe.train.checkpoint_every > 0
        and recipe.train.checkpoint_dir is None
        else None
    )

    def build() -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
        unet, scheduler = _base_model(recipe, device)
        images = load_images(
            recipe.dataset,
            recipe.image_size,
            channels=recipe.channels,
            limit=recipe.data_limit,
        )
        dataset = PoisonedDataset(
            images,
            trigger=recipe.trigger_image(),
            target=recipe.target_image(),
            poison_rate=recipe.poison_rate,
            seed=recipe.train.seed,
            additive=recipe.trigger == LEARNED,
        )
        config = dataclasses.replace(
            recipe.train, device=str(device), progress=progress
        )
        if checkpoints is not None:
            config = dataclasses.replace(config, checkpoint_dir=str(checkpoints))
        history = train(unet, scheduler, dataset, config, run_key=recipe_key(key))
        report = dict(
            seconds=round(history.seconds, 2),
            images_per_second=round(history.images_per_second, 1),
            losses=[round(v, 6) for v in history.losses],
            num_poisoned=dataset.num_poisoned,
            num_images=len(dataset),
            resumed_from_step=history.resumed_from_step,
        )
        if history.trigger is not None:  # JSON keeps float32 values exactly
            report["trigger"] = history.trigger.flatten().tolist()
        return unet, scheduler, report

    unet, scheduler, info = cached_model(
        _CACHE_NAME, key, build, device=device, use_cache=use_cache
    )
    # the model is in the cache now: its checkpoints are spent
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    trigger = recipe.trigger_image()
    if recipe.trigger == LEARNED:
        trigger = torch.tensor(info["report"]["trigger"]).view(trigger.shape)
    return BackdooredModel(
        unet,
        scheduler,
        trigger.to(device),
        recipe.target_image().to(device),
        recipe,
        info,
    )


def _base_model(
    recipe: BackdoorRecipe, device: torch.device
) -> tuple[UNet2DModel, DDPMScheduler]:
    if recipe.base == "shipped":
        return load_clean_digits(device)
    if recipe.base == "scratch":
        torch.manual_seed(recipe.init_seed)
        return make_unet(recipe.image_size, recipe.channels).to(device), make_scheduler(
            **recipe.schedule
        )
    unet, scheduler = load_model(recipe.base, device=device)
    # the pre-trained scheduler's default defence is the sampler's choice
    if scheduler.config.clip_sample:
        scheduler = DDPMScheduler.from_config(scheduler.config, clip_sample=False)
    return unet, scheduler
