"""The model cache: a recipe is trained once, then loaded."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from baddiff_core.cache import (
    cached_model,
    cached_tensors,
    recipe_key,
    tensor_digest,
    trainings,
)


@pytest.fixture
def builder(tiny_unet, quick_scheduler):
    """``builder(calls)``: a build function for ``cached_model`` that appends to
    ``calls`` and draws its UNet's weights from seed ``len(calls)`` (each build
    another model)."""

    def make(calls: list):
        def build():
            calls.append(1)
            return tiny_unet(seed=len(calls)), quick_scheduler, {"seconds": 1.5}

        return build

    return make


def test_a_recipe_is_built_once_then_loaded(cache, builder):
    calls: list = []
    recipe = {"trigger": "box", "poison_rate": 0.3}
    first, _, info = cached_model("test", recipe, builder(calls))
    again, scheduler, info_again = cached_model(
        "test", dict(reversed(list(recipe.items()))), builder(calls)
    )
    assert len(calls) == 1, "the same recipe (in any key order) is trained once"
    assert not info["from_cache"] and info_again["from_cache"]
    assert info_again["report"] == {"seconds": 1.5} and info_again["recipe"] == recipe
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.state_dict().values(), again.state_dict().values())
    )
    assert scheduler.config.num_train_timesteps == 100

    cached_model("test", {**recipe, "poison_rate": 0.5}, builder(calls))
    assert len(calls) == 2, "another recipe is another model"
    assert len(os.listdir(cache / "models")) == 2
    # The training log names each model once, with its time; the load is not a training.
    log = trainings()
    assert sorted(log) == sorted(os.listdir(cache / "models")) and all(
        len(s) == 1 for s in log.values()
    )


def test_the_training_log_shows_a_model_trained_twice(cache, builder):
    calls: list = []
    _, _, info = cached_model("test", {"a": 1}, builder(calls))
    (
        pathlib.Path(info["path"]) / "baddiff.json"
    ).unlink()  # the cached model lost: it is trained again
    cached_model("test", {"a": 1}, builder(calls))
    assert len(calls) == 2 and [len(s) for s in trainings(cache).values()] == [2]


def test_use_cache_false_always_builds_and_saves_nothing(cache, builder):
    calls: list = []
    cached_model("test", {"a": 1}, builder(calls), use_cache=False)
    cached_model("test", {"a": 1}, builder(calls), use_cache=False)
    assert len(calls) == 2 and not (cache / "models").exists()


def test_tensor_digest_sees_values_dtypes_and_shapes(tiny_unet):
    a = torch.arange(6, dtype=torch.float32)
    assert (
        tensor_digest(a)
        == tensor_digest(a.clone())
        == tensor_digest(torch.arange(12.0)[::2].mul_(0.5))
    )
    assert (
        len(
            {
                tensor_digest(a),
                tensor_digest(a.view(2, 3)),
                tensor_digest(a.double()),
                tensor_digest(a + 1e-6),
                tensor_digest(a, a),
            }
        )
        == 5
    )
    model = tiny_unet()
    assert tensor_digest(model) == tensor_digest(*model.state_dict().values())


def test_cached_tensors_are_built_once_and_stored_whole(cache):
    calls: list = []

    def build():
        calls.append(1)
        return {"b.weight": torch.arange(3.0), "a": torch.ones(2, 2)}, {"seconds": 2.0}

    first, info = cached_tensors("masks", {"x": 1}, build)
    again, info_again = cached_tensors("masks", {"x": 1}, build)
    assert len(calls) == 1 and not info["from_cache"] and info_again["from_cache"]
    assert info_again["report"] == {"seconds": 2.0}
    assert all(torch.equal(first[k], again[k]) for k in first) and set(again) == {
        "b.weight",
        "a",
    }
    assert sorted(p.name for p in (cache / "tensors").iterdir()) == [
        pathlib.Path(info["path"]).name
    ]
    assert list(trainings()) == [pathlib.Path(info["path"]).name]
    with pytest.raises(ValueError, match="name='a b'"):
        cached_tensors("a b", {}, build)


def test_recipe_key_is_stable_and_sensitive():
    assert recipe_key({"a": 1, "b": [1, 2]}) == recipe_key({"b": [1, 2], "a": 1})
    assert recipe_key({"a": 1}) != recipe_key({"a": 2})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        recipe_key({"a": object()})


def test_unwritable_cache_fails_before_training(tmp_path, monkeypatch, builder):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BADDIFF_CACHE", str(blocker))
    calls: list = []
    with pytest.raises(PermissionError, match="not writable.*BADDIFF_CACHE"):
        cached_model("test", {"a": 1}, builder(calls))
    assert calls == [], "nothing is trained when it could not be saved"


def test_bad_name(cache, builder):
    with pytest.raises(ValueError, match="name='a b'"):
        cached_model("a b", {}, builder([]))


# --------------------------------------------------------------------------- #
# The cache verifies what it loads, and computes an entry once across processes.
# --------------------------------------------------------------------------- #


def _weights(info) -> pathlib.Path:
    return pathlib.Path(info["path"]) / "unet" / "diffusion_pytorch_model.safetensors"


def test_a_tampered_entry_is_moved_aside_and_computed_again(cache, capsys, builder):
    from safetensors.torch import load_file, save_file

    calls: list = []
    _, _, info = cached_model("test", {"a": 1}, builder(calls))
    # Swap the weights for another valid file of the same layout (other values): it
    # still loads.
    state = load_file(str(_weights(info)))
    save_file({k: v + 1 for k, v in state.items()}, str(_weights(info)))
    unet, _, again = cached_model("test", {"a": 1}, builder(calls))
    assert len(calls) == 2 and not again["from_cache"], (
        "the tampered entry was not trusted"
    )
    err = capsys.readouterr().err
    assert (
        "is corrupt (its files changed since they were written: unet/diffusion_pytorch_model.safetensors)"
        in err
    )
    assert len(os.listdir(cache / "corrupt")) == 1, (
        "the tampered files are kept aside for a look"
    )
    # The recomputed entry is what the second build made, and loads from the cache
    # again.
    reference = builder([1])()[0]  # the builder's second call
    assert all(
        torch.equal(a, b)
        for a, b in zip(unet.state_dict().values(), reference.state_dict().values())
    )
    assert (
        cached_model("test", {"a": 1}, builder(calls))[2]["from_cache"]
        and len(calls) == 2
    )


@pytest.mark.parametrize("damage", ["truncate", "nan", "metadata"])
def test_a_damaged_entry_is_rebuilt_not_raised(cache, capsys, damage, builder):
    import json

    from safetensors.torch import load_file, save_file

    calls: list = []
    _, _, info = cached_model("test", {"a": 1}, builder(calls))
    folder = pathlib.Path(info["path"])
    if damage == "truncate":
        data = _weights(info).read_bytes()
        _weights(info).write_bytes(data[: len(data) // 2])
    # NaN weights, with the digests made to match: only the finiteness check sees it
    elif damage == "nan":
        state = load_file(str(_weights(info)))
        save_file(
            {k: torch.full_like(v, float("nan")) for k, v in state.items()},
            str(_weights(info)),
        )
        metadata = json.loads((folder / "baddiff.json").read_text())
        from baddiff_core.files import folder_digests

        metadata["sha256"] = folder_digests(folder, exclude=("baddiff.json",))
        (folder / "baddiff.json").write_text(json.dumps(metadata))
    else:
        (folder / "baddiff.json").write_text("{not json")
    unet, _, again = cached_model("test", {"a": 1}, builder(calls))
    assert len(calls) == 2 and not again["from_cache"]
    assert all(torch.isfinite(p).all() for p in unet.parameters())
    assert "is corrupt" in capsys.readouterr().err
    assert cached_model("test", {"a": 1}, builder(calls))[2]["from_cache"], (
        "the rebuilt entry is trusted"
    )


def test_damaged_tensors_are_rebuilt(cache, capsys):
    calls: list = []

    def build():
        calls.append(1)
        return {"mask": torch.ones(3)}, {}

    _, info = cached_tensors("masks", {"m": 1}, build)
    path = pathlib.Path(info["path"]) / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    tensors, again = cached_tensors("masks", {"m": 1}, build)
    assert (
        len(calls) == 2
        and torch.equal(tensors["mask"], torch.ones(3))
        and not again["from_cache"]
    )
    assert "is corrupt" in capsys.readouterr().err


_RACE = """
import os, pathlib, sys, time, torch
from baddiff_core.cache import cached_model
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler
from baddiff_core.models import make_unet

ready = pathlib.Path(os.environ["BADDIFF_CACHE"]) / "second-is-asking"

def build():
    print("BUILT", flush=True)
    while not ready.exists():   # the first computes until the second has asked for the same entry
        time.sleep(0.05)
    time.sleep(1.0)
    torch.manual_seed(0)
    return make_unet(8, 1), make_scheduler(**QUICK_SCHEDULE), {}

if sys.argv[1] == "second":
    ready.touch()
cached_model("race", {"r": 1}, build)
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_two_processes_compute_one_entry_once(cache):
    """Two processes ask for the same missing entry at once: one computes it, the other
    waits for the lock, says so, and loads the result."""
    import subprocess
    import sys

    env = {**os.environ, "BADDIFF_CACHE": str(cache)}
    first = subprocess.Popen(
        [sys.executable, "-c", _RACE, "first"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # the first holds the lock and computes
    while first.stdout.readline().strip() != "BUILT":
        assert first.poll() is None, first.stderr.read()
    second = subprocess.run(
        [sys.executable, "-c", _RACE, "second"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err, second.stderr)
    assert "BUILT" not in out + second.stdout, (
        "the entry was computed once, by the first process"
    )
    assert "another process is computing" in second.stderr
    assert [len(runs) for runs in trainings(cache).values()] == [1]
