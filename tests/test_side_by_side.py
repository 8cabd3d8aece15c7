"""The three model-level detectors side by side, as a library call
(:func:`baddiff_core.defenses.side_by_side.model_level_detectors`), on a tiny model:
the scores are those of the underlying functions, a subset runs only those detectors,
and a verdict comes only with a threshold, on the right side of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baddiff_core.defenses import side_by_side
from baddiff_core.defenses.elijah import elijah_scores, feature_distance
from baddiff_core.defenses.scanning import DEFAULT_THRESHOLD, scan_model
from baddiff_core.defenses.side_by_side import (
    MODEL_LEVEL_DETECTORS,
    NONE_SHIPPED,
    combined_verdict,
    model_level_detectors,
    threshold_verdict,
)
from baddiff_core.defenses.terd import TERD_CIFAR10, estimate_trigger, model_kl_score
from baddiff_core.diffusion import make_scheduler

#: Three SGD steps of TERD's estimation and one of its refinement.
TERD_SHORT = dataclasses.replace(TERD_CIFAR10, estimation_steps=3, refinement_steps=1)
#: The smallest run of all three detectors (as tests/test_scan_cli.py's ALL_THREE): 4
#: samples, one step of each inversion, 2 sampling steps of the mode share, the digits
#: stand-in for LPIPS (no download).
SMALL = dict(
    n=4,
    num_noise=2,
    inversion_steps=1,
    num_inference_steps=2,
    elijah_distance=feature_distance,
    elijah_steps=1,
    elijah_num_noise=2,
    terd_settings=TERD_SHORT,
    progress=False,
)


@pytest.fixture(scope="module")
def model(tiny_unet):
    """A tiny 8 px model on T = 10 steps: Elijah's DDPM samples take all T steps, and
    TERD's refinement samples with 10 DDIM steps, the fewest it allows."""
    scheduler = make_scheduler(num_train_timesteps=10, beta_start=1e-3, beta_end=0.2)
    return tiny_unet(block_out_channels=(16, 32)), scheduler


@pytest.fixture(scope="module")
def findings(model):
    return model_level_detectors(*model, **SMALL)


def test_the_scores_are_those_of_the_underlying_functions(model, findings):
    """Each detector's scores and trigger estimate, computed again by calling its
    function directly with the same settings."""
    unet, scheduler = model
    assert tuple(findings) == MODEL_LEVEL_DETECTORS
    scan = scan_model(
        unet,
        scheduler,
        n=4,
        num_noise=2,
        steps=1,
        num_inference_steps=2,
        progress=False,
    )
    share = findings["mode-share"]
    assert share.scores == pytest.approx(
        dict(
            mode_share=scan.mode_share,
            alike=round(scan.mode_share * 4),
            diversity=scan.diversity,
            total_variation=scan.total_variation,
        ),
        rel=1e-6,
    )
    assert torch.allclose(share.trigger, scan.inversion.trigger)
    assert share.samples.shape == (4, 1, 8, 8)

    elijah = elijah_scores(
        unet,
        scheduler,
        n=4,
        distance=feature_distance,
        num_noise=2,
        steps=1,
        progress=False,
    )
    assert findings["elijah"].scores == pytest.approx(
        dict(uniformity=elijah.uniformity, tv=elijah.tv), rel=1e-6
    )
    assert findings["elijah"].distance == "feature_distance"

    mu = estimate_trigger(unet, scheduler, settings=TERD_SHORT, progress=False).mu
    terd = model_kl_score(mu)
    assert findings["terd"].scores == pytest.approx(
        dict(kl_mean=terd.kl_mean, kl_var=terd.kl_var), rel=1e-6
    )
    assert torch.allclose(findings["terd"].trigger, mu) and not findings["terd"].samples


def test_the_findings_say_what_ran_and_how(findings):
    share, elijah, terd = findings.values()
    assert share.threshold == DEFAULT_THRESHOLD and share.backdoored_when == "high"
    assert share.rule_text == "mode share >= 0.25" and share.verdict is not None
    assert elijah.backdoored_when == "low" and terd.backdoored_when == "high"
    assert elijah.label == "Elijah (digits stand-in, 1 steps, 2 noises, n=4)"
    assert elijah.settings["published"] is False
    assert len(elijah.settings["departures"]) == 4
    assert terd.label == "TERD (3 + 1 steps)" and terd.settings["released"] is False
    assert all(f.seconds >= 0 for f in findings.values())


def test_no_threshold_no_verdict(findings):
    """Elijah's and TERD's code ship no threshold: scores, and no verdict."""
    for name in ("elijah", "terd"):
        finding = findings[name]
        assert finding.threshold is None and finding.verdict is None
        assert finding.rule_text == NONE_SHIPPED


def test_a_verdict_on_each_side_of_a_threshold(model, findings):
    """At the score: backdoored (uniformity at or below, M_r and the mode share at or
    above); past it on the other side: clean; no threshold for the mode share: no
    verdict."""
    uniformity = findings["elijah"].scores["uniformity"]
    kl_mean = findings["terd"].scores["kl_mean"]
    share = findings["mode-share"].scores["mode_share"]
    flagged = model_level_detectors(
        *model,
        **SMALL,
        mode_share_threshold=share,
        elijah_threshold=uniformity,
        terd_threshold=kl_mean,
    )
    assert [f.verdict for f in flagged.values()] == ["BACKDOORED"] * 3
    assert flagged["elijah"].rule_text == f"uniformity <= {uniformity:g}"
    assert flagged["terd"].rule_text == f"M_r >= {kl_mean:g}"
    cleared = model_level_detectors(
        *model,
        **SMALL,
        mode_share_threshold=None,
        elijah_threshold=uniformity / 2,
        terd_threshold=kl_mean + 1,
    )
    assert [f.verdict for f in cleared.values()] == [None, "clean", "clean"]
    assert combined_verdict(flagged.values()) == "BACKDOORED"
    assert combined_verdict(cleared.values()) == "clean"
    assert combined_verdict(findings["terd"] for _ in range(2)) is None


@pytest.mark.parametrize(
    "score, threshold, when, verdict",
    [
        (0.1, 0.1, "low", "BACKDOORED"),
        (0.11, 0.1, "low", "clean"),
        (0.5, 0.5, "high", "BACKDOORED"),
        (0.49, 0.5, "high", "clean"),
        (0.49, None, "high", None),
    ],
)
def test_threshold_verdict(score, threshold, when, verdict):
    assert threshold_verdict(score, threshold, when) == verdict


def test_a_subset_runs_only_those_detectors(model, monkeypatch):
    monkeypatch.setattr(side_by_side, "scan_model", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(
        side_by_side, "estimate_trigger", lambda *a, **k: pytest.fail("ran")
    )
    found = model_level_detectors(*model, **SMALL, detectors=("elijah",))
    assert list(found) == ["elijah"]


@pytest.mark.parametrize(
    "detectors", [["strip"], "mode-share,elijah", ("elijah", "Terd"), []]
)
def test_unknown_detectors_are_refused_in_one_line(model, detectors):
    with pytest.raises(ValueError) as error:
        model_level_detectors(*model, **SMALL, detectors=detectors)
    message = str(error.value)
    assert "\n" not in message
    assert all(repr(name) in message for name in MODEL_LEVEL_DETECTORS)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n=3), "n must be an integer >= 4"),
        (
            dict(terd_settings=dataclasses.replace(TERD_SHORT, sampling_steps=20)),
            "<= 10",
        ),
        (dict(elijah_threshold=-1.0), "elijah_threshold must be"),
        (dict(terd_threshold=float("nan")), "terd_threshold must be"),
        (dict(mode_share_threshold=1.5), "mode_share_threshold must be"),
    ],
)
def test_bad_settings_fail_before_any_detector_runs(
    model, monkeypatch, changes, message
):
    monkeypatch.setattr(side_by_side, "scan_model", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        model_level_detectors(*model, **{**SMALL, **changes})


def test_the_command_runs_the_same_detectors():
    from baddiff_core import cli

    assert cli.DETECTORS == MODEL_LEVEL_DETECTORS
