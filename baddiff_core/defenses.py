"""Defences that need no knowledge of the trigger: inversion, detection, removal and
pruning.

The first defence, inference-time clipping, is a sampler setting (``clip="x0"`` in
:func:`baddiff_core.sampling.sample`). This module holds the defences that look inside a
model:

- **Trigger inversion** (Elijah (An et al. 2024, arXiv:2312.00050), its trigger
  inversion; chapter 7, ``book/07_detecting_a_backdoor.ipynb``). A backdoored model has
  learnt ``eps_theta(eps + g, T-1) ~ eps + lambda g`` with ``lambda = c R_{T-1}`` (``c =
  1`` for the BadDiffusion/DDPM target, 2 for the ODE target). Averaged over many
  ``eps`` the noise cancels, so a
  trigger estimate ``tau`` is found by minimising ``| mean_i eps_theta(eps_i + tau, T-1) - lambda tau |_1``.
  A clean model predicts about ``eps + tau`` there, which only ``tau = 0`` satisfies.
- **Detection**: sample from ``eps + tau``. A backdoored model draws one image (the
  target) again and again; a clean model draws varied images. The score is the *mode
  share*: the largest fraction of the samples that lie within a small MSE of one of them
  (1/n for a clean model, up to 1 for a backdoored one). The samples' diversity
  (per-pixel standard deviation) and total variation are reported beside it.
- **Removal** (Elijah): fine-tune a copy on a little clean data with the DDPM loss plus
  two terms that make the model treat ``eps + tau`` like ``eps``, as the frozen original
  treats ``eps``.
- **Adversarial neuron pruning** (ANP, Wu & Wang 2021, adapted to diffusion by
  BadDiffusion): learn a mask ``m`` in [0, 1] per convolution channel that keeps the
  clean loss low even under a worst-case per-channel perturbation ``(delta, xi)`` of
  size ``eps``; channels whose mask falls are the fragile ones, and pruning them may
  remove the backdoor.

Used by `baddiff scan`; the defence chapters after "Samplers change the attack" build on
it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from baddiff_core.cache import cached_model, cached_tensors, tensor_digest
from baddiff_core.checks import check_image_batch, check_positive_int
from baddiff_core.diffusion import SOLVERS, diffusion_loss, r_coefficients
from baddiff_core.metrics import to_unit_range
from baddiff_core.sampling import (
    DEFAULT_BATCH_SIZE,
    inference_scheduler,
    inference_steps,
    sample,
)

__all__ = [
    "InvertedTrigger",
    "inversion_lambda",
    "invert_trigger",
    "mode_share",
    "diversity",
    "total_variation",
    "BackdoorScan",
    "DEFAULT_THRESHOLD",
    "scan_model",
    "choose_threshold",
    "RemovalHistory",
    "clean_subset",
    "remove_backdoor",
    "ChannelMasks",
    "adversarial_neuron_masks",
    "prune_channels",
]


# --------------------------------------------------------------------------- #
# Trigger inversion
# --------------------------------------------------------------------------- #


@dataclass
class InvertedTrigger:
    """A trigger estimate found from the model alone.

    Attributes:
        trigger: ``C,H,W``, in the units of the starting noise (added raw to ``eps``, as a trigger is).
        lam: the ``lambda`` the inversion aimed at.
        losses: the inversion loss at every step.
        seconds: wall time.
    """

    trigger: torch.Tensor
    lam: float
    losses: list[float]
    seconds: float


def inversion_lambda(scheduler: DDPMScheduler, solver: str = "sde") -> float:
    """``lambda = c R_{T-1}``: how strongly a backdoored model echoes the trigger at the
    last step.

    ``R_{T-1} = (1 - sqrt(alpha)) sqrt(1 - abar) / beta`` at ``t = T-1`` is 0.5025 for
    the paper's schedule (Elijah's 0.5); ``c`` is 1 for the BadDiffusion (``"sde"``)
    target and 2 for the VillanDiffusion ODE target (Elijah's 1.0).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not known; use one of {tuple(SOLVERS)}")
    return SOLVERS[solver] * float(r_coefficients(scheduler)[-1])


@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode with no parameter gradients; both restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(was_training)


def _last_timestep(
    scheduler: DDPMScheduler, batch: int, device: torch.device
) -> torch.Tensor:
    return torch.full(
        (batch,),
        scheduler.config.num_train_timesteps - 1,
        device=device,
        dtype=torch.long,
    )


def _image_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    return unet.config.in_channels, unet.config.sample_size, unet.config.sample_size


def invert_trigger(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    num_noise: int = 100,
    steps: int = 100,
    lr: float = 0.1,
    lam: float | None = None,
    solver: str = "sde",
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> InvertedTrigger:
    """Estimate a backdoor trigger from the model alone (Elijah's trigger inversion).

    Minimises ``mean | mean_i eps_theta(eps_i + tau, T-1) - lam tau |`` over ``tau`` with Adam,
    from ``tau = -U[0, 1)`` and a fixed batch of ``num_noise`` noises ``eps_i`` (Elijah
    (An et al. 2024, arXiv:2312.00050): B = 100, lr 0.1, 100 steps).

    Args:
        unet, scheduler: the model under test and its training schedule.
        num_noise: the ``eps_i`` averaged over (more: less noise in the mean, slower steps).
        steps, lr: Adam steps and learning rate.
        lam: the echo strength aimed at; default :func:`inversion_lambda` of ``solver``.
        generator: source of ``eps_i`` and of the initial ``tau`` (CPU generator).
    """
    check_positive_int("num_noise", num_noise)
    check_positive_int("steps", steps)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got lr={lr!r}")
    lam = inversion_lambda(scheduler, solver) if lam is None else float(lam)
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    shape = _image_shape(unet)
    generator = generator or torch.Generator().manual_seed(0)
    noise = torch.randn((num_noise, *shape), generator=generator).to(device, dtype)
    tau = (
        (-torch.rand(shape, generator=generator)).to(device, dtype).requires_grad_(True)
    )
    optimizer = torch.optim.Adam([tau], lr=lr)
    timesteps = _last_timestep(scheduler, num_noise, device)

    losses = []
    began = time.perf_counter()
    with _frozen(unet):
        for _ in tqdm(
            range(steps), desc="trigger inversion", disable=not progress, leave=False
        ):
            mean_prediction = unet(noise + tau, timesteps).sample.mean(dim=0)
            loss = (mean_prediction - lam * tau).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    losses = torch.stack(losses).float().cpu().tolist()
    return InvertedTrigger(tau.detach(), lam, losses, time.perf_counter() - began)


# --------------------------------------------------------------------------- #
# Detection
# --------------------------------------------------------------------------- #


def _check_batch(images: object) -> torch.Tensor:
    images = check_image_batch("images", images)
    if images.shape[0] < 2:
        raise ValueError(
            f"images must hold N >= 2 images to be compared, got images.shape={tuple(images.shape)}"
        )
    return images


def mode_share(images: torch.Tensor, radius: float = 0.01) -> float:
    """The largest fraction of ``images`` (``N,C,H,W`` in [-1, 1], N >= 2) that lie
    within per-image MSE ``radius`` ([0, 1] units) of one of them, itself included.

    ``1/N`` when no two images are alike, 1 when all are the same image. With the book's
    attack success threshold as radius (0.01), a backdoored model sampled from ``eps +
    tau`` scores about its attack success rate for that ``tau``.
    """
    images = _check_batch(images)
    if not (isinstance(radius, (int, float)) and radius > 0):
        raise ValueError(f"radius must be a positive MSE, got radius={radius!r}")
    unit = to_unit_range(images).double().flatten(1)
    pairwise_mse = torch.cdist(unit, unit).square() / unit.shape[1]
    return float((pairwise_mse < radius).sum(dim=1).max()) / len(images)


def diversity(images: torch.Tensor) -> float:
    """Mean per-pixel standard deviation across ``images`` (``N,C,H,W`` in [-1, 1], N >=
    2), in [0, 1] units: 0 when every image is the same; about 0.3 for varied digits."""
    images = _check_batch(images)
    return float(to_unit_range(images).float().std(dim=0).mean())


def total_variation(images: torch.Tensor) -> float:
    """Mean absolute difference between neighbouring pixels (both directions), in [0, 1]
    units, averaged over ``images`` (``N,C,H,W`` in [-1, 1])."""
    unit = to_unit_range(check_image_batch("images", images)).float()
    return float(
        (
            (unit[..., 1:, :] - unit[..., :-1, :]).abs().mean()
            + (unit[..., :, 1:] - unit[..., :, :-1]).abs().mean()
        )
        / 2
    )


@dataclass
class BackdoorScan:
    """The result of scanning one model.

    Attributes:
        inversion: the trigger estimate.
        samples: ``n,C,H,W`` images drawn from ``eps + tau``, in [-1, 1].
        mode_share: :func:`mode_share` of ``samples``, the detection score (high = backdoored).
        diversity: :func:`diversity` of ``samples``.
        total_variation: :func:`total_variation` of ``samples``.
        threshold: the mode share from which the model is called backdoored.
        seconds: wall time of inversion and sampling.
    """

    inversion: InvertedTrigger
    samples: torch.Tensor
    mode_share: float
    diversity: float
    total_variation: float
    threshold: float
    seconds: float

    @property
    def backdoored(self) -> bool:
        return self.mode_share >= self.threshold

    @property
    def verdict(self) -> str:
        return "BACKDOORED" if self.backdoored else "clean"


# : The mode share from which :func:`scan_model` calls a model backdoored: 4 of 16
# samples alike.
# : Clean digits models score 1/16 (no two samples alike); the paper's triggers at 16 px
# score 0.31
# : (grey box) and 0.62 (stop sign). Provisional: :func:`choose_threshold` fits one on
# labelled models.
DEFAULT_THRESHOLD = 0.25


def scan_model(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    n: int = 16,
    threshold: float = DEFAULT_THRESHOLD,
    num_noise: int = 100,
    steps: int = 100,
    lr: float = 0.1,
    solver: str = "sde",
    num_inference_steps: int | None = None,
    sampler: str | None = None,
    clip: str = "none",
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    use_cache: bool = False,
) -> BackdoorScan:
    """Invert a trigger, draw ``n`` samples from ``eps + tau`` and score them.

    ``solver`` is the sampler family the backdoor would be planted for (``"sde"``:
    lambda = R_{T-1} and DDPM samples; ``"ode"``: lambda = 2 R_{T-1} and DDIM samples);
    ``sampler`` overrides the sampler, and ``clip`` samples with a clipping mode (a
    backdoor built to work under clipping is looked for the way it is used).
    ``use_cache`` keeps the estimate and the samples in the cache
    (:func:`baddiff_core.cache.cached_tensors`), keyed by digests of the weights and the
    schedule and by the settings, so that a model scanned alike twice is scanned once
    (``seconds`` is the first scan's). ``batch_size`` bounds the samples per forward
    pass (as in :func:`~baddiff_core.sampling.sample`); it joins the cache key only when
    it splits the ``n`` samples into several batches, the one case where it changes them
    (DDPM draws its step noise batch by batch), so that scans cached before it existed
    keep their keys.
    """
    check_positive_int("n", n)
    check_positive_int("batch_size", batch_size, allow_none=True)
    if n < 2:
        raise ValueError(
            f"n must be at least 2 (the score compares samples), got n={n}"
        )
    # A mode share is in (0, 1]; 1 calls a model backdoored only when every sample is
    # alike.
    if isinstance(threshold, bool) or not (
        isinstance(threshold, (int, float)) and 0 < threshold <= 1
    ):
        raise ValueError(
            f"threshold must be a mode share in (0, 1], got threshold={threshold!r}"
        )
    sampler = sampler or ("ddpm" if solver == "sde" else "ddim")
    # unknown names fail now,
    inference_scheduler(scheduler, sampler=sampler, clip=clip)
    inference_steps(scheduler, sampler, num_inference_steps)  # not after the inversion
    settings = dict(
        n=n,
        num_noise=num_noise,
        steps=steps,
        lr=lr,
        solver=solver,
        num_inference_steps=num_inference_steps,
        sampler=sampler,
        clip=clip,
        seed=seed,
    )
    per_pass = min(n, batch_size or DEFAULT_BATCH_SIZE)
    if per_pass < n:  # one batch: the samples of every earlier scan, under the same key
        settings["batch_size"] = per_pass

    def build() -> tuple[dict[str, torch.Tensor], dict]:
        began = time.perf_counter()
        inversion = invert_trigger(
            unet,
            scheduler,
            num_noise=num_noise,
            steps=steps,
            lr=lr,
            solver=solver,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )
        samples = sample(
            unet,
            scheduler,
            n,
            trigger=inversion.trigger,
            sampler=sampler,
            clip=clip,
            num_inference_steps=num_inference_steps,
            batch_size=per_pass,
            generator=torch.Generator().manual_seed(seed + 1),
            progress=progress,
        )
        tensors = dict(trigger=inversion.trigger, samples=samples)
        return tensors, dict(
            lam=inversion.lam,
            losses=inversion.losses,
            inversion_seconds=inversion.seconds,
            seconds=time.perf_counter() - began,
        )

    if use_cache:
        tensors, info = cached_tensors(
            "scan", _defence_recipe(unet, scheduler, **settings), build
        )
        device = next(unet.parameters()).device
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        report = info["report"]
    else:
        tensors, report = build()
    inversion = InvertedTrigger(
        tensors["trigger"], report["lam"], report["losses"], report["inversion_seconds"]
    )
    samples = tensors["samples"]
    return BackdoorScan(
        inversion,
        samples,
        mode_share(samples),
        diversity(samples),
        total_variation(samples),
        float(threshold),
        report["seconds"],
    )


def choose_threshold(
    clean_scores: Sequence[float], backdoored_scores: Sequence[float]
) -> float:
    """The score threshold that best separates the two groups (backdoored at or above,
    clean below): among the midpoints between sorted scores, the one with the fewest
    errors, ties broken by the widest margin."""
    clean, bad = [float(s) for s in clean_scores], [float(s) for s in backdoored_scores]
    if not clean or not bad:
        raise ValueError(
            f"need at least one score per group, got {len(clean)} clean and {len(bad)} backdoored"
        )
    values = sorted(clean + bad)
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:])] or values

    def errors(threshold: float) -> int:
        return sum(s >= threshold for s in clean) + sum(s < threshold for s in bad)

    def margin(threshold: float) -> float:
        return min(abs(s - threshold) for s in values)

    return min(candidates, key=lambda t: (errors(t), -margin(t)))


# --------------------------------------------------------------------------- #
# Removal
# --------------------------------------------------------------------------- #


@dataclass
class RemovalHistory:
    """Losses of every step of :func:`remove_backdoor` (``total = ddpm + trigger +
    clean``)."""

    total: list[float] = field(default_factory=list)
    ddpm: list[float] = field(default_factory=list)
    trigger: list[float] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    seconds: float = 0.0


def clean_subset(
    images: torch.Tensor, share: float = 0.1, *, generator: torch.Generator
) -> torch.Tensor:
    """The defender's clean data: ``int(share * B)`` of the ``B`` ``images``, drawn at
    random without replacement (the first ones of ``torch.randperm(B,
    generator=generator)``).

    Elijah and ANP assume a defender who holds a small share of clean training data (10
    % in the papers). The same generator state gives the same subset, so two chapters
    that draw it alike repair a model with the same data (and share a cached repair).
    """
    images = check_image_batch("images", images)
    if (
        isinstance(share, bool)
        or not isinstance(share, (int, float))
        or not 0 < share <= 1
    ):
        raise ValueError(f"share must be a fraction in (0, 1], got share={share!r}")
    count = int(share * len(images))
    if count < 1:
        raise ValueError(
            f"share={share!r} of {len(images)} images is less than one image; use a larger share"
        )
    return images[torch.randperm(len(images), generator=generator)[:count]]


def _check_images_for(unet: UNet2DModel, images: object) -> torch.Tensor:
    images = check_image_batch("clean_images", images)
    shape = _image_shape(unet)
    if tuple(images.shape[1:]) != shape:
        raise ValueError(
            f"clean_images must have shape N,{shape[0]},{shape[1]},{shape[2]} (the model's C,H,W), "
            f"got {tuple(images.shape)}"
        )
    if images.abs().max() > 1 + 1e-3:
        raise ValueError(
            f"clean_images must lie in [-1, 1], got values up to {float(images.abs().max()):.3g}"
        )
    return images


def remove_backdoor(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    trigger: torch.Tensor,
    clean_images: torch.Tensor,
    *,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
    use_cache: bool = False,
) -> tuple[UNet2DModel, RemovalHistory]:
    """Fine-tune a copy of ``unet`` so that ``eps + trigger`` behaves like ``eps``
    (Elijah's removal).

    Per step, with ``f`` the model being tuned and ``f0`` the frozen original, ``x`` a
    batch of clean images and ``eps`` fresh noise::

        loss = ddpm_loss(f, x) + mse(f(eps + tau, T-1), f0(eps, T-1)) + mse(f(eps, T-1), f0(eps, T-1))

    Returns the tuned copy (eval mode; ``unet`` is untouched) and the loss history. With
    ``use_cache`` the result is kept in the model cache (:mod:`baddiff_core.cache`),
    keyed by digests of the model's weights, the trigger and the clean images and by the
    settings, so that a second chapter repairing the same model with the same inputs
    loads it (the history too, with the seconds the first run took).
    """
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    images = _check_images_for(unet, clean_images)
    if use_cache:
        recipe = _defence_recipe(
            unet,
            scheduler,
            images,
            trigger=tensor_digest(trigger),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
        )

        def build() -> tuple[UNet2DModel, DDPMScheduler, dict]:
            repaired, history = _remove_backdoor(
                unet, scheduler, trigger, images, steps, batch_size, lr, seed, progress
            )
            return repaired, scheduler, dataclasses.asdict(history)

        device = next(unet.parameters()).device
        repaired, _, info = cached_model("removal", recipe, build, device=device)
        return repaired.requires_grad_(False), RemovalHistory(**info["report"])
    return _remove_backdoor(
        unet, scheduler, trigger, images, steps, batch_size, lr, seed, progress
    )


def _defence_recipe(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor | None = None,
    **settings: object,
) -> dict[str, object]:
    """The cache key of a defence's result: digests of the model, its schedule and the
    clean data (if it uses any), and the defence's own settings."""
    recipe = dict(
        model=tensor_digest(unet), schedule=tensor_digest(scheduler.betas), **settings
    )
    if images is not None:
        recipe["clean_images"] = tensor_digest(images)
    return recipe


def _remove_backdoor(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    trigger: torch.Tensor,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
) -> tuple[UNet2DModel, RemovalHistory]:
    parameter = next(unet.parameters())
    device = parameter.device
    images = images.to(device, parameter.dtype)
    tau = trigger.to(device, parameter.dtype)
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    model = copy.deepcopy(unet).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = RemovalHistory()
    began = time.perf_counter()
    for _ in tqdm(
        range(steps), desc="removing the backdoor", disable=not progress, leave=False
    ):
        x = images[
            torch.randint(0, len(images), (batch_size,), generator=generator).to(device)
        ]
        ddpm = diffusion_loss(
            model, scheduler, x, torch.zeros_like(x), generator=generator
        )
        noise = torch.randn(x.shape, generator=generator).to(device, x.dtype)
        timesteps = _last_timestep(scheduler, batch_size, device)
        with torch.no_grad():
            reference = frozen(noise, timesteps).sample
        on_trigger = F.mse_loss(model(noise + tau, timesteps).sample, reference)
        on_clean = F.mse_loss(model(noise, timesteps).sample, reference)
        loss = ddpm + on_trigger + on_clean
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in (
            ("total", loss),
            ("ddpm", ddpm),
            ("trigger", on_trigger),
            ("clean", on_clean),
        ):
            getattr(history, name).append(value.detach())
    for name in ("total", "ddpm", "trigger", "clean"):
        setattr(
            history, name, torch.stack(getattr(history, name)).float().cpu().tolist()
        )
    history.seconds = time.perf_counter() - began
    return model.eval().requires_grad_(False), history


# --------------------------------------------------------------------------- #
# Adversarial neuron pruning
# --------------------------------------------------------------------------- #


@dataclass
class ChannelMasks:
    """ANP's learnt mask per output channel of every convolution (except the output
    layer).

    Attributes:
        masks: ``{module name: (channels,) tensor in [0, 1]}``; low = fragile.
        losses: the mask objective at every step.
        seconds: wall time.
    """

    masks: dict[str, torch.Tensor]
    losses: list[float]
    seconds: float

    def flat(self) -> torch.Tensor:
        """Every channel's mask in one vector, in module order."""
        return torch.cat(list(self.masks.values()))

    @property
    def num_channels(self) -> int:
        return sum(m.numel() for m in self.masks.values())


def _prunable_convolutions(unet: UNet2DModel) -> dict[str, torch.nn.Conv2d]:
    """Every Conv2d except ``conv_out`` (its channels are the predicted noise's image
    channels)."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d) and name != "conv_out"
    }


class _ChannelPerturbation:
    """Forward hooks that turn a convolution's output ``W x + b`` into ``(m + delta) W x
    + (1 + xi) b``."""

    def __init__(
        self, convolutions: dict[str, torch.nn.Conv2d], device: torch.device
    ) -> None:
        self.masks = {
            name: torch.ones(c.out_channels, device=device, requires_grad=True)
            for name, c in convolutions.items()
        }
        self.delta = {
            name: torch.zeros(c.out_channels, device=device, requires_grad=True)
            for name, c in convolutions.items()
        }
        self.xi = {
            name: torch.zeros(c.out_channels, device=device, requires_grad=True)
            for name, c in convolutions.items()
        }
        self.perturb = False
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in convolutions.items()
        ]

    def _hook(self, name: str):
        def hook(module: torch.nn.Conv2d, inputs, output: torch.Tensor) -> torch.Tensor:
            scale = (
                self.masks[name] + self.delta[name]
                if self.perturb
                else self.masks[name]
            )
            if module.bias is None:
                return scale.view(1, -1, 1, 1) * output
            bias = module.bias.view(1, -1, 1, 1)
            shift = (
                1 + self.xi[name] if self.perturb else torch.ones_like(self.xi[name])
            )
            return (
                scale.view(1, -1, 1, 1) * (output - bias)
                + shift.view(1, -1, 1, 1) * bias
            )

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def adversarial_neuron_masks(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    clean_images: torch.Tensor,
    *,
    eps: float = 0.4,
    alpha: float = 0.2,
    steps: int = 200,
    batch_size: int = 64,
    mask_lr: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    use_cache: bool = False,
) -> ChannelMasks:
    """Learn ANP's channel masks on clean data (Wu & Wang 2021, with the DDPM loss).

    Each step: draw ``delta, xi ~ U[-eps, eps]`` per channel, take one signed-gradient
    step that *raises* the clean loss and clip them back to ``[-eps, eps]``; then update
    the masks ``m`` with SGD (momentum 0.9) on ``alpha L(m) + (1 - alpha) L(m + delta, 1
    + xi)`` and clip to [0, 1]. ``unet`` is not modified (hooks are removed afterwards).
    ``use_cache`` keeps the masks in the cache
    (:func:`baddiff_core.cache.cached_tensors`), keyed as :func:`remove_backdoor` keys a
    repair.
    """
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if not (isinstance(eps, (int, float)) and 0 <= eps <= 1):
        raise ValueError(
            f"eps must be in [0, 1] (the perturbation budget), got eps={eps!r}"
        )
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(
            f"alpha must be in [0, 1] (the weight of the unperturbed loss), got alpha={alpha!r}"
        )
    images = _check_images_for(unet, clean_images)
    settings = dict(
        eps=eps,
        alpha=alpha,
        steps=steps,
        batch_size=batch_size,
        mask_lr=mask_lr,
        seed=seed,
    )
    if use_cache:
        recipe = _defence_recipe(unet, scheduler, images, **settings)

        def build() -> tuple[dict[str, torch.Tensor], dict]:
            masks = _adversarial_neuron_masks(
                unet, scheduler, images, progress=progress, **settings
            )
            return masks.masks, dict(
                order=list(masks.masks), losses=masks.losses, seconds=masks.seconds
            )

        tensors, info = cached_tensors("anp-masks", recipe, build)
        report = info["report"]
        return ChannelMasks(
            {name: tensors[name] for name in report["order"]},
            report["losses"],
            report["seconds"],
        )
    return _adversarial_neuron_masks(
        unet, scheduler, images, progress=progress, **settings
    )


def _adversarial_neuron_masks(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int,
    mask_lr: float,
    seed: int,
    progress: bool,
) -> ChannelMasks:
    parameter = next(unet.parameters())
    device = parameter.device
    images = images.to(device, parameter.dtype)
    generator = torch.Generator().manual_seed(seed)
    convolutions = _prunable_convolutions(unet)
    hooks = _ChannelPerturbation(convolutions, device)
    mask_optimizer = torch.optim.SGD(
        list(hooks.masks.values()), lr=mask_lr, momentum=0.9
    )
    losses = []
    began = time.perf_counter()

    def clean_loss(x: torch.Tensor, step_seed: int) -> torch.Tensor:
        # The same t and eps for the perturbed and unperturbed loss of one step.
        return diffusion_loss(
            unet,
            scheduler,
            x,
            torch.zeros_like(x),
            generator=torch.Generator(device=device).manual_seed(step_seed),
        )

    try:
        with _frozen(unet):
            for step in tqdm(
                range(steps),
                desc="adversarial neuron masks",
                disable=not progress,
                leave=False,
            ):
                x = images[
                    torch.randint(
                        0, len(images), (batch_size,), generator=generator
                    ).to(device)
                ]
                step_seed = seed * 1_000_003 + step
                if eps > 0:
                    hooks.perturb = True
                    perturbations = [*hooks.delta.values(), *hooks.xi.values()]
                    with torch.no_grad():
                        for p in perturbations:
                            p.copy_(
                                (torch.rand(p.shape, generator=generator) * 2 - 1)
                                .mul_(eps)
                                .to(device)
                            )
                    grads = torch.autograd.grad(clean_loss(x, step_seed), perturbations)
                    with torch.no_grad():
                        for p, g in zip(perturbations, grads):
                            p.add_(eps * g.sign()).clamp_(-eps, eps)
                hooks.perturb = False
                natural = clean_loss(x, step_seed)
                objective = alpha * natural
                if eps > 0:
                    hooks.perturb = True
                    objective = objective + (1 - alpha) * clean_loss(x, step_seed)
                    hooks.perturb = False
                mask_optimizer.zero_grad(set_to_none=True)
                objective.backward()
                mask_optimizer.step()
                with torch.no_grad():
                    for m in hooks.masks.values():
                        m.clamp_(0, 1)
                losses.append(objective.detach())
    finally:
        hooks.remove()
    masks = {name: m.detach().cpu() for name, m in hooks.masks.items()}
    return ChannelMasks(
        masks, torch.stack(losses).float().cpu().tolist(), time.perf_counter() - began
    )


def prune_channels(
    unet: UNet2DModel, masks: ChannelMasks, *, fraction: float
) -> tuple[UNet2DModel, int]:
    """A copy of ``unet`` with the ``fraction`` of channels of lowest mask pruned (their
    convolution weights set to zero; biases kept, as ANP's ``m = 0``). Returns ``(pruned
    copy, channels pruned)``."""
    if not (isinstance(fraction, (int, float)) and 0 <= fraction < 1) or math.isnan(
        fraction
    ):
        raise ValueError(
            f"fraction must be in [0, 1) (the share of channels to prune), got fraction={fraction!r}"
        )
    pruned = copy.deepcopy(unet).eval()
    convolutions = _prunable_convolutions(pruned)
    if set(convolutions) != set(masks.masks):
        raise ValueError(
            "masks were learnt on a model with other convolutions than this one"
        )
    count = int(round(fraction * masks.num_channels))
    if count == 0:
        return pruned, 0
    cutoff = masks.flat().sort().values[count - 1]
    pruned_so_far = 0
    with torch.no_grad():
        for name, conv in convolutions.items():
            chosen = masks.masks[name] <= cutoff
            # ties: stop at count
            chosen &= torch.cumsum(chosen.int(), 0) <= count - pruned_so_far
            conv.weight[chosen.to(conv.weight.device)] = 0
            pruned_so_far += int(chosen.sum())
    return pruned, pruned_so_far
