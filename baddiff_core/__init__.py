"""baddiff_core: the library behind the book *Backdooring Diffusion Models*.

The chapters use one import::

    import baddiff_core as bd

    recipe = bd.BackdoorRecipe(trigger="stop_sign", target="hat", poison_rate=0.1)
    model = bd.plant_backdoor(recipe)
    bd.show_images(bd.sample(model.unet, model.scheduler, n=16))

Every name in ``__all__`` is defined in one module of the package (listed in
``_EXPORTS`` below and on the book's API reference page); ``bd.X`` is that module's ``X``.
Names are imported on first use (PEP 562, as diffusers does), so ``import baddiff_core``
stays cheap and ``baddiff --help`` does not wait for PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: The public API: module -> the names it gives ``bd``. A chapter needs nothing else.
_EXPORTS: dict[str, tuple[str, ...]] = {
    # diffusion in general (chapters 1-2)
    "diffusion": (
        "PAPER_SCHEDULE",
        "QUICK_SCHEDULE",
        "SOLVERS",
        "diffusion_loss",
        "in_range_path",
        "make_scheduler",
        "poisoned_forward",
        "r_coefficients",
        "sampler_for",
        "solver_for",
    ),
    "models": (
        "PRETRAINED_CIFAR10",
        "count_parameters",
        "ddpm_cifar10_unet",
        "load_model",
        "make_unet",
        "save_model",
    ),
    "pretrained": ("clean_digits_path", "load_clean_digits"),
    "data": ("load_images", "load_sample_photo"),
    # (the function train() is not here: bd.train is the module baddiff_core.train)
    "train": ("TrainConfig", "list_checkpoints", "load_checkpoint_weights"),
    "sampling": (
        "CLIP_MODES",
        "inference_scheduler",
        "sample",
        "sample_clean_and_triggered",
    ),
    # the attack (chapters 3-4)
    "triggers": (
        "TARGET_KINDS",
        "TRIGGER_KINDS",
        "make_target",
        "make_trigger",
        "stamp",
        "transparency_mask",
    ),
    "poison": ("PoisonedDataset",),
    "attack": ("BackdoorRecipe", "QUICK_SHORT_FINETUNE", "plant_backdoor"),
    # a trigger learned with the backdoor to pass the noise test (chapter 10)
    "learned_trigger": ("initial_trigger", "ks_distance_bound", "project_trigger"),
    # measuring it
    "metrics": (
        "attack_success_rate",
        "class_histogram",
        "frechet_distance",
        "mse_to_target",
        "ssim_to_target",
    ),
    "evaluation": ("clean_quality", "evaluate_attack"),
    # defences (chapters 5-9)
    "defenses": (
        "adversarial_neuron_masks",
        "choose_threshold",
        "clean_subset",
        "inversion_lambda",
        "prune_channels",
        "remove_backdoor",
        "scan_model",
    ),
    # Elijah as published (An et al. 2024, arXiv:2312.00050), beside the book's scan
    "defenses.elijah": (
        "ElijahScores",
        "elijah_inversion",
        "elijah_scores",
        "elijah_num_noise",
        "elijah_settings",
        "feature_distance",
        "fit_threshold",
        "leave_one_out_accuracy",
        "lpips_distance",
        "tv_score",
        "uniformity_score",
    ),
    # TERD as released (Mo et al. 2024, arXiv:2409.05294)
    "defenses.terd": (
        "TERD_CIFAR10",
        "TerdModelScore",
        "TerdSettings",
        "TerdTrigger",
        "detect_inputs",
        "estimate_trigger",
        "input_detection_rates",
        "input_log_likelihood_ratio",
        "model_kl_score",
        "reversed_loss",
    ),
    # the book's noise test of a starting noise
    "defenses.noise_tests": ("NoiseTest", "noise_test"),
    # the three model-level detectors side by side (``baddiff scan``)
    "defenses.side_by_side": (
        "MODEL_LEVEL_DETECTORS",
        "DetectorFinding",
        "combined_verdict",
        "model_level_detectors",
        "threshold_verdict",
    ),
    "scoreboard": (
        "DEPLOYED_CLIP",
        "SCOREBOARD_DETECTORS",
        "SCOREBOARD_MITIGATIONS",
        "Detection",
        "Mitigation",
        "Scoreboard",
        "ScoreboardConfig",
        "run_scoreboard",
        "scoreboard_plan",
    ),
    # the authors' released models (chapter 11) and the paper's numbers
    "authors": (
        "AUTHORS_MODELS",
        "EIGHT_BIT_FLOOR",
        "as_saved_png",
        "load_authors_model",
    ),
    "authors_assets": ("authors_downloads", "authors_target", "authors_trigger"),
    "published": ("BADDIFFUSION_CIFAR10",),
    # running the book: settings, tables, figures, GPU time, the cache
    "book": (
        "SMOKE_SCHEDULE",
        "chapter_settings",
        "glue",
        "markdown_table",
        "show_table",
    ),
    "viz": ("animate_images", "show_images", "show_strips", "use_style"),
    "gpu_time": (
        "Plan",
        "Work",
        "WorkCounter",
        "fine_tune",
        "gradient_passes",
        "sampling_passes",
        "training",
    ),
    "devices": ("mixed_precision_for",),
    "cache": ("recipe_key",),
}

#: Modules a chapter uses as a whole (``bd.classical.heat_step(...)``).
_MODULES = ("classical", "benchmark")

_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + list(_MODULES)


def __getattr__(name: str) -> Any:
    """``bd.X``: import the module that defines ``X`` on first use (PEP 562)."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
