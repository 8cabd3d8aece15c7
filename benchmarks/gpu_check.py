"""The GPU check: what full mode costs on the GPU at hand, in one run of a few minutes.

    python benchmarks/gpu_check.py                 # a GPU: writes benchmarks/results/full-gpu.json
    python benchmarks/gpu_check.py --dry-run       # the same code on the CPU at a few steps (CI)

``benchmarks/gpu_check.sh`` installs the wheels it is handed (offline) and runs this
file under a time limit. Nothing is downloaded: the CIFAR-10 UNet is
``google/ddpm-cifar10-32``'s architecture with random weights, and the images are random
numbers, which cost the same arithmetic.

What it measures (``baddiff_core.benchmark``), written as JSON that the Performance page
shows:

- ``throughput``: training images/s and model FLOP utilisation of the CIFAR-10 UNet at
  batch 128 in fp32, fp16, bf16 where the GPU runs it (compute capability 8.0 or more)
  and bf16 with channels-last and ``torch.compile`` (``training_throughput``);
- ``peak_memory_bytes``: training at batch 128, sampling at the evaluation batch of 256
  images;
- ``fine_tune``: the paper's backdoor fine-tune (``BackdoorRecipe.paper()``), seconds
  per step and what its 19,550 steps would take (``fine_tune_cost``);
- ``sampling_cost``: seconds per UNet step at batch 256, so DDPM-1000 and DDIM-50 per
  image, and the batch's peak memory (``sampling_cost``).
"""

from __future__ import annotations

import argparse
import sys
import time

from baddiff_core.benchmark import (
    fine_tune_cost,
    run_benchmarks,
    sampling_cost,
    write_results,
)
from baddiff_core.devices import resolve_device

#: What a run may take on one modern GPU (the issue that asked for this check: 8
#: minutes).
BUDGET_SECONDS = 8 * 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every section on the CPU at a few steps (what CI does, so that this cannot rot)",
    )
    parser.add_argument(
        "--device", default=None, help="default: cuda (cpu with --dry-run)"
    )
    parser.add_argument(
        "--output",
        help="default: benchmarks/results/full-gpu.json "
        "(_build/benchmarks/gpu-check-dry-run.json with --dry-run)",
    )
    args = parser.parse_args(argv)
    device_name = args.device or ("cpu" if args.dry_run else "cuda")
    try:
        device = resolve_device(device_name)
    except ValueError as error:
        print(f"gpu_check: {error}", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.dry_run:
        print(
            f"gpu_check: {device} is not a GPU; pass --dry-run to exercise the check on it",
            file=sys.stderr,
        )
        return 2
    output = args.output or (
        "_build/benchmarks/gpu-check-dry-run.json"
        if args.dry_run
        else "benchmarks/results/full-gpu.json"
    )
    began = time.perf_counter()
    results = run_benchmarks(
        "smoke" if args.dry_run else "check", device, sections=("memory", "throughput")
    )
    print("fine-tune ...", flush=True)
    results["fine_tune"] = fine_tune_cost(
        device, steps=3 if args.dry_run else 20, batch_size=2 if args.dry_run else None
    )
    f = results["fine_tune"]
    print(
        f"the paper's fine-tune: {1000 * f['step_seconds']:.0f} ms per step at batch {f['batch']} "
        f"({f['mixed_precision']}); {f['paper_steps']:,} steps: {f['paper_hours']:.1f} h",
        flush=True,
    )
    results["sampling_cost"] = sampling_cost(
        device, batch_size=2 if args.dry_run else 256, steps=2 if args.dry_run else 20
    )
    c = results["sampling_cost"]
    print(
        f"sampling at batch {c['batch']}: {1000 * c['step_seconds']:.0f} ms per step; DDPM-1000 "
        f"{c['ddpm_1000_seconds_per_image']:.2f} s/image, DDIM-50 {c['ddim_50_seconds_per_image']:.3f} s/image",
        flush=True,
    )
    results["dry_run"] = args.dry_run
    results["seconds"] = time.perf_counter() - began
    path = write_results(results, output)
    print(
        f"wrote {path} and its Markdown beside it ({results['seconds']:.0f} s"
        f"{'' if args.dry_run else f'; budget {BUDGET_SECONDS} s'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
