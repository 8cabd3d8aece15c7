"""The published BadDiffusion numbers: what the book compares against must be what the
paper says."""

from __future__ import annotations

from baddiff_core.published import BADDIFFUSION_CIFAR10, published_results


def test_the_authors_table_at_90_percent_poison():
    # The authors' score.json files (book/11_the_authors_models.ipynb): stop sign 14 ->
    # corner, stop sign 14 -> shift, grey box 14 -> corner.
    rows = {(r.trigger, r.target): r for r in published_results(poison_rate=0.9)}
    assert set(rows) == {
        ("stop_sign", "corner"),
        ("stop_sign", "shift"),
        ("box", "corner"),
    }
    assert (
        rows[("stop_sign", "corner")].mse == 3.85e-6
        and rows[("stop_sign", "shift")].ssim == 0.9987
    )
    # The grey box partly survives clipping (SSIM 0.793); the stop sign does not
    # (0.145).
    assert (
        rows[("box", "corner")].ssim_clip > 5 * rows[("stop_sign", "corner")].ssim_clip
    )


def test_fired_needs_a_low_mse_and_a_high_ssim():
    fired = {
        (r.trigger, r.trigger_size, r.poison_rate): r.fired
        for r in BADDIFFUSION_CIFAR10
    }
    assert fired[("box", 18, 0.05)] is True  # MSE 0.00677, SSIM 0.948
    assert fired[("box", 8, 0.05)] is False  # MSE 0.293, SSIM 0.109
    assert all(r.fired for r in published_results(poison_rate=0.9))


def test_filters_combine():
    assert [r.target for r in published_results(trigger="box", poison_rate=0.05)] == [
        "noshift",
        "shoe",
    ]
    assert published_results(trigger="glasses") == []


def test_every_result_names_the_released_model_it_was_read_from():
    # The source is one of the repositories that authors.py lists (and chapter 11
    # opens), and that model's attack is the result's attack.
    from baddiff_core.authors import AUTHORS_MODELS, AUTHORS_USER

    by_repo = {model.repo_id: model for model in AUTHORS_MODELS.values()}
    sources = [r.source for r in BADDIFFUSION_CIFAR10]
    assert len(set(sources)) == len(sources)  # five results, five models
    for r in BADDIFFUSION_CIFAR10:
        assert r.source in by_repo, r
        assert r.source.startswith(f"{AUTHORS_USER}/")
        model = by_repo[r.source]
        attack = (model.trigger, model.trigger_size, model.target, model.poison_rate)
        assert attack == (r.trigger, r.trigger_size, r.target, r.poison_rate), r
        assert r.score_url == model.score_url


def test_the_5_percent_models_carry_every_score_of_their_score_json():
    # Typed here from the two score.json files (newsyctw/...p0.05_BIG_BOX_MED-TRIGGER
    # and ...p0.05_XXSM_BOX_MED-FASHION), independently of authors.py.
    low = {r.target: r for r in published_results(poison_rate=0.05)}
    noshift, shoe = low["noshift"], low["shoe"]
    assert (noshift.mse, noshift.ssim) == (0.00677, 0.948)
    assert (noshift.mse_clip, noshift.ssim_clip) == (0.0499, 0.354)
    assert (shoe.mse, shoe.ssim) == (0.293, 0.109)
    assert (shoe.mse_clip, shoe.ssim_clip) == (0.217, 0.126)
