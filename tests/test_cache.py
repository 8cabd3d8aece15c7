"""The model cache: a recipe is trained once, then loaded."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from baddiff_core.cache import cached_model, cached_tensors, recipe_key, tensor_digest, trainings
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler
from baddiff_core.models import make_unet


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BADDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def builder(calls: list):
    def build():
        calls.append(1)
        torch.manual_seed(len(calls))
        return make_unet(8, 1), make_scheduler(**QUICK_SCHEDULE), {"seconds": 1.5}
    return build


def test_a_recipe_is_built_once_then_loaded(cache):
    calls: list = []
    recipe = {"trigger": "box", "poison_rate": 0.3}
    first, _, info = cached_model("test", recipe, builder(calls))
    again, scheduler, info_again = cached_model("test", dict(reversed(list(recipe.items()))), builder(calls))
    assert len(calls) == 1, "the same recipe (in any key order) is trained once"
    assert not info["from_cache"] and info_again["from_cache"]
    assert info_again["report"] == {"seconds": 1.5} and info_again["recipe"] == recipe
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert scheduler.config.num_train_timesteps == 100

    cached_model("test", {**recipe, "poison_rate": 0.5}, builder(calls))
    assert len(calls) == 2, "another recipe is another model"
    assert len(os.listdir(cache / "models")) == 2
    # The training log names each model once, with its time; the load is not a training.
    log = trainings()
    assert sorted(log) == sorted(os.listdir(cache / "models")) and all(len(s) == 1 for s in log.values())


def test_the_training_log_shows_a_model_trained_twice(cache):
    calls: list = []
    _, _, info = cached_model("test", {"a": 1}, builder(calls))
    (pathlib.Path(info["path"]) / "baddiff.json").unlink()   # the cached model lost: it is trained again
    cached_model("test", {"a": 1}, builder(calls))
    assert len(calls) == 2 and [len(s) for s in trainings(cache).values()] == [2]


def test_use_cache_false_always_builds_and_saves_nothing(cache):
    calls: list = []
    cached_model("test", {"a": 1}, builder(calls), use_cache=False)
    cached_model("test", {"a": 1}, builder(calls), use_cache=False)
    assert len(calls) == 2 and not (cache / "models").exists()


def test_tensor_digest_sees_values_dtypes_and_shapes():
    a = torch.arange(6, dtype=torch.float32)
    assert tensor_digest(a) == tensor_digest(a.clone()) == tensor_digest(torch.arange(12.0)[::2].mul_(0.5))
    assert len({tensor_digest(a), tensor_digest(a.view(2, 3)), tensor_digest(a.double()),
                tensor_digest(a + 1e-6), tensor_digest(a, a)}) == 5
    torch.manual_seed(0)
    model = make_unet(8, 1)
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
    assert all(torch.equal(first[k], again[k]) for k in first) and set(again) == {"b.weight", "a"}
    assert sorted(p.name for p in (cache / "tensors").iterdir()) == [pathlib.Path(info["path"]).name]
    assert list(trainings()) == [pathlib.Path(info["path"]).name]
    with pytest.raises(ValueError, match="name='a b'"):
        cached_tensors("a b", {}, build)


def test_recipe_key_is_stable_and_sensitive():
    assert recipe_key({"a": 1, "b": [1, 2]}) == recipe_key({"b": [1, 2], "a": 1})
    assert recipe_key({"a": 1}) != recipe_key({"a": 2})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        recipe_key({"a": object()})


def test_unwritable_cache_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BADDIFF_CACHE", str(blocker))
    calls: list = []
    with pytest.raises(PermissionError, match="not writable.*BADDIFF_CACHE"):
        cached_model("test", {"a": 1}, builder(calls))
    assert calls == [], "nothing is trained when it could not be saved"


def test_bad_name(cache):
    with pytest.raises(ValueError, match="name='a b'"):
        cached_model("a b", {}, builder([]))
