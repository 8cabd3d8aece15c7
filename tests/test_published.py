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


def test_every_result_names_the_released_model_it_was_read_from():
    # The source is one of the repositories that authors.py lists (and chapter 10
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


def _rounded(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def test_every_number_is_its_score_json_value_rounded():
    # authors.py records each score.json to 3 or 4 significant digits; the numbers
    # here are those values rounded to 2 or 3 (0.0626 -> 0.063, 0.9969 -> 0.997).
    from baddiff_core.authors import AUTHORS_MODELS

    by_repo = {model.repo_id: model.published for model in AUTHORS_MODELS.values()}
    checked = 0
    for r in BADDIFFUSION_CIFAR10:
        scores = by_repo[r.source]
        for field in ("mse", "ssim", "mse_clip", "ssim_clip"):
            ours = getattr(r, field)
            if ours is None:
                continue
            theirs = getattr(scores, field)
            assert ours in (_rounded(theirs, 2), _rounded(theirs, 3)), (r, field)
            checked += 1
    assert checked == 14  # 4 numbers for each 90 % model, 1 for each 5 % model
