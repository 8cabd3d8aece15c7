"""A cache of trained models, so that no chapter trains the same model twice.

Introduced in chapter 3 (Planting a backdoor). A model is keyed by its full recipe (a JSON-able
dict: data, trigger, target, poison rate, training configuration, base model, ...) and stored in
the diffusers layout under ``$BADDIFF_CACHE`` (default ``~/.cache/baddiff``)::

    <cache>/models/<name>-<16 hex digits of sha256(recipe)>/
    <cache>/checkpoints/<name>-<the same digits>/   # a long training's checkpoints, until its model is saved

A chapter asks for a model by recipe and gets it from the cache, or it is trained and saved
(atomically) first. Change anything in the recipe and a different model is trained. Each training
appends a line to ``<cache>/trainings.jsonl`` (:func:`trainings`), so "no model is trained twice"
is something one can check after a book build, not only hope.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from baddiff_core.files import atomic_folder
from baddiff_core.models import load_model, save_model

__all__ = ["CACHE_ENV", "CACHE_FORMAT", "cache_root", "recipe_key", "tensor_digest", "cached_model",
           "cached_tensors", "checkpoint_folder", "trainings"]

CACHE_ENV = "BADDIFF_CACHE"
#: Bumped whenever training code changes what a recipe produces, so stale models are not reused.
CACHE_FORMAT = 1

Builder = Callable[[], tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]]


def cache_root() -> Path:
    """The cache folder: ``$BADDIFF_CACHE`` if set, else ``~/.cache/baddiff``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "baddiff").expanduser()


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the recipe's canonical JSON (sorted keys) and the format."""
    try:
        text = json.dumps({"format": CACHE_FORMAT, "recipe": recipe}, sort_keys=True, separators=(",", ":"))
    except TypeError as error:
        raise TypeError(f"a recipe must be JSON-serialisable to be cached: {error}") from error
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_digest(*tensors: torch.Tensor | torch.nn.Module) -> str:
    """16 hex digits of the SHA-256 of tensors' dtypes, shapes and values (a module: its state dict,
    in order), for recipes whose ingredients are tensors, such as a model to be repaired."""
    digest = hashlib.sha256()
    for item in tensors:
        values = list(item.state_dict().values()) if isinstance(item, torch.nn.Module) else [item]
        for tensor in values:
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def _entry_folder(kind: str, name: str, recipe: Mapping[str, Any]) -> Path:
    """``<cache>/<kind>/<name>-<recipe key>``, after checking that ``name`` is a safe folder prefix."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"name={name!r} must use only letters, digits, '-' and '_'")
    return cache_root() / kind / f"{name}-{recipe_key(recipe)}"


def checkpoint_folder(name: str, recipe: Mapping[str, Any]) -> Path:
    """``<cache>/checkpoints/<name>-<recipe key>``: where a long training of the entry that
    :func:`cached_model` would save as ``<cache>/models/<name>-<recipe key>`` keeps its resumable
    checkpoints (:class:`~baddiff_core.train.TrainConfig`'s ``checkpoint_dir``) until the model is
    saved. Named like the entry, so that the same recipe asked for again after an interruption finds
    them, and another recipe never does."""
    return _entry_folder("checkpoints", name, recipe)


def cached_model(name: str, recipe: Mapping[str, Any], build: Builder, *, device: str | torch.device = "cpu",
                 use_cache: bool = True) -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
    """The model of ``recipe``: loaded from the cache, or made by ``build()`` and saved there.

    Args:
        name: a short readable prefix of the folder name (letters, digits, ``-``, ``_``).
        recipe: everything that determines the model.
        build: trains the model; returns ``(unet, scheduler, report)`` (``report``: JSON-able facts
            such as the training time and losses).
        device: where the returned UNet lives.
        use_cache: ``False`` always builds and does not save.

    Returns:
        ``(unet, scheduler, info)``; ``info`` holds ``recipe``, ``report``, ``path`` and whether it
        came ``from_cache``.
    """
    folder = _entry_folder("models", name, recipe)
    if use_cache and (folder / "baddiff.json").is_file():
        unet, scheduler = load_model(folder, device=device)
        metadata = json.loads((folder / "baddiff.json").read_text())
        return unet, scheduler, dict(metadata, path=str(folder), from_cache=True)

    if use_cache:
        _check_writable(folder.parent)
    began = time.perf_counter()
    unet, scheduler, report = build()
    metadata = dict(name=name, recipe=dict(recipe), report=report, format=CACHE_FORMAT)
    if use_cache:
        save_model(folder, unet.to("cpu"), scheduler, metadata=metadata)
        _log_training(folder, time.perf_counter() - began)
    return unet.to(device).eval(), scheduler, dict(metadata, path=str(folder) if use_cache else None,
                                                   from_cache=False)


TensorBuilder = Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]


def cached_tensors(name: str, recipe: Mapping[str, Any], build: TensorBuilder, *, use_cache: bool = True
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Named tensors that took long to compute (not a model, e.g. learnt masks), cached like models.

    ``build()`` returns ``(tensors, report)``; they are stored as ``tensors.safetensors`` and
    ``baddiff.json`` in ``<cache>/tensors/<name>-<key>/``, written under a temporary name and
    renamed when complete. Returns ``(tensors on the CPU, info)``, ``info`` as :func:`cached_model`'s.
    """
    folder = _entry_folder("tensors", name, recipe)
    if use_cache and (folder / "baddiff.json").is_file():
        metadata = json.loads((folder / "baddiff.json").read_text())
        return load_file(str(folder / "tensors.safetensors")), dict(metadata, path=str(folder), from_cache=True)
    if use_cache:
        _check_writable(folder.parent)
    began = time.perf_counter()
    tensors, report = build()
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    metadata = dict(name=name, recipe=dict(recipe), report=report, format=CACHE_FORMAT)
    if use_cache:
        with atomic_folder(folder) as staging:
            save_file(tensors, str(staging / "tensors.safetensors"))
            (staging / "baddiff.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        _log_training(folder, time.perf_counter() - began)
    return tensors, dict(metadata, path=str(folder) if use_cache else None, from_cache=False)


_TRAININGS = "trainings.jsonl"


def _log_training(folder: Path, seconds: float) -> None:
    line = json.dumps(dict(model=folder.name, seconds=round(seconds, 3), when=time.strftime("%Y-%m-%dT%H:%M:%S")))
    with open(cache_root() / _TRAININGS, "a") as handle:   # one short append: whole lines, even in parallel
        handle.write(line + "\n")


def trainings(root: str | os.PathLike | None = None) -> dict[str, list[float]]:
    """Every entry the cache at ``root`` (default :func:`cache_root`) has computed (models from
    :func:`cached_model`, tensors from :func:`cached_tensors`), with the seconds of each run:
    ``{folder name: [seconds, ...]}``. Two runs for one folder mean that it was computed twice
    (its folder was deleted in between, or two runs raced)."""
    log = Path(root or cache_root()) / _TRAININGS
    found: dict[str, list[float]] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                found.setdefault(entry["model"], []).append(float(entry["seconds"]))
    return found


def _check_writable(folder: Path) -> None:
    """Fail before a long training run, not after it, if the model could not be saved."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"the model cache {str(folder)!r} is not writable ({error.strerror}); set "
                              f"{CACHE_ENV} to a writable folder") from error
