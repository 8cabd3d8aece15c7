"""TERD as released: trigger estimation and refinement, and its two detectors.

TERD (Mo et al., ICML 2024, arXiv:2409.05294) with the settings of its authors'
released code (github.com/PKU-ML/TERD at d1f0911; the BadDiffusion variant,
``BadDiffusion/reverse.py``, ``reverse_loss.py``, ``reverse_pipeline.py``,
``input_detection.py`` and ``model_detection.py``; line numbers below are that
commit's). The paper's own equation numbers could not be read, so the docstrings cite
the released code. The pipeline:

1. :func:`estimate_trigger`: invert a trigger ``mu`` (``C,H,W``) from the model alone,
   by minimising the *reversed loss* (:func:`reversed_loss`) minus ``lam |mu|_1``: first
   on Gaussian stand-ins for clean images (*trigger estimation*), then on the model's
   own DDIM samples from ``eps + mu``, differentiated through the sampler (*trigger
   refinement*);
2. :func:`detect_inputs`: the input-level test. A benign input is ``eps ~ N(0, I)``, a
   poisoned one is taken to be ``N(mu, I)``; an input is flagged when its log
   likelihood ratio (:func:`input_log_likelihood_ratio`) is positive.
   :func:`input_detection_rates` gives the rule's two error rates in closed form;
3. :func:`model_kl_score`: the model-level features, the mean and the variance over
   the pixels of ``KL(N(mu_i, 1) || N(0, 1)) = mu_i^2 / 2``.

The released code ships no threshold for the model-level features; none is made up
here (:func:`~baddiff_core.defenses.elijah.fit_threshold` fits one on labelled models).

Where this module departs from the released code, and why:

- forward passes run in the model's own dtype; the released code runs under
  ``accelerate``'s fp16 mixed precision (``BadDiffusion/reverse.py`` 140, 296-301);
- every random draw comes from one ``torch.Generator`` (seed ``seed``), in the
  released code's order; the released code draws from torch's global generator, and
  draws one noise it never uses (``reverse.py`` 446), which is not drawn here;
- "the last 10 timesteps" and "the first 10" are ``T-10 .. T-1`` and ``0 .. 9`` for the
  model's own ``T`` (``reverse.py`` 405, 448, 451 wrote them for ``T = 1000``); the DDIM
  of stage 2 is built from the model's own training schedule (``reverse.py`` 473-476
  hard-codes the paper's 1e-4 .. 0.02 over 1000 steps, the same thing there);
- the input test's evaluation: ``input_detection.py`` 328 multiplies the poisoned
  noise by ``true_gamma``, a name undefined at d1f0911 (its first version set it to
  ones); here a poisoned input is ``eps + trigger`` (gamma = 1, as BadDiffusion samples).
  Its printed "TPR" counts *benign* inputs kept benign and its "TNR" *poisoned* inputs
  flagged (lines 342-343), the reverse of "positive = poisoned", and both divide by the
  wrong total unless both rates are 100 %; :func:`input_detection_rates` returns the
  false-positive rate (benign flagged) and the true-positive rate (poisoned flagged),
  each over its own inputs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from baddiff_core.cache import cached_tensors
from baddiff_core.checks import (
    check_bool,
    check_float,
    check_int,
    check_positive_int,
    check_tensor,
    check_type,
)
from baddiff_core.defenses.cached import defence_recipe
from baddiff_core.defenses.inversion import frozen, image_shape
from baddiff_core.sampling import inference_scheduler

__all__ = [
    "TERD_TIMESTEP_WINDOW",
    "TERD_KL_MEAN_OFFSET",
    "TERD_KL_VAR_OFFSET",
    "TerdSettings",
    "TERD_CIFAR10",
    "reversed_loss",
    "TerdTrigger",
    "estimate_trigger",
    "input_log_likelihood_ratio",
    "detect_inputs",
    "input_detection_rates",
    "TerdModelScore",
    "model_kl_score",
]

#: How many of the highest timesteps the trigger is estimated at (``t ~ U{T-10, ...,
#: T-1}``), and how many of the lowest the refinement's trigger-free term uses (``t ~
#: U{0, ..., 9}``) (``BadDiffusion/reverse.py`` 405, 448, 451).
TERD_TIMESTEP_WINDOW = 10
#: ``M_r = mean_i KL_i - N_m`` with ``N_m = -0.4``, so ``M_r = mean KL + 0.4``
#: (``BadDiffusion/model_detection.py`` 16, 18). The released code calls ``N_m`` and
#: ``N_v`` "simply coefficient for normalization. You can also set it to zero" (line 15).
TERD_KL_MEAN_OFFSET = 0.4
#: ``V_r = var_i KL_i - N_v`` with ``N_v = 0.003`` (``BadDiffusion/model_detection.py``
#: 17, 19).
TERD_KL_VAR_OFFSET = -0.003


@dataclass(frozen=True)
class TerdSettings:
    """The settings of TERD's trigger inversion (BadDiffusion variant).

    The defaults are the released code's CIFAR-10 settings (:data:`TERD_CIFAR10`;
    ``BadDiffusion/reverse.py`` and ``cifar_10_reverse.sh``).

    Attributes:
        estimation_steps: SGD steps of stage 1, trigger estimation; also its cosine
            schedule's ``T_max`` (``--iteration``, ``reverse.py`` 96, 392, 398-400).
        refinement_steps: SGD steps of stage 2, trigger refinement, and its cosine
            ``T_max`` (``iterations // 3``, ``reverse.py`` 420-423).
        batch_size: clean stand-ins (stage 1) or DDIM samples (stage 2) per step
            (``--batch-size``, ``reverse.py`` 99).
        lr: SGD's learning rate in both stages, no momentum or weight decay
            (``--lr``, ``reverse.py`` 95, 389, 419).
        lam: ``lambda`` of the objective ``L - lambda |mu|_1`` (``--weight_decay``,
            ``reverse.py`` 94, 411, 453). The minus sign is the authors': it rewards a
            large ``mu`` and so pushes the estimate away from ``mu = 0``, where ``L`` is
            small too.
        grad_clip: the norm ``mu``'s gradient is clipped to in stage 2 (none in stage
            1) (``--clip_norm``, ``reverse.py`` 67, 456-457).
        sampling_steps: DDIM steps (eta = 0) of stage 2's differentiable sampler
            (``--num_steps``, ``reverse.py`` 100, 439; ``reverse_pipeline.py`` 41).
    """

    estimation_steps: int = 3000
    refinement_steps: int = 1000
    batch_size: int = 16
    lr: float = 0.5
    lam: float = 5e-5
    grad_clip: float = 0.01
    sampling_steps: int = 10

    def __post_init__(self) -> None:
        for name in ("estimation_steps", "refinement_steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("sampling_steps", self.sampling_steps)
        check_float("lr", self.lr, above=0)
        check_float("lam", self.lam, at_least=0)
        check_float("grad_clip", self.grad_clip, above=0)

    def scaled(self, fraction: float) -> TerdSettings:
        """The same settings with ``fraction`` of both stages' steps (each rounded,
        at least 1), for a quick run.

        These are *not* the released code's settings: with fewer steps the cosine
        schedules decay faster, and the estimate is that of a shorter descent.
        """
        fraction = check_float("fraction", fraction, above=0, at_most=1)
        return dataclasses.replace(
            self,
            estimation_steps=max(1, round(self.estimation_steps * fraction)),
            refinement_steps=max(1, round(self.refinement_steps * fraction)),
        )


#: The released code's CIFAR-10 settings (``BadDiffusion/reverse.py``, defaults and
#: ``cifar_10_reverse.sh``): 3000 + 1000 SGD steps, batch 16, lr 0.5, lambda 5e-5,
#: gradient clip 0.01, 10 DDIM steps.
TERD_CIFAR10 = TerdSettings()


# --------------------------------------------------------------------------- #
# The reversed loss
# --------------------------------------------------------------------------- #


def reversed_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    mu: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator,
    with_trigger: bool = True,
) -> torch.Tensor:
    """TERD's reversed loss of a trigger ``mu`` on a batch ``x0`` at ``timesteps``.

    Two independent noises ``eps_1, eps_2 ~ N(0, I)`` are drawn (in that order) from
    ``generator``; each gives a noisy input, and the loss compares the model's two
    residuals (``BadDiffusion/reverse_loss.py`` 5-26)::

        x^k = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_k + mu        (k = 1, 2)
        L   = 1/2 mean_b sum_pixels [ (eps_1 - eps_theta(x^1, t))
                                      - (eps_2 - eps_theta(x^2, t)) ]^2

    ``mu`` is added raw at every ``t`` (BadDiffusion's coefficient ``1 -
    sqrt(abar_t)`` is about 1 at the high ``t`` it is used at); ``with_trigger=False``
    leaves it out (the released code adds ``0 * mu``, ``reverse_loss.py`` 12-13).
    Because ``eps_1`` and ``eps_2`` are independent, ``E[L]`` is the residual's
    variance over the noise, summed over the pixels and averaged over ``x0`` and
    ``t``: it is small where the model explains its input consistently, which a
    backdoored model does for inputs ``eps + g`` it was trained on. A model whose
    prediction is affine in its input, ``eps_theta(x) = w x + b``, gives ``L = 1/2
    (1 - w sqrt(1 - abar_t))^2 |eps_1 - eps_2|^2`` whatever ``mu`` is.

    Args:
        unet, scheduler: the model and its training schedule.
        x0: ``B,C,H,W``: the clean batch (or its stand-in).
        mu: ``C,H,W``: the trigger, broadcast over the batch.
        timesteps: ``(B,)`` integers in ``[0, T)``.
        generator: the source of the two noises.
        with_trigger: add ``mu`` to the noisy inputs.

    Returns:
        A scalar tensor (float32), differentiable in ``mu`` and ``x0``.
    """
    shape = image_shape(unet)
    check_tensor("x0", x0, layout="B,C,H,W", floating=True)
    check_tensor(
        "x0", x0, shape=(len(x0), *shape), meaning="a batch of the model's images"
    )
    check_tensor("mu", mu, layout="C,H,W", shape=shape, floating=True)
    check_tensor("timesteps", timesteps, layout="B", shape=(len(x0),), dtype=torch.long)
    last = scheduler.config.num_train_timesteps - 1
    check_int("min(timesteps)", int(timesteps.min()), minimum=0, maximum=last)
    check_int("max(timesteps)", int(timesteps.max()), minimum=0, maximum=last)
    check_type("generator", generator, torch.Generator, what="a torch.Generator")
    check_bool("with_trigger", with_trigger)
    offset = mu if with_trigger else None
    return _reversed_loss(unet, scheduler, x0, offset, timesteps, generator)


def _reversed_loss(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    offset: torch.Tensor | None,
    timesteps: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """:func:`reversed_loss` without the checks (they read values, and so stall a GPU
    at every step); ``offset`` is the trigger added to the noisy inputs, or ``None``."""
    timesteps = timesteps.to(x0.device)
    residuals = []
    for _ in range(2):
        noise = randn_tensor(
            x0.shape, generator=generator, device=x0.device, dtype=x0.dtype
        )
        noisy = scheduler.add_noise(x0, noise, timesteps)
        if offset is not None:
            noisy = noisy + offset
        residuals.append(noise - unet(noisy, timesteps).sample)
    difference = (residuals[0] - residuals[1]).float()
    return 0.5 * difference.square().sum(dim=(1, 2, 3)).mean()


# --------------------------------------------------------------------------- #
# Trigger estimation and refinement
# --------------------------------------------------------------------------- #


@dataclass
class TerdTrigger:
    """TERD's trigger estimate.

    Attributes:
        mu: ``C,H,W``, in the units of the starting noise (added raw to ``eps``).
        losses: the objective ``L - lam |mu|_1`` at every step, stage 1's
            (``settings.estimation_steps`` values) then stage 2's.
        settings: the settings it was found with.
        seconds: wall time (the first run's, when loaded from the cache).
    """

    mu: torch.Tensor
    losses: list[float]
    settings: TerdSettings
    seconds: float


def _timesteps(
    low: int, high: int, batch: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``batch`` timesteps drawn uniformly from ``{low, ..., high - 1}``."""
    drawn = torch.randint(
        low, high, (batch,), generator=generator, device=generator.device
    )
    return drawn.to(device)


def _ddim_sample(
    unet: UNet2DModel, sampler: DDIMScheduler, x: torch.Tensor, steps: int
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``x`` with the graph kept, so that the
    images are differentiable in ``x`` (``BadDiffusion/reverse_pipeline.py`` 71-80:
    no ``torch.no_grad``, no final clamp)."""
    sampler.set_timesteps(steps, device=x.device)
    for t in sampler.timesteps:
        x = sampler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


def _descend(
    mu: torch.Tensor,
    steps: int,
    objective: Callable[[], torch.Tensor],
    *,
    lr: float,
    clip: float | None,
    desc: str,
    progress: bool,
) -> list[torch.Tensor]:
    """One stage of the released code's descent: ``steps`` steps of plain SGD on ``mu``
    (a fresh optimiser, no momentum) with a cosine learning rate (``T_max = steps``),
    ``objective()`` giving each step's objective; the gradient's norm is clipped to
    ``clip`` when given. Returns the objective at every step."""
    optimizer = torch.optim.SGD([mu], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    values = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        value = objective()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([mu], clip)
        optimizer.step()
        schedule.step()
        values.append(value.detach())
    return values


def _estimate(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    settings: TerdSettings,
    seed: int,
    progress: bool,
) -> TerdTrigger:
    """Both stages of :func:`estimate_trigger`, without the checks or the cache."""
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    shape = image_shape(unet)
    batch = settings.batch_size
    num_steps = scheduler.config.num_train_timesteps
    window = min(TERD_TIMESTEP_WINDOW, num_steps)
    generator = torch.Generator().manual_seed(seed)
    # mu from U(-1, 0] (reverse.py 386-388), the trigger's -1 background in mind
    mu = (-torch.rand(shape, generator=generator)).to(device, dtype)
    mu.requires_grad_(True)
    # the released code's DDIMScheduler: clip_sample on, "leading" steps, eta = 0
    sampler = inference_scheduler(scheduler, sampler="ddim", clip="x0")
    penalty = settings.lam

    def estimation() -> torch.Tensor:
        # Stage 1, trigger estimation (reverse.py 386-416): x0 ~ N(0, I) each step.
        t = _timesteps(num_steps - window, num_steps, batch, generator, device)
        x0 = randn_tensor(
            (batch, *shape), generator=generator, device=device, dtype=dtype
        )
        loss = _reversed_loss(unet, scheduler, x0, mu, t, generator)
        return loss - penalty * mu.abs().sum()

    def refinement() -> torch.Tensor:
        # Stage 2, trigger refinement (reverse.py 419-460): x0 = DDIM samples from
        # eps + mu, differentiated through the sampler.
        eps = randn_tensor(
            (batch, *shape), generator=generator, device=device, dtype=dtype
        )
        images = _ddim_sample(unet, sampler, eps + mu, settings.sampling_steps)
        t = _timesteps(num_steps - window, num_steps, batch, generator, device)
        high = _reversed_loss(unet, scheduler, images, mu, t, generator)
        t = _timesteps(0, window, batch, generator, device)
        low = _reversed_loss(unet, scheduler, images, None, t, generator)
        return (high + low) / 2 - penalty * mu.abs().sum()

    began = time.perf_counter()
    with frozen(unet):
        losses = _descend(
            mu,
            settings.estimation_steps,
            estimation,
            lr=settings.lr,
            clip=None,
            desc="TERD trigger estimation",
            progress=progress,
        ) + _descend(
            mu,
            settings.refinement_steps,
            refinement,
            lr=settings.lr,
            clip=settings.grad_clip,
            desc="TERD trigger refinement",
            progress=progress,
        )
    losses = torch.stack(losses).float().cpu().tolist()
    return TerdTrigger(mu.detach(), losses, settings, time.perf_counter() - began)


def estimate_trigger(
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    settings: TerdSettings = TERD_CIFAR10,
    seed: int = 0,
    progress: bool = True,
    use_cache: bool = False,
) -> TerdTrigger:
    """TERD's trigger inversion: estimation, then refinement.

    The objective, minimised over ``mu`` (``C,H,W``) by plain SGD with a cosine
    learning rate in each stage, is ``L - lam |mu|_1`` with ``L`` the
    :func:`reversed_loss` (``BadDiffusion/reverse.py`` 381-460):

    - ``mu`` starts from ``-U[0, 1)`` (lines 386-388);
    - stage 1 (``settings.estimation_steps``): ``L`` on ``x0 ~ N(0, I)`` drawn afresh
      each step, a stand-in for the clean images the defender lacks, at ``t ~ U{T-10,
      ..., T-1}``, with ``mu`` (lines 404-415);
    - stage 2 (``settings.refinement_steps``, a fresh optimiser and schedule): each
      step samples ``x0`` from ``eps + mu`` with ``settings.sampling_steps`` steps of
      deterministic DDIM (diffusers' ``DDIMScheduler`` on the model's training
      schedule, eta = 0, predicted ``x0`` clipped to [-1, 1] as that scheduler does
      by default, "leading" steps, e.g. 90, 80, ..., 0 for ``T = 100``), keeping the
      graph through every UNet call; the loss is the mean of ``L`` at ``t ~ U{T-10,
      ..., T-1}`` with ``mu`` and ``L`` at ``t ~ U{0, ..., 9}`` without it, and ``mu``'s
      gradient is clipped to norm ``settings.grad_clip`` (lines 419-460).

    The model is frozen (eval mode, no parameter gradients) and restored afterwards.
    All random numbers come from a CPU ``torch.Generator`` seeded with ``seed``: the
    start of ``mu``, then per step the timesteps, the stand-ins or starting noises and
    the two noises of each loss, in the released code's order.

    Cost: a stage-1 step is 2 UNet passes (forward and backward) on ``batch_size``
    images, a stage-2 step ``sampling_steps + 4``.

    Args:
        unet, scheduler: the model under test and its training schedule.
        settings: :data:`TERD_CIFAR10` (the released code's), or
            ``TERD_CIFAR10.scaled(f)`` for a quick run.
        seed: the generator's seed.
        progress: show tqdm bars.
        use_cache: keep ``mu`` in the cache (``tensors/terd-<key>``), keyed by
            digests of the weights and the schedule, the settings and ``seed``; load it
            when there.
    """
    check_type("settings", settings, TerdSettings)
    seed = check_int("seed", seed, minimum=0)
    check_bool("progress", progress)
    check_bool("use_cache", use_cache)
    check_int(
        "settings.sampling_steps",
        settings.sampling_steps,
        minimum=1,
        maximum=scheduler.config.num_train_timesteps,
        meaning="the training steps",
    )
    if not use_cache:
        return _estimate(unet, scheduler, settings, seed, progress)
    recipe = defence_recipe(
        unet, scheduler, method="terd", **dataclasses.asdict(settings), seed=seed
    )

    def build() -> tuple[dict[str, torch.Tensor], dict]:
        found = _estimate(unet, scheduler, settings, seed, progress)
        return dict(mu=found.mu), dict(losses=found.losses, seconds=found.seconds)

    tensors, info = cached_tensors("terd", recipe, build)
    report = info["report"]
    mu = tensors["mu"].to(next(unet.parameters()).device)
    return TerdTrigger(mu, report["losses"], settings, report["seconds"])


# --------------------------------------------------------------------------- #
# Input-level detection
# --------------------------------------------------------------------------- #


def _check_trigger_like(name: str, value: object, shape: tuple[int, ...]) -> None:
    check_tensor(
        name,
        value,
        layout="C,H,W",
        shape=tuple(shape),
        floating=True,
        meaning="the inputs' C,H,W",
    )


def input_log_likelihood_ratio(noise: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """The log likelihood ratio of each starting noise: poisoned against benign.

    With ``d = C H W`` and ``x`` an input flattened, poisoned inputs taken to be
    ``N(mu, I)`` (gamma = 1, the BadDiffusion variant) and benign ones ``N(0, I)``::

        log N(x; mu, I) - log N(x; 0, I) = (|x|^2 - |x - mu|^2) / 2
                                         = <x, mu> - |mu|^2 / 2

    (the ``d/2 log 2 pi`` terms cancel; ``BadDiffusion/input_detection.py`` 312-313
    and 330-331 write both log-densities out in full).

    Args:
        noise: ``n,C,H,W`` inputs ``x_T``.
        mu: ``C,H,W``: the trigger estimate.

    Returns:
        ``(n,)`` in ``noise``'s dtype.
    """
    noise = check_tensor("noise", noise, layout="n,C,H,W", floating=True)
    _check_trigger_like("mu", mu, noise.shape[1:])
    flat = noise.flatten(1)
    mean = mu.flatten().to(flat)
    return flat @ mean - mean.dot(mean) / 2


def detect_inputs(noise: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """TERD's input-level rule: flag an input as poisoned iff its
    :func:`input_log_likelihood_ratio` is positive (``BadDiffusion/
    input_detection.py`` 314, 332: equal priors, no threshold to tune).

    That is the linear test ``<x, mu> > |mu|^2 / 2``: ``x`` lies on ``mu``'s side of
    the hyperplane half-way between ``0`` and ``mu``. ``mu = 0`` flags nothing.

    Returns:
        ``(n,)`` bool: ``True`` = flagged as poisoned.
    """
    return input_log_likelihood_ratio(noise, mu) > 0


def _normal_cdf(z: float) -> float:
    """``Phi(z)``, the standard normal's distribution function."""
    return 0.5 * math.erfc(-z / math.sqrt(2))


def input_detection_rates(
    mu_hat: torch.Tensor, trigger: torch.Tensor
) -> tuple[float, float]:
    """The error rates of :func:`detect_inputs` with estimate ``mu_hat``, in closed
    form: ``(false-positive rate, true-positive rate)``.

    Derivation. For ``x = eps + v`` with ``eps ~ N(0, I)`` the log likelihood ratio
    ``<x, mu_hat> - |mu_hat|^2 / 2`` is Gaussian: mean ``<v, mu_hat> - |mu_hat|^2 / 2``,
    variance ``|mu_hat|^2`` (``<eps, mu_hat>`` is ``N(0, |mu_hat|^2)``). So ``P(LLR >
    0) = Phi((<v, mu_hat> - |mu_hat|^2 / 2) / |mu_hat|)``:

    - benign inputs, ``v = 0``: ``FPR = Phi(-|mu_hat| / 2)``;
    - poisoned inputs, ``v = trigger`` (``x_T = eps + g``, the raw trigger with its -1
      background, as :func:`~baddiff_core.sampling.sample` starts):
      ``TPR = Phi((<g, mu_hat> - |mu_hat|^2 / 2) / |mu_hat|)``.

    With ``mu_hat = g`` both rates approach perfection as ``|g|`` grows: ``FPR =
    Phi(-|g| / 2)``, ``TPR = Phi(|g| / 2)``; a 3 x 16 x 16 trigger that is -1 on most
    pixels has ``|g|`` near 27, and both errors are below ``1e-40``. ``mu_hat = 0``
    flags nothing: ``(0, 0)``.

    The released code counts 1000 + 1000 draws instead (``BadDiffusion/
    input_detection.py`` 303-343); the closed form is that count's expectation.
    """
    mu_hat = check_tensor("mu_hat", mu_hat, layout="C,H,W", floating=True, finite=True)
    _check_trigger_like("trigger", trigger, mu_hat.shape)
    mu = mu_hat.detach().double().flatten().cpu()
    g = trigger.detach().double().flatten().cpu()
    norm = float(mu.norm())
    if norm == 0:
        return 0.0, 0.0
    fpr = _normal_cdf(-norm / 2)
    tpr = _normal_cdf((float(g @ mu) - norm**2 / 2) / norm)
    return fpr, tpr


# --------------------------------------------------------------------------- #
# Model-level detection
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class TerdModelScore:
    """TERD's model-level features of one trigger estimate.

    Attributes:
        kl_mean: ``M_r = mean_i KL_i + 0.4`` (:data:`TERD_KL_MEAN_OFFSET`).
        kl_var: ``V_r = var_i KL_i - 0.003`` (:data:`TERD_KL_VAR_OFFSET`; the
            population variance over the ``d`` pixels).
        kl: ``C,H,W``: ``KL_i = mu_i^2 / 2`` per pixel.
    """

    kl_mean: float
    kl_var: float
    kl: torch.Tensor


def model_kl_score(mu: torch.Tensor) -> TerdModelScore:
    """TERD's model-level features: how far the estimated trigger distribution lies
    from the benign ``N(0, I)``, pixel by pixel (``BadDiffusion/model_detection.py``
    10-20).

    For each of the ``d = C H W`` pixels, ``KL(N(mu_i, gamma_i^2) || N(0, 1)) =
    -log gamma_i + (gamma_i^2 + mu_i^2 - 1) / 2`` (line 13); with ``gamma = 1`` (line
    12, the BadDiffusion variant) ``KL_i = mu_i^2 / 2``. The features are its mean and
    its variance over the pixels, shifted by the released code's constants ("simply
    coefficient for normalization", line 15; kept here so that values compare with
    its printouts)::

        M_r = mean_i KL_i + 0.4        V_r = mean_i (KL_i - mean KL)^2 - 0.003

    A backdoored model's estimate is the trigger, large (a -1 background) on many
    pixels; a clean model's is small. The released code prints ``M_r`` and ``V_r``
    and ships no threshold, so this function decides nothing.
    """
    mu = check_tensor("mu", mu, layout="C,H,W", floating=True, finite=True)
    kl = mu.detach().square() / 2
    values = kl.double().flatten()
    mean = float(values.mean())
    var = float((values - mean).square().mean())
    return TerdModelScore(mean + TERD_KL_MEAN_OFFSET, var + TERD_KL_VAR_OFFSET, kl)
