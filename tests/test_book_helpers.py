"""Run settings, devices, data and figures shared by every chapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from baddiff_core.book import chapter_settings, glue
from baddiff_core.data import load_sample_photo
from baddiff_core.devices import resolve_device
from baddiff_core.viz import animate_images, show_images, to_display


def test_auto_device_is_a_device_this_machine_has():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else device.type)
    torch.zeros(1, device=device)  # usable


@pytest.mark.parametrize("bad", ["tpu9", "gpu", "cuda:x", "", "cpu0"])
def test_unknown_device_names_the_value_and_the_choices(bad):
    with pytest.raises(ValueError, match=rf"device={bad!r}.*'auto', 'cpu', 'cuda'"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_says_so():
    with pytest.raises(ValueError, match="sees none"):
        resolve_device("cuda")


def test_device_type_error():
    with pytest.raises(TypeError, match="got 3 of type int"):
        resolve_device(3)


def test_chapter_settings_seed_everything_reproducibly():
    a = chapter_settings(quick=True, device="cpu", seed=7)
    first = torch.rand(3), np.random.rand(3), torch.randn(2, generator=a.generator(1))
    b = chapter_settings(quick=True, device="cpu", seed=7)
    second = torch.rand(3), np.random.rand(3), torch.randn(2, generator=b.generator(1))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])
    assert not torch.equal(
        torch.randn(2, generator=b.generator(1)),
        torch.randn(2, generator=b.generator(2)),
    )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            dict(quick="yes", device="cpu", seed=0),
            TypeError,
            "QUICK must be True.*'yes'",
        ),
        (
            dict(quick=True, device="cpu", seed=-1),
            ValueError,
            "SEED must be a non-negative integer, got SEED=-1",
        ),
        (
            dict(quick=True, device="cpu", seed=1.5),
            TypeError,
            "SEED must be .* got SEED=1.5",
        ),
        (dict(quick=True, device="tpu9", seed=0), ValueError, "device='tpu9'"),
    ],
)
def test_chapter_settings_reject_bad_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        chapter_settings(**kwargs)


def test_glue_stores_plain_python_numbers(monkeypatch):
    import myst_nb

    stored = {}
    monkeypatch.setattr(
        myst_nb, "glue", lambda name, value, display: stored.update({name: value})
    )
    glue("a", np.float64(0.25))
    glue("b", torch.tensor(3))
    glue("c", "text")
    assert stored == {"a": 0.25, "b": 3, "c": "text"}
    assert type(stored["a"]) is float and type(stored["b"]) is int


def test_sample_photo_shapes_and_range():
    grey = load_sample_photo("china.jpg", size=(24, 36), grayscale=True)
    colour = load_sample_photo("flower.jpg", size=(24, 36))
    assert grey.shape == (24, 36) and colour.shape == (24, 36, 3)
    for image in (grey, colour):
        assert (
            image.dtype == np.float32
            and 0.0 <= image.min()
            and image.max() <= 1.0
            and image.std() > 0.05
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="lena.png"), "name='lena.png' is not a photo"),
        (dict(size=(0, 10)), "size must be"),
    ],
)
def test_sample_photo_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_sample_photo(**kwargs)


def test_to_display_maps_model_range_to_unit_range():
    # 1, 2, 2 in [-1, 1] (2 is clipped)
    image = torch.tensor([[[-1.0, 0.0], [1.0, 2.0]]])
    np.testing.assert_allclose(to_display(image), [[0.0, 0.5], [1.0, 1.0]])
    rgb = torch.zeros(3, 4, 5)
    assert to_display(rgb).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="value_range"):
        to_display(image, value_range=(1, 0))


def test_show_images_and_animation():
    batch = torch.rand(5, 3, 8, 8) * 2 - 1
    fig = show_images(batch, titles=list("abcde"), ncols=3)
    assert len(fig.axes) == 6 and fig.axes[4].get_title() == "e"
    html = animate_images(list(batch), titles=list("abcde")).to_jshtml()
    assert html.count("data:image/png;base64") == 5
    with pytest.raises(ValueError, match="titles"):
        show_images(batch, titles=["a"])


def test_markdown_table_formats_columns_and_escapes_pipes():
    from baddiff_core.book import markdown_table

    text = markdown_table(
        [
            {"attack": "a|b", "asr": 0.9061},
            {"attack": "c", "asr": 1},
            {"attack": "d", "asr": "-"},
        ],
        {"asr": ".2f"},
    )
    assert text.splitlines() == [
        "| attack | asr |",
        "|---|---|",
        "| a\\|b | 0.91 |",
        "| c | 1.00 |",
        "| d | - |",
    ]


@pytest.mark.parametrize(
    "rows, formats, message",
    [
        ([], None, "at least one row"),
        ([{"a": 1}, {"b": 2}], None, "row 1 has columns"),
        ([{"a": 1}], {"z": ".2f"}, "formats names columns"),
    ],
)
def test_markdown_table_bad_input(rows, formats, message):
    from baddiff_core.book import markdown_table

    with pytest.raises(ValueError, match=message):
        markdown_table(rows, formats)


def test_show_strips_puts_each_row_side_by_side():
    from baddiff_core.viz import show_strips

    grey = -torch.ones(3, 1, 4, 5)
    grey[1] = 1.0  # the middle image of the first row is white
    fig = show_strips({"first": grey, "second": [torch.zeros(1, 4, 5)] * 2})
    first, second = fig.axes
    assert (
        first.get_title(loc="left") == "first"
        and second.get_title(loc="left") == "second"
    )
    shown = first.get_images()[0].get_array()
    assert shown.shape == (4, 15)  # three 4 x 5 images, side by side
    assert shown[:, 5:10].min() == 1 and shown[:, :5].max() == 0
    assert second.get_images()[0].get_array().shape == (4, 10)
    with pytest.raises(ValueError, match="at least one row"):
        show_strips({})


# --------------------------------------------------------------------------- #
# The three scales: quick, full and smoke (full mode's code at a few steps, CI).
# --------------------------------------------------------------------------- #


def test_scale_comes_from_quick_and_the_environment(monkeypatch):
    monkeypatch.delenv("BADDIFF_SCALE", raising=False)
    assert chapter_settings(quick=True, device="cpu", seed=0).scale == "quick"
    assert chapter_settings(quick=False, device="cpu", seed=0).scale == "full"
    monkeypatch.setenv("BADDIFF_SCALE", "smoke")
    assert chapter_settings(quick=False, device="cpu", seed=0).scale == "smoke"
    # quick is small already
    assert chapter_settings(quick=True, device="cpu", seed=0).scale == "quick"
    monkeypatch.setenv("BADDIFF_SCALE", "huge")
    with pytest.raises(ValueError, match="BADDIFF_SCALE='huge' is not a scale"):
        chapter_settings(quick=False, device="cpu", seed=0)


def test_recipe_sets_the_seed_and_shrinks_only_at_the_smoke_scale(monkeypatch):
    from baddiff_core.attack import BackdoorRecipe
    from baddiff_core.book import SMOKE_SCHEDULE
    from baddiff_core.train import TrainConfig

    monkeypatch.delenv("BADDIFF_SCALE", raising=False)
    paper = BackdoorRecipe.paper()
    full = chapter_settings(quick=False, device="cpu", seed=5)
    recipe = full.recipe(paper, seed_offset=2)
    assert recipe.train.seed == 7 and recipe.train.steps == paper.train.steps == 19_550
    assert recipe.data_limit is None and full.scaled(1000, smoke=4) == 1000

    monkeypatch.setenv("BADDIFF_SCALE", "smoke")
    smoke = chapter_settings(quick=False, device="cpu", seed=5)
    recipe = smoke.recipe(paper, seed_offset=2)
    assert (
        recipe.train.seed == 7
        and recipe.train.steps == 2
        and recipe.train.batch_size == 4
    )
    assert (
        recipe.data_limit == 32
        and recipe.trigger == paper.trigger
        and recipe.base == paper.base
    )
    assert smoke.scaled(1000, smoke=4) == 4
    scratch = smoke.recipe(BackdoorRecipe.paper(base="scratch"))
    assert scratch.schedule == SMOKE_SCHEDULE
    config = smoke.recipe(TrainConfig(steps=40_000, checkpoint_every=10_000))
    assert (config.steps, config.checkpoint_every, config.seed) == (2, 1, 5)
    with pytest.raises(TypeError, match="BackdoorRecipe or a TrainConfig"):
        smoke.recipe({"steps": 3})


def test_check_asserts_where_measured_and_records_elsewhere(monkeypatch, capsys):
    monkeypatch.delenv("BADDIFF_SCALE", raising=False)
    quick = chapter_settings(quick=True, device="cpu", seed=0)
    full = chapter_settings(quick=False, device="cpu", seed=0)
    with pytest.raises(AssertionError, match="clipping stops it"):
        quick.check(False, "clipping stops it")
    with pytest.raises(AssertionError):
        full.check(0.3 > 0.5, "fires")
    assert full.check(False, "white box missed", scales=("quick",)) is False
    assert (
        "[full scale, recorded, not checked] white box missed: does not hold"
        in capsys.readouterr().out
    )
    monkeypatch.setenv("BADDIFF_SCALE", "smoke")
    smoke = chapter_settings(quick=False, device="cpu", seed=0)
    assert smoke.check(False, "fires") is False and smoke.check(True, "stops") is True
    assert (
        "[smoke scale, recorded, not checked] fires: does not hold"
        in capsys.readouterr().out
    )
    with pytest.raises(ValueError, match="unknown scales"):
        quick.check(True, "x", scales=("fast",))


def test_scale_settings_name_the_threshold_and_the_fid_features(monkeypatch):
    from baddiff_core.evaluation import ASR_THRESHOLDS

    monkeypatch.delenv("BADDIFF_SCALE", raising=False)
    quick = chapter_settings(quick=True, device="cpu", seed=0)
    full = chapter_settings(quick=False, device="cpu", seed=0)
    assert (
        (quick.asr_threshold, full.asr_threshold)
        == (ASR_THRESHOLDS["quick"], ASR_THRESHOLDS["full"])
        == (0.01, 0.05)
    )
    assert (quick.fid_features, full.fid_features) == ("digits", "inception")
    monkeypatch.setenv("BADDIFF_SCALE", "smoke")
    assert chapter_settings(quick=False, device="cpu", seed=0).fid_features == "digits"


def test_full_mode_says_what_it_downloads(monkeypatch, capsys):
    monkeypatch.delenv("BADDIFF_SCALE", raising=False)
    chapter_settings(quick=True, device="cpu", seed=0)
    assert "downloads" not in capsys.readouterr().out
    chapter_settings(quick=False, device="cpu", seed=0)
    out = capsys.readouterr().out
    assert "google/ddpm-cifar10-32" in out and "CIFAR-10" in out and "Inception" in out
