"""Model presets, and saving/loading in the diffusers layout that a stock pipeline
reads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

from baddiff_core.diffusion import QUICK_SCHEDULE
from baddiff_core.models import (
    count_parameters,
    ddpm_cifar10_unet,
    load_model,
    make_unet,
    save_model,
)


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_map_images_to_noise_predictions_of_the_same_shape(size, channels):
    torch.manual_seed(0)
    unet = make_unet(size, channels)
    x = torch.randn(2, channels, size, size)
    assert unet(x, torch.tensor([0, 5])).sample.shape == x.shape
    assert count_parameters(unet) < 2_000_000


def test_cifar10_architecture_has_the_published_size():
    # google/ddpm-cifar10-32: 35.7 M
    assert abs(count_parameters(ddpm_cifar10_unet()) - 35.7e6) < 0.1e6


def test_stock_pipeline_loads_a_saved_model(tmp_path, tiny_unet, quick_scheduler):
    unet, scheduler = tiny_unet(), quick_scheduler
    save_model(tmp_path / "model", unet, scheduler, metadata={"kind": "test"})
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "model")
    images = pipeline(
        batch_size=2,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (2, 8, 8, 1) and np.all((0 <= images) & (images <= 1))
    assert json.loads((tmp_path / "model" / "baddiff.json").read_text()) == {
        "kind": "test"
    }
    assert (
        tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    ).is_file()
    assert not list((tmp_path / "model").rglob("*.bin")), (
        "weights are stored as safetensors only"
    )


def test_save_then_load_round_trips(tmp_path, tiny_unet, quick_scheduler):
    unet, scheduler = tiny_unet(16, 3, seed=1), quick_scheduler
    save_model(tmp_path / "m", unet, scheduler)
    loaded, loaded_scheduler = load_model(tmp_path / "m")
    for (name, a), (_, b) in zip(
        unet.state_dict().items(), loaded.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert loaded_scheduler.config.num_train_timesteps == 100
    torch.testing.assert_close(
        loaded_scheduler.alphas_cumprod, scheduler.alphas_cumprod
    )
    assert not loaded.training


def test_saving_over_a_model_is_atomic(
    tmp_path, monkeypatch, tiny_unet, quick_scheduler
):
    path = tmp_path / "m"
    first = tiny_unet(seed=2)
    save_model(path, first, quick_scheduler)

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(DDPMPipeline, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(path, tiny_unet(seed=3), quick_scheduler)
    monkeypatch.undo()
    loaded, _ = load_model(path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), loaded.state_dict().values())
    )
    assert sorted(os.listdir(tmp_path)) == ["m"], "no temporary folder is left behind"

    second = tiny_unet(seed=4)
    save_model(path, second, quick_scheduler)
    loaded, _ = load_model(path)
    assert all(
        torch.equal(a, b)
        for a, b in zip(second.state_dict().values(), loaded.state_dict().values())
    )
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_load_model_errors_name_the_path(tmp_path, tiny_unet, quick_scheduler):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/config.json' is missing"):
        load_model(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_model(tmp_path / "file.txt")
    saved = save_model(tmp_path / "model", tiny_unet(16, 1), quick_scheduler)
    (
        saved / "unet" / "diffusion_pytorch_model.safetensors"
    ).unlink()  # configs present, weights gone
    with pytest.raises(
        FileNotFoundError, match="unet/diffusion_pytorch_model.safetensors is missing"
    ):
        load_model(saved)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=12, channels=1), "image_size=12 has no preset"),
        (dict(image_size=16, channels=2), "channels must be 1"),
    ],
)
def test_make_unet_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_unet(**kwargs)


def test_hub_ids_fall_back_to_files_at_the_repository_root(monkeypatch, tiny_unet):
    """Early hub repositories (google/ddpm-cifar10-32) keep the UNet and scheduler at
    their root."""
    from baddiff_core import models

    calls = []

    def fake_loader(result):
        def from_pretrained(source, subfolder=None, **kwargs):
            calls.append((source, subfolder))
            if subfolder is not None:
                raise OSError(f"{source} has no {subfolder}/ folder")
            return result

        return from_pretrained

    unet = tiny_unet(block_out_channels=(16, 32))
    scheduler = models.DDPMScheduler()
    monkeypatch.setattr(models.UNet2DModel, "from_pretrained", fake_loader(unet))
    monkeypatch.setattr(models.DDPMScheduler, "from_pretrained", fake_loader(scheduler))
    loaded_unet, loaded_scheduler = models.load_model("someone/old-layout")
    assert loaded_unet is unet and loaded_scheduler is scheduler
    assert calls == [
        ("someone/old-layout", "unet"),
        ("someone/old-layout", None),
        ("someone/old-layout", "scheduler"),
        ("someone/old-layout", None),
    ]


class _RunsCodeOnLoad:
    """Unpickling this calls Path.touch(marker): a stand-in for any code an attacker
    could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def pickled_model_folder(tmp_path, tiny_unet, quick_scheduler):
    """``pickled_model_folder(payload)``: a diffusers-layout folder whose UNet weights
    are a pickle (``.bin``) holding ``payload(unet)``."""

    def build(payload) -> str:
        unet = tiny_unet(block_out_channels=(16, 32))
        folder = save_model(tmp_path / "model", unet, quick_scheduler)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(payload(unet), folder / "unet" / "diffusion_pytorch_model.bin")
        return str(folder)

    return build


def test_pickled_weights_are_refused_without_opt_in(tmp_path, pickled_model_folder):
    marker = tmp_path / "code-ran"
    folder = pickled_model_folder(lambda unet: {"weights": _RunsCodeOnLoad(marker)})
    with pytest.raises(
        ValueError,
        match=r"diffusion_pytorch_model\.bin' is a pickle file.*allow_pickle=True",
    ):
        load_model(folder)
    assert not marker.exists()


def test_opted_in_pickles_are_read_as_tensors_only(tmp_path, pickled_model_folder):
    marker = tmp_path / "code-ran"
    folder = pickled_model_folder(lambda unet: {"weights": _RunsCodeOnLoad(marker)})
    with pytest.raises(ValueError, match=r"holds more than tensors"):
        load_model(folder, allow_pickle=True)
    assert not marker.exists(), "weights_only=True must refuse to run the payload"


def test_opted_in_plain_state_dict_loads(pickled_model_folder):
    original = {}

    def state(unet):
        original.update({k: v.clone() for k, v in unet.state_dict().items()})
        return unet.state_dict()

    folder = pickled_model_folder(state)
    unet, scheduler = load_model(folder, allow_pickle=True)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in original.items())
    assert scheduler.config.num_train_timesteps == QUICK_SCHEDULE["num_train_timesteps"]
