"""The scoreboard: one call fills every cell, and each cell is what the defence's own
function gives when called alone with the same seeds. The tests that share the tiny
board measured once (two 8 px attacks, two clean models) are marked slow."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import baddiff_core as bd
from baddiff_core.scoreboard import _leave_one_out
from conftest import tiny_recipe

CONFIG = bd.ScoreboardConfig(
    n_eval=4,
    ddim_steps=5,
    ddpm_steps=5,  # of T = 10
    scan_noise=2,
    scan_samples=4,
    scan_steps=5,
    removal_steps=2,
    defence_batch=8,
    anp_steps=2,
    elijah_samples=4,
    elijah_noise=4,
    elijah_steps=2,
    terd=bd.TERD_CIFAR10.scaled(0.001),
    noises=200,
    fid_features="digits",
)
SEED = 0


def _evaluate(unet, model, sampler: str, clip: str):
    """``evaluate_attack`` of ``unet`` with ``model``'s trigger and target, as the
    board samples it."""
    return bd.evaluate_attack(
        unet,
        model.scheduler,
        model.trigger,
        model.target,
        n=CONFIG.n_eval,
        clips=(clip,),
        sampler=sampler,
        num_inference_steps=(
            CONFIG.ddim_steps if sampler == "ddim" else CONFIG.ddpm_steps
        ),
        threshold=CONFIG.asr_threshold,
        seed=SEED + 1,
    )[clip]


def _scan(model, sampler: str):
    """The book's scan of ``model`` as the board runs it (from the cache)."""
    return bd.scan_model(
        model.unet,
        model.scheduler,
        num_noise=CONFIG.scan_noise,
        n=CONFIG.scan_samples,
        steps=CONFIG.scan_steps,
        solver=bd.solver_for(sampler),
        clip=bd.DEPLOYED_CLIP[sampler],
        seed=SEED,
        progress=False,
        use_cache=True,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny attacks (DDPM and DDIM), two clean models, and the board, measured on
    an empty cache with every UNet pass counted."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BADDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        box = tiny_recipe()
        recipes = {"box, DDPM": box, "box, DDIM": box.with_train(solver="ode")}
        attacks = {
            name: bd.plant_backdoor(recipe, device="cpu", progress=False)
            for name, recipe in recipes.items()
        }
        clean_recipes = [
            tiny_recipe(poison_rate=0.0),
            tiny_recipe(poison_rate=0.0, train=dataclasses.replace(box.train, seed=7)),
        ]
        clean = {}
        for i, recipe in enumerate(clean_recipes):
            model = bd.plant_backdoor(recipe, device="cpu", progress=False)
            clean[f"clean {i}"] = (model.unet, model.scheduler)
        real = bd.load_images(
            box.dataset, box.image_size, channels=box.channels, limit=64
        )
        with bd.WorkCounter() as counter:
            board = bd.run_scoreboard(
                attacks, clean, real, config=CONFIG, seed=SEED, progress=False
            )
        plan = bd.scoreboard_plan(recipes, clean_recipes[0], clean_recipes[1], CONFIG)
        yield dict(
            board=board,
            attacks=attacks,
            clean=clean,
            real=real,
            counter=counter,
            plan=plan,
        )


@pytest.mark.slow  # one tiny board: about a minute
def test_every_cell_is_measured(setup):
    board = setup["board"]
    assert board.attacks == tuple(setup["attacks"])
    assert board.samplers == {"box, DDPM": "ddpm", "box, DDIM": "ddim"}
    assert set(board.detections) == {
        (d, a) for d in bd.SCOREBOARD_DETECTORS for a in board.attacks
    }
    assert set(board.mitigations) == {
        (m, a) for m in bd.SCOREBOARD_MITIGATIONS for a in board.attacks
    }
    for cell in board.detections.values():
        assert 0 <= cell.tpr <= 1 and 0 <= cell.tnr <= 1
    for cell in board.mitigations.values():
        assert 0 <= cell.asr_after <= 1 and cell.fd_after > 0


@pytest.mark.slow  # one tiny board: about a minute
def test_the_input_tests_are_the_libraries_own(setup):
    board, attacks = setup["board"], setup["attacks"]
    shape = attacks["box, DDPM"].trigger.shape
    honest = torch.randn(
        (CONFIG.noises, *shape), generator=torch.Generator().manual_seed(5)
    )
    eps = torch.randn(
        (CONFIG.noises, *shape), generator=torch.Generator().manual_seed(6)
    )
    for name, model in attacks.items():
        triggered = eps + model.trigger
        noise = board.detections[("noise test (book)", name)]
        assert noise.tpr == bd.noise_test(triggered, alpha=CONFIG.alpha).flagged_share
        assert noise.tnr == 1 - bd.noise_test(honest, alpha=CONFIG.alpha).flagged_share
        mu = bd.estimate_trigger(
            model.unet,
            model.scheduler,
            settings=CONFIG.terd,
            seed=SEED,
            progress=False,
            use_cache=True,
        ).mu
        terd = board.detections[("TERD, input level", name)]
        assert terd.tpr == bd.detect_inputs(triggered, mu).double().mean().item()
        assert terd.tnr == 1 - bd.detect_inputs(honest, mu).double().mean().item()
        assert (terd.positives, terd.negatives) == (CONFIG.noises, CONFIG.noises)


@pytest.mark.slow  # one tiny board: about a minute
def test_clipping_and_sampler_cells_are_evaluate_attack(setup):
    board, real = setup["board"], setup["real"]
    for name, model in setup["attacks"].items():
        sampler = board.samplers[name]
        other = {"ddpm": "ddim", "ddim": "ddpm"}[sampler]

        def evaluate(sampler: str, clip: str, model=model):
            return _evaluate(model.unet, model, sampler, clip)

        base = evaluate(sampler, bd.DEPLOYED_CLIP[sampler])
        assert bd.DEPLOYED_CLIP == {"ddpm": "none", "ddim": "x0"}
        for defence, measured in (
            ("x0 clipping", evaluate(sampler, "x0")),
            ("x_t clamping", evaluate(sampler, "xt")),
            ("other sampler", evaluate(other, "none")),
        ):
            cell = board.mitigations[(defence, name)]
            assert cell.asr_before == base.asr and cell.asr_after == measured.asr
            assert cell.leak_after == measured.leak
            fd = bd.frechet_distance(real, measured.clean, features="digits").value
            assert cell.fd_after == pytest.approx(fd)
            assert cell.fd_change == pytest.approx(fd / cell.fd_before)


@pytest.mark.slow  # one tiny board: about a minute
def test_the_mode_share_cell_is_the_scan(setup):
    board = setup["board"]
    for name, model in setup["attacks"].items():
        scan = _scan(model, board.samplers[name])
        cell = board.detections[("mode share (book)", name)]
        assert cell.score == scan.mode_share
        assert cell.tpr == float(scan.backdoored)
        assert cell.threshold == scan.threshold


@pytest.mark.slow  # one tiny board: about a minute
def test_elijah_cells_are_elijahs_own(setup):
    board, real = setup["board"], setup["real"]
    clean_data = bd.clean_subset(
        real, CONFIG.clean_share, generator=torch.Generator().manual_seed(SEED + 2)
    )
    for name, model in setup["attacks"].items():
        sampler = board.samplers[name]
        scores = bd.elijah_scores(
            model.unet,
            model.scheduler,
            sampler=sampler,
            n=CONFIG.elijah_samples,
            distance=CONFIG.elijah_distance,
            seed=SEED,
            num_noise=CONFIG.elijah_noise,
            steps=CONFIG.elijah_steps,
            progress=False,
        )
        assert board.detections[("Elijah detection", name)].score == pytest.approx(
            scores.uniformity
        )
        # the removal starts from the book's trigger estimate (the scan's)
        scan = _scan(model, sampler)
        repaired, _ = bd.remove_backdoor(
            model.unet,
            model.scheduler,
            scan.inversion.trigger,
            clean_data,
            steps=CONFIG.removal_steps,
            batch_size=CONFIG.defence_batch,
            seed=SEED,
            progress=False,
        )
        after = _evaluate(repaired, model, sampler, bd.DEPLOYED_CLIP[sampler])
        assert board.mitigations[("Elijah removal", name)].asr_after == after.asr


def test_leave_one_out_by_hand():
    # Left out, each model is judged by the midpoint threshold of the others: 10 falls
    # below (2 + 20) / 2 = 11, so that backdoored model is missed; 20 is above
    # (2 + 10) / 2 = 6; the clean 1 and 2 are below (2 + 10) / 2 and (1 + 10) / 2.
    scores = {("c1", "s"): 1.0, ("c2", "s"): 2.0, ("b1", "s"): 10.0, ("b2", "s"): 20.0}
    verdicts = _leave_one_out(scores, {"b1", "b2"}, "high")
    assert {k[0]: v for k, v in verdicts.items()} == {
        "c1": (False, 6.0),
        "c2": (False, 5.5),
        "b1": (False, 11.0),
        "b2": (True, 6.0),
    }
    low = _leave_one_out({k: -v for k, v in scores.items()}, {"b1", "b2"}, "low")
    assert {k: f for k, (f, _) in low.items()} == {
        k: f for k, (f, _) in verdicts.items()
    }


def test_leave_one_out_falls_back_to_every_sampler():
    # Sampler "t" holds one backdoored model: left out, it is judged on "s" and on the
    # other "t" scores, the clean ones' 1, 2 and 3 against b1's 10 (threshold 6.5).
    scores = {("c1", "s"): 1.0, ("b1", "s"): 10.0, ("c1", "t"): 2.0, ("c2", "t"): 3.0}
    scores[("b2", "t")] = 7.0
    verdicts = _leave_one_out(scores, {"b1", "b2"}, "high")
    assert verdicts[("b2", "t")] == (True, 6.5)


@pytest.mark.slow  # one tiny board: about a minute
def test_model_level_rates_come_from_the_verdicts(setup):
    board = setup["board"]
    for detector, (level, _) in bd.SCOREBOARD_DETECTORS.items():
        for name in board.attacks:
            cell = board.detections[(detector, name)]
            if level == "model":
                assert cell.tpr in (0.0, 1.0)
                assert cell.negatives == 2 and cell.tnr in (0.0, 0.5, 1.0)
    rows = board.detection_rows()
    assert [row["level"] for row in rows] == [
        level for level, _ in bd.SCOREBOARD_DETECTORS.values()
    ]
    for row, detector in zip(rows, bd.SCOREBOARD_DETECTORS):
        assert row["TNR"] == min(
            board.detections[(detector, a)].tnr for a in board.attacks
        )


@pytest.mark.slow  # one tiny board: about a minute
def test_mitigation_rows(setup):
    board = setup["board"]
    rows = board.mitigation_rows()
    assert rows[0]["defence"] == "no defence" and len(rows) == 1 + len(
        bd.SCOREBOARD_MITIGATIONS
    )
    assert len(board.mitigation_rows("fd_change")) == len(bd.SCOREBOARD_MITIGATIONS)
    with pytest.raises(ValueError, match="Mitigation attribute"):
        board.mitigation_rows("bogus")


@pytest.mark.slow  # one tiny board: about a minute
def test_the_plan_bounds_the_work(setup):
    counter, plan = setup["counter"], setup["plan"]
    for grad in (False, True):
        assert 0 < counter.passes(grad=grad) <= plan.passes(grad=grad)


@pytest.mark.slow  # one tiny board: about a minute
def test_refuses_too_few_clean_models(setup):
    one = dict(list(setup["clean"].items())[:1])
    with pytest.raises(ValueError, match="two clean models"):
        bd.run_scoreboard(setup["attacks"], one, setup["real"], config=CONFIG)
