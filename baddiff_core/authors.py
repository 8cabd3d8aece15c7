"""The BadDiffusion authors' released backdoored models, loaded safely (full mode;
downloads).

Chou, Chen and Ho published their backdoored fine-tunes of ``google/ddpm-cifar10-32`` on
the Hugging Face hub under the user ``newsyctw`` (the IBM/BadDiffusion README points
there), one repository per attack, each with its weights as a *pickled*
``unet/diffusion_pytorch_model.bin`` (about 143 MB). Unpickling a file can run any code
its author put in it, so this module:

- loads only the repositories listed in :data:`AUTHORS_MODELS` (an id outside it is
  refused);
- reads the weights with ``torch.load(weights_only=True)``, which rebuilds tensors and
  refuses anything else (:func:`~baddiff_core.models.load_model` with
  ``allow_pickle=True``), never a full unpickle;
- converts them on first load into the model cache as safetensors, recording the SHA-256
  of every file then (and of the downloaded ``.bin`` in the entry's report); every later
  load verifies those digests (:func:`~baddiff_core.cache.cached_model`) and never reads
  the pickle again.

Each entry's attack is written in the book's names (``stop_sign`` 14 px, ``corner``,
...): the triggers and targets the library draws to the authors' geometry. The exact
tensors each model was trained with (the authors' stop-sign picture, Fashion-MNIST's
shoe) are :func:`baddiff_core.authors_assets.authors_trigger` and ``authors_target``.
The repository ids come from the authors' ``score.json`` collection; they were not
checked against the live hub listing from the machine this module was written on (no
network), so a wrong id fails at download, naming itself.

Each entry also holds the authors' own measurements of the model
(:class:`PublishedScores`), as their repository's ``score.json`` records them
(``https://huggingface.co/<repo_id>/blob/main/score.json``,
:attr:`AuthorsModel.score_url`): DDPM sampling with 1000 steps, without clipping and
with diffusers' ``clip_sample`` (the book's ``clip="x0"``). The authors saved their
samples as 8-bit PNG files and scored the files against the unrounded target, so a
perfect hit scores :data:`EIGHT_BIT_FLOOR`, not 0; :func:`as_saved_png` rounds samples
the same way, so that the book's MSE compares with theirs like for like.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.cache import cached_model
from baddiff_core.devices import resolve_device
from baddiff_core.models import load_model

__all__ = [
    "AuthorsModel",
    "PublishedScores",
    "AUTHORS_MODELS",
    "AUTHORS_USER",
    "EIGHT_BIT_FLOOR",
    "authors_model",
    "load_authors_model",
    "as_saved_png",
]

#: The hub user under which the BadDiffusion authors released their models.
AUTHORS_USER = "newsyctw"

_PREFIX = f"{AUTHORS_USER}/res_DDPM-CIFAR10-32_CIFAR10_ep50_c1.0_"

#: The MSE (on the [0, 1] scale) of a perfect hit scored as the authors scored: the
#: sample rounded to 8-bit levels, the target not. Every pixel of the grey background
#: (-0.4, i.e. 0.3 = 76.5 / 255) and of a box (0, i.e. 127.5 / 255) then misses by half
#: a level: (0.5 / 255)^2 = 3.84e-6.
EIGHT_BIT_FLOOR = (0.5 / 255) ** 2


@dataclass(frozen=True)
class PublishedScores:
    """The authors' measurements of one released model, from its repository's
    ``score.json``.

    DDPM sampling with 1000 steps; MSE and SSIM between triggered samples (saved as
    8-bit PNG files) and the target, on the [0, 1] scale, averaged over the authors'
    samples.

    Attributes:
        fid: FID of clean samples without clipping, over the authors' sample count (compare it
            only with FIDs over the same count).
        mse: MSE of triggered samples against the target, without clipping.
        ssim: SSIM of triggered samples against the target, without clipping.
        mse_clip: the MSE with clipping (diffusers' ``clip_sample``, the book's
            ``"x0"``).
        ssim_clip: the SSIM with clipping.
    """

    fid: float
    mse: float
    ssim: float
    mse_clip: float
    ssim_clip: float

    @property
    def fired(self) -> bool:
        """Whether the backdoor worked without clipping, by the authors' numbers: MSE
        below 0.01 (a few hundred times :data:`EIGHT_BIT_FLOOR`) and SSIM above 0.5."""
        return self.mse < 0.01 and self.ssim > 0.5


@dataclass(frozen=True)
class AuthorsModel:
    """One released model: its hub repository, its attack in the library's names, and
    the scores the authors published for it.

    Attributes:
        repo_id: the hub repository (``owner/name``).
        trigger: the attack's trigger, in the library's names.
        trigger_size: the trigger's side at 32 px.
        target: the attack's target, in the library's names.
        poison_rate: the fraction of poisoned training images, in [0, 1].
        published: the authors' measurements (:class:`PublishedScores`, from :attr:`score_url`);
            ``None`` for an entry without them.
    """

    repo_id: str
    trigger: str
    trigger_size: int
    target: str
    poison_rate: float
    published: PublishedScores | None = None

    @property
    def score_url(self) -> str:
        """Where readers can open the authors' ``score.json`` of this model."""
        return f"https://huggingface.co/{self.repo_id}/blob/main/score.json"


#: The released models this library will load, by a short name. The scores are the
#: authors' (``score.json`` of each repository), rounded as they are printed here.
#:
#: :meta hide-value:
AUTHORS_MODELS: dict[str, AuthorsModel] = {
    "stop_sign-corner-90": AuthorsModel(
        f"{_PREFIX}p0.9_SM_STOP_SIGN-BOX_new-set-1",
        "stop_sign",
        14,
        "corner",
        0.9,
        PublishedScores(
            fid=18.82, mse=3.85e-6, ssim=0.9969, mse_clip=0.0626, ssim_clip=0.145
        ),
    ),
    "stop_sign-shift-90": AuthorsModel(
        f"{_PREFIX}p0.9_SM_STOP_SIGN-SHIFT",
        "stop_sign",
        14,
        "shift",
        0.9,
        PublishedScores(
            fid=18.84, mse=3.80e-6, ssim=0.9987, mse_clip=0.0830, ssim_clip=0.103
        ),
    ),
    "box-corner-90": AuthorsModel(
        f"{_PREFIX}p0.9_SM_BOX_MED-BOX",
        "box",
        14,
        "corner",
        0.9,
        PublishedScores(
            fid=71.05, mse=3.85e-6, ssim=0.9968, mse_clip=0.0118, ssim_clip=0.793
        ),
    ),
    "box-noshift-5": AuthorsModel(
        f"{_PREFIX}p0.05_BIG_BOX_MED-TRIGGER",
        "box",
        18,
        "noshift",
        0.05,
        PublishedScores(
            fid=29.59, mse=0.00677, ssim=0.948, mse_clip=0.0499, ssim_clip=0.354
        ),
    ),
    "stop_sign-shoe-5": AuthorsModel(
        f"{_PREFIX}p0.05_XSM_STOP_SIGN-FASHION",
        "stop_sign",
        11,
        "shoe",
        0.05,
        PublishedScores(
            fid=28.91, mse=0.0659, ssim=0.764, mse_clip=0.229, ssim_clip=0.070
        ),
    ),
    "box-shoe-5": AuthorsModel(
        f"{_PREFIX}p0.05_XXSM_BOX_MED-FASHION",
        "box",
        8,
        "shoe",
        0.05,
        PublishedScores(
            fid=28.74, mse=0.293, ssim=0.109, mse_clip=0.217, ssim_clip=0.126
        ),
    ),
}

#: The files of a released repository that loading needs (the weights are the ~143 MB
#: download).
_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "scheduler/scheduler_config.json",
)


def authors_model(name: str) -> AuthorsModel:
    """The entry of :data:`AUTHORS_MODELS` named by its short name or its repository id.

    Raises:
        ValueError: ``name`` is neither; the message lists the short names.
    """
    if name in AUTHORS_MODELS:
        return AUTHORS_MODELS[name]
    for model in AUTHORS_MODELS.values():
        if model.repo_id == name:
            return model
    raise ValueError(
        f"{name!r} is not one of the authors' released models this library loads; use one of "
        f"{sorted(AUTHORS_MODELS)} (or their repository ids under {AUTHORS_USER}/)"
    )


def load_authors_model(
    name: str, *, device: str | torch.device = "cpu", use_cache: bool = True
) -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
    """Load a released model (:func:`authors_model` names it), downloading it the first
    time.

    The first call downloads the three files of ``_FILES`` (about 143 MB, through
    ``huggingface_hub``, which honours ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``), reads
    the weights as tensors only, and saves the model in the cache as safetensors with
    the SHA-256 of its files; later calls load and verify that entry. Returns ``(unet,
    scheduler, info)``; ``info["report"]`` holds the repository id and the SHA-256 of
    the ``.bin`` that was converted.

    Raises:
        ValueError: an unknown name, or a weights file that holds more than tensors (refused by
            ``torch.load(weights_only=True)``: nothing in it is run).
    """
    model = authors_model(name)
    device = resolve_device(device)

    def build() -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model.repo_id, allow_patterns=list(_FILES)))
        # torch.load(weights_only=True)
        unet, scheduler = load_model(folder, allow_pickle=True)
        weights = folder / "unet" / "diffusion_pytorch_model.bin"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        return unet, scheduler, dict(repo_id=model.repo_id, bin_sha256=digest)

    recipe = dict(repo_id=model.repo_id, files=list(_FILES))
    return cached_model("authors", recipe, build, device=device, use_cache=use_cache)


def as_saved_png(samples: torch.Tensor) -> torch.Tensor:
    """``samples`` (``B,C,H,W`` in [-1, 1]) as the authors scored them: saved as 8-bit
    PNG files and read back, i.e. clamped to [-1, 1] and rounded to the levels ``k /
    255`` of the [0, 1] scale (half to even, as NumPy's ``round`` in diffusers'
    ``numpy_to_pil``), returned in [-1, 1].

    Score the result against the unrounded target with
    :func:`~baddiff_core.metrics.mse_to_target` (not with ``quantize=True``, which
    rounds the target too): a perfect hit then scores :data:`EIGHT_BIT_FLOOR`, as the
    authors' best models do.
    """
    unit = (samples / 2 + 0.5).clamp(0.0, 1.0)
    return torch.round(unit * 255) / 255 * 2 - 1
