"""The ``baddiff`` command: train a clean model, plant a backdoor, sample, evaluate.

Full-scale runs outside notebooks, e.g. on a GPU machine::

    baddiff backdoor --paper --output runs/cifar10-stop-hat          # the paper's CIFAR-10 attack
    baddiff evaluate runs/cifar10-stop-hat --n 256
    baddiff scan runs/cifar10-stop-hat                                # any downloaded DDPM/DDIM model
    accelerate launch -m baddiff_core.cli backdoor --paper ...        # several GPUs

Bad arguments exit with status 2 and a message that names the value and what is allowed.

``baddiff scan MODEL`` runs three model-level detectors side by side (``--detectors``):
the book's mode share (with its threshold), Elijah as published and TERD's model-level
features (:func:`~baddiff_core.defenses.side_by_side.model_level_detectors`; the
command checks the options, writes scan.json and the images, and prints the table).
Elijah's and TERD's code ship no threshold, so they give a verdict only when one is
passed (``--elijah-threshold``, ``--terd-threshold``). It exits with status 1
when any detector that has a verdict calls the model backdoored, and 0 otherwise (also
when no detector run has a verdict; scan.json's ``verdict`` is then null).
``baddiff scan MODEL --input NOISE`` exits with 1 when any starting noise is flagged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from baddiff_core.files import atomic_file, atomic_folder, check_output_folder
from baddiff_core.metrics import MissingDependencyError, paper_scale, resolve_features

if TYPE_CHECKING:  # imported when used: the command starts without torch's models
    from baddiff_core.defenses.elijah import Distance
    from baddiff_core.defenses.side_by_side import DetectorFinding
    from baddiff_core.defenses.terd import TerdSettings

__all__ = ["main", "build_parser"]

BACKDOOR_FILE = "backdoor.safetensors"
#: Every model folder this library writes holds this file (``save_model``'s metadata).
MODEL_MARKER = "baddiff.json"
#: Every folder of samples ``baddiff sample`` writes holds this file (what was sampled,
#: how).
SAMPLES_MARKER = "samples.json"
#: The settings of ``baddiff sample`` that its marker records, beside the model.
SAMPLES_SETTINGS = ("n", "triggered", "clip", "sampler", "steps", "seed")
#: The model-level detectors ``baddiff scan`` runs (``--detectors``), in the order it
#: runs them: the book's mode share, Elijah as published, TERD's model-level features.
DETECTORS = ("mode-share", "elijah", "terd")
#: ``--elijah-distance``: Elijah's LPIPS, the book's offline stand-in, or chosen by the
#: images (as ``baddiff evaluate --fd-features`` and chapter 9 choose).
ELIJAH_DISTANCES = ("auto", "lpips", "digits")


MODEL_FOLDER_HELP = "folder to write (diffusers layout)"
OVERWRITE_HELP = (
    "replace --output even if it is a file or a folder that baddiff did not write (without it, "
    "such an output is refused before any work starts)"
)


class UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


#: torch's generators take seeds from 0 to 2**64 - 1.
SEED_LIMIT = 2**64


def _seed(text: str) -> int:
    """``--seed``: an integer torch's generators accept, checked before any work
    starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a seed is an integer, got {text!r}"
        ) from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"a seed is an integer from 0 to 2**64 - 1, got {text}"
        )
    return value


def _add_output(command: argparse.ArgumentParser, help: str) -> None:
    """``--output`` and ``--overwrite``: every command that writes a model or images."""
    command.add_argument("--output", type=Path, required=True, help=help)
    command.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _add_sampler(
    command: argparse.ArgumentParser,
    steps_help: str,
    sampler_help: str | None = None,
    default: str | None = "ddpm",
) -> None:
    """``--sampler`` and ``--steps``: how a command samples (DDPM or DDIM)."""
    from baddiff_core.sampling import SAMPLERS

    command.add_argument(
        "--sampler", choices=SAMPLERS, default=default, help=sampler_help
    )
    command.add_argument("--steps", type=int, help=steps_help)


def _add_run(command: argparse.ArgumentParser, json_help: str | None = None) -> None:
    """``--seed``, ``--batch-size``, ``--json`` and ``--device``: how a sampling
    command runs."""
    from baddiff_core.sampling import DEFAULT_BATCH_SIZE

    command.add_argument("--seed", type=_seed, default=0)
    command.add_argument(
        "--batch-size",
        type=int,
        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})",
    )
    if json_help:
        command.add_argument("--json", action="store_true", help=json_help)
    command.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    from baddiff_core.defenses import DEFAULT_THRESHOLD
    from baddiff_core.diffusion import SOLVERS
    from baddiff_core.evaluation import ASR_THRESHOLDS
    from baddiff_core.sampling import CLIP_MODES, SAMPLERS
    from baddiff_core.triggers import TARGET_KINDS, TRIGGER_KINDS

    parser = argparse.ArgumentParser(
        prog="baddiff",
        description="Backdooring diffusion models: train a clean "
        "model, plant a backdoor, sample, evaluate.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    clean = commands.add_parser(
        "train-clean",
        help="train the clean digits model the package ships",
        description="Train a clean 16 x 16 digits model with the shipped recipe.",
    )
    _add_output(clean, MODEL_FOLDER_HELP)
    clean.add_argument("--device", default="auto")

    backdoor = commands.add_parser(
        "backdoor",
        help="plant a backdoor by fine-tuning or from scratch",
        description="Train a backdoored model (BadDiffusion) and save it.",
    )
    _add_output(backdoor, MODEL_FOLDER_HELP)
    backdoor.add_argument(
        "--paper",
        action="store_true",
        help="the paper's CIFAR-10 setting (google/ddpm-cifar10-32, stop sign -> hat, 10%%, "
        "50 epochs); downloads, wants a GPU",
    )
    backdoor.add_argument(
        "--base", help="'shipped' (default), 'scratch', a model folder or a hub id"
    )
    backdoor.add_argument("--trigger", choices=TRIGGER_KINDS)
    backdoor.add_argument(
        "--trigger-size", type=int, help="trigger side at 32 px (18, 14, 11, 8 or 4)"
    )
    backdoor.add_argument("--target", choices=TARGET_KINDS)
    backdoor.add_argument("--poison-rate", type=float)
    backdoor.add_argument("--steps", type=int, help="optimizer steps")
    backdoor.add_argument("--batch-size", type=int)
    backdoor.add_argument("--learning-rate", type=float)
    backdoor.add_argument(
        "--sampler",
        choices=SAMPLERS,
        help="the sampler the backdoor fires under: 'ddpm' (BadDiffusion, the default) "
        "or 'ddim' (VillanDiffusion's ODE target)",
    )
    # The training loss's own name for the same choice, kept as a hidden alias.
    backdoor.add_argument("--solver", choices=SOLVERS, help=argparse.SUPPRESS)
    backdoor.add_argument("--seed", type=_seed)
    backdoor.add_argument("--checkpoint-dir", help="save resumable checkpoints here")
    backdoor.add_argument("--device", default="auto")

    sample = commands.add_parser(
        "sample",
        help="draw clean or triggered samples into an image grid",
        description="Sample a model and save the images as one PNG grid, or as a folder of PNGs.",
    )
    sample.add_argument("model", help="a model folder (diffusers layout) or a hub id")
    sample.add_argument("--n", type=int, default=16, help="number of images")
    sample.add_argument(
        "--triggered",
        action="store_true",
        help="start from noise + the model's trigger",
    )
    sample.add_argument("--clip", choices=CLIP_MODES, default="none")
    _add_sampler(sample, "inference steps (default: all for DDPM, 50 for DDIM)")
    _add_output(
        sample,
        "a .png file: one grid of at most 64 images; anything else: a folder of one PNG "
        "per image, written batch by batch (any --n)",
    )
    _add_run(sample)

    evaluate = commands.add_parser(
        "evaluate",
        help="attack success, MSE/SSIM to the target and clean quality",
        description="Measure a backdoored model, with and without clipping.",
    )
    evaluate.add_argument(
        "model", help="a backdoored model folder written by `baddiff backdoor`"
    )
    evaluate.add_argument(
        "--n",
        type=int,
        default=64,
        help="triggered (and clean) samples per clipping mode",
    )
    evaluate.add_argument(
        "--clip",
        choices=CLIP_MODES,
        action="append",
        help="mode(s) to measure (default: all)",
    )
    _add_sampler(evaluate, "inference steps")
    evaluate.add_argument(
        "--threshold",
        type=float,
        help=f"attack-success MSE threshold in (0, 1) (default {ASR_THRESHOLDS['quick']} for a "
        f"16 px, 1-channel model such as the book's digits, else {ASR_THRESHOLDS['full']})",
    )
    evaluate.add_argument(
        "--fd-samples",
        type=int,
        default=256,
        help="clean samples for the Frechet distance (0: skip)",
    )
    evaluate.add_argument(
        "--fd-features",
        choices=("auto", "digits", "inception"),
        default="auto",
        help="features of the Frechet distance: 'inception' (the paper's FID; needs torch-fidelity, "
        "downloads its weights once), 'digits' (the book's offline network), 'auto' (inception for "
        "colour images of 32 px or more, else digits)",
    )
    _add_run(evaluate, json_help="print the results as JSON")

    scan = commands.add_parser(
        "scan",
        help="look for a backdoor without knowing the trigger (three model-level "
        "detectors side by side: the book's mode share, Elijah as published, TERD)",
        description="Estimate a trigger from the model alone and judge the model with up to three "
        "detectors, reported side by side: the book's mode share (Elijah's inversion objective; "
        "backdoored when many samples from noise + the estimate are the same image), Elijah as "
        "published (its uniformity and total variation) and TERD's model-level features (M_r, V_r). "
        "Elijah and TERD ship no threshold: they give a verdict only with --elijah-threshold or "
        "--terd-threshold. Works on any unconditional DDPM/DDIM UNet in the diffusers layout. "
        "Exit status: 1 when any detector with a verdict calls the model backdoored, else 0; "
        "2 bad arguments.",
    )
    scan.add_argument(
        "model", help="a model folder (diffusers layout) or a hub id (needs a network)"
    )
    scan.add_argument(
        "--n",
        type=int,
        default=16,
        help="samples drawn from noise + the trigger estimate",
    )
    scan.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help="mode share (fraction of samples alike) from which the model is called backdoored",
    )
    scan.add_argument(
        "--inversion-steps",
        type=int,
        default=100,
        help="Adam steps of the trigger inversion",
    )
    scan.add_argument(
        "--noise-batch",
        type=int,
        default=100,
        help="noises averaged over by the inversion",
    )
    _add_sampler(
        scan,
        "sampling steps (default: the training steps for DDPM, 50 for DDIM)",
        "the sampler a backdoor would fire under, and the one the scan samples with: "
        "'ddpm' (BadDiffusion, the default) or 'ddim' (VillanDiffusion's ODE target)",
        default=None,
    )
    scan.add_argument("--solver", choices=SOLVERS, help=argparse.SUPPRESS)
    scan.add_argument(
        "--clip",
        choices=CLIP_MODES,
        default="none",
        help="sample from noise + the estimate with this clipping, as the model is used",
    )
    scan.add_argument(
        "--detectors",
        default=",".join(DETECTORS),
        metavar="LIST",
        help="comma-separated model-level detectors to run (default: all three): "
        "'mode-share' (the book's; --n, --threshold, --inversion-steps, --noise-batch, --steps, "
        "--clip), 'elijah' (Elijah as published: its inversion, then --n samples with all T DDPM "
        "steps, or 50 DDIM, about as long as the mode share) and 'terd' (TERD: 3000 + 1000 SGD "
        "steps at the released settings, slow: about 24 minutes per 16 px model on a CPU; "
        "--terd-steps)",
    )
    scan.add_argument(
        "--output",
        type=Path,
        help="folder for scan.json and each detector's trigger estimate and samples "
        "(trigger.*, samples.png; elijah-*; terd-trigger.*) "
        "(default: scan-<model name> in the current folder)",
    )
    elijah = scan.add_argument_group(
        "Elijah as published (An et al. 2024, arXiv:2312.00050)"
    )
    elijah.add_argument(
        "--elijah-threshold",
        type=float,
        metavar="U",
        help="call the model backdoored when Elijah's uniformity is at or below U (low = alike "
        "samples). Elijah's code ships no threshold: without this option its scores are "
        "reported with no verdict (fit one on labelled models: baddiff_core.fit_threshold)",
    )
    elijah.add_argument(
        "--elijah-distance",
        choices=ELIJAH_DISTANCES,
        default="auto",
        help="distance of the uniformity: 'lpips' (Elijah's; needs piq, downloads VGG16 weights "
        "once), 'digits' (the book's offline stand-in, not LPIPS), 'auto' (lpips for colour "
        "images of 32 px or more, else digits)",
    )
    elijah.add_argument(
        "--elijah-steps",
        type=int,
        help="Adam steps of Elijah's inversion (default: the released code's, 100 for DDPM, "
        "10 for DDIM)",
    )
    elijah.add_argument(
        "--elijah-noise-batch",
        type=int,
        help="noises of Elijah's inversion (default: the released code's, 100; 50 at 128 px, "
        "20 at 256 px)",
    )
    terd = scan.add_argument_group(
        "TERD (Mo et al. 2024, arXiv:2409.05294): model-level features, and --input's test"
    )
    terd.add_argument(
        "--terd-threshold",
        type=float,
        metavar="M",
        help="call the model backdoored when TERD's M_r (mean KL of its trigger estimate + "
        "0.4) is at or above M. TERD's code ships no threshold: without this option M_r and "
        "V_r are reported with no verdict",
    )
    terd.add_argument(
        "--terd-steps",
        type=int,
        default=3000,
        help="steps of TERD's trigger estimation, then a third as many of its "
        "refinement, in both modes (default: the released code's 3000 and 1000)",
    )
    inputs = scan.add_argument_group(
        "testing starting noises (--input): is a given x_T triggered?"
    )
    inputs.add_argument(
        "--input",
        type=Path,
        metavar="NOISE",
        help="instead of scanning the model, test the starting noises in this "
        "safetensors file (one n,C,H,W or C,H,W tensor) with the book's noise test and "
        "TERD's input test; exit status 1 when any noise is flagged; writes nothing",
    )
    inputs.add_argument(
        "--alpha",
        type=float,
        default=0.01,
        help="the noise test's false-positive rate on honest noise (default 0.01)",
    )
    _add_run(scan, json_help="print the result as JSON")
    return parser


#: Failures a user can cause and mend (a bad value, a missing or corrupt file, a
#: missing package):
#: one line, exit status 2. ``OSError`` covers missing files, permissions and
#: unreachable hubs;
#: ``ValueError`` covers corrupt JSON and undecodable text too.
EXPECTED_ERRORS = (
    UsageError,
    ValueError,
    TypeError,
    OSError,
    MissingDependencyError,
    SafetensorError,
    MemoryError,
)
#: Longest message printed: a value echoed back (a 60 MB config) is cut.
MESSAGE_LIMIT = 500


def main(argv: list[str] | None = None) -> int:
    """Run one ``baddiff`` command. Exit status: 0 success (``scan``: no detector calls
    the model backdoored), 1 ``scan``'s backdoored verdict (any detector's) or an
    internal error, 2 bad input or an expected failure (one line on stderr), 130
    interrupted (Ctrl-C). ``baddiff --debug COMMAND`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = f"baddiff {args.command}"
    try:
        from baddiff_core.devices import use_available_cpus

        use_available_cpus()  # a CPU quota or pinned cores: no more torch threads than CPUs
        return {
            "train-clean": _train_clean,
            "backdoor": _backdoor,
            "sample": _sample,
            "evaluate": _evaluate,
            "scan": _scan,
        }[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"{command}: interrupted; nothing was written (a training keeps its last checkpoint)",
            file=sys.stderr,
        )
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes one line, unless --debug
        if args.debug:
            raise
        if isinstance(error, EXPECTED_ERRORS) or _out_of_memory(error):
            print(f"{command}: error: {_one_line(error)}", file=sys.stderr)
            return 2
        print(
            f"{command}: internal error: {type(error).__name__}: {_one_line(error)} (run `baddiff --debug "
            f"{args.command} ...` for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _out_of_memory(error: Exception) -> bool:
    """torch's allocation failures: ``torch.OutOfMemoryError`` on a GPU, a RuntimeError
    on a CPU."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text
        or "not enough memory" in text
        or "failed to allocate" in text
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if _out_of_memory(error) or isinstance(error, MemoryError):
        text = f"not enough memory ({text[:200]}); ask for fewer images or pass a smaller --batch-size"
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + " [...]"


def _sampling_options(args: argparse.Namespace, *, progress: bool = True) -> dict:
    """What every sampling command passes on from its flags: ``--seed``,
    ``--batch-size``, and whether to show progress."""
    return dict(seed=args.seed, batch_size=args.batch_size, progress=progress)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value}")


def _solver(args: argparse.Namespace) -> str | None:
    """The training target asked for: ``--sampler``, or its alias ``--solver``."""
    from baddiff_core.diffusion import sampler_for, solver_for

    if args.sampler is None:
        return args.solver
    if args.solver is not None and args.solver != solver_for(args.sampler):
        raise UsageError(
            f"--sampler {args.sampler} and --solver {args.solver} disagree "
            f"(--sampler {sampler_for(args.solver)} is --solver {args.solver}); "
            "give one of them"
        )
    return solver_for(args.sampler)


def _train_clean(args: argparse.Namespace) -> int:
    from baddiff_core.devices import resolve_device
    from baddiff_core.models import save_model
    from baddiff_core.pretrained import CLEAN_DIGITS_RECIPE, train_clean_digits

    device = resolve_device(args.device)
    # before the training
    check_output_folder(args.output, marker=MODEL_MARKER, overwrite=args.overwrite)
    unet, scheduler, report = train_clean_digits(device=str(device))
    save_model(
        args.output,
        unet.to("cpu"),
        scheduler,
        metadata=dict(kind="clean", recipe=CLEAN_DIGITS_RECIPE, report=report),
    )
    print(
        f"wrote {args.output} ({report['seconds']} s, final loss {report['final_loss']:.4f})"
    )
    return 0


def _backdoor(args: argparse.Namespace) -> int:
    from baddiff_core.attack import BackdoorRecipe, plant_backdoor
    from baddiff_core.models import save_model

    for name in ("steps", "batch_size", "trigger_size"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    recipe = BackdoorRecipe.paper() if args.paper else BackdoorRecipe()
    changes = {
        k: getattr(args, k)
        for k in ("base", "trigger", "trigger_size", "target", "poison_rate")
        if getattr(args, k) is not None
    }
    train_changes = {
        k: getattr(args, k)
        for k in ("steps", "batch_size", "learning_rate", "seed")
        if getattr(args, k) is not None
    }
    if (solver := _solver(args)) is not None:
        train_changes["solver"] = solver
    if args.checkpoint_dir:
        train_changes.update(
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=recipe.train.checkpoint_every
            or max(1, (train_changes.get("steps") or recipe.train.steps) // 10),
        )
    if changes.get("base") == "scratch" and args.paper:
        raise UsageError(
            "--paper fine-tunes google/ddpm-cifar10-32; it cannot be combined with --base scratch"
        )
    recipe = dataclasses.replace(
        recipe, **changes, train=dataclasses.replace(recipe.train, **train_changes)
    )
    # before the training
    check_output_folder(args.output, marker=MODEL_MARKER, overwrite=args.overwrite)
    began = time.time()
    model = plant_backdoor(recipe, device=args.device, use_cache=False)
    save_model(
        args.output,
        model.unet.to("cpu"),
        model.scheduler,
        metadata=dict(
            kind="backdoor", recipe=recipe.key(), report=model.info["report"]
        ),
    )
    save_file(
        {
            "trigger": model.trigger.cpu().contiguous(),
            "target": model.target.cpu().contiguous(),
        },
        str(Path(args.output) / BACKDOOR_FILE),
    )
    print(
        f"wrote {args.output}: {recipe.trigger} -> {recipe.target}, poison rate {recipe.poison_rate}, "
        f"{recipe.train.steps} steps in {time.time() - began:.0f} s"
    )
    return 0


def _load_backdoor(
    folder: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(folder) / BACKDOOR_FILE
    if not path.is_file():
        raise UsageError(
            f"{folder!r} holds no {BACKDOOR_FILE} (trigger and target): it was not written by "
            "`baddiff backdoor`"
        )
    tensors = load_file(str(path))
    return tensors["trigger"].to(device), tensors["target"].to(device)


#: The most images ``baddiff sample`` puts in one PNG grid; more are written as a
#: folder of PNGs.
GRID_LIMIT = 64


def _sample(args: argparse.Namespace) -> int:
    from baddiff_core.devices import resolve_device
    from baddiff_core.models import load_model
    from baddiff_core.sampling import DEFAULT_BATCH_SIZE, inference_steps, sample
    from baddiff_core.viz import show_images

    for name in ("n", "steps", "batch_size"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    grid = args.output.suffix.lower() == ".png"
    if args.output.suffix.lower() in (
        ".jpg",
        ".jpeg",
        ".gif",
        ".bmp",
        ".webp",
        ".tif",
        ".tiff",
        ".pdf",
        ".svg",
    ):
        raise UsageError(
            f"--output must be a .png file (one grid) or a folder (one PNG per image), "
            f"got {str(args.output)!r}"
        )
    if grid and args.n > GRID_LIMIT:
        raise UsageError(
            f"--n {args.n} is too many images for one PNG grid (at most {GRID_LIMIT}); give a folder "
            "as --output to write one PNG per image"
        )
    if not grid:
        check_output_folder(
            args.output, marker=SAMPLES_MARKER, overwrite=args.overwrite
        )
    device = resolve_device(args.device)
    unet, scheduler = load_model(args.model, device=device)
    # a bad --steps fails before any sampling
    inference_steps(scheduler, args.sampler, args.steps)
    if not grid:
        _check_free_space(args.output, args.n, unet.config)
    trigger = _load_backdoor(args.model, device)[0] if args.triggered else None
    generator = torch.Generator(device).manual_seed(args.seed)
    settings = dict(
        trigger=trigger,
        clip=args.clip,
        sampler=args.sampler,
        num_inference_steps=args.steps,
        generator=generator,
    )
    what = f"{args.n} {'triggered' if args.triggered else 'clean'} samples, clip={args.clip}"
    if grid:
        images = sample(unet, scheduler, args.n, batch_size=args.batch_size, **settings)
        figure = show_images(images.cpu(), ncols=min(8, args.n))
        with atomic_file(args.output) as staging:
            figure.savefig(staging, format="png")
        print(f"wrote {args.output} ({what})")
        return 0
    # A folder: batch by batch, each written before the next is drawn, so memory holds
    # one batch.
    from tqdm.auto import tqdm

    per_pass = args.batch_size or DEFAULT_BATCH_SIZE
    with (
        atomic_folder(args.output) as staging,
        tqdm(total=args.n, desc="sampling", unit="image") as bar,
    ):
        for first in range(0, args.n, per_pass):
            count = min(per_pass, args.n - first)
            for index, image in enumerate(
                sample(unet, scheduler, count, progress=False, **settings), first
            ):
                _save_png(image, staging / f"{index:06d}.png")
            bar.update(count)
        (staging / SAMPLES_MARKER).write_text(
            json.dumps(
                {"model": str(args.model)}
                | {key: getattr(args, key) for key in SAMPLES_SETTINGS},
                indent=2,
            )
            + "\n"
        )
    print(f"wrote {args.output}/ ({what}, one PNG each)")
    return 0


#: Disk a small PNG takes at least: one file-system block (4 KiB on ext4, APFS and
#: NTFS).
FILE_BLOCK = 4096


def _check_free_space(output: Path, n: int, unet_config: Any) -> None:
    """Refuse, before sampling, a folder of ``n`` PNGs that cannot fit on its disk: each
    takes at least a file-system block, or its raw pixels (``C * H * W`` bytes, an upper
    bound for PNG) and a header if that is more."""
    import shutil

    size = unet_config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    per_image = max(FILE_BLOCK, unet_config.out_channels * height * width + 1024)
    needed = n * per_image
    existing = next(
        parent
        for parent in (output.absolute(), *output.absolute().parents)
        if parent.exists()
    )
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise UsageError(
            f"--n {n} PNGs need about {needed / 2**30:.1f} GiB and {str(existing)!r} has "
            f"{free / 2**30:.1f} GiB free; ask for fewer images"
        )


def _save_png(image: torch.Tensor, path: Path) -> None:
    """One ``C,H,W`` image in [-1, 1] as an 8-bit PNG (grey or RGB)."""
    from PIL import Image

    pixels = (
        ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
    )
    array = (
        pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    )
    Image.fromarray(array).save(path)


def _default_threshold(unet: torch.nn.Module) -> float:
    """The attack-success threshold ``baddiff evaluate`` uses when given none: the quick
    one for a 16 px, 1-channel model (the book's digits), the full one for any other
    (CIFAR-10 and larger): :data:`~baddiff_core.evaluation.ASR_THRESHOLDS`."""
    from baddiff_core.evaluation import asr_threshold

    size = unet.config.sample_size
    square = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return asr_threshold(quick=square == (16, 16) and unet.config.in_channels == 1)


def _evaluate(args: argparse.Namespace) -> int:
    from baddiff_core.data import load_images
    from baddiff_core.devices import resolve_device
    from baddiff_core.evaluation import clean_quality, evaluate_attack
    from baddiff_core.models import load_model
    from baddiff_core.sampling import CLIP_MODES

    for name in ("n", "steps", "batch_size"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise UsageError(
            f"--threshold must be an MSE threshold in (0, 1), got {args.threshold}"
        )
    if args.fd_samples < 0 or args.fd_samples == 1:
        raise UsageError(
            f"--fd-samples must be 0 (skip) or at least 2, got {args.fd_samples}"
        )
    device = resolve_device(args.device)
    unet, scheduler = load_model(args.model, device=device)
    trigger, target = _load_backdoor(args.model, device)
    metadata = json.loads((Path(args.model) / "baddiff.json").read_text())
    recipe = metadata.get("recipe", {})
    threshold = (
        args.threshold if args.threshold is not None else _default_threshold(unet)
    )
    # fail now, not after sampling, when the FID's features cannot be had
    if args.fd_samples:
        resolve_features(
            args.fd_features,
            torch.empty(
                2,
                unet.config.in_channels,
                unet.config.sample_size,
                unet.config.sample_size,
            ),
        )
    results = evaluate_attack(
        unet,
        scheduler,
        trigger,
        target,
        n=args.n,
        clips=tuple(args.clip or CLIP_MODES),
        threshold=threshold,
        sampler=args.sampler,
        num_inference_steps=args.steps,
        **_sampling_options(args),
    )
    output = {
        "model": args.model,
        "attack": {k: v.as_dict() for k, v in results.items()},
    }
    if args.fd_samples:
        real = load_images(
            recipe.get("dataset", "digits"),
            unet.config.sample_size,
            channels=unet.config.in_channels,
        )
        score = clean_quality(
            unet,
            scheduler,
            real,
            n=args.fd_samples,
            features=args.fd_features,
            **_sampling_options(args),
        )
        output["clean_quality"] = dict(
            value=score.value,
            num_real=score.num_real,
            num_fake=score.num_fake,
            features=score.features,
            text=str(score),
        )
    if args.json:
        print(json.dumps(output, indent=2))
    else:
        print(
            f"{'clip':6s} {'ASR':>6s} {'MSE':>9s} {'SSIM':>6s} {'leak':>6s}   ({args.n} samples, threshold {threshold})"
        )
        for clip, m in results.items():
            print(f"{clip:6s} {m.asr:6.3f} {m.mse:9.2e} {m.ssim:6.3f} {m.leak:6.3f}")
        if "clean_quality" in output:
            print(f"clean quality: {output['clean_quality']['text']}")
    return 0


def _read_noise(path: Path) -> torch.Tensor:
    """The starting noises of ``--input``: the file's one tensor (or its ``noise``),
    as ``n,C,H,W``."""
    tensors = load_file(str(path))
    if len(tensors) != 1 and "noise" not in tensors:
        raise UsageError(
            f"--input {path} must hold one tensor or one named 'noise', "
            f"it holds {sorted(tensors)}"
        )
    noise = tensors.get("noise", next(iter(tensors.values())))
    if noise.dim() == 3:
        noise = noise.unsqueeze(0)
    if noise.dim() != 4 or not noise.is_floating_point():
        raise UsageError(
            f"--input {path} must hold a float n,C,H,W or C,H,W tensor, got "
            f"{noise.dtype} of shape {tuple(noise.shape)}"
        )
    if not torch.isfinite(noise).all():
        raise UsageError(f"--input {path} holds NaN or infinite values")
    return noise.float()


def _scan_input(args: argparse.Namespace) -> int:
    """``baddiff scan MODEL --input NOISE``: flag triggered starting noises."""
    from baddiff_core.defenses.noise_tests import noise_test
    from baddiff_core.defenses.terd import estimate_trigger, input_log_likelihood_ratio
    from baddiff_core.devices import resolve_device
    from baddiff_core.models import load_model

    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be a rate in (0, 1), got {args.alpha}")
    _positive("--terd-steps", args.terd_steps)
    noise = _read_noise(args.input)
    unet, scheduler = load_model(args.model, device=resolve_device(args.device))
    shape = (unet.config.in_channels, *(2 * [unet.config.sample_size]))
    if tuple(noise.shape[1:]) != shape:
        raise UsageError(
            f"--input {args.input} holds noises of shape {tuple(noise.shape[1:])}, "
            f"the model starts from {shape}"
        )
    tested = noise_test(noise, alpha=args.alpha)
    settings = _terd_settings(args.terd_steps)
    terd = estimate_trigger(
        unet, scheduler, settings=settings, seed=args.seed, progress=not args.json
    )
    llr = input_log_likelihood_ratio(noise, terd.mu.cpu())
    rows = [
        dict(
            input=i,
            noise_test_p=float(p),
            noise_test_flagged=bool(flag),
            terd_log_likelihood_ratio=float(ratio),
            terd_flagged=bool(ratio > 0),
        )
        for i, (p, flag, ratio) in enumerate(zip(tested.p_value, tested.flagged, llr))
    ]
    flagged = sum(r["noise_test_flagged"] or r["terd_flagged"] for r in rows)
    if args.json:
        print(json.dumps(dict(model=str(args.model), inputs=rows), indent=2))
    else:
        print(f"{'input':>5s} {'noise test p':>12s} {'TERD log-LR':>12s}  flagged by")
        for r in rows:
            by = [
                name
                for name, key in (("noise test", "noise_test"), ("TERD", "terd"))
                if r[f"{key}_flagged"]
            ]
            print(
                f"{r['input']:5d} {r['noise_test_p']:12.3g} "
                f"{r['terd_log_likelihood_ratio']:12.3g}  {', '.join(by) or '-'}"
            )
        print(
            f"{flagged} of {len(rows)} noises flagged (noise test at alpha "
            f"{args.alpha}; TERD: log-likelihood ratio > 0 with its trigger estimate, "
            f"{args.terd_steps} + {settings.refinement_steps} steps)"
        )
    return 1 if flagged else 0


def _terd_settings(steps: int) -> TerdSettings:
    """TERD's settings for ``--terd-steps``, in both modes of ``baddiff scan``: the
    released code's (:data:`~baddiff_core.defenses.terd.TERD_CIFAR10`) with ``steps``
    of trigger estimation and a third as many (at least 1) of refinement; 3000 gives
    the released 3000 + 1000."""
    from baddiff_core.defenses.terd import TERD_CIFAR10

    return dataclasses.replace(
        TERD_CIFAR10, estimation_steps=steps, refinement_steps=max(1, steps // 3)
    )


def _detectors(text: str) -> tuple[str, ...]:
    """``--detectors``: the named detectors, in the order they run
    (:data:`DETECTORS`)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DETECTORS]
    if not names or unknown:
        raise UsageError(
            f"--detectors must be a comma-separated list of {', '.join(DETECTORS)}, "
            f"got {text!r}"
        )
    return tuple(name for name in DETECTORS if name in names)


def _check_detector_options(
    args: argparse.Namespace, detectors: tuple[str, ...]
) -> None:
    """Elijah's and TERD's options, checked before the model is loaded: an option of a
    detector that does not run is refused rather than ignored."""
    for name in ("elijah_steps", "elijah_noise_batch", "terd_steps"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    for threshold in ("elijah_threshold", "terd_threshold"):
        value = getattr(args, threshold)
        if value is not None and not math.isfinite(value):
            raise UsageError(
                f"--{threshold.replace('_', '-')} must be a finite number, got {value}"
            )
    if args.elijah_threshold is not None and args.elijah_threshold < 0:
        raise UsageError(
            "--elijah-threshold must be a uniformity (a distance, at least 0), "
            f"got {args.elijah_threshold}"
        )
    given = dict(
        elijah=(
            ("--elijah-threshold", args.elijah_threshold is not None),
            ("--elijah-steps", args.elijah_steps is not None),
            ("--elijah-noise-batch", args.elijah_noise_batch is not None),
            ("--elijah-distance", args.elijah_distance != "auto"),
        ),
        terd=(("--terd-threshold", args.terd_threshold is not None),),
    )
    for detector, options in given.items():
        for flag, is_given in options:
            if is_given and detector not in detectors:
                raise UsageError(
                    f"{flag} is an option of {detector}, which --detectors "
                    f"{args.detectors!r} leaves out"
                )
    if "elijah" in detectors and args.n < 4:
        raise UsageError(
            f"--n must be at least 4 for elijah (its trimmed uniformity drops a quarter "
            f"of the samples at each end), got {args.n}; or leave elijah out of --detectors"
        )


def _elijah_distance(
    choice: str, shape: tuple[int, int, int], device: torch.device | str = "cpu"
) -> Distance:
    """The distance of Elijah's uniformity for ``--elijah-distance`` and images of
    ``shape`` (``C,H,W``): ``"auto"`` is LPIPS for colour images of 32 px or more (as
    ``baddiff evaluate --fd-features auto`` and chapter 9 choose), else the digits
    stand-in. It is tried once on two images, so that a missing package, weights that
    cannot be downloaded or images too small fail now, in one line, not after the
    inversion."""
    from baddiff_core.defenses.elijah import feature_distance, lpips_distance

    how = ""
    if choice == "auto":
        choice = "lpips" if paper_scale(shape) else "digits"
        how = (
            " (chosen by --elijah-distance auto for colour images of 32 px or more; "
            f"the model's are {'x'.join(map(str, shape))})"
        )
    offline = (
        "offline, pass --elijah-distance digits (the book's stand-in, not LPIPS) or "
        "leave elijah out of --detectors"
    )
    distance = lpips_distance if choice == "lpips" else feature_distance
    probe = torch.full((2, *shape), 0.5, device=device)
    try:
        distance(probe, probe)
    except MissingDependencyError:
        raise MissingDependencyError(
            f"--elijah-distance lpips{how} is Elijah's LPIPS and needs the optional package "
            "piq and VGG16/LPIPS weights it downloads on first use: "
            f'`pip install "baddiff-core[full]"` (or `pip install piq`); {offline}'
        ) from None
    except OSError as error:
        if choice != "lpips":
            raise
        raise OSError(
            f"--elijah-distance lpips{how}: LPIPS's weights could not be loaded "
            f"({_one_line(error)}); {offline}"
        ) from error
    except ValueError as error:
        raise UsageError(f"--elijah-distance {choice}{how}: {error}") from None
    return distance


def _threshold_note(flag: str, threshold: float | None, authors: str) -> str:
    """Where a detector's threshold came from, for scan.json."""
    from baddiff_core.defenses.side_by_side import NONE_SHIPPED

    if threshold is not None:
        return f"given ({flag})"
    return f"{NONE_SHIPPED} ({authors} code has none); pass {flag} for a verdict"


def _entry(finding: DetectorFinding, args: argparse.Namespace) -> dict[str, Any]:
    """A detector's entry in scan.json (scores, threshold, verdict, settings,
    seconds)."""
    from baddiff_core.defenses import DEFAULT_THRESHOLD

    if finding.detector == "mode-share":
        note = (
            "the book's default (provisional)"
            if args.threshold == DEFAULT_THRESHOLD
            else "given (--threshold)"
        )
    else:
        authors = "Elijah's" if finding.detector == "elijah" else "TERD's"
        note = _threshold_note(
            THRESHOLD_FLAGS[finding.detector], finding.threshold, authors
        )
    loss = "final_loss" if finding.detector == "terd" else "final_inversion_loss"
    copied = ("name", "scores", "thresholded_score", "backdoored_when", "threshold")
    entry = {key: getattr(finding, key) for key in copied}
    entry |= dict(threshold_note=note, verdict=finding.verdict)
    if finding.detector == "elijah":
        entry["distance"] = finding.distance
    entry |= {"settings": finding.settings, loss: finding.final_loss}
    entry["seconds"] = round(finding.seconds, 1)
    return entry


def _legacy(finding: DetectorFinding) -> dict[str, Any]:
    """The fields scan.json has held at its top level since before the detectors stood
    side by side: the mode share's."""
    scores, settings = finding.scores, finding.settings
    return dict(
        mode_share=scores["mode_share"],
        sampler=settings["sampler"],
        solver=settings["solver"],
        clip=settings["clip"],
        threshold=finding.threshold,
        alike=scores["alike"],
        samples=settings["samples"],
        diversity=scores["diversity"],
        total_variation=scores["total_variation"],
        inversion_steps=settings["inversion_steps"],
        final_inversion_loss=finding.final_loss,
        seconds=round(finding.result.seconds, 1),
    )


#: The detectors' names in the summary line.
SHORT_NAMES = {"mode-share": "mode share", "elijah": "Elijah", "terd": "TERD"}
#: The option that gives each detector its threshold.
THRESHOLD_FLAGS = {
    "mode-share": "--threshold",
    "elijah": "--elijah-threshold",
    "terd": "--terd-threshold",
}


#: Each detector's prefix of its file names in --output, and its trigger's title.
FILES = {
    "mode-share": ("", "trigger estimate"),
    "elijah": ("elijah-", "Elijah's estimate"),
    "terd": ("terd-", "TERD's estimate"),
}


def _save_finding(output: Path, finding: DetectorFinding, n: int) -> None:
    """A detector's trigger estimate (safetensors and PNG) and samples (PNG) in
    ``output``."""
    import matplotlib.pyplot as plt

    from baddiff_core.viz import show_images

    prefix, title = FILES[finding.detector]
    trigger = finding.trigger.detach().cpu()
    save_file(
        {"trigger": trigger.contiguous()},
        str(output / f"{prefix}trigger.safetensors"),
    )
    low, high = float(trigger.min()), float(trigger.max())
    figures = [
        (
            "trigger.png",
            show_images(
                [trigger],
                titles=[title],
                size=2.5,
                value_range=(low, max(high, low + 1e-6)),
            ),
        )
    ]
    if finding.samples is not None:
        samples = finding.samples.detach().cpu()
        figures.append(("samples.png", show_images(samples, ncols=min(8, n))))
    for name, figure in figures:
        figure.savefig(output / f"{prefix}{name}")
        plt.close(figure)


def _summary(findings: dict[str, DetectorFinding], seconds: float, output: Path) -> str:
    """The line under the table: the scan's verdict and which detectors gave it."""
    from baddiff_core.defenses.side_by_side import NONE_SHIPPED

    judged = [name for name, f in findings.items() if f.verdict is not None]
    flagged = [
        SHORT_NAMES[name] for name in judged if findings[name].verdict == "BACKDOORED"
    ]
    unjudged = [name for name in findings if findings[name].verdict is None]
    if flagged:
        line = (
            f"BACKDOORED: called backdoored by {' and '.join(flagged)} "
            f"({len(flagged)} of {len(judged)} detectors with a threshold)"
        )
    elif judged:
        line = (
            f"clean: no detector with a threshold calls the model backdoored "
            f"({len(judged)} of {len(findings)} have one)"
        )
    else:
        line = "no verdict: none of the detectors run has a threshold"
    if unjudged:
        line += (
            f"; {' and '.join(SHORT_NAMES[name] for name in unjudged)}: scores only "
            f"({NONE_SHIPPED}; {', '.join(THRESHOLD_FLAGS[name] for name in unjudged)} "
            f"give{'s' * (len(unjudged) == 1)} a verdict)"
        )
    return (
        f"{line}. {len(findings)} detector{'s' * (len(findings) > 1)} in "
        f"{seconds:.0f} s; estimates and samples in {output}/"
    )


def _print_table(findings: dict[str, DetectorFinding], summary: str) -> None:
    """The detectors side by side: detector | score(s) | threshold | verdict, then the
    summary line."""
    rows = [("detector", "score(s)", "threshold", "verdict")] + [
        (f.label, f.score_text, f.rule_text, f.verdict or "-")
        for f in findings.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)] + [0]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    print(summary)


def _scan(args: argparse.Namespace) -> int:
    """``baddiff scan MODEL``: the model-level detectors side by side
    (:func:`~baddiff_core.defenses.side_by_side.model_level_detectors`), or, with
    ``--input``, :func:`_scan_input`."""
    from baddiff_core.devices import resolve_device
    from baddiff_core.diffusion import sampler_for
    from baddiff_core.models import load_model
    from baddiff_core.sampling import inference_steps

    for name in ("n", "inversion_steps", "noise_batch", "steps", "batch_size"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.input is not None:
        return _scan_input(args)
    if args.n < 2:
        raise UsageError(
            f"--n must be at least 2 (the score compares samples), got {args.n}"
        )
    if not 0 < args.threshold <= 1:
        raise UsageError(
            f"--threshold must be a mode share in (0, 1], got {args.threshold}"
        )
    detectors = _detectors(args.detectors)
    _check_detector_options(args, detectors)
    solver = _solver(args) or "sde"
    sampler = sampler_for(solver)
    output = args.output or Path(
        f"scan-{Path(str(args.model).rstrip('/')).name.replace('/', '-')}"
    )
    if "elijah" in detectors and args.elijah_distance == "lpips":
        _elijah_distance("lpips", (3, 32, 32))  # piq and its weights, before the model
    device = resolve_device(args.device)
    unet, scheduler = load_model(args.model, device=device)
    # What can be checked on the model, before any detector runs.
    if "mode-share" in detectors:
        inference_steps(scheduler, sampler, args.steps)
    distance: Distance | None = None
    if "elijah" in detectors:
        shape = (unet.config.in_channels, *(2 * [unet.config.sample_size]))
        distance = _elijah_distance(args.elijah_distance, shape, device)
    terd_settings = _terd_settings(args.terd_steps)
    train_steps = scheduler.config.num_train_timesteps
    if "terd" in detectors and train_steps < terd_settings.sampling_steps:
        raise UsageError(
            f"terd samples with {terd_settings.sampling_steps} DDIM steps and the model "
            f"was trained with {train_steps}; leave terd out of --detectors"
        )
    from baddiff_core.defenses.side_by_side import (
        combined_verdict,
        model_level_detectors,
    )

    progress = not args.json
    settings = dict(
        n=args.n,
        sampler=sampler,
        mode_share_threshold=args.threshold,
        num_noise=args.noise_batch,
        inversion_steps=args.inversion_steps,
        num_inference_steps=args.steps,
        clip=args.clip,
        batch_size=args.batch_size,
        elijah_threshold=args.elijah_threshold,
        elijah_distance=distance,
        elijah_steps=args.elijah_steps,
        elijah_num_noise=args.elijah_noise_batch,
        terd_threshold=args.terd_threshold,
        terd_settings=terd_settings,
        seed=args.seed,
        progress=progress,
    )
    what = {
        "mode-share": "the book's mode share",
        "elijah": "Elijah as published",
        "terd": f"TERD ({terd_settings.estimation_steps} + "
        f"{terd_settings.refinement_steps} SGD steps; at the released 3000 + 1000, "
        "about 24 minutes per 16 px model on a CPU)",
    }
    began = time.perf_counter()
    findings: dict[str, DetectorFinding] = {}
    for k, name in enumerate(detectors, 1):  # one at a time, to say which is running
        if progress:
            print(
                f"baddiff scan: detector {k} of {len(detectors)}: {what[name]}",
                file=sys.stderr,
            )
        findings |= model_level_detectors(unet, scheduler, detectors=name, **settings)
    total = time.perf_counter() - began
    verdict = combined_verdict(findings.values())
    # The mode share's fields stay where they were before the detectors stood side
    # by side; "verdict" is the scan's, the one the exit status gives.
    legacy = (
        _legacy(findings["mode-share"])
        if "mode-share" in findings
        else dict(sampler=sampler, solver=solver)
    )
    report = dict(
        model=str(args.model),
        verdict=verdict,
        **legacy,
        output=str(output),
        detectors={name: _entry(f, args) for name, f in findings.items()},
        total_seconds=round(total, 1),
    )
    output.mkdir(parents=True, exist_ok=True)
    for finding in findings.values():
        _save_finding(output, finding, args.n)
    (output / "scan.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(findings, _summary(findings, total, output))
    return 1 if verdict == "BACKDOORED" else 0


if __name__ == "__main__":
    raise SystemExit(main())
