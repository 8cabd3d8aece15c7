"""The authors' released models: only listed repositories, tensors only, converted to safetensors
once and verified after. Run in a subprocess against a stand-in hub cache, offline, through the
same code a reader's Colab runs (``HF_HUB_CACHE`` is read when huggingface_hub is imported)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from baddiff_core.authors import AUTHORS_MODELS, authors_model
from standins import OLD_ATTENTION_NAMES, build_authors_repo

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
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
               BADDIFF_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_a_released_model_is_converted_once_then_loaded_verified(tmp_path):
    snapshot = build_authors_repo(tmp_path / "hub", REPO)
    first = load_in_subprocess(tmp_path)
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout.strip().splitlines()[-1])
    assert info["from_cache"] is False and info["report"]["repo_id"] == REPO and info["T"] == 10
    import hashlib

    bin_file = snapshot / "unet" / "diffusion_pytorch_model.bin"
    assert info["report"]["bin_sha256"] == hashlib.sha256(bin_file.read_bytes()).hexdigest()
    entry = tmp_path / "cache" / "models" / os.path.basename(info["path"])
    assert (entry / "unet" / "diffusion_pytorch_model.safetensors").is_file()   # converted
    assert not list(entry.rglob("*.bin"))                                        # no pickle kept
    assert "sha256" in json.loads((entry / "baddiff.json").read_text())         # digests recorded
    # The converted weights are the released ones, tensor for tensor.
    from baddiff_core.models import load_model

    released = torch.load(bin_file, weights_only=True)
    converted, _ = load_model(entry)
    for key, value in converted.state_dict().items():
        torch.testing.assert_close(value, released[key], rtol=0, atol=0)

    bin_file.unlink()   # later loads never read the pickle again
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
    build_authors_repo(tmp_path / "hub", REPO, weights=pickle.dumps({"weight": _RunsCode(str(marker))}))
    done = load_in_subprocess(tmp_path)
    assert done.returncode != 0 and "holds more than tensors" in done.stderr
    assert not marker.exists()
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


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
    saved = torch.load(snapshot / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    assert any(".query." in key for key in saved) and not any(".to_q." in key for key in saved)
    done = load_in_subprocess(tmp_path)
    assert done.returncode == 0, done.stderr
    entry = tmp_path / "cache" / "models" / os.path.basename(json.loads(done.stdout.strip().splitlines()[-1])["path"])
    from baddiff_core.models import load_model

    converted, _ = load_model(entry)
    state = converted.state_dict()
    for key, value in saved.items():
        for new, old in OLD_ATTENTION_NAMES.items():
            key = key.replace(f".{old}.", f".{new}.")
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
