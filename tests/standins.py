"""Offline stand-ins for what full mode downloads, built by the tests themselves.

Full mode (``QUICK = False``) downloads two things: the pre-trained
``google/ddpm-cifar10-32`` from the Hugging Face hub and the CIFAR-10 training set. The
full-mode smoke test (``test_full_mode.py``) runs the library's real download code
against local copies laid out exactly as the real ones are found on disk, so that
nothing in the library has to know about them:

- a Hugging Face hub cache (``HF_HUB_CACHE``, used with ``HF_HUB_OFFLINE=1``) holding
  ``models--google--ddpm-cifar10-32`` in that repository's layout: ``config.json``,
  ``diffusion_pytorch_model.safetensors`` and ``scheduler_config.json`` at its root,
  plus ``model_index.json``. The UNet is of the same class and block layout as the real
  one, but narrow and randomly initialised (about 0.1 M parameters against 35.7 M), and
  its schedule has T = 10 instead of 1000, so that a DDPM chain is ten calls of a small
  network;
- CIFAR-10's binary version (``cifar-10-batches-bin/data_batch_{1..5}.bin``) under
  ``BADDIFF_DATA``, holding 32 x 32 colour crops of the two photographs scikit-learn
  ships.

Chapter 11 also downloads the BadDiffusion authors' released models;
``build_authors_repo`` writes one of their repositories into the same hub cache, in
their layout (a pickled ``.bin``). Their stop-sign picture and Fashion-MNIST have no
stand-in (they are checked against published digests), so at the smoke scale chapter 11
measures only the grey-box models, whose attacks are drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.book import SMOKE_SCHEDULE
from baddiff_core.data import load_sample_photo, write_cifar10_binary
from baddiff_core.models import PRETRAINED_CIFAR10, ddpm_cifar10_unet

#: A made-up commit id for the stand-in snapshot (the hub cache names snapshots by
#: commit).
STANDIN_COMMIT = "0" * 40


def narrow_cifar10_unet(seed: int = 0) -> UNet2DModel:
    """``google/ddpm-cifar10-32``'s class and block layout, made narrow (about 0.1 M
    parameters)."""
    real = dict(ddpm_cifar10_unet().config)
    real.update(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4
    )
    torch.manual_seed(seed)
    return UNet2DModel(
        **{key: value for key, value in real.items() if not key.startswith("_")}
    )


def build_hub_cache(hub_cache: Path, *, seed: int = 0) -> Path:
    """Write a stand-in of ``google/ddpm-cifar10-32`` into the hub cache folder
    ``hub_cache``.

    Returns the snapshot folder. Point ``HF_HUB_CACHE`` at ``hub_cache`` and set
    ``HF_HUB_OFFLINE=1`` (before ``huggingface_hub`` is imported) for
    ``from_pretrained`` to find it.
    """
    repo = hub_cache / f"models--{PRETRAINED_CIFAR10.replace('/', '--')}"
    snapshot = repo / "snapshots" / STANDIN_COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(STANDIN_COMMIT)

    narrow_cifar10_unet(seed).save_pretrained(snapshot, safe_serialization=True)
    DDPMScheduler(
        **SMOKE_SCHEDULE,
        beta_schedule="linear",
        clip_sample=True,
        variance_type="fixed_large",
    ).save_pretrained(snapshot)
    (snapshot / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            },
            indent=2,
        )
    )
    return snapshot


def build_cifar10(data_root: Path, *, per_batch: int = 16, seed: int = 0) -> Path:
    """Write a stand-in of CIFAR-10's binary training set (5 files of ``per_batch``
    images each), crops of scikit-learn's photographs, into
    ``data_root/cifar-10-batches-bin``."""
    rng = np.random.default_rng(seed)
    photos = [
        load_sample_photo(name, size=(107, 160)) for name in ("china.jpg", "flower.jpg")
    ]
    count = 5 * per_batch
    crops = []
    for index in range(count):
        photo = photos[index % 2]
        top, left = (
            rng.integers(0, photo.shape[0] - 32),
            rng.integers(0, photo.shape[1] - 32),
        )
        crops.append(photo[top : top + 32, left : left + 32])
    images = np.round(np.stack(crops) * 255).astype(np.uint8)  # N,32,32,3
    labels = np.arange(count) % 10
    return write_cifar10_binary(data_root / "cifar-10-batches-bin", images, labels)


#: How diffusers before 0.15 named the attention weights that it now calls to_q, to_k,
#: to_v, to_out.0.
OLD_ATTENTION_NAMES = {
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "to_out.0": "proj_attn",
}


def build_authors_repo(
    hub_cache: Path,
    repo_id: str,
    *,
    weights: bytes | None = None,
    old_names: bool = False,
    seed: int = 0,
) -> Path:
    """Write a stand-in of one of the BadDiffusion authors' released repositories into
    ``hub_cache``.

    Their layout: ``unet/config.json``, the weights as a pickled
    ``unet/diffusion_pytorch_model.bin`` (a state dict of plain tensors, as
    ``torch.save`` writes it) and ``scheduler/scheduler_config.json``. The UNet is
    narrow (``build_hub_cache``'s); ``weights`` replaces the ``.bin``'s bytes (a
    malicious pickle, in the test that it is refused); ``old_names`` writes the
    attention weights under their names before diffusers 0.15 (as releases of that time
    have them). Returns the snapshot folder.
    """
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / STANDIN_COMMIT
    (snapshot / "unet").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(STANDIN_COMMIT)
    unet = narrow_cifar10_unet(seed)
    unet.save_config(snapshot / "unet")
    if weights is None:
        state = unet.state_dict()
        if old_names:
            for new, old in OLD_ATTENTION_NAMES.items():
                state = {
                    key.replace(f".{new}.", f".{old}."): value
                    for key, value in state.items()
                }
        torch.save(state, snapshot / "unet" / "diffusion_pytorch_model.bin")
    else:
        (snapshot / "unet" / "diffusion_pytorch_model.bin").write_bytes(weights)
    DDPMScheduler(**SMOKE_SCHEDULE, beta_schedule="linear").save_pretrained(
        snapshot / "scheduler"
    )
    return snapshot
