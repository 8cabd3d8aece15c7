"""The published BadDiffusion numbers: what the book compares against must be what the
paper says."""

from __future__ import annotations

from baddiff_core.published import BADDIFFUSION_CIFAR10, published_results


def test_the_authors_table_at_90_percent_poison():
    # The authors' score.json files (book/10_the_authors_models.ipynb): stop sign 14 ->
    # corner, stop sign 14 -> shift, grey box 14 -> corner.
    rows = {(r.trigger, r.target): r for r in published_results(poison_rate=0.9)}
    assert set(rows) == {
        ("stop_sign", "corner"),
        ("stop_sign", "shift"),
        ("box", "corner"),
    }
    assert (
        rows[("stop_sign", "corner")].mse == 3.85e-6
        and rows[("stop_sign", "shift")].ssim == 0.999
    )
    # The grey box partly survives clipping (SSIM 0.793); the stop sign does not
    # (0.145).
    assert (
        rows[("box", "corner")].ssim_clip > 5 * rows[("stop_sign", "corner")].ssim_clip
    )


def test_fired_reads_mse_first_then_ssim():
    fired = {
        (r.trigger, r.trigger_size, r.poison_rate): r.fired
        for r in BADDIFFUSION_CIFAR10
    }
    assert fired[("box", 18, 0.05)] is True  # MSE 0.0068
    assert fired[("box", 8, 0.05)] is False  # only SSIM 0.11 published
    assert all(r.fired for r in published_results(poison_rate=0.9))


def test_filters_combine():
    assert [r.target for r in published_results(trigger="box", poison_rate=0.05)] == [
        "noshift",
        "shoe",
    ]
    assert published_results(trigger="glasses") == []
