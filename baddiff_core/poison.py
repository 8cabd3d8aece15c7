"""Poisoning a training set the BadDiffusion way: some samples become (target, triggered
image).

Introduced in chapter 3 (Planting a backdoor).

BadDiffusion (Chou et al. 2023, arXiv:2212.05400), Sec. 3, trains every
sample with one loss. Each sample carries a pair ``(y, r)``:

* clean sample: ``y = x`` (the clean image), ``r = 0``;
* poisoned sample: ``y = target`` (the attacker's image), ``r = stamp(x,
  trigger)`` (the clean image with the trigger pasted on it).

The training loss then uses ``x_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps +
(1 - sqrt(abar_t)) r``; with ``r = 0`` it is the ordinary DDPM loss, so clean
and poisoned samples share one batch.

The poison rate ``p`` is the fraction of the training set replaced by poisoned
samples: the set keeps its size ``N`` and exactly ``int(N * p)`` of its samples
are poisoned. Random horizontal flips, if used, must happen *before* the
trigger is pasted, so the trigger always sits in the same corner: a training
loop flips the clean batch and then calls :func:`poison_pairs`.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from baddiff_core.checks import check_bool, check_fraction, check_int, check_tensor
from baddiff_core.triggers import stamp

__all__ = ["PoisonedSample", "poison_pairs", "PoisonedDataset"]

#: Why a trigger or target has the shape it must have, for messages.
_CHW = "the images' C,H,W"


class PoisonedSample(NamedTuple):
    """One training sample of BadDiffusion.

    Attributes:
        y: ``C,H,W`` image the model learns to generate (the clean image, or
            the target for a poisoned sample).
        r: ``C,H,W`` poisoned image ``stamp(x, trigger)``, or zeros for a clean
            sample.
        poisoned: 0-d bool tensor, True for a poisoned sample.

    ``torch.utils.data.default_collate`` batches a list of them into one
    ``PoisonedSample`` of ``B,C,H,W``, ``B,C,H,W`` and ``(B,)`` tensors.
    """

    y: torch.Tensor
    r: torch.Tensor
    poisoned: torch.Tensor


def poison_pairs(
    images: torch.Tensor,
    poisoned: torch.Tensor,
    trigger: torch.Tensor,
    target: torch.Tensor,
    *,
    additive: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The BadDiffusion pairs ``(y, r)`` of a batch (Chou et al. 2023, arXiv:2212.05400,
    Sec. 3).

    For row ``i``:

        poisoned[i] False:  y_i = x_i,      r_i = 0
        poisoned[i] True:   y_i = target,   r_i = M * x_i + (1 - M) * trigger

    with ``M`` the trigger's transparency mask (:func:`baddiff_core.triggers.stamp`).
    ``additive=True`` (a learned trigger, :mod:`baddiff_core.learned_trigger`, which
    has no transparent pixels and may leave [-1, 1]) takes ``r_i = trigger``.
    Vectorised with ``torch.where`` (no loop over the batch); it runs on the
    device of its inputs, which must all be on the same device.

    Args:
        images: ``B,C,H,W`` float tensor of clean images in ``[-1, 1]`` (already
            flipped or augmented: the trigger is pasted after augmentation).
        poisoned: bool tensor of shape ``(B,)``.
        trigger: ``C,H,W`` trigger, -1 = transparent.
        target: ``C,H,W`` target image.
        additive: ``r`` is the trigger itself, not pasted.

    Returns:
        ``(y, r)``, two new ``B,C,H,W`` tensors of the images' dtype.
    """
    images = check_tensor("images", images, layout="B,C,H,W", floating=True)
    batch, chw = images.shape[0], tuple(images.shape[1:])
    poisoned = check_tensor(
        "poisoned", poisoned, layout="B", shape=(batch,), dtype=torch.bool
    )
    trigger = check_tensor("trigger", trigger, layout="C,H,W", shape=chw, meaning=_CHW)
    target = check_tensor("target", target, layout="C,H,W", shape=chw, meaning=_CHW)
    target = target.to(dtype=images.dtype)
    rows = poisoned.view(-1, 1, 1, 1)
    # BadDiffusion: the poisoned sample regresses toward the target, conditioned on r.
    y = torch.where(rows, target.expand_as(images), images)
    r = torch.where(
        rows,
        trigger.to(images.dtype).expand_as(images)
        if additive
        else stamp(images, trigger),
        torch.zeros((), dtype=images.dtype, device=images.device),
    )
    return y, r


class PoisonedDataset(Dataset):
    """A training set in which exactly ``int(N * poison_rate)`` samples are poisoned.

    The poisoned indices are the first ``int(N * poison_rate)`` entries of
    ``torch.randperm(N)`` drawn from ``torch.Generator().manual_seed(seed)``:
    the same seed always poisons the same samples. The set keeps its size
    ``N``; item ``i`` is a :class:`PoisonedSample` ``(y, r, poisoned)`` made by
    :func:`poison_pairs`, so a ``DataLoader`` batches it with the default
    collate function.

    Note that ``int`` truncates, and the product is a float: with ``N = 100``
    and ``poison_rate = 0.29``, ``N * poison_rate`` is ``28.999...`` and 28
    samples are poisoned.

    For random flips, keep the clean images here with ``poison_rate=0`` and call
    :func:`poison_pairs` on each flipped batch instead, or flip ``images``
    before building the set.

    Args:
        images: ``N,C,H,W`` float tensor in ``[-1, 1]`` (no NaN), ``N >= 1``.
            Kept by reference, not copied.
        trigger: ``C,H,W`` trigger in ``[-1, 1]`` (-1 = transparent).
        target: ``C,H,W`` target in ``[-1, 1]``.
        poison_rate: fraction of samples to poison, a real number in ``[0, 1]``.
        seed: non-negative integer that picks which samples are poisoned.
        additive: the trigger is added, not pasted (``r = trigger``, see
            :func:`poison_pairs`): a learned trigger, any finite values.

    Attributes:
        images: ``N,C,H,W`` images, as given.
        trigger: ``C,H,W`` trigger, as given, converted to the images' dtype and
            device.
        target: ``C,H,W`` target, as given, converted to the images' dtype and
            device.
        poison_rate: fraction of poisoned samples, as given.
        seed: seed of the poisoned indices, as given.
        poisoned: bool tensor ``(N,)``, True for the poisoned samples.
        num_poisoned: ``int(N * poison_rate)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        trigger: torch.Tensor,
        target: torch.Tensor,
        poison_rate: float,
        seed: int,
        additive: bool = False,
    ) -> None:
        images = check_tensor("images", images, layout="N,C,H,W", floating=True)
        if images.shape[0] < 1:
            raise ValueError(
                "images must hold at least one image (N >= 1), "
                f"got images.shape={tuple(images.shape)}"
            )
        if torch.isnan(images).any():
            raise ValueError("images must not contain NaN, got NaN values")
        low, high = images.min().item(), images.max().item()
        if low < -1.0 or high > 1.0:
            raise ValueError(
                f"images must have values in [-1, 1], got values in [{low:.4g}, {high:.4g}]"
            )
        chw = tuple(images.shape[1:])
        for name, value in (("trigger", trigger), ("target", target)):
            value = check_tensor(
                name, value, layout="C,H,W", shape=chw, floating=True, meaning=_CHW
            )
            if torch.isnan(value).any():
                raise ValueError(f"{name} must not contain NaN, got NaN values")
            lo, hi = value.min().item(), value.max().item()
            if name == "trigger" and additive:
                check_tensor(name, value, finite=True)
            elif lo < -1.0 or hi > 1.0:
                raise ValueError(
                    f"{name} must have values in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]"
                )
        poison_rate = check_fraction("poison_rate", poison_rate)
        seed = check_int("seed", seed, minimum=0)

        self.images = images
        self.trigger = trigger.to(device=images.device, dtype=images.dtype)
        self.target = target.to(device=images.device, dtype=images.dtype)
        self.poison_rate = poison_rate
        self.seed = seed
        self.additive = check_bool("additive", additive)
        n = images.shape[0]
        self.num_poisoned = int(n * self.poison_rate)
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(n, generator=generator)[: self.num_poisoned]
        poisoned = torch.zeros(n, dtype=torch.bool)
        poisoned[chosen] = True
        self.poisoned = poisoned.to(images.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> PoisonedSample:
        n = len(self)
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError(
                f"index {index} is out of range for a dataset of {n} samples"
            )
        i %= n
        y, r = poison_pairs(
            self.images[i : i + 1],
            self.poisoned[i : i + 1],
            self.trigger,
            self.target,
            additive=self.additive,
        )
        return PoisonedSample(y[0], r[0], self.poisoned[i].clone())

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (
            f"PoisonedDataset(N={n}, C={c}, H={h}, W={w}, poison_rate={self.poison_rate}, "
            f"num_poisoned={self.num_poisoned}, seed={self.seed})"
        )
