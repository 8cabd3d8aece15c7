"""The authors' released models: only listed repositories, tensors only, converted to
safetensors once and verified after. Run in a subprocess against a stand-in hub cache,
offline, through the same code a reader's Colab runs (``HF_HUB_CACHE`` is read when
huggingface_hub is imported)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from standins import OLD_ATTENTION_NAMES, build_authors_repo

from baddiff_core.authors import AUTHORS_MODELS, authors_model

NAME = "stop_sign-corner-90"
REPO = AUTHORS_MODELS[NAME].repo_id


def load_in_subprocess(tmp_path, name=NAME) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import json
        from baddiff_core.authors import load_authors_model
        unet, scheduler, info = load_authors_model({name!r})
        print(json.dumps(dict(from_cache=info["from_cache"], report=info["report"], path=info["path"],
                              params=sum(p.numel() for p in unet.parameters()),
                              T=scheduler.config.num_train_timesteps)))
    """)
    env = dict(
        os.environ,
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_HUB_OFFLINE="1",
        BADDIFF_CACHE=str(tmp_path / "cache"),
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_released_model_is_converted_once_then_loaded_verified(tmp_path):
    snapshot = build_authors_repo(tmp_path / "hub", REPO)
    first = load_in_subprocess(tmp_path)
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout.strip().splitlines()[-1])
    assert (
        info["from_cache"] is False
        and info["report"]["repo_id"] == REPO
        and info["T"] == 10
    )
    import hashlib

    bin_file = snapshot / "unet" / "diffusion_pytorch_model.bin"
    assert (
        info["report"]["bin_sha256"]
        == hashlib.sha256(bin_file.read_bytes()).hexdigest()
    )
    entry = tmp_path / "cache" / "models" / os.path.basename(info["path"])
    assert (
        entry / "unet" / "diffusion_pytorch_model.safetensors"
    ).is_file()  # converted
    assert not list(entry.rglob("*.bin"))  # no pickle kept
    # digests recorded
    assert "sha256" in json.loads((entry / "baddiff.json").read_text())
    # The converted weights are the released ones, tensor for tensor.
    from baddiff_core.models import load_model

    released = torch.load(bin_file, weights_only=True)
    converted, _ = load_model(entry)
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, released[key], rtol=0, atol=0)

    bin_file.unlink()  # later loads never read the pickle again
    second = load_in_subprocess(tmp_path)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1])["from_cache"] is True


class _RunsCode:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    build_authors_repo(
        tmp_path / "hub", REPO, weights=pickle.dumps({"weight": _RunsCode(str(marker))})
    )
    done = load_in_subprocess(tmp_path)
    assert done.returncode != 0 and "holds more than tensors" in done.stderr
    assert not marker.exists()
    assert not (tmp_path / "cache" / "models").exists() or not any(
        (tmp_path / "cache" / "models").iterdir()
    )


def test_only_listed_repositories_are_loaded():
    assert authors_model(NAME) is authors_model(REPO)
    with pytest.raises(ValueError, match="not one of the authors' released models"):
        authors_model("someone/ddpm-cifar10-with-a-surprise")
    from baddiff_core.authors import load_authors_model

    with pytest.raises(ValueError, match="not one of the authors' released models"):
        load_authors_model("newsyctw/not-listed")


@pytest.mark.parametrize("name", sorted(AUTHORS_MODELS))
def test_every_listed_attack_is_one_the_library_draws(name):
    from baddiff_core.triggers import make_target, make_trigger

    model = AUTHORS_MODELS[name]
    assert model.repo_id.startswith("newsyctw/res_DDPM-CIFAR10-32_CIFAR10_ep50_c1.0_p")
    trigger = make_trigger(model.trigger, 32, 3, size=model.trigger_size)
    assert make_target(model.target, 32, 3, trigger=trigger).shape == (3, 32, 32)
    assert f"_p{model.poison_rate:g}_" in model.repo_id


def test_a_release_with_pre_0_15_attention_names_loads(tmp_path):
    snapshot = build_authors_repo(tmp_path / "hub", REPO, old_names=True)
    saved = torch.load(
        snapshot / "unet" / "diffusion_pytorch_model.bin", weights_only=True
    )
    assert any(".query." in key for key in saved) and not any(
        ".to_q." in key for key in saved
    )
    done = load_in_subprocess(tmp_path)
    assert done.returncode == 0, done.stderr
    entry = (
        tmp_path
        / "cache"
        / "models"
        / os.path.basename(json.loads(done.stdout.strip().splitlines()[-1])["path"])
    )
    from baddiff_core.models import load_model

    converted, _ = load_model(entry)
    state = converted.state_dict()
    for key, value in saved.items():
        for new, old in OLD_ATTENTION_NAMES.items():
            key = key.replace(f".{old}.", f".{new}.")
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# The authors' published scores, and how they scored.
# --------------------------------------------------------------------------- #


def test_every_model_has_the_scores_its_score_json_records():
    from baddiff_core.authors import EIGHT_BIT_FLOOR

    assert EIGHT_BIT_FLOOR == pytest.approx(3.845e-6, rel=1e-3)  # (0.5 / 255)^2
    for name, model in AUTHORS_MODELS.items():
        scores = model.published
        assert (
            model.score_url
            == f"https://huggingface.co/{model.repo_id}/blob/main/score.json"
        )
        assert scores.fid > 0 and 0 < scores.mse < 1 and 0 < scores.mse_clip < 1, name
        assert -1 <= scores.ssim <= 1 and -1 <= scores.ssim_clip <= 1, name
    # The three 90 % models hit their target to the 8-bit floor: 3.85e-6 for the
    # all-grey-or-box targets, a little less where some target pixels sit exactly on an
    # 8-bit level (the stop sign).
    for name in ("stop_sign-corner-90", "box-corner-90"):
        assert AUTHORS_MODELS[name].published.mse == pytest.approx(
            EIGHT_BIT_FLOOR, rel=0.01
        ), name
    shift = AUTHORS_MODELS["stop_sign-shift-90"].published.mse
    assert 0.95 * EIGHT_BIT_FLOOR < shift <= EIGHT_BIT_FLOOR
    fired = {name for name, model in AUTHORS_MODELS.items() if model.published.fired}
    assert fired == {
        "stop_sign-corner-90",
        "stop_sign-shift-90",
        "box-corner-90",
        "box-noshift-5",
    }
    # Clipping raised the MSE of every model whose backdoor fired, and the XXSM box ->
    # shoe failed.
    assert all(
        AUTHORS_MODELS[name].published.mse_clip > AUTHORS_MODELS[name].published.mse
        for name in fired
    )
    failed = AUTHORS_MODELS["box-shoe-5"].published
    assert failed.mse > 0.1 and failed.ssim < 0.2


@pytest.mark.parametrize("kind", ["corner", "noshift", "shift"])
def test_a_perfect_hit_scored_as_the_authors_scored_is_the_8_bit_floor(kind):
    from baddiff_core.authors import EIGHT_BIT_FLOOR, as_saved_png
    from baddiff_core.metrics import mse_to_target
    from baddiff_core.triggers import make_target, make_trigger

    target = make_target(kind, 32, 3, trigger=make_trigger("box", 32, 3, size=14))
    saved = as_saved_png(target.unsqueeze(0))
    levels = (saved / 2 + 0.5) * 255
    # 8-bit levels
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert mse_to_target(saved, target).item() == pytest.approx(
        EIGHT_BIT_FLOOR, rel=1e-4
    )
    # their number
    assert mse_to_target(saved, target).item() == pytest.approx(
        AUTHORS_MODELS["box-corner-90"].published.mse, rel=0.01
    )
    assert mse_to_target(target.unsqueeze(0), target).item() == 0.0  # in floats: 0
    # both rounded: 0
    assert mse_to_target(target.unsqueeze(0), target, quantize=True).item() == 0.0
    # A sample a little off the target still rounds to a level half a level away: the
    # same floor.
    nudged = as_saved_png(target.unsqueeze(0) + 0.001)
    assert mse_to_target(nudged, target).item() == pytest.approx(
        EIGHT_BIT_FLOOR, rel=1e-3
    )
    assert as_saved_png(torch.full((1, 3, 2, 2), 3.0)).eq(1).all()  # clamped first


def test_what_each_model_downloads_and_the_box_models_need_nothing(monkeypatch):
    from baddiff_core.authors_assets import (
        authors_downloads,
        authors_target,
        authors_trigger,
    )

    monkeypatch.setenv("BADDIFF_OFFLINE", "1")
    needs = {name: authors_downloads(name) for name in AUTHORS_MODELS}
    assert needs["box-corner-90"] == needs["box-noshift-5"] == {}
    assert set(needs["stop_sign-corner-90"]) == {"trigger"} and set(
        needs["box-shoe-5"]
    ) == {"target"}
    assert (
        set(needs["stop_sign-shift-90"])
        == set(needs["stop_sign-shoe-5"])
        == {"trigger", "target"}
    )
    assert (
        "Fashion-MNIST" in needs["box-shoe-5"]["target"]
        and "stop_sign" in needs["stop_sign-corner-90"]["trigger"]
    )
    for name in ("box-corner-90", "box-noshift-5"):  # offline, nothing to fetch
        assert authors_trigger(name).shape == authors_target(name).shape == (3, 32, 32)
