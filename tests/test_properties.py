"""Property-based tests (Hypothesis): triggers, targets, stamping and poisoning hold
their contracts for any image size, channel count, trigger size, poison rate and
seed."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from baddiff_core.poison import PoisonedDataset
from baddiff_core.triggers import (
    TARGET_KINDS,
    TRIGGER_KINDS,
    make_target,
    make_trigger,
    scale_length,
    stamp,
    transparency_mask,
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
image_sizes = st.integers(min_value=8, max_value=48)
channel_counts = st.sampled_from([1, 3])
trigger_sizes = st.integers(min_value=1, max_value=24)


def corner_fits(size: int, image_size: int) -> bool:
    return scale_length(size, image_size) + scale_length(2, image_size) <= image_size


@SETTINGS
@given(
    kind=st.sampled_from(TRIGGER_KINDS),
    image_size=image_sizes,
    channels=channel_counts,
    size=trigger_sizes,
)
def test_trigger_shape_range_and_transparency(kind, image_size, channels, size):
    assume(kind in ("glasses", "none") or corner_fits(size, image_size))
    trigger = make_trigger(kind, image_size, channels, size=size)
    assert (
        trigger.shape == (channels, image_size, image_size)
        and trigger.dtype == torch.float32
    )
    assert trigger.min() >= -1 and trigger.max() <= 1
    mask = transparency_mask(trigger)[0]
    opaque = ~mask
    if kind == "none":
        assert mask.all()
        return
    assert opaque.any() and mask.any(), (
        "a trigger covers part of the image, not all of it"
    )
    # An opaque pixel is never -1 in every channel (else it would read as transparent).
    assert (trigger[:, opaque] > -1).any(dim=0).all()
    if kind in ("box", "white_box", "stop_sign"):
        side, gap = scale_length(size, image_size), scale_length(2, image_size)
        rows, cols = torch.nonzero(opaque, as_tuple=True)
        low, high = image_size - side - gap, image_size - gap
        assert (
            rows.min() >= low
            and rows.max() < high
            and cols.min() >= low
            and cols.max() < high
        )
        if kind != "stop_sign":
            assert opaque.sum() == side * side, "a box fills its square"


@SETTINGS
@given(
    kind=st.sampled_from(TRIGGER_KINDS), image_size=image_sizes, channels=channel_counts
)
def test_triggers_that_do_not_fit_are_refused(kind, image_size, channels):
    assume(kind in ("box", "white_box", "stop_sign"))
    too_big = next(s for s in range(1, 400) if not corner_fits(s, image_size))
    with pytest.raises(ValueError, match="size"):
        make_trigger(kind, image_size, channels, size=too_big)


@SETTINGS
@given(
    kind=st.sampled_from(TARGET_KINDS),
    trigger_kind=st.sampled_from(["box", "white_box", "stop_sign"]),
    image_size=image_sizes,
    channels=channel_counts,
)
def test_target_shape_and_grey_background(kind, trigger_kind, image_size, channels):
    size = 14 if corner_fits(14, image_size) else 4
    assume(corner_fits(size, image_size))
    trigger = make_trigger(trigger_kind, image_size, channels, size=size)
    target = make_target(kind, image_size, channels, trigger=trigger)
    assert target.shape == (channels, image_size, image_size)
    assert target.min() >= -0.4 and target.max() <= 1
    assert (target == -0.4).any(), "every target sits on the grey background"
    if kind == "noshift":
        assert torch.equal(target, trigger.clamp(-0.4, 1))


@SETTINGS
@given(
    image_size=image_sizes,
    channels=channel_counts,
    batch=st.integers(1, 5),
    kind=st.sampled_from(TRIGGER_KINDS),
    seed=st.integers(0, 2**16),
)
def test_stamp_keeps_the_image_where_the_trigger_is_transparent(
    image_size, channels, batch, kind, seed
):
    size = 8 if corner_fits(8, image_size) else 1
    trigger = make_trigger(kind, image_size, channels, size=size)
    images = (
        torch.rand(
            (batch, channels, image_size, image_size),
            generator=torch.Generator().manual_seed(seed),
        )
        * 2
        - 1
    )
    stamped = stamp(images, trigger)
    mask = transparency_mask(trigger)
    assert stamped.shape == images.shape
    assert torch.equal(torch.where(mask, stamped, 0.0), torch.where(mask, images, 0.0))
    assert torch.equal(
        torch.where(mask, 0.0, stamped),
        torch.where(mask, 0.0, trigger.expand_as(images)),
    )
    assert torch.equal(stamp(stamped, trigger), stamped), (
        "stamping twice changes nothing"
    )


@SETTINGS
@given(
    n=st.integers(1, 60),
    rate=st.floats(0.0, 1.0, allow_nan=False),
    seed=st.integers(0, 2**16),
    channels=channel_counts,
)
def test_poisoning_replaces_exactly_floor_n_p_samples(n, rate, seed, channels):
    images = (
        torch.rand((n, channels, 8, 8), generator=torch.Generator().manual_seed(seed))
        * 2
        - 1
    )
    trigger = make_trigger("white_box", 8, channels, size=8)
    target = make_target("corner", 8, channels)
    dataset = PoisonedDataset(
        images, trigger=trigger, target=target, poison_rate=rate, seed=seed
    )
    assert len(dataset) == n
    assert int(dataset.poisoned.sum()) == dataset.num_poisoned == math.floor(n * rate)
    again = PoisonedDataset(
        images, trigger=trigger, target=target, poison_rate=rate, seed=seed
    )
    assert torch.equal(dataset.poisoned, again.poisoned), (
        "the same seed poisons the same samples"
    )
    for i in range(n):
        y, r, poisoned = dataset[i]
        if poisoned:
            assert torch.equal(y, target) and torch.equal(r, stamp(images[i], trigger))
        else:
            assert torch.equal(y, images[i]) and not r.any()


@SETTINGS
@given(
    rate=st.one_of(
        st.floats(allow_nan=True).filter(lambda x: not 0 <= x <= 1),
        st.just(float("nan")),
    )
)
def test_poison_rates_outside_0_1_are_refused(rate):
    images = torch.zeros((4, 1, 8, 8))
    with pytest.raises(ValueError, match="poison_rate"):
        PoisonedDataset(
            images,
            trigger=make_trigger("box", 8, 1, size=8),
            target=make_target("corner", 8, 1),
            poison_rate=rate,
            seed=0,
        )
