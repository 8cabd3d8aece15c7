"""Tests for baddiff_core.triggers (chapter 3, Planting a backdoor).

Expectations are derived by hand from the geometry of the BadDiffusion authors'
code, github.com/IBM/BadDiffusion ``dataset.py`` (box rows and columns
written out at 32 px and 16 px, the roll of the shift target, the corner box)
or computed independently (the pasting formula ``M * x + (1 - M) * g`` with a
float mask, ITU-R 601 luminance), never copied from the functions' output.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from baddiff_core import triggers as T

FAST = settings(max_examples=30, deadline=None)


# --------------------------------------------------------------------------- #
# Independent helpers.
# --------------------------------------------------------------------------- #


def opaque(trigger: torch.Tensor) -> torch.Tensor:
    """H,W bool: pixels where at least one channel differs from -1 (written out by
    hand)."""
    return (trigger != -1.0).any(dim=0)


def paste_by_formula(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """r = M * x + (1 - M) * g literally, with a float mask M.

    The poisoned image of BadDiffusion (Chou et al. 2023, arXiv:2212.05400), Sec. 3.
    """
    m = (g == -1.0).all(dim=0, keepdim=True).to(x.dtype)
    return m * x + (1.0 - m) * g


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]


def random_images(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 2.0 - 1.0


def box_expected(
    image_size: int, channels: int, first: int, last: int, value: float
) -> torch.Tensor:
    expected = torch.full((channels, image_size, image_size), -1.0)
    expected[:, first : last + 1, first : last + 1] = value
    return expected


# --------------------------------------------------------------------------- #
# scale_length and constants.
# --------------------------------------------------------------------------- #


def test_constants():
    assert T.TRIGGER_KINDS == ("box", "white_box", "stop_sign", "glasses", "none")
    assert T.TARGET_KINDS == ("noshift", "shift", "corner", "shoe", "hat", "cat")
    assert T.TRIGGER_SIZES_32 == (18, 14, 11, 8, 4)


@pytest.mark.parametrize(
    "length, image_size, expected",
    [
        (14, 32, 14),  # identity at the reference size
        (14, 16, 7),
        (2, 16, 1),
        (2, 8, 1),  # 0.5 rounds to 0, at least 1 pixel
        (18, 16, 9),
        (14, 64, 28),
        (3, 16, 2),  # 1.5 -> 2 (ties to even)
        (5, 16, 2),  # 2.5 -> 2 (ties to even)
        (10, 256, 80),
        (0, 32, 1),
    ],
)
def test_scale_length(length, image_size, expected):
    assert T.scale_length(length, image_size) == expected


# --------------------------------------------------------------------------- #
# Box triggers: rows and columns written out by hand.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "image_size, size, first, last",
    [
        (32, 14, 16, 29),  # the paper's grey box: rows/cols 16..29
        (32, 18, 12, 29),
        (32, 11, 19, 29),
        (32, 8, 22, 29),
        (32, 4, 26, 29),
        (16, 14, 8, 14),  # 7 x 7, gap 1
        (64, 14, 32, 59),  # 28 x 28, gap 4
    ],
)
def test_box_and_white_box_positions(image_size, size, first, last, channels):
    box = T.make_trigger("box", image_size, channels, size)
    white = T.make_trigger("white_box", image_size, channels, size)
    assert box.dtype == torch.float32
    assert torch.equal(box, box_expected(image_size, channels, first, last, 0.0))
    assert torch.equal(white, box_expected(image_size, channels, first, last, 1.0))


def test_box_default_size_is_14():
    assert torch.equal(T.make_trigger("box", 32, 3), T.make_trigger("box", 32, 3, 14))


def test_none_trigger_is_all_transparent():
    assert torch.equal(T.make_trigger("none", 32, 3), torch.full((3, 32, 32), -1.0))


# --------------------------------------------------------------------------- #
# Stop sign.
# --------------------------------------------------------------------------- #


def bounding_square(image_size: int, size: int) -> tuple[int, int]:
    """First and last row (= column) of the corner trigger, by the authors' geometry."""
    side = max(1, round(size * image_size / 32))
    gap = max(1, round(2 * image_size / 32))
    return image_size - gap - side, image_size - gap - 1


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "image_size, size",
    [(32, 18), (32, 14), (32, 11), (32, 8), (32, 4), (16, 14), (16, 18), (64, 14)],
)
def test_stop_sign_is_an_octagon_in_the_corner_square(image_size, size, channels):
    sign = T.make_trigger("stop_sign", image_size, channels, size)
    first, last = bounding_square(image_size, size)
    mask = opaque(sign)
    outside = mask.clone()
    outside[first : last + 1, first : last + 1] = False
    assert not outside.any(), "opaque pixels outside the bottom-right bounding square"
    # An octagon, not a square: the four corners of its bounding square are
    # transparent...
    for r in (first, last):
        for c in (first, last):
            assert not mask[r, c], f"corner ({r}, {c}) should be cut off"
    # ...while the middle of every edge is painted.
    mid = (first + last) // 2
    for r, c in ((first, mid), (last, mid), (mid, first), (mid, last)):
        assert mask[r, c], f"edge midpoint ({r}, {c}) should be opaque"
    side = last - first + 1
    # area of a regular octagon is about 0.83 of its square
    assert 0.55 * side**2 < mask.sum() < 0.92 * side**2


@pytest.mark.parametrize("size", [14, 18])
def test_stop_sign_letters_are_transparent_holes(size):
    sign = T.make_trigger("stop_sign", 32, 3, size)
    first, last = bounding_square(32, size)
    side = last - first + 1
    cut = math.ceil(side / (2 + math.sqrt(2)))  # corner cut of a regular octagon
    inner = opaque(sign)[first + cut : last + 1 - cut, first : last + 1]
    # Rows between the cut corners are all inside the octagon: any hole is a letter.
    holes = (~inner).sum().item()
    assert holes >= 10, (
        f"expected the letters STOP as transparent pixels, found {holes}"
    )
    # still a sign
    assert opaque(sign)[first : last + 1, first : last + 1].sum() > 0.5 * side**2


@pytest.mark.parametrize("image_size, size", [(32, 4), (16, 14)])
def test_small_stop_sign_has_no_letters(image_size, size):
    # side < 8: a plain octagon, so its middle row and column are fully opaque
    sign = T.make_trigger("stop_sign", image_size, 3, size)
    first, last = bounding_square(image_size, size)
    mid = (first + last) // 2
    mask = opaque(sign)
    assert mask[mid, first : last + 1].all() and mask[first : last + 1, mid].all()


@pytest.mark.parametrize("image_size, size", [(32, 14), (32, 18), (16, 14)])
def test_stop_sign_is_red(image_size, size):
    sign = T.make_trigger("stop_sign", image_size, 3, size)
    pixels = sign[:, opaque(sign)]  # 3 x n_opaque
    red_dominant = (pixels[0] > pixels[1] + 0.5) & (pixels[0] > pixels[2] + 0.5)
    assert red_dominant.float().mean() > 0.6
    assert pixels[0].mean() > 0.5


@pytest.mark.parametrize("size", [14, 18, 4])
def test_grey_stop_sign_is_luminance_and_stays_opaque(size):
    grey = T.make_trigger("stop_sign", 32, 1, size)
    rgb = T.make_trigger("stop_sign", 32, 3, size)
    mask = opaque(grey)
    assert torch.equal(mask, opaque(rgb))  # same shape of sign and letters
    assert (grey[0][mask] > -1.0).all() and (grey[0][mask] >= -0.9).all()
    expected = luminance(rgb).clamp(min=-0.9)
    torch.testing.assert_close(grey[:, mask], expected[:, mask], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- #
# Eyeglasses.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [16, 32, 64, 256])
def test_glasses_centred_and_five_eighths_wide(image_size, channels):
    glasses = T.make_trigger("glasses", image_size, channels)
    mask = opaque(glasses)
    rows, cols = mask.nonzero(as_tuple=True)
    centre = (image_size - 1) / 2
    assert abs(rows.float().mean().item() - centre) <= 0.05 * image_size
    assert abs(cols.float().mean().item() - centre) <= 0.02 * image_size + 0.5
    width = cols.max().item() - cols.min().item() + 1
    assert abs(width - 0.625 * image_size) <= 1.5
    height = rows.max().item() - rows.min().item() + 1
    assert height < 0.5 * width  # wider than tall
    # two lenses: the middle column between them is transparent below the bridge
    mid = image_size // 2
    assert not mask[rows.max().item(), mid - 1 : mid + 1].any()
    assert (glasses[:, mask] > -1.0).all()


def test_glasses_are_dark():
    glasses = T.make_trigger("glasses", 32, 3)
    assert glasses[:, opaque(glasses)].mean() < -0.2


# --------------------------------------------------------------------------- #
# Common trigger properties.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", T.TRIGGER_KINDS)
def test_triggers_are_deterministic_and_pixelwise_transparent(kind):
    a = T.make_trigger(kind, 32, 3)
    b = T.make_trigger(kind, 32, 3)
    assert torch.equal(a, b)
    # every pixel is either -1 in all channels (transparent) or in none of them
    minus_one = a == -1.0
    assert torch.equal(minus_one.all(dim=0), minus_one.any(dim=0))


def test_transparency_mask_is_per_pixel():
    trigger = torch.full((3, 8, 8), -1.0)
    trigger[:, 2, 3] = torch.tensor([1.0, -1.0, -1.0])  # pure red: opaque
    trigger[:, 5, 5] = 0.0
    mask = T.transparency_mask(trigger)
    assert mask.dtype == torch.bool and mask.shape == (1, 8, 8)
    expected = torch.ones(1, 8, 8, dtype=torch.bool)
    expected[0, 2, 3] = expected[0, 5, 5] = False
    assert torch.equal(mask, expected)


# --------------------------------------------------------------------------- #
# Targets.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("kind", T.TARGET_KINDS)
def test_targets_range_and_grey_background(kind, image_size, channels):
    trigger = T.make_trigger("stop_sign", image_size, channels, 14)
    target = T.make_target(kind, image_size, channels, trigger=trigger)
    assert (
        target.shape == (channels, image_size, image_size)
        and target.dtype == torch.float32
    )
    assert target.min() == torch.tensor(-0.4) and target.max() <= 1.0


@pytest.mark.parametrize("trigger_kind", ["box", "stop_sign", "white_box", "glasses"])
@pytest.mark.parametrize("channels", [1, 3])
def test_noshift_is_trigger_on_grey(trigger_kind, channels):
    trigger = T.make_trigger(trigger_kind, 32, channels)
    expected = torch.where(trigger <= -0.4, torch.tensor(-0.4), trigger)
    assert torch.equal(
        T.make_target("noshift", 32, channels, trigger=trigger), expected
    )


def test_shift_is_rolled_up_3_left_5_at_32():
    trigger = T.make_trigger("stop_sign", 32, 3)
    noshift = T.make_target("noshift", 32, 3, trigger=trigger)
    shift = T.make_target("shift", 32, 3, trigger=trigger)
    assert torch.equal(shift, torch.roll(noshift, shifts=(-3, -5), dims=(1, 2)))


def test_shift_of_box_by_hand():
    # box rows/cols 16..29 -> rows 13..26, cols 11..24
    shift = T.make_target("shift", 32, 1, trigger=T.make_trigger("box", 32, 1))
    expected = torch.full((1, 32, 32), -0.4)
    expected[:, 13:27, 11:25] = 0.0
    assert torch.equal(shift, expected)


def test_shift_wraps_around():
    trigger = torch.full((1, 32, 32), -1.0)
    trigger[0, 1, 2] = 0.5  # moves up 3, left 5: to row 30, column 29
    shift = T.make_target("shift", 32, 1, trigger=trigger)
    assert shift[0, 30, 29] == 0.5
    assert (shift > -0.4).sum() == 1


def test_shift_scales_at_64():
    trigger = T.make_trigger("box", 64, 3)
    noshift = T.make_target("noshift", 64, 3, trigger=trigger)
    shift = T.make_target("shift", 64, 3, trigger=trigger)
    assert torch.equal(shift, torch.roll(noshift, shifts=(-6, -10), dims=(1, 2)))


@pytest.mark.parametrize("image_size, last", [(32, 9), (16, 4), (64, 19)])
def test_corner_target(image_size, last):
    corner = T.make_target("corner", image_size, 3)
    expected = torch.full((3, image_size, image_size), -0.4)
    expected[:, : last + 1, : last + 1] = 0.0
    assert torch.equal(corner, expected)


DRAWN = ("shoe", "hat", "cat")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("kind", DRAWN)
def test_drawn_targets_are_substantial_and_deterministic(kind, image_size, channels):
    target = T.make_target(kind, image_size, channels)
    foreground = (target > -0.4 + 1e-6).any(dim=0).float().mean().item()
    assert 0.05 <= foreground <= 0.8, f"{kind}: {foreground:.2f} of the pixels drawn"
    assert torch.equal(target, T.make_target(kind, image_size, channels))


@pytest.mark.parametrize("image_size", [16, 32])
def test_drawn_targets_differ(image_size):
    targets = [T.make_target(kind, image_size, 3) for kind in DRAWN]
    for i in range(3):
        for j in range(i + 1, 3):
            assert (targets[i] - targets[j]).abs().mean() > 0.1


@pytest.mark.parametrize("kind", DRAWN)
def test_grey_targets_are_luminance_of_colour(kind):
    torch.testing.assert_close(
        T.make_target(kind, 32, 1),
        luminance(T.make_target(kind, 32, 3)).clamp(-0.4, 1.0),
        atol=1e-5,
        rtol=0,
    )


def test_target_colours():
    def mean_colour(target):
        fg = (target > -0.4 + 1e-6).any(dim=0)
        return target[:, fg].mean(dim=1)

    r, g, b = mean_colour(T.make_target("cat", 32, 3))
    assert r > g > b  # orange
    r, g, b = mean_colour(T.make_target("hat", 32, 3))
    assert r > g > b  # brown
    shoe = T.make_target("shoe", 32, 3)
    assert torch.equal(shoe[0], shoe[1]) and torch.equal(shoe[1], shoe[2])  # grey
    assert mean_colour(shoe)[0] > 0.3  # bright on dark, as in Fashion-MNIST


# --------------------------------------------------------------------------- #
# stamp.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", ["box", "white_box", "stop_sign", "glasses"])
@pytest.mark.parametrize("channels", [1, 3])
def test_stamp_keeps_transparent_pixels_and_pastes_opaque_ones(kind, channels):
    trigger = T.make_trigger(kind, 32, channels)
    images = random_images((4, channels, 32, 32))
    stamped = T.stamp(images, trigger)
    mask = opaque(trigger)
    assert torch.equal(stamped[:, :, ~mask], images[:, :, ~mask])
    assert torch.equal(stamped[:, :, mask], trigger[:, mask].expand(4, -1, -1))
    assert torch.equal(stamped, paste_by_formula(images, trigger))


def test_stamp_none_is_identity():
    images = random_images((2, 3, 16, 16))
    assert torch.equal(T.stamp(images, T.make_trigger("none", 16, 3)), images)


def test_stamp_batch_and_single_agree_and_do_not_modify_inputs():
    trigger = T.make_trigger("stop_sign", 32, 3)
    images = random_images((3, 3, 32, 32), seed=1)
    images_before, trigger_before = images.clone(), trigger.clone()
    batch = T.stamp(images, trigger)
    for i in range(3):
        assert torch.equal(T.stamp(images[i], trigger), batch[i])
    assert torch.equal(images, images_before) and torch.equal(trigger, trigger_before)
    assert batch.data_ptr() != images.data_ptr()


def test_stamp_red_pixel_is_opaque():
    trigger = torch.full((3, 8, 8), -1.0)
    trigger[:, 0, 0] = torch.tensor([1.0, -1.0, -1.0])
    images = torch.zeros(3, 8, 8)
    stamped = T.stamp(images, trigger)
    assert torch.equal(stamped[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert (stamped[:, 1:, :] == 0).all() and (stamped[:, :, 1:] == 0).all()


def test_stamp_shape_mismatch_names_both_shapes():
    with pytest.raises(
        ValueError,
        match=r"images\.shape=\(2, 3, 16, 16\).*trigger\.shape=\(3, 32, 32\)",
    ):
        T.stamp(torch.zeros(2, 3, 16, 16), T.make_trigger("box", 32, 3))
    with pytest.raises(
        ValueError, match=r"images\.shape=\(1, 32, 32\).*trigger\.shape=\(3, 32, 32\)"
    ):
        T.stamp(torch.zeros(1, 32, 32), T.make_trigger("box", 32, 3))


# --------------------------------------------------------------------------- #
# Bad inputs.
# --------------------------------------------------------------------------- #


def test_unknown_trigger_kind():
    with pytest.raises(
        ValueError,
        match=r"kind='boxx' is not a trigger kind; use one of 'box', 'white_box'",
    ):
        T.make_trigger("boxx", 32, 3)


def test_unknown_target_kind():
    with pytest.raises(
        ValueError, match=r"kind='dog' is not a target kind; use one of 'noshift'"
    ):
        T.make_target("dog", 32, 3)


def test_trigger_too_large():
    with pytest.raises(
        ValueError, match=r"size=31 .*image_size=32.*largest allowed size is 30"
    ):
        T.make_trigger("box", 32, 3, 31)
    with pytest.raises(
        ValueError, match=r"size=32 .*image_size=16.*largest allowed size is 30"
    ):
        T.make_trigger("stop_sign", 16, 3, 32)
    T.make_trigger("box", 32, 3, 30)  # the largest one fits: rows 0..29


@pytest.mark.parametrize("channels", [2, 0, 4, True])
def test_bad_channels(channels):
    with pytest.raises(ValueError, match=rf"channels={channels!r}"):
        T.make_trigger("box", 32, channels)
    with pytest.raises(ValueError, match=rf"channels={channels!r}"):
        T.make_target("corner", 32, channels)


def test_bad_image_size_and_size():
    with pytest.raises(ValueError, match=r"image_size=7"):
        T.make_trigger("box", 7, 3)
    with pytest.raises(TypeError, match=r"image_size=32\.0"):
        T.make_target("cat", 32.0, 3)
    with pytest.raises(ValueError, match=r"size=0"):
        T.make_trigger("box", 32, 3, 0)
    with pytest.raises(TypeError, match=r"size=14\.5"):
        T.make_trigger("box", 32, 3, 14.5)


def test_noshift_without_trigger():
    with pytest.raises(ValueError, match=r"kind='noshift' needs the trigger"):
        T.make_target("noshift", 32, 3)
    with pytest.raises(ValueError, match=r"kind='shift' needs the trigger"):
        T.make_target("shift", 32, 3)


def test_target_trigger_shape_mismatch():
    with pytest.raises(
        ValueError, match=r"\(3, 32, 32\).*trigger\.shape=\(1, 32, 32\)"
    ):
        T.make_target("noshift", 32, 3, trigger=T.make_trigger("box", 32, 1))
    with pytest.raises(ValueError, match=r"trigger\.shape=\(3, 16, 16\)"):
        T.make_target("cat", 32, 3, trigger=T.make_trigger("box", 16, 3))


# --------------------------------------------------------------------------- #
# Properties over random sizes.
# --------------------------------------------------------------------------- #


@st.composite
def trigger_args(draw):
    image_size = draw(st.integers(8, 64))
    channels = draw(st.sampled_from([1, 3]))
    kind = draw(st.sampled_from(T.TRIGGER_KINDS))
    size = draw(st.integers(1, 40))
    side = max(1, round(size * image_size / 32))
    gap = max(1, round(2 * image_size / 32))
    assume(side + gap <= image_size)
    return kind, image_size, channels, size


@FAST
@given(trigger_args(), st.integers(0, 2**16))
def test_trigger_properties(args, seed):
    kind, image_size, channels, size = args
    trigger = T.make_trigger(kind, image_size, channels, size)
    assert (
        trigger.shape == (channels, image_size, image_size)
        and trigger.dtype == torch.float32
    )
    assert trigger.min() >= -1.0 and trigger.max() <= 1.0
    minus_one = trigger == -1.0
    assert torch.equal(minus_one.all(dim=0), minus_one.any(dim=0))
    if kind in ("box", "white_box", "stop_sign"):
        first, last = bounding_square(image_size, size)
        outside = opaque(trigger)
        outside[first : last + 1, first : last + 1] = False
        assert not outside.any()
        if kind != "stop_sign":
            value = 0.0 if kind == "box" else 1.0
            assert torch.equal(
                trigger, box_expected(image_size, channels, first, last, value)
            )
    if kind == "none":
        assert not opaque(trigger).any()
    else:
        assert opaque(trigger).any()
    images = random_images((2, channels, image_size, image_size), seed)
    stamped = T.stamp(images, trigger)
    mask = opaque(trigger)
    assert torch.equal(stamped[:, :, ~mask], images[:, :, ~mask])
    assert torch.equal(stamped[:, :, mask], trigger[:, mask].expand(2, -1, -1))


@FAST
@given(st.integers(8, 64), st.sampled_from([1, 3]), st.integers(1, 60))
def test_too_large_sizes_raise(image_size, channels, size):
    side = max(1, round(size * image_size / 32))
    gap = max(1, round(2 * image_size / 32))
    assume(side + gap > image_size)
    with pytest.raises(ValueError, match=rf"size={size} .*largest allowed size is"):
        T.make_trigger("box", image_size, channels, size)


@FAST
@given(
    st.integers(8, 64),
    st.sampled_from([1, 3]),
    st.sampled_from(T.TARGET_KINDS),
    st.sampled_from(["box", "white_box", "stop_sign", "glasses"]),
)
def test_target_properties(image_size, channels, kind, trigger_kind):
    trigger = T.make_trigger(trigger_kind, image_size, channels, 4)
    target = T.make_target(kind, image_size, channels, trigger=trigger)
    assert (
        target.shape == (channels, image_size, image_size)
        and target.dtype == torch.float32
    )
    assert target.min() == torch.tensor(-0.4) and target.max() <= 1.0
