"""``baddiff scan``: trigger inversion and detection from the command line, on a small
model folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from baddiff_core.cli import main
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler
from baddiff_core.models import save_model
from conftest import cli_argv

#: The smallest scan the tests run: 2 samples, 1 inversion step, 2 DDPM steps.
SMALL_SCAN = dict(n=2, inversion_steps=1, noise_batch=2, steps=2)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_unet):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_model(
        folder,
        tiny_unet(block_out_channels=(16, 32)),
        make_scheduler(**QUICK_SCHEDULE),
    )
    return folder


def test_scan_writes_a_verdict_images_and_a_report(model_folder, tmp_path, capsys):
    out = tmp_path / "scan"
    status = main(
        cli_argv(
            "scan",
            model_folder,
            n=4,
            inversion_steps=3,
            noise_batch=4,
            steps=3,
            output=out,
            json=True,
        )
    )
    report = json.loads(capsys.readouterr().out)
    assert status == (1 if report["verdict"] == "BACKDOORED" else 0)
    assert report["samples"] == 4 and report["inversion_steps"] == 3
    assert 0.25 <= report["mode_share"] <= 1 and report["seconds"] >= 0
    assert {p.name for p in out.iterdir()} == {
        "trigger.png",
        "samples.png",
        "trigger.safetensors",
        "scan.json",
    }
    assert load_file(str(out / "trigger.safetensors"))["trigger"].shape == (1, 8, 8)
    assert json.loads((out / "scan.json").read_text()) == report


def test_scan_for_ddim_backdoors_under_clipping_says_so(model_folder, tmp_path, capsys):
    status = main(
        cli_argv(
            "scan",
            model_folder,
            **SMALL_SCAN,
            sampler="ddim",
            clip="x0",
            output=tmp_path / "s",
            json=True,
        )
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["sampler"], report["solver"], report["clip"]) == (
        "ddim",
        "ode",
        "x0",
    )
    assert status in (0, 1)


def test_scan_prints_one_line_verdict(model_folder, tmp_path, capsys):
    main(cli_argv("scan", model_folder, **SMALL_SCAN, output=tmp_path / "s"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        line.startswith(("clean:", "BACKDOORED:"))
        and "of 2 samples" in line
        and "inversion steps" in line
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["scan", "{model}", "--n", "1"], "--n must be at least 2"),
        (["scan", "{model}", "--n", "0"], "--n must be a positive integer, got 0"),
        (
            ["scan", "{model}", "--threshold", "0"],
            "--threshold must be a mode share in (0, 1], got 0.0",
        ),
        (
            ["scan", "{model}", "--inversion-steps", "-3"],
            "--inversion-steps must be a positive integer, got -3",
        ),
        (["scan", "{tmp}/no-such-model"], "does not exist"),
    ],
)
def test_scan_bad_arguments_exit_with_status_2(
    argv, message, model_folder, tmp_path, capsys
):
    argv = [a.format(model=model_folder, tmp=tmp_path) for a in argv]
    assert main(argv + ["--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written for a bad call


def test_scan_unknown_clipping_is_refused_by_argparse_with_status_2(
    model_folder, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        main(cli_argv("scan", model_folder, clip="yes", output=tmp_path / "out"))
    assert (
        exit_info.value.code == 2 and "invalid choice: 'yes'" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_scan_samples_in_batches_of_batch_size(
    model_folder, tmp_path, monkeypatch, capsys, cache
):
    """``--batch-size`` reaches the sampler; it keys a cached scan only when it splits
    the samples, so a scan cached before the option existed (one batch) is found
    again."""
    import baddiff_core.defenses as defenses
    from baddiff_core.cache import trainings
    from baddiff_core.defenses import scanning
    from baddiff_core.models import load_model

    asked = []
    real_sample = scanning.sample

    def recording_sample(*args, **kwargs):
        asked.append(kwargs["batch_size"])
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(scanning, "sample", recording_sample)
    argv = cli_argv(
        "scan",
        model_folder,
        n=4,
        inversion_steps=1,
        noise_batch=2,
        steps=2,
        output=tmp_path / "s",
        json=True,
    )
    main(argv + ["--batch-size", "3"])
    main(argv)
    assert asked == [
        3,
        4,
    ]  # default: min(n, DEFAULT_BATCH_SIZE), the 4 samples in one pass
    capsys.readouterr()

    unet, scheduler = load_model(model_folder)
    settings = dict(
        n=4, num_noise=2, steps=1, num_inference_steps=2, progress=False, use_cache=True
    )
    first = defenses.scan_model(unet, scheduler, **settings)
    # one batch: the same scan
    again = defenses.scan_model(unet, scheduler, batch_size=4, **settings)
    split = defenses.scan_model(unet, scheduler, batch_size=2, **settings)
    assert len(trainings()) == 2 and torch.equal(first.samples, again.samples)
    assert split.samples.shape == first.samples.shape


def test_the_largest_seed_scans(model_folder, tmp_path, capsys):
    """``--seed`` takes 0 .. 2**64 - 1; the samples' generator (seed + 1) wraps to 0
    instead of overflowing torch's seed range."""
    argv = cli_argv("scan", model_folder, **SMALL_SCAN, seed=str(2**64 - 1), json=True)
    status = main([*argv, "--output", str(tmp_path / "s")])
    report = json.loads(capsys.readouterr().out)
    assert status in (0, 1) and report["samples"] == 2


# --input: testing given starting noises for a trigger.


def _noise_file(path, **tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_scan_input_flags_triggered_noises(model_folder, tmp_path, capsys):
    from baddiff_core.triggers import make_trigger

    honest = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    triggered = honest + make_trigger("box", 8, 1)
    noise = _noise_file(
        tmp_path / "x.safetensors", noise=torch.cat([honest, triggered])
    )
    argv = cli_argv("scan", model_folder, input=noise, terd_steps=1, json=True)
    status = main(argv)
    rows = json.loads(capsys.readouterr().out)["inputs"]
    assert status == 1 and [r["input"] for r in rows] == list(range(6))
    # The box's -1 background shifts 60 of the 64 entries: the noise test sees it.
    assert [r["noise_test_flagged"] for r in rows[3:]] == [True] * 3
    assert all(0 <= r["noise_test_p"] <= 1 for r in rows)
    assert all(r["terd_flagged"] == (r["terd_log_likelihood_ratio"] > 0) for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


@pytest.mark.parametrize(
    "tensors, extra, message",
    [
        (dict(a=torch.zeros(1, 1, 8, 8), b=torch.zeros(1)), [], "must hold one tensor"),
        (dict(noise=torch.zeros(2, 1, 4, 4)), [], "the model starts from (1, 8, 8)"),
        (dict(noise=torch.full((1, 8, 8), float("nan"))), [], "NaN or infinite"),
        (dict(noise=torch.zeros(8, 8)), [], "n,C,H,W or C,H,W"),
        (dict(noise=torch.zeros(1, 8, 8)), ["--alpha", "1.5"], "--alpha must be"),
        (dict(noise=torch.zeros(1, 8, 8)), ["--terd-steps", "0"], "--terd-steps must"),
    ],
)
def test_scan_input_refuses_bad_noise_in_one_line(
    tensors, extra, message, model_folder, tmp_path, capsys
):
    noise = _noise_file(tmp_path / "x.safetensors", **tensors)
    assert main(["scan", str(model_folder), "--input", str(noise), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_scan_input_missing_file_is_one_line(model_folder, tmp_path, capsys):
    assert main(["scan", str(model_folder), "--input", str(tmp_path / "no")]) == 2
    assert "No such file" in capsys.readouterr().err
