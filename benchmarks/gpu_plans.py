"""Print every chapter's full-mode GPU plan: its work items, FLOPs and minutes on a T4
and an A100.

    .venv/bin/python benchmarks/gpu_plans.py [--markdown]

Runs each chapter's parameters and setup cells with ``QUICK = False`` at full scale
(nothing is trained, sampled or downloaded: the setup cells only configure), as
``tests/test_gpu_plans.py`` does, and prints ``PLAN.rows()``
(``baddiff_core.gpu_time``). The rates are assumptions (T4 7 TFLOP/s, A100 42 TFLOP/s)
until ``benchmarks/gpu_check.sh`` measures them on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def chapter_plan(chapter: Path):
    """The ``PLAN`` a chapter builds with ``QUICK = False`` (at full scale when the
    environment sets no ``BADDIFF_SCALE``): its parameters cell, then its code cells from
    the setup cell (``chapter_settings(``) to the one that defines ``PLAN``."""
    cells = [
        c for c in nbformat.read(chapter, as_version=4).cells if c.cell_type == "code"
    ]
    parameters = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    first = next(i for i, c in enumerate(cells) if "chapter_settings(" in c.source)
    last = next(i for i, c in enumerate(cells) if "PLAN = " in c.source)
    namespace: dict = {}
    exec(compile(parameters.source, f"{chapter.name}:parameters", "exec"), namespace)
    namespace.update(QUICK=False, DEVICE="cpu")
    for index in range(first, last + 1):
        source = cells[index].source
        exec(compile(source, f"{chapter.name}:cell {index}", "exec"), namespace)
    namespace["WORK"].stop()
    return namespace["PLAN"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--markdown", action="store_true", help="one Markdown table of the chapters"
    )
    args = parser.parse_args(argv)
    os.environ.pop("BADDIFF_SCALE", None)  # full scale
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    import contextlib
    import io

    from conftest import chapter_notebooks

    rows = []
    for chapter in chapter_notebooks():
        with contextlib.redirect_stdout(io.StringIO()):
            plan = chapter_plan(chapter)
        rows.append((chapter.stem, plan))
        if not args.markdown:
            print(f"\n{chapter.stem}: {plan}")
            for row in plan.rows():
                print(
                    f"  {row['work'][:60]:60s} {row['image passes']:>10,} passes "
                    f"{'(+backward)' if row['backward'] == 'yes' else '           '} "
                    f"{row['PFLOP']:7.3f} PFLOP {row['min on T4']:6.1f} min T4"
                )
    if args.markdown:
        print("| chapter | PFLOP | T4 minutes | A100 minutes |\n|---|---|---|---|")
        for name, plan in rows:
            print(
                f"| {name} | {plan.flops / 1e15:.1f} | {plan.minutes('T4'):.1f} | {plan.minutes('A100'):.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
