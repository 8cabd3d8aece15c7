"""The benchmark's measuring tools, each against something known: call order,
hand-counted FLOPs, a buffer of known size, a jupyter cache with known times. The
command itself runs in `make test`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import nbformat
import pytest
import torch

from baddiff_core import benchmark
from baddiff_core.benchmark import (
    Comparison,
    cache_summary,
    interleaved,
    peak_memory,
    results_markdown,
    run_benchmarks,
    training_flops,
    training_throughput,
    write_results,
)
from conftest import ROOT


def run_script(name: str, *args: str, **options) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> <args>`` in a child process, its output captured as
    text; ``options`` go to ``subprocess.run``."""
    script = str(ROOT / "benchmarks" / name)
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, **options
    )


def test_interleaved_alternates_and_takes_the_median_of_paired_ratios():
    calls: list[str] = []
    seconds = iter(
        [
            9.0,
            9.0,  # warm-up, not recorded
            2.0,
            1.0,
            1.0,
            4.0,
            3.0,
            1.0,
        ]
    )

    def run(name):
        def call():
            calls.append(name)
            return next(seconds)

        return call

    comparison = interleaved("demo", run("a"), run("b"), 3)
    assert calls == [
        "a",
        "b",
        "a",
        "b",
        "b",
        "a",
        "a",
        "b",
    ]  # warm-up, then A B, B A, A B
    assert comparison.candidate == [2.0, 4.0, 3.0] and comparison.baseline == [
        1.0,
        1.0,
        1.0,
    ]
    assert comparison.ratio == 3.0 and comparison.spread == (2.0, 4.0)
    assert comparison.passed is None
    assert (
        Comparison("train: poisoned / clean step", [1.02], [1.0], 1.03).passed is True
    )
    assert Comparison("x", [1.1], [1.0], 1.03).passed is False
    with pytest.raises(
        ValueError, match="repeats must be a positive integer, got repeats=0"
    ):
        interleaved("demo", run("a"), run("b"), 0)


class _OneConv(torch.nn.Module):
    """A 'UNet' that is one 3x3 convolution (it ignores the timestep)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)

    def forward(self, x, t):
        return type("Out", (), {"sample": self.conv(x).mean(1, keepdim=True)})()


def test_training_flops_match_a_hand_count(quick_scheduler):
    """Forward: 2 * B * C_out * H * W * C_in * 3 * 3 multiply-adds counted as two FLOPs
    each. The input needs no gradient, so the backward pass computes the weight's
    gradient only: as much again."""
    batch = torch.rand(2, 1, 8, 8)
    forward = 2 * 2 * 4 * 8 * 8 * 1 * 9
    assert training_flops(_OneConv(), batch, quick_scheduler) == 2 * forward


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/status"
)
def test_torch_calls_counts_each_function_by_name():
    x = torch.ones(3)

    def work():
        y = torch.clamp(x, 0, 1) + 1  # clamp, then add
        return y.clamp(-1, 1).sum()  # a method counts like the function

    calls = benchmark.torch_calls(work)
    assert calls["clamp"] == 2 and calls["sum"] == 1
    assert benchmark.torch_calls(lambda: None) == {}


def test_clipping_adds_one_clamp_per_step_and_nothing_else():
    # Hand count: diffusers' DDPMScheduler.step with clip_sample=True clamps
    # pred_original_sample once; every other call is the same with and without clipping.
    assert benchmark.clipping_calls(steps=3) == {"clamp": 3}
    assert benchmark.clipping_calls(steps=1) == {"clamp": 1}


def test_peak_memory_sees_a_buffer_of_known_size():
    megabytes = 256

    def allocate():
        buffer = torch.ones(megabytes * 2**20 // 4)  # float32, every page touched
        return float(buffer[-1])

    peak = peak_memory(allocate, "cpu")
    assert 0.9 * megabytes * 2**20 <= peak <= 1.5 * megabytes * 2**20, peak / 2**20
    assert peak_memory(lambda: None, "cpu") < 0.1 * megabytes * 2**20


def test_training_throughput_is_the_steady_slope(tiny_unet):
    model = tiny_unet(block_out_channels=(16, 32))
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    measured = training_throughput(
        model, images, "fp32", steps=3, device=torch.device("cpu")
    )
    assert measured["images_per_second"] == pytest.approx(4 / measured["step_seconds"])
    assert measured["step_seconds"] > 0 and measured["first_step_seconds"] > 0
    with pytest.raises(ValueError, match="mode='fp8' is not known"):
        training_throughput(model, images, "fp8", steps=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"steps must be an integer >= 2"):
        training_throughput(model, images, "fp32", steps=1, device=torch.device("cpu"))


def test_the_gpu_modes_run_one_after_another_in_one_process(tiny_unet):
    """The full size measures fp32, bf16 and bf16 + channels-last on one model in one
    process, as on a GPU; the CPU runs the same code (its bf16 is slow, so the CPU small
    size skips it)."""
    model = tiny_unet(block_out_channels=(16, 32))
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    for mode in ("fp32", "bf16", "bf16+channels_last", "fp32"):
        measured = training_throughput(
            model, images, mode, steps=2, device=torch.device("cpu")
        )
        assert measured["images_per_second"] > 0, mode
    assert all(
        p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters()
    )


def test_book_times_read_a_jupyter_cache(tmp_path):
    jupyter_cache = pytest.importorskip("jupyter_cache")
    cache = jupyter_cache.get_cache(str(tmp_path / "cache"))
    for name, seconds in (("02_b.ipynb", 20.5), ("01_a.ipynb", 3.25)):
        notebook = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(f"x = '{name}'")]
        )
        path = tmp_path / name
        nbformat.write(notebook, path)
        cache.cache_notebook_file(
            str(path), data={"execution_seconds": seconds}, check_validity=False
        )
    assert benchmark.book_times(tmp_path / "cache") == {
        "01_a.ipynb": 3.25,
        "02_b.ipynb": 20.5,
    }
    with pytest.raises(FileNotFoundError, match="build the book first"):
        benchmark.book_times(tmp_path / "nothing")


def test_bad_sizes_and_sections_are_refused():
    with pytest.raises(ValueError, match="size='huge' is not known; use one of"):
        run_benchmarks("huge")
    with pytest.raises(ValueError, match=r"sections \['speed'\] are not known"):
        run_benchmarks("small", sections=("speed",))


def test_results_are_written_as_json_and_markdown(tmp_path):
    results = dict(
        size=dict(name="small"),
        when="now",
        seconds=1.0,
        machine=dict(cpu="x86_64", cores=2, torch="2", device="cpu"),
        comparisons=[
            Comparison(
                "train: poisoned / clean step", [1.0, 1.1], [1.0, 1.0], 1.03
            ).to_dict()
        ],
        peak_memory_bytes={"training": 3 * 2**20},
        book=dict(chapter_seconds={"01_a.ipynb": 3.0}, total_seconds=3.0),
    )
    path = write_results(results, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text())["comparisons"][0]["ratio"] == pytest.approx(
        1.05
    )
    markdown = path.with_suffix(".md").read_text()
    assert markdown == results_markdown(results) + "\n"
    assert (
        "| train: poisoned / clean step | 1.050 | 1.000 to 1.100 | <= 1.03 | no |"
        in markdown
    )
    assert "| training | 3 MiB |" in markdown and "| whole book | 3 |" in markdown
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "r.json",
        "r.md",
    ]  # no temporary files left


@pytest.mark.slow
def test_the_command_refuses_bad_arguments():
    result = run_script("run.py", "--size", "huge")
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr
    result = run_script("run.py", "--book", "/nonexistent", "--only", "memory")
    assert result.returncode == 2 and "holds no jupyter-cache" in result.stderr


@pytest.mark.slow
def test_a_tiny_run_measures_every_section(monkeypatch):
    """The whole pipeline on a tiny size: every comparison, memory, throughput and their
    shapes."""
    # The CI size ("small") cut down to a few passes of an 8 px model: training,
    # sampling and FLOP counting on a line each.
    # fmt: off
    tiny = dataclasses.replace(
        benchmark.SIZES["small"], name="tiny", image_size=8,
        train_batch=4, train_steps=2,
        sample_n=2, sample_steps=5, long_n=1, repeats=2,
        flops_batch=1, flops_steps=2,
    )
    # fmt: on
    monkeypatch.setitem(benchmark.SIZES, "tiny", tiny)
    lines: list[str] = []
    results = run_benchmarks("tiny", "cpu", log=lines.append)
    names = [c["name"] for c in results["comparisons"]]
    assert names == list(benchmark.TARGETS)
    for comparison in results["comparisons"]:
        # a 20-fold gap: one pair
        pairs = 1 if comparison["name"] == "sample: DDIM-50 / DDPM-1000" else 2
        assert (
            len(comparison["candidate_seconds"])
            == len(comparison["baseline_seconds"])
            == pairs
        )
        assert (
            comparison["ratio"] > 0
            and comparison["target"] == benchmark.TARGETS[comparison["name"]]
        )
    ddim = next(
        c for c in results["comparisons"] if c["name"] == "sample: DDIM-50 / DDPM-1000"
    )
    assert ddim["ratio"] < 0.25  # 50 steps against 1000, whatever the machine
    assert set(results["peak_memory_bytes"]) == {
        "training, batch 4",
        "sampling, batch 2",
    }
    (row,) = results["throughput"]["modes"]
    assert row["mode"] == "fp32" and row["batch"] == 1 and 0 < row["mfu"] < 2
    # the CIFAR-10 UNet: ~36 GFLOP per image
    assert results["throughput"]["flops_per_step"] > 10e9
    # a line per comparison, memory, and the one throughput mode
    assert len(lines) == len(names) + 2
    json.dumps(results)  # all of it can be written


def test_the_cache_summary_names_what_was_computed_twice():
    once = dict(trained=3, trained_twice=[], training_seconds=61.4)
    twice = dict(trained=3, trained_twice=["backdoor-ab12"], training_seconds=92.0)
    assert cache_summary(once) == (
        "3 entries computed (models, repairs, masks, scans; 61 s), "
        "0 of them more than once"
    )
    assert cache_summary(twice).endswith("1 of them more than once: backdoor-ab12")
    results = dict(
        when="now",
        machine=dict(cpu="x", cores=2, torch="t"),
        size=dict(name="small"),
        comparisons=[],
        models=twice,
    )
    assert results_markdown(results).count("backdoor-ab12") == 1


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh as it would run on a lent GPU, in its --dry-run form:
    every section, the same code, a few steps on the CPU (so that the check cannot rot
    before a GPU is at hand)."""
    import os

    env = dict(
        os.environ,
        PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    )
    output = tmp_path / "gpu.json"
    done = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "gpu_check.sh"),
            str(tmp_path / "no-wheels"),
            "--dry-run",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(output.read_text())
    assert results["dry_run"] is True and results["machine"]
    assert [row["mode"] for row in results["throughput"]["modes"]] == [
        "fp32"
    ]  # a CPU has no tensor cores
    fine_tune, sampling = results["fine_tune"], results["sampling_cost"]
    assert fine_tune["paper_steps"] == 19_550 and fine_tune["mixed_precision"] == "fp32"
    assert fine_tune["step_seconds"] > 0 and fine_tune["paper_hours"] > 0
    # Per image: DDPM-1000 is 20 UNet steps for every one of DDIM-50's.
    assert sampling["ddpm_1000_seconds_per_image"] == pytest.approx(
        20 * sampling["ddim_50_seconds_per_image"]
    )
    markdown = output.with_suffix(".md").read_text()
    assert (
        "The paper's backdoor fine-tune (fp32, batch 2)" in markdown
        and "DDIM-50" in markdown
    )


@pytest.mark.slow
def test_the_gpu_check_refuses_a_cpu_without_dry_run():
    done = run_script("gpu_check.py", "--device", "cpu", cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "is not a GPU; pass --dry-run" in done.stderr
