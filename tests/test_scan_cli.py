"""``baddiff scan``: trigger inversion and detection from the command line, on a small
model folder: the book's mode share alone, the three model-level detectors side by side
(mode share, Elijah as published, TERD), and ``--input``."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from baddiff_core.cli import main
from baddiff_core.diffusion import QUICK_SCHEDULE, make_scheduler
from baddiff_core.models import save_model
from conftest import cli_argv

#: The smallest scan the tests run: the mode share alone, 2 samples, 1 inversion step,
#: 2 DDPM steps.
SMALL_SCAN = dict(
    n=2, inversion_steps=1, noise_batch=2, steps=2, detectors="mode-share"
)


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
            detectors="mode-share",
            output=out,
            json=True,
        )
    )
    report = json.loads(capsys.readouterr().out)
    assert status == (1 if report["verdict"] == "BACKDOORED" else 0)
    assert report["samples"] == 4 and report["inversion_steps"] == 3
    assert list(report["detectors"]) == ["mode-share"]
    assert report["detectors"]["mode-share"]["verdict"] == report["verdict"]
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


def test_scan_prints_a_table_and_a_one_line_verdict(model_folder, tmp_path, capsys):
    main(cli_argv("scan", model_folder, **SMALL_SCAN, output=tmp_path / "s"))
    header, row, line = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["detector", "score(s)", "threshold", "verdict"]
    assert row.startswith("mode share (book's)") and "of 2 alike" in row
    assert line.startswith(("clean:", "BACKDOORED:")) and "1 detector in" in line


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
        detectors="mode-share",
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


# The model-level detectors side by side: mode share, Elijah as published, TERD.

#: The smallest run of all three detectors: 4 samples (Elijah's trim needs 4), one
#: step of each inversion, 3 + 1 steps of TERD, the digits stand-in for LPIPS (no
#: download). ``--threshold 1``: the mode share flags only 4 samples alike.
ALL_THREE = dict(
    n=4,
    inversion_steps=1,
    noise_batch=2,
    steps=2,
    threshold=1,
    elijah_steps=1,
    elijah_noise_batch=2,
    elijah_distance="digits",
    terd_steps=3,
)


@pytest.fixture(scope="module")
def short_model_folder(tmp_path_factory, tiny_unet):
    """A tiny model trained (in name) on T = 10 steps: Elijah's DDPM samples take all
    T steps, and TERD's refinement samples with 10 DDIM steps, the fewest it allows."""
    folder = tmp_path_factory.mktemp("models") / "short"
    scheduler = make_scheduler(num_train_timesteps=10, beta_start=1e-3, beta_end=0.2)
    save_model(folder, tiny_unet(block_out_channels=(16, 32)), scheduler)
    return folder


@pytest.fixture(scope="module")
def side_by_side(short_model_folder, tmp_path_factory):
    """One run of ``baddiff scan`` with all three detectors (the default): its exit
    status, printed table, scan.json and output folder."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("scans") / "all"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(cli_argv("scan", short_model_folder, **ALL_THREE, output=out))
    report = json.loads((out / "scan.json").read_text())
    return status, printed.getvalue(), report, out


def test_all_three_detectors_are_reported_in_scan_json(side_by_side):
    status, _, report, out = side_by_side
    detectors = report["detectors"]
    assert list(detectors) == ["mode-share", "elijah", "terd"]
    for entry in detectors.values():
        assert {"scores", "threshold", "verdict", "seconds"} <= set(entry)
        assert entry["seconds"] >= 0
    assert set(detectors["mode-share"]["scores"]) >= {"mode_share", "diversity"}
    assert set(detectors["elijah"]["scores"]) == {"uniformity", "tv"}
    assert set(detectors["terd"]["scores"]) == {"kl_mean", "kl_var"}
    # Elijah and TERD ship no threshold: scores, no verdict.
    for name in ("elijah", "terd"):
        assert detectors[name]["threshold"] is None
        assert detectors[name]["verdict"] is None
        assert "none shipped" in detectors[name]["threshold_note"]
    assert detectors["elijah"]["distance"] == "feature_distance"
    assert detectors["elijah"]["settings"]["published"] is False
    assert detectors["terd"]["settings"]["estimation_steps"] == 3
    assert detectors["terd"]["settings"]["refinement_steps"] == 1
    # The mode share's fields stay at the top level; "verdict" is the scan's.
    share = detectors["mode-share"]
    assert report["mode_share"] == share["scores"]["mode_share"]
    assert report["threshold"] == share["threshold"] == 1
    assert report["verdict"] == share["verdict"]  # the only verdict of the three
    assert status == (1 if report["verdict"] == "BACKDOORED" else 0)
    assert {p.name for p in out.iterdir()} == {
        "scan.json",
        "trigger.safetensors",
        "trigger.png",
        "samples.png",
        "elijah-trigger.safetensors",
        "elijah-trigger.png",
        "elijah-samples.png",
        "terd-trigger.safetensors",
        "terd-trigger.png",
    }


def test_the_printed_table_names_each_detector(side_by_side):
    _, printed, report, _ = side_by_side
    header, *rows, summary = printed.strip().splitlines()
    assert header.split() == ["detector", "score(s)", "threshold", "verdict"]
    assert [row.split()[0] for row in rows] == ["mode", "Elijah", "TERD"]
    assert "mode share >= 1.00" in rows[0]
    assert "uniformity" in rows[1] and "none shipped" in rows[1]
    assert "M_r" in rows[2] and "V_r" in rows[2] and "none shipped" in rows[2]
    assert rows[2].startswith("TERD (3 + 1 steps)")
    assert summary.startswith(f"{report['verdict']}:") and "3 detectors in" in summary
    assert "Elijah and TERD: scores only" in summary


def test_elijah_and_terd_scores_are_those_of_the_library(
    side_by_side, short_model_folder
):
    """The scores in scan.json, computed again by calling the library directly with
    the same settings."""
    import dataclasses

    from baddiff_core.defenses.elijah import elijah_scores, feature_distance
    from baddiff_core.defenses.terd import (
        TERD_CIFAR10,
        estimate_trigger,
        model_kl_score,
    )
    from baddiff_core.models import load_model

    detectors = side_by_side[2]["detectors"]
    unet, scheduler = load_model(short_model_folder)
    elijah = elijah_scores(
        unet,
        scheduler,
        sampler="ddpm",
        n=4,
        distance=feature_distance,
        seed=0,
        num_noise=2,
        steps=1,
        progress=False,
    )
    assert detectors["elijah"]["scores"] == pytest.approx(
        dict(uniformity=elijah.uniformity, tv=elijah.tv), rel=1e-6
    )
    settings = dataclasses.replace(TERD_CIFAR10, estimation_steps=3, refinement_steps=1)
    mu = estimate_trigger(unet, scheduler, settings=settings, seed=0, progress=False).mu
    terd = model_kl_score(mu)
    assert detectors["terd"]["scores"] == pytest.approx(
        dict(kl_mean=terd.kl_mean, kl_var=terd.kl_var), rel=1e-6
    )


@pytest.mark.parametrize(
    "elijah_flags, terd_flags",
    [(True, False), (False, True), (False, False), (None, None)],
)
def test_the_exit_status_is_1_when_any_verdict_is_backdoored(
    elijah_flags, terd_flags, side_by_side, short_model_folder, tmp_path, capsys
):
    """Thresholds at a score flag it (uniformity at or below, M_r at or above); half
    the uniformity and M_r + 1 do not; no threshold, no verdict (exit status 0)."""
    scores = {k: v["scores"] for k, v in side_by_side[2]["detectors"].items()}
    uniformity, kl_mean = scores["elijah"]["uniformity"], scores["terd"]["kl_mean"]
    options = {k: ALL_THREE[k] for k in ("n", "elijah_steps", "elijah_noise_batch")}
    options.update(elijah_distance="digits", json=True)
    if elijah_flags is None:  # Elijah alone, without a threshold
        options.update(detectors="elijah")
    else:
        options.update(
            detectors="elijah,terd",
            terd_steps=3,
            elijah_threshold=uniformity if elijah_flags else uniformity / 2,
            terd_threshold=kl_mean if terd_flags else kl_mean + 1,
        )
    status = main(
        cli_argv("scan", short_model_folder, **options, output=tmp_path / "s")
    )
    report = json.loads(capsys.readouterr().out)
    verdicts = {k: v["verdict"] for k, v in report["detectors"].items()}
    if elijah_flags is None:
        assert (
            status == 0 and report["verdict"] is None and verdicts == {"elijah": None}
        )
        return
    assert verdicts == {
        "elijah": "BACKDOORED" if elijah_flags else "clean",
        "terd": "BACKDOORED" if terd_flags else "clean",
    }
    backdoored = elijah_flags or terd_flags
    assert status == (1 if backdoored else 0)
    assert report["verdict"] == ("BACKDOORED" if backdoored else "clean")
    assert "mode_share" not in report  # the mode share did not run


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--detectors", "mode-share,strip"], "--detectors must be a comma-separated"),
        (["--detectors", ","], "--detectors must be a comma-separated list"),
        (["--elijah-threshold", "nan"], "--elijah-threshold must be a finite number"),
        (["--elijah-threshold", "-1"], "--elijah-threshold must be a uniformity"),
        (["--terd-threshold", "inf"], "--terd-threshold must be a finite number"),
        (["--elijah-steps", "0"], "--elijah-steps must be a positive integer, got 0"),
        (["--elijah-noise-batch", "-2"], "--elijah-noise-batch must be a positive"),
        (["--terd-steps", "0"], "--terd-steps must be a positive integer, got 0"),
        (
            ["--detectors", "mode-share", "--elijah-threshold", "0.1"],
            "--elijah-threshold is an option of elijah, which --detectors",
        ),
        (
            ["--detectors", "mode-share,elijah", "--terd-threshold", "1"],
            "--terd-threshold is an option of terd",
        ),
        (
            ["--detectors", "terd", "--elijah-distance", "digits"],
            "--elijah-distance is an option of elijah",
        ),
        (["--n", "3"], "--n must be at least 4 for elijah"),
        (["--elijah-distance", "lpips"], "needs the optional package piq"),
    ],
)
def test_the_detectors_options_are_refused_before_the_model_is_loaded(
    extra, message, model_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(
        "baddiff_core.models.load_model", lambda *a, **k: pytest.fail("loaded")
    )
    # piq cannot be imported: LPIPS is missing, and no test downloads its weights.
    monkeypatch.setitem(sys.modules, "piq", None)
    argv = ["scan", str(model_folder), *extra, "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_too_small_images_for_the_digits_distance_are_one_line(
    tmp_path, tiny_unet, capsys
):
    """The stand-in reads images of 8 px or more; smaller ones are refused before any
    detector runs."""
    folder = tmp_path / "four"
    save_model(
        folder, tiny_unet(sample_size=4, block_out_channels=(16, 32)), make_scheduler()
    )
    argv = cli_argv("scan", folder, detectors="elijah", output=tmp_path / "out")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--elijah-distance digits (chosen by --elijah-distance auto" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
