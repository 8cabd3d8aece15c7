"""Tests for baddiff_core.poison (chapter 3, The BadDiffusion attack).

The pairs ``(y, r)`` are checked against the pairs of BadDiffusion (Chou et al.
2023, arXiv:2212.05400, Sec. 3) written out per sample (a Python loop and the
float-mask formula ``M * x + (1 - M) * g``), the poisoned indices against an
independent ``torch.randperm`` with the same seed, and the counts against
``int(N * p)`` worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from baddiff_core.poison import PoisonedDataset, PoisonedSample, poison_pairs
from baddiff_core.triggers import make_target, make_trigger

FAST = settings(max_examples=30, deadline=None)


def random_images(
    n: int, channels: int = 3, size: int = 16, seed: int = 0
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=generator) * 2.0 - 1.0


def paste_by_formula(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """r = M * x + (1 - M) * g, M = 1 where all channels of g are -1.

    The poisoned image of BadDiffusion (Chou et al. 2023, arXiv:2212.05400), Sec. 3.
    """
    m = (g == -1.0).all(dim=0, keepdim=True).to(x.dtype)
    return m * x + (1.0 - m) * g


@pytest.fixture
def setup():
    trigger = make_trigger("stop_sign", 16, 3, 18)
    target = make_target("hat", 16, 3)
    return random_images(20), trigger, target


def make(images, trigger, target, rate=0.5, seed=0):
    return PoisonedDataset(
        images, trigger=trigger, target=target, poison_rate=rate, seed=seed
    )


# --------------------------------------------------------------------------- #
# poison_pairs.
# --------------------------------------------------------------------------- #


def test_poison_pairs_matches_per_sample_definition(setup):
    images, trigger, target = setup
    poisoned = torch.tensor([i % 3 == 0 for i in range(len(images))])
    y, r = poison_pairs(images, poisoned, trigger, target)
    assert y.shape == r.shape == images.shape
    for i in range(len(images)):
        if poisoned[i]:
            assert torch.equal(y[i], target)
            assert torch.equal(r[i], paste_by_formula(images[i], trigger))
        else:
            assert torch.equal(y[i], images[i])
            assert torch.equal(r[i], torch.zeros_like(images[i]))


def test_poison_pairs_all_clean_and_all_poisoned(setup):
    images, trigger, target = setup
    y, r = poison_pairs(
        images, torch.zeros(len(images), dtype=torch.bool), trigger, target
    )
    assert torch.equal(y, images) and (r == 0).all()
    y, r = poison_pairs(
        images, torch.ones(len(images), dtype=torch.bool), trigger, target
    )
    assert torch.equal(y, target.expand_as(images))
    assert torch.equal(r, paste_by_formula(images, trigger))


def test_poison_pairs_does_not_modify_inputs(setup):
    images, trigger, target = setup
    before = images.clone()
    y, r = poison_pairs(
        images, torch.ones(len(images), dtype=torch.bool), trigger, target
    )
    assert torch.equal(images, before)
    y += 1.0  # results are fresh tensors, not views of the target
    assert torch.equal(target, make_target("hat", 16, 3))


def test_flip_before_paste_keeps_trigger_in_place(setup):
    # A training loop flips clean images, then pastes: the trigger never flips.
    images, trigger, target = setup
    flipped = torch.flip(images, dims=(3,))
    _, r = poison_pairs(
        flipped, torch.ones(len(images), dtype=torch.bool), trigger, target
    )
    opaque = (trigger != -1).any(dim=0)
    assert torch.equal(r[:, :, opaque], trigger[:, opaque].expand(len(images), -1, -1))
    assert torch.equal(r[:, :, ~opaque], flipped[:, :, ~opaque])


def test_poison_pairs_keeps_dtype(setup):
    images, trigger, target = setup
    y, r = poison_pairs(
        images.double(), torch.ones(20, dtype=torch.bool), trigger, target
    )
    assert y.dtype == r.dtype == torch.float64


def test_poison_pairs_bad_inputs(setup):
    images, trigger, target = setup
    with pytest.raises(
        TypeError, match=r"poisoned must be a bool tensor.*torch\.int64"
    ):
        poison_pairs(images, torch.zeros(20, dtype=torch.long), trigger, target)
    with pytest.raises(ValueError, match=r"poisoned\.shape=\(19,\)"):
        poison_pairs(images, torch.zeros(19, dtype=torch.bool), trigger, target)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*\(3, 16, 16\)"):
        poison_pairs(images[0], torch.zeros(1, dtype=torch.bool), trigger, target)
    with pytest.raises(ValueError, match=r"trigger\.shape=\(1, 16, 16\)"):
        poison_pairs(images, torch.zeros(20, dtype=torch.bool), trigger[:1], target)
    with pytest.raises(ValueError, match=r"target\.shape=\(3, 8, 8\)"):
        poison_pairs(
            images, torch.zeros(20, dtype=torch.bool), trigger, target[:, :8, :8]
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_poison_pairs_on_cuda(setup):
    images, trigger, target = (t.cuda() for t in setup)
    poisoned = torch.arange(20, device="cuda") % 2 == 0
    y, r = poison_pairs(images, poisoned, trigger, target)
    assert y.device.type == r.device.type == "cuda"
    y_cpu, r_cpu = poison_pairs(*(t.cpu() for t in (images, poisoned, trigger, target)))
    assert torch.equal(y.cpu(), y_cpu) and torch.equal(r.cpu(), r_cpu)


# --------------------------------------------------------------------------- #
# PoisonedDataset: how many, which ones.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "n, rate, expected",
    [
        (10, 0.0, 0),
        (10, 1.0, 10),
        (10, 0.5, 5),
        (7, 0.3, 2),  # 2.1 -> 2
        (3, 0.9, 2),  # 2.7 -> 2
        (1, 0.99, 0),
        (100, 0.05, 5),
        (50, 0.9, 45),
        (1, 1, 1),  # an int rate is a real number too
    ],
)
def test_exact_number_poisoned(n, rate, expected):
    images = random_images(n, channels=1, size=8)
    data = make(
        images, make_trigger("box", 8, 1), make_target("corner", 8, 1), rate=rate
    )
    assert data.num_poisoned == expected
    assert data.poisoned.dtype == torch.bool and data.poisoned.shape == (n,)
    assert data.poisoned.sum().item() == expected
    assert len(data) == n


def test_poisoned_indices_follow_the_seeded_permutation(setup):
    images, trigger, target = setup
    data = make(images, trigger, target, rate=0.3, seed=7)
    chosen = torch.randperm(20, generator=torch.Generator().manual_seed(7))[:6]
    expected = torch.zeros(20, dtype=torch.bool)
    expected[chosen] = True
    assert torch.equal(data.poisoned, expected)


def test_same_seed_same_indices_different_seed_different(setup):
    images, trigger, target = setup
    images = random_images(100)
    a = make(images, trigger, target, rate=0.5, seed=3)
    b = make(images, trigger, target, rate=0.5, seed=3)
    c = make(images, trigger, target, rate=0.5, seed=4)
    assert torch.equal(a.poisoned, b.poisoned)
    assert not torch.equal(a.poisoned, c.poisoned)


def test_attributes(setup):
    images, trigger, target = setup
    data = make(images, trigger, target, rate=0.25, seed=11)
    assert data.images is images
    assert torch.equal(data.trigger, trigger) and torch.equal(data.target, target)
    assert data.poison_rate == 0.25 and data.seed == 11 and data.num_poisoned == 5


# --------------------------------------------------------------------------- #
# PoisonedDataset: items and batches.
# --------------------------------------------------------------------------- #


def test_items_clean_and_poisoned(setup):
    images, trigger, target = setup
    data = make(images, trigger, target, rate=0.4, seed=1)
    assert 0 < data.num_poisoned < len(data)
    for i in range(len(data)):
        item = data[i]
        assert isinstance(item, PoisonedSample)
        y, r, poisoned = item
        assert poisoned.dtype == torch.bool and poisoned.ndim == 0
        assert bool(poisoned) == bool(data.poisoned[i])
        if poisoned:
            assert torch.equal(y, target)
            assert torch.equal(r, paste_by_formula(images[i], trigger))
        else:
            assert torch.equal(y, images[i])
            assert torch.equal(r, torch.zeros(3, 16, 16))


def test_negative_and_out_of_range_index(setup):
    images, trigger, target = setup
    data = make(images, trigger, target, rate=1.0)
    assert torch.equal(data[-1].r, data[19].r)
    with pytest.raises(IndexError, match="20"):
        data[20]


def test_dataloader_collates(setup):
    images, trigger, target = setup
    data = make(images, trigger, target, rate=0.5, seed=2)
    batch = next(iter(DataLoader(data, batch_size=8, shuffle=False)))
    assert isinstance(batch, PoisonedSample)
    assert batch.y.shape == batch.r.shape == (8, 3, 16, 16)
    assert batch.poisoned.shape == (8,) and batch.poisoned.dtype == torch.bool
    assert torch.equal(batch.poisoned, data.poisoned[:8])
    y, r = poison_pairs(images[:8], data.poisoned[:8], trigger, target)
    assert torch.equal(batch.y, y) and torch.equal(batch.r, r)


def test_item_is_the_batch_row(setup):
    # the per-item path and the vectorised batch path agree
    images, trigger, target = setup
    data = make(images, trigger, target, rate=0.5, seed=5)
    y, r = poison_pairs(images, data.poisoned, trigger, target)
    for i in range(len(data)):
        assert torch.equal(data[i].y, y[i]) and torch.equal(data[i].r, r[i])


# --------------------------------------------------------------------------- #
# Bad inputs.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan, math.inf])
def test_bad_poison_rate(setup, rate):
    images, trigger, target = setup
    with pytest.raises(ValueError, match=rf"poison_rate={rate!r}"):
        make(images, trigger, target, rate=rate)


@pytest.mark.parametrize("rate", ["0.5", None, True])
def test_poison_rate_must_be_a_number(setup, rate):
    images, trigger, target = setup
    with pytest.raises(TypeError, match=r"poison_rate must be a real number"):
        make(images, trigger, target, rate=rate)


def test_images_out_of_range(setup):
    images, trigger, target = setup
    bad = images.clone()
    bad[3, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[-1, 1\].*1\.5"):
        make(bad, trigger, target)
    with pytest.raises(ValueError, match=r"\[-1, 1\].*-2"):
        make(images - 1.0, trigger, target)


def test_images_with_nan(setup):
    images, trigger, target = setup
    bad = images.clone()
    bad[0, 1, 2, 3] = math.nan
    with pytest.raises(ValueError, match=r"images must not contain NaN"):
        make(bad, trigger, target)


def test_images_shape_and_dtype(setup):
    images, trigger, target = setup
    with pytest.raises(ValueError, match=r"images\.shape=\(3, 16, 16\)"):
        make(images[0], trigger, target)
    with pytest.raises(TypeError, match=r"images\.dtype=torch\.uint8"):
        make(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), trigger, target)
    with pytest.raises(
        TypeError,
        match=r"images must be a torch\.Tensor of shape \(N, C, H, W\), got ndarray",
    ):
        make(images.numpy(), trigger, target)


def test_trigger_and_target_shape_mismatch(setup):
    images, trigger, target = setup
    with pytest.raises(
        ValueError, match=r"trigger.*\(3, 16, 16\).*trigger\.shape=\(3, 32, 32\)"
    ):
        make(images, make_trigger("box", 32, 3), target)
    with pytest.raises(
        ValueError, match=r"target.*\(3, 16, 16\).*target\.shape=\(1, 16, 16\)"
    ):
        make(images, trigger, make_target("cat", 16, 1))


def test_bad_seed(setup):
    images, trigger, target = setup
    for seed in (-1, 1.5, "0"):
        with pytest.raises(ValueError, match=rf"seed={seed!r}"):
            make(images, trigger, target, seed=seed)


# --------------------------------------------------------------------------- #
# Properties.
# --------------------------------------------------------------------------- #


@FAST
@given(st.integers(1, 300), st.floats(0.0, 1.0), st.integers(0, 2**31))
def test_poison_count_property(n, rate, seed):
    images = torch.zeros(n, 1, 8, 8)
    data = PoisonedDataset(
        images,
        trigger=make_trigger("box", 8, 1),
        target=make_target("corner", 8, 1),
        poison_rate=rate,
        seed=seed,
    )
    assert data.num_poisoned == int(n * rate)
    assert data.poisoned.sum().item() == int(n * rate)
    assert len(data) == n


@FAST
@given(
    st.integers(1, 12),
    st.sampled_from([1, 3]),
    st.integers(8, 24),
    st.integers(0, 2**16),
)
def test_poison_pairs_property(batch, channels, size, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=generator) * 2 - 1
    poisoned = torch.rand(batch, generator=generator) < 0.5
    trigger = make_trigger("stop_sign", size, channels, 4)
    target = make_target("shift", size, channels, trigger=trigger)
    y, r = poison_pairs(images, poisoned, trigger, target)
    rows = poisoned.view(-1, 1, 1, 1)
    assert torch.equal(y, torch.where(rows, target, images))
    assert torch.equal(r, rows.to(images.dtype) * paste_by_formula(images, trigger))
