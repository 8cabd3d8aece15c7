"""A cache of trained models, so that no chapter trains the same model twice.

Introduced in chapter 3 (Planting a backdoor). A model is keyed by its full recipe (a
JSON-able dict: data, trigger, target, poison rate, training configuration, base model,
...) and stored in the diffusers layout under ``$BADDIFF_CACHE`` (default
``~/.cache/baddiff``)::

    <cache>/models/<name>-<16 hex digits of sha256(recipe)>/
    <cache>/checkpoints/<name>-<the same digits>/   # a long training's checkpoints, until its model is saved

A chapter asks for a model by recipe and gets it from the cache, or it is trained and
saved (atomically) first. Change anything in the recipe and a different model is
trained. Each training appends a line to ``<cache>/trainings.jsonl``
(:func:`trainings`), so "no model is trained twice" is something one can check after a
book build, not only hope.

The cache trusts nothing it finds. Every entry records the SHA-256 of its files in its
``baddiff.json`` and is checked on every load, as are its weights (all finite); an entry
that fails (truncated, edited, swapped for another valid file, NaN weights) is reported
in one line, moved aside to ``<cache>/corrupt/`` and computed again. Two processes
asking for the same missing entry do not both compute it: the second waits on a file
lock (``<cache>/locks/``), says so, and then loads what the first saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import DDPMScheduler, UNet2DModel
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from baddiff_core.files import atomic_folder, folder_digests
from baddiff_core.models import METADATA_FILE, load_model, save_model

__all__ = [
    "CACHE_ENV",
    "CACHE_FORMAT",
    "cache_root",
    "recipe_key",
    "tensor_digest",
    "cached_model",
    "cached_tensors",
    "checkpoint_folder",
    "trainings",
]

#: The environment variable that moves the cache (default ``~/.cache/baddiff``).
CACHE_ENV = "BADDIFF_CACHE"
#: Bumped whenever training code changes what a recipe produces, so stale models are
#: not reused.
CACHE_FORMAT = 1

Builder = Callable[[], tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]]


def cache_root() -> Path:
    """The cache folder: ``$BADDIFF_CACHE`` if set, else ``~/.cache/baddiff``."""
    return Path(
        os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "baddiff"
    ).expanduser()


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of the recipe's canonical JSON (sorted keys) and the
    format."""
    try:
        text = json.dumps(
            {"format": CACHE_FORMAT, "recipe": recipe},
            sort_keys=True,
            separators=(",", ":"),
        )
    except TypeError as error:
        raise TypeError(
            f"a recipe must be JSON-serialisable to be cached: {error}"
        ) from error
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_digest(*tensors: torch.Tensor | torch.nn.Module) -> str:
    """16 hex digits of the SHA-256 of tensors' dtypes, shapes and values (a module: its
    state dict, in order), for recipes whose ingredients are tensors, such as a model to
    be repaired."""
    digest = hashlib.sha256()
    for item in tensors:
        values = (
            list(item.state_dict().values())
            if isinstance(item, torch.nn.Module)
            else [item]
        )
        for tensor in values:
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(
                tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            )
    return digest.hexdigest()[:16]


def _entry_folder(kind: str, name: str, recipe: Mapping[str, Any]) -> Path:
    """``<cache>/<kind>/<name>-<recipe key>``, after checking that ``name`` is a safe
    folder prefix."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"name={name!r} must use only letters, digits, '-' and '_'")
    return cache_root() / kind / f"{name}-{recipe_key(recipe)}"


def checkpoint_folder(name: str, recipe: Mapping[str, Any]) -> Path:
    """``<cache>/checkpoints/<name>-<recipe key>``: where a long training of the entry
    that :func:`cached_model` would save as ``<cache>/models/<name>-<recipe key>`` keeps
    its resumable checkpoints (:class:`~baddiff_core.train.TrainConfig`'s
    ``checkpoint_dir``) until the model is saved. Named like the entry, so that the same
    recipe asked for again after an interruption finds them, and another recipe never
    does."""
    return _entry_folder("checkpoints", name, recipe)


def cached_model(
    name: str,
    recipe: Mapping[str, Any],
    build: Builder,
    *,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
) -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
    """The model of ``recipe``: loaded from the cache, or made by ``build()`` and saved
    there.

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

    def load() -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]] | None:
        metadata = _verified_metadata(folder)
        if metadata is None:
            return None
        try:
            unet, scheduler = load_model(folder, device=device)
        except (OSError, ValueError, SafetensorError) as error:
            return _quarantine(
                folder, f"it cannot be loaded ({str(error).splitlines()[0]})"
            )
        if not all(torch.isfinite(p).all() for p in unet.parameters()):
            return _quarantine(folder, "its weights are not all finite")
        return unet, scheduler, dict(metadata, path=str(folder), from_cache=True)

    def make() -> tuple[UNet2DModel, DDPMScheduler, dict[str, Any]]:
        unet, scheduler, report = build()
        metadata = _metadata(name, recipe, report)
        if use_cache:
            save_model(
                folder,
                unet.to("cpu"),
                scheduler,
                metadata=metadata,
                record_digests=True,
            )
        return unet.to(device).eval(), scheduler, _built(metadata, folder, use_cache)

    return _load_or_make(folder, load, make, use_cache)


TensorBuilder = Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]


def cached_tensors(
    name: str,
    recipe: Mapping[str, Any],
    build: TensorBuilder,
    *,
    use_cache: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Named tensors that took long to compute (not a model, e.g. learnt masks), cached
    like models.

    ``build()`` returns ``(tensors, report)``; they are stored as
    ``tensors.safetensors`` and ``baddiff.json`` in ``<cache>/tensors/<name>-<key>/``,
    written under a temporary name and renamed when complete. Returns ``(tensors on the
    CPU, info)``, ``info`` as :func:`cached_model`'s.
    """
    folder = _entry_folder("tensors", name, recipe)

    def load() -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        metadata = _verified_metadata(folder)
        if metadata is None:
            return None
        try:
            tensors = load_file(str(folder / "tensors.safetensors"))
        except (OSError, SafetensorError) as error:
            return _quarantine(
                folder, f"it cannot be loaded ({str(error).splitlines()[0]})"
            )
        if not all(
            torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()
        ):
            return _quarantine(folder, "its tensors are not all finite")
        return tensors, dict(metadata, path=str(folder), from_cache=True)

    def make() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, report = build()
        tensors = {
            key: value.detach().cpu().contiguous() for key, value in tensors.items()
        }
        metadata = _metadata(name, recipe, report)
        if use_cache:
            with atomic_folder(folder) as staging:
                save_file(tensors, str(staging / "tensors.safetensors"))
                metadata["sha256"] = folder_digests(staging)
                (staging / METADATA_FILE).write_text(
                    json.dumps(metadata, indent=2, sort_keys=True) + "\n"
                )
        return tensors, _built(metadata, folder, use_cache)

    return _load_or_make(folder, load, make, use_cache)


_T = TypeVar("_T")


def _load_or_make(
    folder: Path,
    load: Callable[[], _T | None],
    make: Callable[[], _T],
    use_cache: bool,
) -> _T:
    """The cache's one protocol: the entry in ``folder`` if it is there and sound, else
    ``make()`` (which saves it), under a lock so that two processes asking for the
    same entry compute it once."""
    if use_cache and (found := load()) is not None:
        return found
    if use_cache:
        _check_writable(folder.parent)
    with _computing(folder, use_cache):
        # another process computed it meanwhile
        if use_cache and (found := load()) is not None:
            return found
        began = time.perf_counter()
        made = make()
        if use_cache:
            _log_training(folder, time.perf_counter() - began)
    return made


def _metadata(
    name: str, recipe: Mapping[str, Any], report: dict[str, Any]
) -> dict[str, Any]:
    """What an entry's ``baddiff.json`` records."""
    return dict(name=name, recipe=dict(recipe), report=report, format=CACHE_FORMAT)


def _built(metadata: dict[str, Any], folder: Path, use_cache: bool) -> dict[str, Any]:
    """The ``info`` of an entry just made: where it was saved, if it was."""
    return dict(metadata, path=str(folder) if use_cache else None, from_cache=False)


def _verified_metadata(folder: Path) -> dict[str, Any] | None:
    """The entry's metadata if ``folder`` holds a complete entry whose files are as
    written; None if there is no entry (or it was found corrupt and moved aside)."""
    if not (folder / METADATA_FILE).is_file():
        return None
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return _quarantine(folder, f"its {METADATA_FILE} is unreadable ({error})")
    expected = metadata.get("sha256") if isinstance(metadata, dict) else None
    # entries written before digests were recorded are checked on loading only
    if expected is not None:
        actual = folder_digests(folder, exclude=(METADATA_FILE,))
        changed = sorted(
            k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k)
        )
        if changed:
            return _quarantine(
                folder,
                f"its files changed since they were written: {', '.join(changed)}",
            )
    return metadata


def _quarantine(folder: Path, problem: str) -> None:
    """Move a corrupt entry out of the way (``<cache>/corrupt/``) and say so; returns
    None."""
    aside = (
        cache_root()
        / "corrupt"
        / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    )
    aside.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(folder, aside)
        where = f"moved to {aside}"
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
        where = "deleted"
    print(
        f"baddiff cache: the entry {folder.name} is corrupt ({problem}); {where}, and it is computed again",
        file=sys.stderr,
    )
    return None


class _computing:
    """Hold ``<cache>/locks/<entry>.lock`` while an entry is computed, so that a second
    process asking for it waits (and says so) instead of computing it too. A no-op
    without the cache."""

    def __init__(self, folder: Path, use_cache: bool) -> None:
        self.folder = folder
        self.lock = None
        if use_cache:
            (cache_root() / "locks").mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(cache_root() / "locks" / f"{folder.name}.lock"))

    def __enter__(self) -> _computing:
        if self.lock is not None:
            try:
                self.lock.acquire(timeout=0)
            except Timeout:
                print(
                    f"baddiff cache: another process is computing {self.folder.name}; waiting for it",
                    file=sys.stderr,
                )
                self.lock.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.lock is not None:
            self.lock.release()


_TRAININGS = "trainings.jsonl"


def _log_training(folder: Path, seconds: float) -> None:
    line = json.dumps(
        dict(
            model=folder.name,
            seconds=round(seconds, 3),
            when=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
    )
    with open(
        cache_root() / _TRAININGS, "a"
    ) as handle:  # one short append: whole lines, even in parallel
        handle.write(line + "\n")


def trainings(root: str | os.PathLike | None = None) -> dict[str, list[float]]:
    """Every entry the cache at ``root`` (default :func:`cache_root`) has computed
    (models from :func:`cached_model`, tensors from :func:`cached_tensors`), with the
    seconds of each run: ``{folder name: [seconds, ...]}``. Two runs for one folder mean
    that it was computed twice (its folder was deleted in between, or two runs
    raced)."""
    log = Path(root or cache_root()) / _TRAININGS
    found: dict[str, list[float]] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                found.setdefault(entry["model"], []).append(float(entry["seconds"]))
    return found


def _check_writable(folder: Path) -> None:
    """Fail before a long training run, not after it, if the model could not be
    saved."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(
            f"the model cache {str(folder)!r} is not writable ({error.strerror}); set "
            f"{CACHE_ENV} to a writable folder"
        ) from error
