"""Benchmarks of the book's training, sampling and chapters: one command, results to a
file.

    python benchmarks/run.py --size small                       # CI: a 2-core CPU, about 40 s
    python benchmarks/run.py --size small --book _build/.jupyter_cache --models
                                        # + the chapter times of a build, what the model cache computed
    python benchmarks/run.py --size full --device cuda          # a GPU: CIFAR-10 UNet, batch 128

It prints each ratio as it is measured and writes JSON (and the same as Markdown tables)
to ``--output``. The measurements are in ``baddiff_core.benchmark``; the book's
Performance page runs the small size and shows the results recorded here. ``--strict``
exits with status 1 when a ratio misses its target (off by default: a shared CI machine
is too noisy for a 3% bound to gate).
"""

from __future__ import annotations

import argparse
import sys

from baddiff_core.benchmark import SIZES, run_benchmarks, write_results
from baddiff_core.cache import cache_root

SECTIONS = ("training", "sampling", "memory", "throughput")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps"
    )
    parser.add_argument(
        "--book",
        metavar="JUPYTER_CACHE",
        help="add the chapter times of a built book "
        "(its execution cache, e.g. _build/.jupyter_cache)",
    )
    parser.add_argument(
        "--models",
        nargs="?",
        const="",
        metavar="CACHE",
        help="add what the model cache computed, and whether anything twice (default: $BADDIFF_CACHE "
        "or ~/.cache/baddiff)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=SECTIONS,
        help="run only these sections",
    )
    parser.add_argument(
        "--output",
        default="_build/benchmarks/results.json",
        help="where to write the JSON (and the Markdown beside it)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a ratio misses its target"
    )
    args = parser.parse_args(argv)
    try:
        models = None if args.models is None else (args.models or cache_root())
        results = run_benchmarks(
            args.size,
            args.device,
            jupyter_cache=args.book,
            model_cache=models,
            sections=tuple(args.only),
        )
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    path = write_results(results, args.output)
    print(f"wrote {path} and {path.with_suffix('.md')} ({results['seconds']:.0f} s)")
    missed = [c["name"] for c in results["comparisons"] if c["passed"] is False]
    if missed:
        print("targets not met: " + "; ".join(missed))
    return 1 if missed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
