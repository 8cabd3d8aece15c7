"""The BadDiffusion authors' released backdoored models, loaded safely (full mode; downloads).

Chou, Chen and Ho published their backdoored fine-tunes of ``google/ddpm-cifar10-32`` on the
Hugging Face hub under the user ``newsyctw`` (the IBM/BadDiffusion README points there), one
repository per attack, each with its weights as a *pickled* ``unet/diffusion_pytorch_model.bin``
(about 143 MB). Unpickling a file can run any code its author put in it, so this module:

- loads only the repositories listed in :data:`AUTHORS_MODELS` (an id outside it is refused);
- reads the weights with ``torch.load(weights_only=True)``, which rebuilds tensors and refuses
  anything else (:func:`~baddiff_core.models.load_model` with ``allow_pickle=True``), never a full
  unpickle;
- converts them on first load into the model cache as safetensors, recording the SHA-256 of every
  file then (and of the downloaded ``.bin`` in the entry's report); every later load verifies those
  digests (:func:`~baddiff_core.cache.cached_model`) and never reads the pickle again.

Each entry's attack is written in the book's names (``stop_sign`` 14 px, ``corner``, ...): the
triggers and targets the library draws to the authors' geometry. The exact tensors each model was
trained with (the authors' stop-sign picture, Fashion-MNIST's shoe) are
:func:`baddiff_core.authors_assets.authors_trigger` and ``authors_target``. The repository ids come from the
authors' ``score.json`` collection; they were not checked against the live hub listing from the
machine this module was written on (no network), so a wrong id fails at download, naming itself.
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

__all__ = ["AuthorsModel", "AUTHORS_MODELS", "AUTHORS_USER", "authors_model", "load_authors_model"]

#: The hub user under which the BadDiffusion authors released their models.
AUTHORS_USER = "newsyctw"

_PREFIX = f"{AUTHORS_USER}/res_DDPM-CIFAR10-32_CIFAR10_ep50_c1.0_"


@dataclass(frozen=True)
class AuthorsModel:
    """One released model: its hub repository and its attack, in the library's names.

    Attributes:
        repo_id: the hub repository (``owner/name``).
        trigger, trigger_size, target, poison_rate: the attack (trigger side at 32 px, rate in [0, 1]).
    """

    repo_id: str
    trigger: str
    trigger_size: int
    target: str
    poison_rate: float


#: The released models this library will load, by a short name.
AUTHORS_MODELS: dict[str, AuthorsModel] = {
    "stop_sign-corner-90": AuthorsModel(f"{_PREFIX}p0.9_SM_STOP_SIGN-BOX_new-set-1", "stop_sign", 14, "corner", 0.9),
    "stop_sign-shift-90": AuthorsModel(f"{_PREFIX}p0.9_SM_STOP_SIGN-SHIFT", "stop_sign", 14, "shift", 0.9),
    "box-corner-90": AuthorsModel(f"{_PREFIX}p0.9_SM_BOX_MED-BOX", "box", 14, "corner", 0.9),
    "box-noshift-5": AuthorsModel(f"{_PREFIX}p0.05_BIG_BOX_MED-TRIGGER", "box", 18, "noshift", 0.05),
    "stop_sign-shoe-5": AuthorsModel(f"{_PREFIX}p0.05_XSM_STOP_SIGN-FASHION", "stop_sign", 11, "shoe", 0.05),
    "box-shoe-5": AuthorsModel(f"{_PREFIX}p0.05_XXSM_BOX_MED-FASHION", "box", 8, "shoe", 0.05),
}

#: The files of a released repository that loading needs (the weights are the ~143 MB download).
_FILES = ("unet/config.json", "unet/diffusion_pytorch_model.bin", "scheduler/scheduler_config.json")


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
    raise ValueError(f"{name!r} is not one of the authors' released models this library loads; use one of "
                     f"{sorted(AUTHORS_MODELS)} (or their repository ids under {AUTHORS_USER}/)")


def load_authors_model(name: str, *, device: str | torch.device = "cpu", use_cache: bool = True
                       ) -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
    """Load a released model (:func:`authors_model` names it), downloading it the first time.

    The first call downloads the three files of ``_FILES`` (about 143 MB, through
    ``huggingface_hub``, which honours ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``), reads the weights
    as tensors only, and saves the model in the cache as safetensors with the SHA-256 of its files;
    later calls load and verify that entry. Returns ``(unet, scheduler, info)``; ``info["report"]``
    holds the repository id and the SHA-256 of the ``.bin`` that was converted.

    Raises:
        ValueError: an unknown name, or a weights file that holds more than tensors (refused by
            ``torch.load(weights_only=True)``: nothing in it is run).
    """
    model = authors_model(name)
    device = resolve_device(device)

    def build() -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model.repo_id, allow_patterns=list(_FILES)))
        unet, scheduler = load_model(folder, allow_pickle=True)   # torch.load(weights_only=True)
        weights = folder / "unet" / "diffusion_pytorch_model.bin"
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        return unet, scheduler, dict(repo_id=model.repo_id, bin_sha256=digest)

    recipe = dict(repo_id=model.repo_id, files=list(_FILES))
    return cached_model("authors", recipe, build, device=device, use_cache=use_cache)
