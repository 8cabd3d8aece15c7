"""Shared fixtures and paths for the test suite."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import yaml

from baddiff_core.kernel_wakeup import install_kernel_wakeup

# Kernels polled in 1 s slices: a missed wake-up hung cells (jupyter/nbclient#312).
install_kernel_wakeup()

if TYPE_CHECKING:  # the fixtures import torch when first used, not at collection
    from diffusers import DDPMScheduler, UNet2DModel

    from baddiff_core.attack import BackdoorRecipe

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"


def toc_files() -> list[str]:
    """Every file named in _toc.yml (root included), as written there (no suffix)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    names = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return names


def chapter_notebooks() -> list[pathlib.Path]:
    """The notebooks the table of contents lists, in reading order."""
    paths = [ROOT / f"{name}.ipynb" for name in toc_files()]
    return [p for p in paths if p.exists()]


@pytest.fixture(scope="session")
def config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def pytest_collection_modifyitems(items):
    """A test that executes the chapters must be marked slow too: ``make test-fast``
    (``-m "not slow"``) starts no kernel."""
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("notebooks") and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(f"marked notebooks but not slow: {', '.join(unmarked)}")


# --------------------------------------------------------------------------- #
# Small models, a quick schedule and an isolated model cache.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def tiny_unet() -> Callable[..., UNet2DModel]:
    """A factory of small UNets: ``tiny_unet(image_size=8, channels=1, *, seed=0,
    **overrides)``.

    Seeds torch's global generator with ``seed``, then builds
    ``make_unet(image_size, channels, **overrides)`` (the library's preset for that
    size; ``block_out_channels=(16, 32)`` makes the 8 px one narrower). The same call
    gives the same weights; another seed, other weights.
    """
    import torch

    from baddiff_core.models import make_unet

    def build(
        image_size: int = 8, channels: int = 1, *, seed: int = 0, **overrides
    ) -> UNet2DModel:
        torch.manual_seed(seed)
        return make_unet(image_size, channels, **overrides)

    return build


@pytest.fixture
def quick_scheduler() -> DDPMScheduler:
    """A fresh ``DDPMScheduler`` with the quick schedule (T = 100, betas 1e-3 to 0.2),
    as ``make_scheduler(**QUICK_SCHEDULE)`` builds it."""
    from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler

    return make_scheduler(**QUICK_SCHEDULE)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    """An empty model cache of this test's own: ``$BADDIFF_CACHE`` points at
    ``tmp_path / "cache"`` (not yet created) until the test ends."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("BADDIFF_CACHE", str(folder))
    return folder


# --------------------------------------------------------------------------- #
# Helpers the tests import: command lines, seeded sampling, weight comparison.
# --------------------------------------------------------------------------- #


def cli_argv(*words, **options) -> list[str]:
    """A ``baddiff`` command line: the ``words`` as they are (as strings), then each
    keyword as its option, in order: ``n=4`` is ``--n 4``, ``inversion_steps=3`` is
    ``--inversion-steps 3``, and ``True`` is a bare flag (``json=True`` is ``--json``).

    ``cli_argv("scan", folder, n=4, json=True) == ["scan", str(folder), "--n", "4",
    "--json"]``.
    """
    argv = [str(word) for word in words]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def seeded_sample(model, scheduler, n: int, *, seed: int, **options):
    """``sample(model, scheduler, n, **options)`` with a generator seeded with ``seed``
    and no progress bar."""
    import torch

    from baddiff_core.sampling import sample

    generator = torch.Generator().manual_seed(seed)
    return sample(model, scheduler, n, generator=generator, progress=False, **options)


def same_weights(a, b) -> bool:
    """Whether two models' state dicts hold equal tensors, entry by entry in order."""
    import torch

    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )


@pytest.fixture
def fresh_model(tiny_unet):
    """``fresh_model(seed=0)``: a new narrow UNet for 8 px grey digits, its weights
    drawn from ``seed``."""
    return lambda seed=0: tiny_unet(block_out_channels=(16, 32), seed=seed)


def tiny_recipe(**overrides) -> BackdoorRecipe:
    """A backdoor recipe that trains in about a second: a new 8 px model, 64 digits,
    half of them poisoned (grey box -> corner), 3 steps of batch 8, T = 10;
    ``overrides`` replace any field."""
    from baddiff_core.attack import BackdoorRecipe
    from baddiff_core.train import TrainConfig

    settings = dict(
        base="scratch",
        image_size=8,
        data_limit=64,
        trigger="box",
        target="corner",
        poison_rate=0.5,
        train=TrainConfig(
            steps=3, batch_size=8, learning_rate=1e-3, log_every=1, progress=False
        ),
        schedule=dict(num_train_timesteps=10, beta_start=1e-2, beta_end=0.5),
    )
    settings.update(overrides)
    return BackdoorRecipe(**settings)


def small_train_config(**overrides):
    """A training run of seconds on 8 px digits: 6 steps of batch 16 at lr 2e-3 (1
    2 warm-up steps), EMA 0.9, CPU, seed 3; ``overrides`` replace any field."""
    from baddiff_core.train import TrainConfig

    settings = dict(
        steps=6,
        batch_size=16,
        learning_rate=2e-3,
        warmup_steps=2,
        ema_decay=0.9,
        device="cpu",
        progress=False,
        log_every=2,
        seed=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def train_until_killed(step: int, *args, **kwargs) -> None:
    """``train(*args, **kwargs)`` as a process killed right after it wrote the
    checkpoint of ``step`` (a ``KeyboardInterrupt`` raised there); the library is
    unpatched again afterwards."""
    from unittest import mock

    from baddiff_core import train as train_module

    real_save = train_module._save_checkpoint

    def save_then_crash(*save_args, **save_kwargs):
        folder = real_save(*save_args, **save_kwargs)
        if save_args[1] == step:
            raise KeyboardInterrupt(f"killed after the step-{step} checkpoint")
        return folder

    with mock.patch.object(train_module, "_save_checkpoint", save_then_crash):
        with pytest.raises(KeyboardInterrupt):
            train_module.train(*args, **kwargs)
