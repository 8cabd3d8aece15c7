"""Every expected failure of the command line is one line and exit status 2; Ctrl-C is
130; an unexpected one is one line and 1, with the traceback behind ``--debug``."""

from __future__ import annotations

import pytest

from baddiff_core import cli
from baddiff_core.models import save_model
from baddiff_core.pretrained import load_clean_digits
from conftest import cli_argv


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "clean"
    unet, scheduler = load_clean_digits()
    save_model(
        folder,
        unet,
        scheduler,
        metadata={"kind": "clean", "recipe": {"dataset": "digits"}},
    )
    return folder


def run(argv, capsys) -> tuple[int, str]:
    status = cli.main(argv)
    return status, capsys.readouterr().err


def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    status, err = run(["sample", "./typo-model", "--output", "x.png"], capsys)
    assert (
        status == 2
        and "'./typo-model' does not exist" in err
        and len(err.strip().splitlines()) == 1
    )


def test_a_corrupt_trigger_file_is_one_line(model_folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    (broken / cli.BACKDOOR_FILE).write_bytes(b"\x00" * 40)
    status, err = run(
        ["evaluate", str(broken), "--n", "2", "--fd-samples", "0"], capsys
    )
    assert (
        status == 2
        and err.startswith("baddiff evaluate: error:")
        and len(err.strip().splitlines()) == 1
    )


@pytest.mark.parametrize(
    "failure, status, words",
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                "allocate 1288490188800 bytes."
            ),
            2,
            "not enough memory",
        ),
        (ValueError("x" * 20_000), 2, "[...]"),
        (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError"),
    ],
)
def test_failures_inside_a_command(
    model_folder, tmp_path, capsys, monkeypatch, failure, status, words
):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr("baddiff_core.sampling.sample", fail)
    code, err = run(
        ["sample", str(model_folder), "--n", "2", "--output", str(tmp_path / "s.png")],
        capsys,
    )
    assert code == status and words in err
    assert (
        len(err.strip().splitlines()) == 1 and len(err) < 700 and "Traceback" not in err
    )
    assert not (tmp_path / "s.png").exists()
    with pytest.raises(type(failure)):  # --debug: the traceback, for a bug report
        cli.main(
            cli_argv("--debug", "sample", model_folder, n=2, output=tmp_path / "s.png")
        )


# --------------------------------------------------------------------------- #
# Non-finite values are errors where they enter, not an all-white picture.
# --------------------------------------------------------------------------- #


def test_nan_weights_are_refused_when_loaded(model_folder, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-weights"
    shutil.copytree(model_folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    first = next(iter(state))
    state[first] = state[first].clone().fill_(float("nan"))
    save_file(state, str(weights))
    status, err = run(
        ["sample", str(broken), "--n", "2", "--output", str(tmp_path / "s.png")], capsys
    )
    assert status == 2 and "NaN or infinite" in err and first in err
    assert not (tmp_path / "s.png").exists()


def test_a_nan_schedule_is_refused(model_folder, tmp_path, capsys):
    import json
    import shutil

    broken = tmp_path / "nan-schedule"
    shutil.copytree(model_folder, broken)
    config_file = broken / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["beta_start"] = float("nan")
    config_file.write_text(json.dumps(config))
    status, err = run(
        ["sample", str(broken), "--n", "2", "--output", str(tmp_path / "s.png")], capsys
    )
    assert status == 2 and "noise schedule" in err and "beta_start" in err


def test_nan_or_out_of_range_triggers_are_refused():
    import torch

    from baddiff_core.sampling import sample
    from baddiff_core.triggers import make_trigger, stamp

    unet, scheduler = load_clean_digits()
    images = torch.zeros(2, 1, 16, 16)
    nan_trigger = make_trigger("box", 16, 1)
    nan_trigger[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stamp(images, nan_trigger)
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        stamp(images, make_trigger("box", 16, 1) * 3)
    with pytest.raises(ValueError, match="trigger must be finite, got 1 NaN"):
        sample(
            unet,
            scheduler,
            2,
            trigger=nan_trigger,
            num_inference_steps=1,
            progress=False,
        )
    with pytest.raises(ValueError, match="noise must be finite, got 256 NaN"):
        sample(
            unet,
            scheduler,
            1,
            noise=torch.full((1, 1, 16, 16), float("nan")),
            num_inference_steps=1,
            progress=False,
        )


def test_scan_checks_its_sampling_steps_before_the_inversion(
    model_folder, tmp_path, capsys, monkeypatch
):
    def no_inversion(*args, **kwargs):
        raise AssertionError("the inversion ran before --steps was checked")

    monkeypatch.setattr("baddiff_core.defenses.scanning.invert_trigger", no_inversion)
    status, err = run(
        cli_argv("scan", model_folder, steps=1000, output=tmp_path / "scan"), capsys
    )
    assert status == 2 and "num_inference_steps must be an integer in [1, 100]" in err


# --------------------------------------------------------------------------- #
# Memory: a large `sample` request is a folder of PNGs, drawn batch by batch.
# --------------------------------------------------------------------------- #


def test_a_large_grid_is_refused_before_sampling(
    model_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        "baddiff_core.sampling.sample", lambda *a, **k: pytest.fail("sampled")
    )
    status, err = run(
        cli_argv("sample", model_folder, n=2000, output=tmp_path / "g.png"), capsys
    )
    assert status == 2 and "too many images for one PNG grid" in err and "folder" in err


def test_sample_writes_a_folder_batch_by_batch(
    model_folder, tmp_path, capsys, monkeypatch
):
    import json

    import numpy as np
    from PIL import Image

    from baddiff_core import sampling

    requested = []
    real_sample = sampling.sample

    def counting(model, scheduler, n, **kwargs):
        requested.append(n)
        return real_sample(model, scheduler, n, **kwargs)

    monkeypatch.setattr("baddiff_core.sampling.sample", counting)
    out = tmp_path / "samples"
    status, err = run(
        cli_argv("sample", model_folder, n=5, batch_size=2, steps=2, output=out),
        capsys,
    )
    assert status == 0, err
    assert requested == [2, 2, 1], "at most one batch in memory"
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)] + ["samples.json"]
    first = np.asarray(Image.open(out / "000000.png"))
    assert first.shape == (16, 16) and first.dtype == np.uint8
    assert json.loads((out / "samples.json").read_text())["n"] == 5
    # Written again over its own output: allowed; over a folder of other files: refused.
    assert (
        run(cli_argv("sample", model_folder, n=1, steps=1, output=out), capsys)[0] == 0
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    status, err = run(
        ["sample", str(model_folder), "--n", "1", "--output", str(tmp_path / "mine")],
        capsys,
    )
    assert status == 2 and "not written by baddiff" in err


def _broken_copy(model_folder, tmp_path, name):
    import shutil

    folder = tmp_path / name
    shutil.copytree(model_folder, folder)
    return folder


def _vae_in_unet(folder):
    import json

    config = json.loads((folder / "unet" / "config.json").read_text())
    config["_class_name"] = "AutoencoderKL"  # what diffusers writes for a VAE
    (folder / "unet" / "config.json").write_text(json.dumps(config))


def _no_scheduler(folder):
    import shutil

    shutil.rmtree(folder / "scheduler")


def _unknown_beta_schedule(folder):
    import json

    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["beta_schedule"] = "cosine-ish"
    path.write_text(json.dumps(config))


def _config_not_json(folder):
    (folder / "unet" / "config.json").write_text("{not json")


def _config_not_utf8(folder):
    (folder / "unet" / "config.json").write_bytes(b"\xff\xfe{")


def _config_a_list(folder):
    (folder / "unet" / "config.json").write_text("[1, 2]")


@pytest.mark.parametrize(
    "damage, words",
    [
        (_vae_in_unet, "describes the class 'AutoencoderKL', not a UNet2DModel"),
        (_no_scheduler, "scheduler_config.json' is missing"),
        (_unknown_beta_schedule, "beta_schedule 'cosine-ish' is not one of"),
        (_config_not_json, "config.json' is not valid JSON (Expecting property name"),
        (_config_not_utf8, "config.json' is not UTF-8 text"),
        (_config_a_list, "holds a JSON list, not an object"),
    ],
)
def test_a_damaged_or_foreign_model_folder_is_named_in_one_line(
    model_folder, tmp_path, capsys, damage, words
):
    folder = _broken_copy(model_folder, tmp_path, "damaged")
    damage(folder)
    status, err = run(
        ["sample", str(folder), "--n", "1", "--output", str(tmp_path / "s.png")], capsys
    )
    assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err
    # the weights are fine: the message must not blame them
    assert "truncated or corrupt" not in err
    assert not (tmp_path / "s.png").exists()


def test_an_empty_model_path_is_refused_not_read_as_the_current_folder(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    status, err = run(["sample", "", "--output", "x.png"], capsys)
    assert status == 2 and "the model path is empty" in err


@pytest.mark.parametrize(
    "seed, words",
    [
        # 2**64: torch's "Overflow when unpacking long long"
        (
            "18446744073709551616",
            "from 0 to 2**64 - 1",
        ),
        ("-1", "from 0 to 2**64 - 1"),
        ("1e3", "a seed is an integer"),
    ],
)
def test_a_seed_out_of_torch_range_is_refused_by_the_parser(
    model_folder, tmp_path, capsys, seed, words
):
    with pytest.raises(SystemExit) as exit_:
        cli.main(cli_argv("sample", model_folder, seed=seed, output=tmp_path / "s.png"))
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_the_largest_seed_torch_takes_is_accepted():
    assert cli._seed(str(2**64 - 1)) == 2**64 - 1
    import torch

    # what the parser promises, checked against torch
    torch.Generator().manual_seed(2**64 - 1)


def test_a_scan_threshold_of_one_is_a_mode_share_and_is_accepted(monkeypatch):
    from baddiff_core.defenses import scan_model, scanning
    from baddiff_core.pretrained import load_clean_digits

    unet, scheduler = load_clean_digits()

    class Validated(Exception):
        pass

    def stop(*args, **kwargs):
        raise Validated

    monkeypatch.setattr(scanning, "invert_trigger", stop)  # the work after the checks
    # 1: backdoored only when every sample is alike (as --help says)
    with pytest.raises(Validated):
        scan_model(unet, scheduler, threshold=1, use_cache=False)
    with pytest.raises(ValueError, match=r"mode share in \(0, 1\]"):
        scan_model(unet, scheduler, threshold=1.5)
    with pytest.raises(ValueError, match=r"mode share in \(0, 1\]"):
        scan_model(unet, scheduler, threshold=True)


def test_a_symlinked_config_is_followed(model_folder, tmp_path, capsys):
    folder = _broken_copy(model_folder, tmp_path, "linked")
    real = tmp_path / "real_config.json"
    (folder / "unet" / "config.json").rename(real)
    (folder / "unet" / "config.json").symlink_to(real)
    status, err = run(
        cli_argv("sample", folder, n=1, steps=2, output=tmp_path / "s.png"), capsys
    )
    assert status == 0 and (tmp_path / "s.png").is_file(), err


@pytest.mark.skipif(
    not __import__("sys").platform.startswith("linux"),
    reason="Linux file names are bytes",
)
def test_a_path_that_is_not_utf8_is_named_not_blamed_on_the_weights(
    model_folder, tmp_path, capsys
):
    import os
    import shutil

    # surrogates, as Python reads it
    folder = os.fsdecode(os.fsencode(str(tmp_path)) + b"/m\xff\xfe")
    shutil.copytree(model_folder, folder)
    status, err = run(
        ["sample", folder, "--n", "1", "--output", str(tmp_path / "s.png")], capsys
    )
    assert status == 2 and "not UTF-8" in err and "corrupt" not in err


def test_a_folder_of_pngs_that_cannot_fit_on_the_disk_is_refused_before_sampling(
    model_folder, tmp_path, capsys, monkeypatch
):
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    # 1 MB free
    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 10**6, 10**6)
    )

    def never(*args, **kwargs):
        raise AssertionError("sampled before checking the disk")

    monkeypatch.setattr("baddiff_core.sampling.sample", never)
    # 16 px grey: a 4 KiB block per file at least, so 1,000 images need about 4 MB.
    status, err = run(
        cli_argv("sample", model_folder, n=1000, output=tmp_path / "many"), capsys
    )
    assert status == 2 and "--n 1000 PNGs need about" in err and "GiB free" in err
    assert not (tmp_path / "many").exists()


@pytest.mark.parametrize("command", ["backdoor", "scan"])
def test_a_sampler_and_a_solver_that_disagree_are_one_line(
    model_folder, tmp_path, capsys, monkeypatch, command
):
    """``--solver`` is the hidden alias of ``--sampler``; a contradiction is refused
    before any model is loaded or trained."""
    monkeypatch.setattr(
        "baddiff_core.models.load_model", lambda *a, **k: pytest.fail("loaded")
    )
    model = [str(model_folder)] if command == "scan" else []
    argv = [command, *model, "--sampler", "ddim", "--solver", "sde"]
    status, err = run([*argv, "--output", str(tmp_path / "o")], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--sampler ddim and --solver sde disagree" in err
