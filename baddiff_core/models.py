"""Denoising networks: small ``UNet2DModel`` presets, and saving/loading in the
diffusers layout.

Introduced in chapter 2 (Denoising diffusion models). A saved model is a folder that a
stock ``diffusers.DDPMPipeline.from_pretrained(path)`` loads::

    model_index.json
    unet/config.json, unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json
    baddiff.json                      (optional: how the model was made, for people and the cache)

Weights are written and read as safetensors; a pickle file is loaded only on an explicit
opt-in, and then as tensors only (:func:`load_model`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors import SafetensorError

from baddiff_core.checks import check_channels
from baddiff_core.files import atomic_folder, folder_digests

__all__ = [
    "UNET_PRESETS",
    "make_unet",
    "ddpm_cifar10_unet",
    "count_parameters",
    "save_model",
    "load_model",
    "PICKLE_SUFFIXES",
    "PRETRAINED_CIFAR10",
]

#: How a model was made, for people and the model cache (written by :func:`save_model`).
METADATA_FILE = "baddiff.json"

#: The paper's clean pre-trained CIFAR-10 model on the Hugging Face hub (full mode;
#: downloads).
PRETRAINED_CIFAR10 = "google/ddpm-cifar10-32"

#: Block widths and attention placement of the small presets, by image size. Attention
#: sits at the coarsest resolution only, where it is cheap.
#:
#: :meta hide-value:
UNET_PRESETS: dict[int, dict[str, Any]] = {
    8: dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
    16: dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    32: dict(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=(
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
        ),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
}


def make_unet(
    image_size: int, channels: int, *, layers_per_block: int = 1, **overrides: Any
) -> UNet2DModel:
    """A small ``UNet2DModel`` for ``image_size`` in {8, 16, 32} (about 1 M parameters
    at 16 px).

    ``overrides`` replace any ``UNet2DModel`` argument of the preset (e.g.
    ``block_out_channels``). The weights are initialised by torch's global generator:
    seed it first for reproducibility.
    """
    if image_size not in UNET_PRESETS:
        raise ValueError(
            f"image_size={image_size!r} has no preset; use one of {sorted(UNET_PRESETS)} "
            "or build a diffusers UNet2DModel yourself"
        )
    channels = check_channels("channels", channels)
    config = dict(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers_per_block,
        norm_num_groups=8,
        attention_head_dim=None,
        **UNET_PRESETS[image_size],
    )
    config.update(overrides)
    return UNet2DModel(**config)


def ddpm_cifar10_unet() -> UNet2DModel:
    """The architecture of ``google/ddpm-cifar10-32`` (35.7 M parameters), randomly
    initialised.

    Used to measure speed without downloading the weights; full mode loads the trained
    weights with :func:`load_model` (``PRETRAINED_CIFAR10``).
    """
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=(
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_num_groups=32,
        dropout=0.1,
        resnet_time_scale_shift="default",
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_model(
    path: str | os.PathLike,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    *,
    metadata: dict[str, Any] | None = None,
    record_digests: bool = False,
) -> Path:
    """Save ``unet`` and ``scheduler`` to the folder ``path`` in the diffusers layout,
    atomically.

    Everything is first written to a temporary sibling folder, which then replaces
    ``path`` by a rename (:func:`~baddiff_core.files.atomic_folder`): an interrupted
    save leaves either the old model or the new one, never half of one. ``metadata``
    (JSON-serialisable) is stored in ``baddiff.json``; with ``record_digests`` it also
    holds, under ``"sha256"``, the digest of every other file
    (:func:`~baddiff_core.files.folder_digests`), so that a later reader can tell the
    folder is exactly as written (the model cache does).
    """
    with atomic_folder(path) as staging:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(
            staging, safe_serialization=True
        )
        if record_digests:
            metadata = dict(
                metadata or {}, sha256=folder_digests(staging, exclude=(METADATA_FILE,))
            )
        if metadata is not None:
            (staging / "baddiff.json").write_text(
                json.dumps(metadata, indent=2, sort_keys=True) + "\n"
            )
    return Path(path)


def load_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
) -> tuple[UNet2DModel, DDPMScheduler]:
    """Load ``(unet, scheduler)`` from a folder in the diffusers layout, or a hub id
    (network needed).

    Weights are read from safetensors, which holds tensors and nothing else. A folder
    that only has pickle-based weights (``.bin``, ``.pt``, ``.ckpt``: loading a pickle
    can run any code its author put in it) is refused unless ``allow_pickle=True``, and
    even then read with ``torch.load(weights_only=True)``, which rebuilds tensors only
    and rejects anything else. The UNet is returned in eval mode on ``device``.

    Raises:
        FileNotFoundError: a local ``path`` does not exist or holds no ``unet/`` weights.
        ValueError: the weights are truncated or corrupt, or a pickle and ``allow_pickle`` is
            False, or a pickle that holds more than tensors.
    """
    if not str(path).strip():
        raise ValueError(
            "the model path is empty; give a model folder or a hub id 'owner/name'"
        )
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(
                f"{str(path)!r} is a file; a model is a folder holding unet/ and scheduler/"
            )
        try:
            str(local.absolute()).encode("utf-8")
        # bytes that are not UTF-8 in a name: safetensors cannot open the file
        except UnicodeEncodeError:
            raise ValueError(
                f"the path {str(path)!r} has bytes that are not UTF-8, which safetensors cannot "
                "open; rename the folder"
            ) from None
        _read_config(local / "unet" / "config.json", ("UNet2DModel",))
        scheduler_config = _read_config(
            local / "scheduler" / "scheduler_config.json", SCHEDULER_CLASSES
        )
        if (
            scheduler_config.get("trained_betas") is None
            and scheduler_config.get("beta_schedule", "linear") not in BETA_SCHEDULES
        ):
            raise ValueError(
                f"{str(local / 'scheduler' / 'scheduler_config.json')!r}: beta_schedule "
                f"{scheduler_config['beta_schedule']!r} is not one of {BETA_SCHEDULES}"
            )
        unet = _load_local_unet(local, path, allow_pickle)
        scheduler = DDPMScheduler.from_pretrained(str(local), subfolder="scheduler")
        _check_finite(unet, scheduler, str(path))
    # "owner/name"; "./x" is a local path
    elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(path)):
        # a hub id such as "google/ddpm-cifar10-32": downloads
        unet, scheduler = _load_from_hub(str(path))
    else:
        raise FileNotFoundError(
            f"model folder {str(path)!r} does not exist (nor is it a hub id 'owner/name')"
        )
    return unet.to(device).eval(), scheduler


#: The ``_class_name`` a scheduler config may carry: DDPMScheduler and the schedulers
#: diffusers lists as compatible with it (they share its betas, which is all a model
#: folder's scheduler gives us).
SCHEDULER_CLASSES = (
    "DDPMScheduler",
    *sorted(
        {getattr(c, "__name__", str(c)) for c in DDPMScheduler._compatibles}
        - {"DDPMScheduler"}
    ),
)
#: The ``beta_schedule`` values diffusers' DDPMScheduler builds.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")


def _read_config(file: Path, classes: tuple[str, ...]) -> dict[str, Any]:
    """One component's config, read and checked before diffusers reads it, so that a
    missing, unreadable or foreign file (a VAE's config in ``unet/``) is named as such,
    not reported later as corrupt weights or a crash inside diffusers."""
    if not file.is_file():
        raise FileNotFoundError(
            f"{str(file)!r} is missing: a model folder holds unet/config.json and "
            "scheduler/scheduler_config.json, as save_model and diffusers' save_pretrained "
            "write them"
        )
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{str(file)!r} is not UTF-8 text, so not a config file (byte {error.start})"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{str(file)!r} is not valid JSON ({error.msg}, line {error.lineno} column "
            f"{error.colno})"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{str(file)!r} holds a JSON {type(config).__name__}, not an object of settings"
        )
    name = config.get("_class_name")
    if name is not None and name not in classes:
        raise ValueError(
            f"{str(file)!r} describes the class {name!r}, not a {classes[0]}: this folder holds another "
            "kind of model"
        )
    return config


def _check_finite(unet: UNet2DModel, scheduler: DDPMScheduler, name: str) -> None:
    """A model with NaN or infinite weights, or a schedule whose betas are not in (0,
    1), samples garbage (an all-white image) without any error: refuse it when it is
    loaded."""
    bad = [
        key
        for key, value in unet.state_dict().items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        raise ValueError(
            f"the weights of {name!r} hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]}); "
            "the model is damaged"
        )
    betas = scheduler.betas
    if not torch.isfinite(betas).all() or betas.min() <= 0 or betas.max() >= 1:
        raise ValueError(
            f"the noise schedule of {name!r} is invalid: its betas must be in (0, 1), got "
            f"{betas.min().item()} to {betas.max().item()} (scheduler_config.json: beta_start, beta_end)"
        )


def _load_local_unet(
    local: Path, path: str | os.PathLike, allow_pickle: bool
) -> UNet2DModel:
    """The UNet of a local diffusers-layout folder: safetensors, else an opted-in
    pickle."""
    weights = local / "unet" / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        try:
            return UNet2DModel.from_pretrained(
                str(local), subfolder="unet", use_safetensors=True
            )
        except (OSError, SafetensorError) as error:
            raise ValueError(
                f"the weights in {str(weights)!r} are truncated or corrupt and cannot be read "
                f"({str(error).splitlines()[0]})"
            ) from error
    pickles = sorted(
        p for p in (local / "unet").glob("*") if p.suffix in PICKLE_SUFFIXES
    )
    if pickles:
        return _load_pickled_unet(local / "unet", pickles[0], allow_pickle)
    raise FileNotFoundError(
        f"{str(path)!r} is not a model folder in the diffusers layout: "
        "unet/diffusion_pytorch_model.safetensors is missing"
    )


#: Weight files that are Python pickles (refused by default, see :func:`load_model`).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _load_pickled_unet(folder: Path, weights: Path, allow_pickle: bool) -> UNet2DModel:
    """A UNet from ``folder/config.json`` and the pickled state dict ``weights``
    (tensors only)."""
    if not allow_pickle:
        raise ValueError(
            f"{str(weights)!r} is a pickle file, and loading a pickle can run code hidden "
            "in it; refusing. Convert the weights to safetensors, or pass "
            "allow_pickle=True to read tensors only, with torch.load(weights_only=True)"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{str(weights)!r} holds more than tensors; torch.load(weights_only=True) "
            f"refused it: {str(error).splitlines()[0]}"
        ) from error
    unet = UNet2DModel.from_config(UNet2DModel.load_config(str(folder)))
    # Releases saved by diffusers before 0.15 name attention weights
    # query/key/value/proj_attn; diffusers' own loader renames them
    # (to_q/to_k/to_v/to_out.0) the same way.
    fix_keys = getattr(unet, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:
        fix_keys(state)
    unet.load_state_dict(state)
    return unet


def _load_from_hub(repo_id: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """A hub repository in the pipeline layout (``unet/``, ``scheduler/``) or, like the
    early ``google/ddpm-*`` repositories, with the UNet and scheduler files at its
    root."""
    try:
        unet = UNet2DModel.from_pretrained(
            repo_id, subfolder="unet", use_safetensors=True
        )
    except OSError:
        unet = UNet2DModel.from_pretrained(repo_id, use_safetensors=True)
    try:
        scheduler = DDPMScheduler.from_pretrained(repo_id, subfolder="scheduler")
    except OSError:
        scheduler = DDPMScheduler.from_pretrained(repo_id)
    return unet, scheduler
