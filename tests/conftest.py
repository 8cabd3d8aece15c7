"""Shared fixtures and paths for the test suite."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:  # the fixtures import torch when first used, not at collection
    from diffusers import DDPMScheduler, UNet2DModel

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
