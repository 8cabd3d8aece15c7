"""One scoreboard: every defence in the book against every attack, each cell measured.

:func:`run_scoreboard` takes the book's backdoored models (one per attack) and its
clean models, runs each defence of chapters 5 to 10 on each of them, from the cache
where an earlier chapter already ran it (models, scans, removals, ANP masks, TERD and
Elijah estimates), and returns a :class:`Scoreboard` of measured numbers. Nothing in it
is typed in. Two kinds of cell:

- **Detectors** flag a model or an input. Each cell holds a *true-positive rate* (TPR)
  and a *true-negative rate* (TNR):

  - input level (TERD's input test, the book's noise test): the share of ``noises``
    triggered starting noises ``eps + g`` flagged (TPR), and the share of as many honest
    noises ``eps`` passed (TNR);
  - model level (the book's mode share, Elijah as published, TERD's ``M_r``): one
    backdoored model per attack, so its TPR is 0 or 1; the TNR is the share of the
    clean models passed. The mode share has the book's threshold. Elijah's and TERD's
    released code ship none, so each model is judged by a threshold fitted on all the
    *other* labelled models of its sampler (leave one out,
    :func:`~baddiff_core.defenses.elijah.fit_threshold`).

- **Mitigations** change how a model samples, or the model. Each cell holds the attack
  success rate (ASR) and the Fréchet distance of clean samples to the training images
  (clean quality; lower is better), before and after the defence: ``x0`` clipping and
  ``x_t`` clamping (chapter 5), the other sampler (chapter 6), Elijah's removal with the
  book's trigger estimate (chapter 8) and adversarial neuron pruning (chapter 8).

One defence at a time. Each model is deployed as its attacker planned
(:data:`DEPLOYED_CLIP`): with the sampler it was planted for (DDPM for the ``"sde"``
target, DDIM for ``"ode"``), without clipping under DDPM (BadDiffusion's setting) and
with diffusers' default ``x0`` clipping under DDIM (``clip_sample=True``, which chapter
9's attackers count on). Every "before" is that deployment's. The clipping rows
replace its clipping mode, the other sampler runs without clipping, and the removals
are measured in the deployment.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel

from baddiff_core.attack import BackdooredModel, BackdoorRecipe
from baddiff_core.defenses.elijah import (
    ELIJAH_SAMPLES,
    Distance,
    elijah_num_noise,
    elijah_scores,
    elijah_settings,
    feature_distance,
    fit_threshold,
)
from baddiff_core.defenses.noise_tests import noise_test
from baddiff_core.defenses.pruning import adversarial_neuron_masks, prune_channels
from baddiff_core.defenses.removal import clean_subset, remove_backdoor
from baddiff_core.defenses.scanning import scan_model
from baddiff_core.defenses.terd import (
    TERD_CIFAR10,
    TerdSettings,
    detect_inputs,
    estimate_trigger,
    model_kl_score,
)
from baddiff_core.diffusion import sampler_for, solver_for
from baddiff_core.evaluation import QUICK_ASR_THRESHOLD, evaluate_attack
from baddiff_core.gpu_time import (
    Plan,
    Work,
    fine_tune,
    gradient_passes,
    sampling_passes,
    train_timesteps,
)
from baddiff_core.metrics import frechet_distance

__all__ = [  # in reading order
    "SCOREBOARD_DETECTORS",
    "SCOREBOARD_MITIGATIONS",
    "DEPLOYED_CLIP",
    "ScoreboardConfig",
    "Detection",
    "Mitigation",
    "Scoreboard",
    "run_scoreboard",
    "scoreboard_plan",
]

# The detectors by level: is this model backdoored? is this starting noise triggered?
_MODEL_LEVEL = {"mode share (book)": 7, "Elijah detection": 8, "TERD, model level": 10}
_INPUT_LEVEL = {"TERD, input level": 10, "noise test (book)": 10}
#: The detectors, in the book's order: name -> (level, chapter).
SCOREBOARD_DETECTORS = {n: ("model", c) for n, c in _MODEL_LEVEL.items()} | {
    n: ("input", c) for n, c in _INPUT_LEVEL.items()
}
#: The mitigations, in the book's order: name -> chapter.
SCOREBOARD_MITIGATIONS = {
    "x0 clipping": 5,
    "x_t clamping": 5,
    "other sampler": 6,
    "Elijah removal": 8,
    "ANP pruning": 8,
}
OTHER_SAMPLER = {"ddpm": "ddim", "ddim": "ddpm"}
#: The clipping mode each sampler is deployed with: none under DDPM, diffusers'
#: default ``clip_sample=True`` (``"x0"``) under DDIM.
DEPLOYED_CLIP = {"ddpm": "none", "ddim": "x0"}


@dataclass(frozen=True)
class ScoreboardConfig:
    """The settings of every measurement on the scoreboard.

    Attributes:
        n_eval: clean and triggered samples per ASR measurement.
        ddim_steps: DDIM steps (20 of the quick chain's ``T = 100``; 50 of 1000 is
            diffusers' default).
        ddpm_steps: DDPM steps of the attack-success samples; ``None`` (as deployed)
            is all ``T`` training steps. Only full mode's smoke scale cuts them.
        asr_threshold: MSE to the target ([0, 1] units) under which a sample hits.
        fid_features: :func:`~baddiff_core.metrics.frechet_distance`'s ``features``.
        scan_noise, scan_samples, scan_steps: the book's scan (chapter 7): noises and
            steps of the inversion, samples scored.
        clean_share: the defender's share of the clean training images (removal, ANP).
        removal_steps: steps of Elijah's removal.
        defence_batch: clean images per step of the removal and of ANP.
        anp_eps, anp_steps, anp_fraction: ANP's perturbation budget, mask steps and
            the share of channels pruned.
        terd: TERD's settings (:data:`~baddiff_core.defenses.terd.TERD_CIFAR10`,
            or a fraction of its steps).
        elijah_distance: Elijah's distance (LPIPS as published; the offline
            :func:`~baddiff_core.defenses.elijah.feature_distance` in quick mode).
        elijah_samples, elijah_noise, elijah_steps: Elijah's samples scored, the
            inversion's noises and its steps; ``None`` is the released code's
            setting (:func:`~baddiff_core.defenses.elijah.elijah_settings`,
            :func:`~baddiff_core.defenses.elijah.elijah_num_noise`). Only full mode's
            smoke scale cuts them.
        noises: honest and triggered noises per input-level test.
        alpha: the noise test's level (its false-positive rate).
    """

    n_eval: int = 32
    ddim_steps: int = 20
    ddpm_steps: int | None = None
    asr_threshold: float = QUICK_ASR_THRESHOLD
    fid_features: str = "auto"
    scan_noise: int = 32
    scan_samples: int = 16
    scan_steps: int = 100
    clean_share: float = 0.1
    removal_steps: int = 100
    defence_batch: int = 64
    anp_eps: float = 0.4
    anp_steps: int = 100
    anp_fraction: float = 0.01
    terd: TerdSettings = field(default_factory=lambda: TERD_CIFAR10.scaled(0.01))
    elijah_distance: Distance = feature_distance
    elijah_samples: int = ELIJAH_SAMPLES
    elijah_noise: int | None = None
    elijah_steps: int | None = None
    noises: int = 1000
    alpha: float = 0.01


@dataclass(frozen=True)
class Detection:
    """One detector against one attack.

    Attributes:
        tpr: the share of triggered inputs (input level) or backdoored models (model
            level: 0 or 1, one model per attack) flagged.
        tnr: the share of honest inputs, or of clean models, passed.
        positives, negatives: how many triggered and honest inputs (or backdoored and
            clean models) the rates count.
        score: the model-level score of the attack's model (``None`` at input level).
        threshold: the threshold that judged it (model level).
    """

    tpr: float
    tnr: float
    positives: int
    negatives: int
    score: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class Mitigation:
    """One mitigation against one attack: ASR and clean quality, before and after.

    Attributes:
        asr_before, asr_after: attack success rates, deployed as planted
            (:data:`DEPLOYED_CLIP`), and with the defence.
        fd_before, fd_after: Fréchet distances of the clean samples to the training
            images (lower is better), likewise.
        leak_after: share of clean samples that hit the target, with the defence.
    """

    asr_before: float
    asr_after: float
    fd_before: float
    fd_after: float
    leak_after: float

    @property
    def fd_change(self) -> float:
        """``fd_after / fd_before``: above 1, the defence costs clean quality."""
        return self.fd_after / self.fd_before


@dataclass(frozen=True)
class Scoreboard:
    """Every defence against every attack.

    Attributes:
        attacks: the attacks' names, in order.
        samplers: attack -> the sampler it was planted for.
        clean_models: the clean models' names (the detectors' negatives).
        detections: ``(detector, attack)`` -> :class:`Detection`.
        mitigations: ``(mitigation, attack)`` -> :class:`Mitigation`.
        config: the settings.
        seconds: wall time of :func:`run_scoreboard` (cached parts load in seconds).
    """

    attacks: tuple[str, ...]
    samplers: dict[str, str]
    clean_models: tuple[str, ...]
    detections: dict[tuple[str, str], Detection]
    mitigations: dict[tuple[str, str], Mitigation]
    config: ScoreboardConfig
    seconds: float

    def detection_rows(self) -> list[dict[str, Any]]:
        """One row per detector: its TPR per attack, then its TNR (the clean inputs'
        or clean models' share passed, the lowest over the attacks' columns)."""
        rows = []
        for name, (level, chapter) in SCOREBOARD_DETECTORS.items():
            cells = [self.detections[(name, attack)] for attack in self.attacks]
            row: dict[str, Any] = {
                "detector": f"{name} (ch. {chapter})",
                "level": level,
            }
            row |= {attack: cell.tpr for attack, cell in zip(self.attacks, cells)}
            row["TNR"] = min(cell.tnr for cell in cells)
            rows.append(row)
        return rows

    def mitigation_rows(self, value: str = "asr_after") -> list[dict[str, Any]]:
        """One row per mitigation (after a first row, "no defence": the deployment's), one column per attack,
        each cell the :class:`Mitigation` attribute ``value``."""
        first = self.mitigations[(next(iter(SCOREBOARD_MITIGATIONS)), self.attacks[0])]
        if not hasattr(first, value):
            raise ValueError(f"value must name a Mitigation attribute, got {value!r}")
        before = value.replace("after", "before").replace("fd_change", "")
        rows = []
        if before and before != value:
            row: dict[str, Any] = {"defence": "no defence"}
            for attack in self.attacks:
                row[attack] = getattr(self.mitigations[("x0 clipping", attack)], before)
            rows.append(row)
        for name, chapter in SCOREBOARD_MITIGATIONS.items():
            row = {"defence": f"{name} (ch. {chapter})"}
            for attack in self.attacks:
                row[attack] = getattr(self.mitigations[(name, attack)], value)
            rows.append(row)
        return rows


def _leave_one_out(
    scores: Mapping[tuple[str, str], float], bad: set[str], backdoored_when: str
) -> dict[tuple[str, str], tuple[bool, float]]:
    """Judge each ``(model, sampler)`` score by a threshold fitted on all the other
    models' scores with the same sampler, or, when those lack a clean or a backdoored
    one, on all the other models' scores
    (:func:`~baddiff_core.defenses.elijah.fit_threshold`): key -> (flagged,
    threshold)."""
    verdicts = {}
    for key, score in scores.items():
        rest = {k: v for k, v in scores.items() if k[0] != key[0] and k[1] == key[1]}
        if not ({k[0] for k in rest} & bad and {k[0] for k in rest} - bad):
            rest = {k: v for k, v in scores.items() if k[0] != key[0]}
        rule = fit_threshold(
            [v for k, v in rest.items() if k[0] not in bad],
            [v for k, v in rest.items() if k[0] in bad],
            backdoored_when=backdoored_when,
        )
        verdicts[key] = (rule.backdoored(score), rule.threshold)
    return verdicts


def _log(progress: bool, start: float, message: str) -> None:
    if progress:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


def run_scoreboard(
    attacks: Mapping[str, BackdooredModel],
    clean_models: Mapping[str, tuple[UNet2DModel, DDPMScheduler]],
    real: torch.Tensor,
    *,
    config: ScoreboardConfig = ScoreboardConfig(),
    seed: int = 0,
    progress: bool = True,
) -> Scoreboard:
    """Measure every defence against every attack (see the module's docstring).

    Args:
        attacks: name -> a backdoored model (:func:`~baddiff_core.attack.plant_backdoor`,
            from the cache); the sampler it is deployed with is the one its training
            target was planted for (:func:`~baddiff_core.diffusion.sampler_for`).
        clean_models: name -> ``(unet, scheduler)`` of a model known to be clean.
            With at least two attacks and two clean models, every model left out
            leaves a clean and a backdoored one to fit the model-level thresholds on.
        real: the training images, ``B,C,H,W`` in [-1, 1]: the Fréchet distances'
            reference, and the defender's clean share (drawn with ``seed + 2``, as
            chapter 8 draws it).
        config: the measurements' settings.
        seed: every random step is seeded from it (the evaluations' noise with
            ``seed + 1``, the input tests' with ``seed + 5`` and ``seed + 6``).
        progress: print one line per step, with the elapsed time.
    """
    if len(attacks) < 2 or len(clean_models) < 2:
        raise ValueError(
            f"need at least two attacks and two clean models, got {len(attacks)} and "
            f"{len(clean_models)}"
        )
    start = time.perf_counter()
    cfg = config
    samplers = {name: sampler_for(m.recipe.train.solver) for name, m in attacks.items()}
    real = real.cpu()
    clean_data = clean_subset(
        real, cfg.clean_share, generator=torch.Generator().manual_seed(seed + 2)
    )

    def fd(samples: torch.Tensor) -> float:
        return frechet_distance(real, samples.cpu(), features=cfg.fid_features).value

    def evaluate(
        unet: UNet2DModel, model: BackdooredModel, sampler: str, clips: tuple[str, ...]
    ) -> dict:
        return evaluate_attack(
            unet,
            model.scheduler,
            model.trigger,
            model.target,
            n=cfg.n_eval,
            clips=clips,
            sampler=sampler,
            num_inference_steps=cfg.ddim_steps if sampler == "ddim" else cfg.ddpm_steps,
            threshold=cfg.asr_threshold,
            seed=seed + 1,
        )

    def scan(unet: UNet2DModel, scheduler: DDPMScheduler, sampler: str) -> Any:
        """The book's scan (chapter 7) as the sampler is deployed, from the cache."""
        return scan_model(
            unet,
            scheduler,
            num_noise=cfg.scan_noise,
            n=cfg.scan_samples,
            steps=cfg.scan_steps,
            solver=solver_for(sampler),
            clip=DEPLOYED_CLIP[sampler],
            seed=seed,
            progress=False,
            use_cache=True,
        )

    # Mitigations.
    mitigations: dict[tuple[str, str], Mitigation] = {}
    scans = {}
    for name, model in attacks.items():
        sampler = samplers[name]
        clip = DEPLOYED_CLIP[sampler]
        planted = evaluate(model.unet, model, sampler, ("none", "x0", "xt"))
        other = evaluate(model.unet, model, OTHER_SAMPLER[sampler], ("none",))["none"]
        scans[name] = scan(model.unet, model.scheduler, sampler)
        repaired, _ = remove_backdoor(
            model.unet,
            model.scheduler,
            scans[name].inversion.trigger,
            clean_data,
            steps=cfg.removal_steps,
            batch_size=cfg.defence_batch,
            seed=seed,
            progress=False,
            use_cache=True,
        )
        masks = adversarial_neuron_masks(
            model.unet,
            model.scheduler,
            clean_data,
            eps=cfg.anp_eps,
            steps=cfg.anp_steps,
            batch_size=cfg.defence_batch,
            seed=seed,
            progress=False,
            use_cache=True,
        )
        pruned, _ = prune_channels(model.unet, masks, fraction=cfg.anp_fraction)
        after = {
            "x0 clipping": planted["x0"],
            "x_t clamping": planted["xt"],
            "other sampler": other,
            "Elijah removal": evaluate(repaired, model, sampler, (clip,))[clip],
            "ANP pruning": evaluate(pruned, model, sampler, (clip,))[clip],
        }
        base = planted[clip]
        fd_before = fd(base.clean)
        for defence, measured in after.items():
            mitigations[(defence, name)] = Mitigation(
                asr_before=base.asr,
                asr_after=measured.asr,
                fd_before=fd_before,
                fd_after=fd(measured.clean),
                leak_after=measured.leak,
            )
        _log(progress, start, f"{name}: mitigations measured ({sampler.upper()})")

    # Model-level detectors: every model, backdoored or clean, with each sampler in use.
    models = {name: (m.unet, m.scheduler) for name, m in attacks.items()}
    models |= dict(clean_models)
    in_use = sorted(set(samplers.values()))
    mode_share, elijah, terd_mu = {}, {}, {}
    for name, (unet, scheduler) in models.items():
        for sampler in in_use if name in clean_models else (samplers[name],):
            found = scans[name] if name in attacks else scan(unet, scheduler, sampler)
            mode_share[(name, sampler)] = (found.backdoored, found.mode_share)
            elijah[(name, sampler)] = elijah_scores(
                unet,
                scheduler,
                sampler=sampler,
                n=cfg.elijah_samples,
                distance=cfg.elijah_distance,
                seed=seed,
                num_noise=cfg.elijah_noise,
                steps=cfg.elijah_steps,
                progress=False,
                use_cache=True,
            ).uniformity
        terd_mu[name] = estimate_trigger(
            unet,
            scheduler,
            settings=cfg.terd,
            seed=seed,
            progress=False,
            use_cache=True,
        ).mu.cpu()
        _log(progress, start, f"{name}: model-level detectors run")

    bad = set(attacks)
    elijah_verdicts = _leave_one_out(elijah, bad, "low")
    m_r = {(name, "any"): model_kl_score(mu).kl_mean for name, mu in terd_mu.items()}
    terd_verdicts = {k[0]: v for k, v in _leave_one_out(m_r, bad, "high").items()}
    m_r = {k[0]: v for k, v in m_r.items()}

    # Input level: the same honest noises for every test, triggered ones per attack.
    shape = next(iter(attacks.values())).trigger.shape
    honest = torch.randn(
        (cfg.noises, *shape), generator=torch.Generator().manual_seed(seed + 5)
    )
    eps = torch.randn(
        (cfg.noises, *shape), generator=torch.Generator().manual_seed(seed + 6)
    )
    honest_flagged = noise_test(honest, alpha=cfg.alpha).flagged_share

    detections: dict[tuple[str, str], Detection] = {}
    clean_names = tuple(clean_models)

    def one_model(
        verdicts: Mapping[str, tuple[bool, float]], name: str, score: float
    ) -> Detection:
        """The attack's model judged, and the clean models' share passed."""
        passed = [not verdicts[c][0] for c in clean_names]
        flagged, threshold = verdicts[name]
        return Detection(
            float(flagged), sum(passed) / len(passed), 1, len(passed), score, threshold
        )

    for name, model in attacks.items():
        sampler = samplers[name]
        in_group = {  # detector -> model -> (flagged, threshold), for this sampler
            "mode share (book)": {
                k: (v[0], scans[name].threshold)
                for (k, s), v in mode_share.items()
                if s == sampler
            },
            "Elijah detection": {
                k: v for (k, s), v in elijah_verdicts.items() if s == sampler
            },
            "TERD, model level": terd_verdicts,
        }
        scores = {
            "mode share (book)": mode_share[(name, sampler)][1],
            "Elijah detection": elijah[(name, sampler)],
            "TERD, model level": m_r[name],
        }
        for detector, verdicts in in_group.items():
            detections[(detector, name)] = one_model(verdicts, name, scores[detector])
        triggered = eps + model.trigger.cpu()
        mu = terd_mu[name]
        detections[("TERD, input level", name)] = Detection(
            detect_inputs(triggered, mu).double().mean().item(),
            1 - detect_inputs(honest, mu).double().mean().item(),
            cfg.noises,
            cfg.noises,
        )
        detections[("noise test (book)", name)] = Detection(
            noise_test(triggered, alpha=cfg.alpha).flagged_share,
            1 - honest_flagged,
            cfg.noises,
            cfg.noises,
        )
    _log(progress, start, "input-level detectors run")
    return Scoreboard(
        attacks=tuple(attacks),
        samplers=samplers,
        clean_models=clean_names,
        detections=detections,
        mitigations=mitigations,
        config=cfg,
        seconds=time.perf_counter() - start,
    )


def scoreboard_plan(
    attacks: Mapping[str, BackdoorRecipe],
    base: Any,
    clean_fine_tune: BackdoorRecipe,
    config: ScoreboardConfig = ScoreboardConfig(),
) -> Plan:
    """The GPU work of :func:`run_scoreboard` on models planted from ``attacks`` and
    ``clean_fine_tune``, and the clean ``base`` (a :class:`~baddiff_core.gpu_time.Plan`:
    every UNet pass, counted as :class:`~baddiff_core.gpu_time.WorkCounter` counts them,
    with the trainings that the model cache may spare).

    Per model and sampler in use, the scan is ``scan_noise`` inversions of
    ``scan_steps`` steps and ``scan_samples`` samples; Elijah's inversion and its
    ``elijah_samples`` samples follow
    :func:`~baddiff_core.defenses.elijah.elijah_settings` where the config leaves
    them ``None``; removal takes 3 passes with a backward and 1 without per clean
    image and step, ANP 3 with a backward; TERD
    ``batch_size (2 estimation_steps + (sampling_steps + 4) refinement_steps)``.
    """
    cfg = config
    batch = cfg.defence_batch  # the removal's and ANP's clean images per step
    samplers = {name: sampler_for(r.train.solver) for name, r in attacks.items()}
    in_use = sorted(set(samplers.values()))
    terd = cfg.terd
    terd_passes = terd.batch_size * (
        2 * terd.estimation_steps + (terd.sampling_steps + 4) * terd.refinement_steps
    )

    def steps(model: Any, sampler: str) -> int:
        if sampler == "ddim":
            return cfg.ddim_steps
        return cfg.ddpm_steps or train_timesteps(model)

    def detectors(model: Any, name: str, sampler: str) -> list[Work]:
        elijah = elijah_settings(sampler)
        size = model.image_size if isinstance(model, BackdoorRecipe) else 32
        chain = train_timesteps(model)
        return [
            gradient_passes(
                cfg.scan_noise * cfg.scan_steps, model, f"scan inversion: {name}"
            ),
            sampling_passes(
                cfg.scan_samples,
                model,
                f"scan samples: {name}",
                steps=chain if sampler == "ddpm" else min(50, chain),
            ),
            gradient_passes(
                (cfg.elijah_steps or elijah.steps)
                * (cfg.elijah_noise or elijah_num_noise(size)),
                model,
                f"Elijah: {name}",
            ),
            sampling_passes(
                cfg.elijah_samples,
                model,
                f"Elijah samples: {name}",
                steps=chain if sampler == "ddpm" else min(50, chain),
            ),
        ]

    work: list[Work] = []
    for name, recipe in attacks.items():
        sampler = samplers[name]
        other = OTHER_SAMPLER[sampler]
        work += [
            fine_tune(recipe, name),
            sampling_passes(  # 3 clipping modes, removal and ANP
                5 * 2 * cfg.n_eval, recipe, f"ASR: {name}", steps=steps(recipe, sampler)
            ),
            sampling_passes(
                2 * cfg.n_eval,
                recipe,
                f"ASR, {other}: {name}",
                steps=steps(recipe, other),
            ),
            gradient_passes(3 * batch * cfg.removal_steps, recipe, f"removal: {name}"),
            sampling_passes(batch * cfg.removal_steps, recipe, "removal: f0", steps=1),
            gradient_passes(3 * batch * cfg.anp_steps, recipe, f"ANP: {name}"),
            gradient_passes(terd_passes, recipe, f"TERD: {name}"),
            *detectors(recipe, name, sampler),
        ]
    work.append(fine_tune(clean_fine_tune, "clean fine-tune"))
    for name, model in (("base model", base), ("clean fine-tune", clean_fine_tune)):
        work.append(gradient_passes(terd_passes, model, f"TERD: {name}"))
        for sampler in in_use:
            work += detectors(model, f"{name}, {sampler}", sampler)
    return Plan(work)
