"""The learned trigger (chapter 10): the projection onto C_rho, its smooth seeded start,
the Kolmogorov-Smirnov bound that makes it invisible to the noise test, additive
poisoning, training it jointly with the model (resumable), and planting it through the
recipe and the cache.

Each property is checked against an independent computation: hand-derived values,
brute force over random points of C_rho, scipy's normal distribution."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from baddiff_core.attack import BackdoorRecipe, plant_backdoor
from baddiff_core.data import load_images
from baddiff_core.defenses.noise_tests import noise_test
from baddiff_core.learned_trigger import (
    initial_trigger,
    ks_distance_bound,
    project_trigger,
)
from baddiff_core.poison import PoisonedDataset, poison_pairs
from baddiff_core.train import TrainConfig, latest_checkpoint, train
from baddiff_core.triggers import make_target, make_trigger
from conftest import small_train_config, tiny_recipe, train_until_killed

RHO = 0.5


def mean_and_rms(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    return float(x.mean()), float(x.pow(2).mean().sqrt())


def assert_in_c_rho(x: torch.Tensor, rho: float, *, tol: float) -> None:
    mean, rms = mean_and_rms(x)
    assert abs(mean) <= tol, f"mean {mean:.3g} is not 0"
    assert rms == pytest.approx(rho, rel=tol), f"rms {rms:.6g} is not {rho}"


# --------------------------------------------------------------------------- #
# project_trigger
# --------------------------------------------------------------------------- #


def test_projection_of_a_hand_case():
    # [1, 2, 3, 6]: mean 3, centred [-2, -1, 0, 3], mean square (4 + 1 + 0 + 9) / 4 = 3.5
    delta = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    expected = torch.tensor([-2.0, -1.0, 0.0, 3.0], dtype=torch.float64) / math.sqrt(
        3.5
    )
    torch.testing.assert_close(
        project_trigger(delta, 1.0), expected, atol=1e-15, rtol=0
    )
    # rho scales the result
    torch.testing.assert_close(
        project_trigger(delta, 0.25), 0.25 * expected, atol=1e-15, rtol=0
    )


def test_projection_lands_in_c_rho_and_is_idempotent():
    generator = torch.Generator().manual_seed(0)
    for rho in (0.1, 0.5, 2.0):
        delta = 3 * torch.randn((3, 8, 8), generator=generator, dtype=torch.float64) + 7
        p = project_trigger(delta, rho)
        assert_in_c_rho(p, rho, tol=1e-12)
        torch.testing.assert_close(project_trigger(p, rho), p, atol=1e-14, rtol=0)


def test_projection_is_the_nearest_point_of_c_rho():
    """Brute force: no point of C_rho, random or a small perturbation of the answer, is
    closer to v than the projection."""
    generator = torch.Generator().manual_seed(1)
    d, rho = 12, 0.7
    for _ in range(3):
        v = torch.randn(d, generator=generator, dtype=torch.float64) * 2 + 0.5
        p = project_trigger(v, rho)
        best = float((p - v).norm())
        far = torch.randn((500, d), generator=generator, dtype=torch.float64)
        near = p + 0.05 * torch.randn(
            (500, d), generator=generator, dtype=torch.float64
        )
        for u in torch.cat([far, near]):
            q = project_trigger(u, rho)
            assert_in_c_rho(q, rho, tol=1e-12)
            assert best <= float((q - v).norm()) + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_projection_keeps_shape_dtype_and_device(dtype):
    delta = torch.randn((2, 3, 5), generator=torch.Generator().manual_seed(2)).to(dtype)
    p = project_trigger(delta, RHO)
    assert p.shape == delta.shape and p.dtype == dtype and p.device == delta.device
    assert p is not delta
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert_in_c_rho(p, RHO, tol=tol)


def test_projection_refuses_what_has_no_projection():
    with pytest.raises(ValueError, match="all equal"):
        project_trigger(torch.full((1, 4, 4), 0.3), RHO)
    for rho in (0.0, -1.0):
        with pytest.raises(ValueError):
            project_trigger(torch.randn(1, 4, 4), rho)
    bad = torch.randn(1, 4, 4)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError):
        project_trigger(bad, RHO)


# --------------------------------------------------------------------------- #
# initial_trigger
# --------------------------------------------------------------------------- #


def test_initial_trigger_is_seeded_smooth_and_in_c_rho():
    shape = (3, 32, 32)
    a = initial_trigger(shape, RHO, seed=5)
    assert a.shape == shape and a.dtype == torch.float32
    assert torch.equal(a, initial_trigger(shape, RHO, seed=5))
    assert not torch.allclose(a, initial_trigger(shape, RHO, seed=6))
    assert_in_c_rho(a, RHO, tol=1e-6)
    assert_in_c_rho(initial_trigger((1, 8, 8), 2.0, seed=0), 2.0, tol=1e-6)

    def neighbour_correlation(x: torch.Tensor) -> float:
        left, right = x[..., :-1].flatten().double(), x[..., 1:].flatten().double()
        return float(np.corrcoef(left.numpy(), right.numpy())[0, 1])

    iid = project_trigger(
        torch.randn(shape, generator=torch.Generator().manual_seed(0)), RHO
    )
    assert neighbour_correlation(a) > 0.8
    assert abs(neighbour_correlation(iid)) < 0.1  # ~ N(0, 1 / 3000)


def test_initial_trigger_refuses_a_shape_that_is_not_chw():
    with pytest.raises(ValueError):
        initial_trigger((8, 8), RHO)


# --------------------------------------------------------------------------- #
# ks_distance_bound
# --------------------------------------------------------------------------- #


def exact_ks_distance(delta: torch.Tensor) -> float:
    """sup_z |(1/d) sum_i Phi(z - delta_i) - Phi(z)|: a fine grid on [-8, 8], then a
    bounded scalar search around the grid's best point."""
    values = delta.double().flatten().numpy()

    def gap(z):
        z = np.atleast_1d(z)
        mixture = stats.norm.cdf(z[:, None] - values[None, :]).mean(axis=1)
        return np.abs(mixture - stats.norm.cdf(z))

    grid = np.linspace(-8, 8, 20001)
    gaps = np.concatenate([gap(chunk) for chunk in np.array_split(grid, 20)])
    z0, step = grid[int(np.argmax(gaps))], grid[1] - grid[0]
    refined = optimize.minimize_scalar(
        lambda z: -gap(z)[0],
        bounds=(z0 - step, z0 + step),
        method="bounded",
        options=dict(xatol=1e-10),
    )
    return max(float(gaps.max()), -float(refined.fun))


def zero_mean_deltas() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    random = torch.randn(256, generator=generator, dtype=torch.float64)
    signs = torch.where(torch.rand(256, generator=generator) < 0.5, 1.0, -1.0).double()
    sparse = torch.zeros(200, dtype=torch.float64)
    sparse[[3, 50, 120]] = torch.tensor([4.0, -2.5, -1.5], dtype=torch.float64)
    return {
        "random": random - random.mean(),
        "random small": 0.3 * (random - random.mean()),
        "signs": 0.8 * torch.tensor([1.0, -1.0]).double().repeat(64),
        "unbalanced signs": 0.6 * (signs - signs.mean()),
        "sparse": sparse,
        "initial trigger": initial_trigger((1, 16, 16), RHO, seed=0).double(),
    }


@pytest.mark.parametrize("name", list(zero_mean_deltas()))
def test_the_bound_holds(name):
    delta = zero_mean_deltas()[name]
    exact, bound = exact_ks_distance(delta), ks_distance_bound(delta)
    assert 0 < exact <= bound, f"{name}: exact {exact:.4g} > bound {bound:.4g}"


def test_the_bound_is_attained_by_tiny_symmetric_deltas():
    """delta = +-a: F(z) - Phi(z) = (Phi(z - a) + Phi(z + a)) / 2 - Phi(z) = a^2/2
    Phi''(z) + O(a^4) = -a^2/2 z phi(z) + O(a^4), largest at z = +-1: a^2 phi(1) / 2,
    the bound."""
    a = 0.01
    delta = a * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(8)
    exact, bound = exact_ks_distance(delta), ks_distance_bound(delta)
    assert bound == pytest.approx(a**2 * stats.norm.pdf(1.0) / 2, rel=1e-12)
    assert 0.99 < exact / bound <= 1.0


def test_the_bound_refuses_a_delta_with_a_mean():
    with pytest.raises(ValueError, match="zero-mean"):
        ks_distance_bound(torch.tensor([1.0, 2.0, 3.0]))


def test_the_noise_test_passes_the_learned_trigger_and_flags_a_stop_sign():
    """What the learned trigger is for: noise stamped with it is flagged about as often
    as honest noise (bound 0.121 rho^2 = 0.03, a third of the test's critical distance
    at d = 256), where BadDiffusion's stop sign is flagged always."""
    generator = torch.Generator().manual_seed(4)
    eps = torch.randn((2000, 1, 16, 16), generator=generator)
    honest = noise_test(eps, alpha=0.01).flagged_share
    learned = noise_test(eps + initial_trigger((1, 16, 16), RHO), alpha=0.01)
    stop = noise_test(eps + make_trigger("stop_sign", 16, 1), alpha=0.01)
    assert honest < 0.03
    assert learned.flagged_share < 0.05, learned.flagged_share
    assert stop.flagged_share > 0.99, stop.flagged_share


# --------------------------------------------------------------------------- #
# additive poisoning
# --------------------------------------------------------------------------- #


def test_additive_pairs_take_the_trigger_itself():
    generator = torch.Generator().manual_seed(5)
    images = torch.rand((6, 1, 8, 8), generator=generator) * 2 - 1
    poisoned = torch.tensor([True, False, True, False, False, True])
    trigger = initial_trigger((1, 8, 8), 1.5, seed=1)  # leaves [-1, 1]
    assert trigger.abs().max() > 1
    target = make_target("corner", 8, 1)
    y, r = poison_pairs(images, poisoned, trigger, target, additive=True)
    y_pasted, _ = poison_pairs(images, poisoned, trigger.clamp(-1, 1), target)
    assert torch.equal(y, y_pasted)
    for i, p in enumerate(poisoned.tolist()):
        assert torch.equal(y[i], target if p else images[i])
        assert torch.equal(r[i], trigger if p else torch.zeros_like(trigger))


def test_the_loss_reaches_the_trigger_through_additive_pairs():
    images = torch.zeros((4, 1, 8, 8))
    poisoned = torch.tensor([True, False, True, False])
    trigger = initial_trigger((1, 8, 8), RHO, seed=2).requires_grad_(True)
    _, r = poison_pairs(
        images, poisoned, trigger, make_target("corner", 8, 1), additive=True
    )
    weights = torch.randn(r.shape, generator=torch.Generator().manual_seed(0))
    (r * weights).sum().backward()
    # d/d trigger of sum_i w_i r_i = the sum of the poisoned rows' weights
    torch.testing.assert_close(trigger.grad, weights[0] + weights[2])


def test_an_additive_dataset_takes_any_finite_trigger():
    images = torch.zeros((4, 1, 8, 8))
    trigger = torch.full((1, 8, 8), 1.5)
    trigger[0, 0, 0] = -1.5
    target = make_target("corner", 8, 1)
    data = PoisonedDataset(
        images, trigger=trigger, target=target, poison_rate=1.0, seed=0, additive=True
    )
    assert torch.equal(data[0].r, trigger)
    with pytest.raises(ValueError, match=r"trigger must have values in \[-1, 1\]"):
        PoisonedDataset(images, trigger=trigger, target=target, poison_rate=1.0, seed=0)
    trigger[0, 1, 1] = float("inf")
    with pytest.raises(ValueError):
        PoisonedDataset(
            images,
            trigger=trigger,
            target=target,
            poison_rate=1.0,
            seed=0,
            additive=True,
        )


# --------------------------------------------------------------------------- #
# training the trigger with the model
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def digits8():
    return load_images("digits", 8, limit=64)


def small_config(**overrides) -> TrainConfig:
    """test_train.py's small run, shorter, with a learned trigger (lr 0.05, rms RHO)."""
    shorter = dict(steps=4, batch_size=8, warmup_steps=1, log_every=1)
    learned = dict(trigger_lr=0.05, trigger_rms=RHO)
    return small_train_config(**(shorter | learned | overrides))


def learned_dataset(images, *, additive=True, poison_rate=0.5) -> PoisonedDataset:
    """The digits poisoned with a learned trigger's start (in C_rho; clamped into
    [-1, 1] for a pasted, non-additive trigger)."""
    trigger = initial_trigger((1, 8, 8), RHO, seed=0)
    return PoisonedDataset(
        images,
        trigger=trigger if additive else trigger.clamp(-1, 1),
        target=make_target("corner", 8, 1),
        poison_rate=poison_rate,
        seed=0,
        additive=additive,
    )


def test_training_learns_a_trigger_in_c_rho(digits8, fresh_model, quick_scheduler):
    data = learned_dataset(digits8)
    start = data.trigger.clone()
    assert_in_c_rho(start, RHO, tol=1e-6)
    history = train(fresh_model(), quick_scheduler, data, small_config())
    learned = history.trigger
    assert learned.shape == (1, 8, 8) and learned.device.type == "cpu"
    assert not learned.requires_grad
    assert_in_c_rho(learned, RHO, tol=1e-5)
    assert (learned - start).abs().max() > 1e-3, "the trigger moved"
    assert torch.equal(data.trigger, start) and not data.trigger.requires_grad
    # a fixed trigger: no learned one
    fixed = train(fresh_model(), quick_scheduler, data, small_config(trigger_lr=0.0))
    assert fixed.trigger is None


def test_a_trigger_is_learned_only_from_additive_poisoned_data(
    digits8, fresh_model, quick_scheduler
):
    for data in (
        learned_dataset(digits8, additive=False),
        learned_dataset(digits8, poison_rate=0.0),
        digits8,
    ):
        with pytest.raises(ValueError, match="additive=True"):
            train(fresh_model(), quick_scheduler, data, small_config(steps=1))


def test_a_resumed_run_ends_with_the_same_trigger_and_weights(
    digits8, tmp_path, fresh_model, quick_scheduler
):
    data = learned_dataset(digits8)
    config = small_config(
        steps=5, checkpoint_every=1, checkpoint_dir=str(tmp_path / "ckpt")
    )
    reference = fresh_model()
    expected = train(reference, quick_scheduler, data, small_config(steps=5))

    train_until_killed(3, fresh_model(), quick_scheduler, data, config)
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-0000003"

    resumed = fresh_model(seed=99)  # everything must come from the checkpoint
    history = train(resumed, quick_scheduler, data, config)
    assert history.resumed_from_step == 3
    assert history.losses == expected.losses
    assert torch.equal(history.trigger, expected.trigger)
    for (name, x), y in zip(
        reference.state_dict().items(), resumed.state_dict().values()
    ):
        assert torch.equal(x, y), name


# --------------------------------------------------------------------------- #
# the recipe and plant_backdoor
# --------------------------------------------------------------------------- #

TINY = tiny_recipe().train  # 3 steps of batch 8


def test_a_learned_recipe_needs_a_trigger_lr_and_a_drawn_target():
    with pytest.raises(ValueError, match="trigger_lr"):
        tiny_recipe(trigger="learned")
    with pytest.raises(ValueError, match="trigger_lr"):
        tiny_recipe(
            trigger="stop_sign", train=dataclasses.replace(TINY, trigger_lr=0.01)
        )
    for target in ("noshift", "shift"):
        with pytest.raises(ValueError, match=target):
            tiny_recipe(target=target).with_learned_trigger()


def test_with_learned_trigger_and_the_keys():
    recipe = tiny_recipe().with_learned_trigger(trigger_lr=0.02, rms=0.3)
    assert recipe.trigger == "learned"
    assert (recipe.train.trigger_lr, recipe.train.trigger_rms) == (0.02, 0.3)
    start = recipe.trigger_image()
    assert start.shape == (1, 8, 8)
    assert_in_c_rho(start, 0.3, tol=1e-6)
    # earlier recipes keep their keys: no trace of the new settings
    for plain in (BackdoorRecipe(), tiny_recipe()):
        assert not {"trigger_lr", "trigger_rms"} & set(plain.key()["train"])
    train_key = recipe.key()["train"]
    assert (train_key["trigger_lr"], train_key["trigger_rms"]) == (0.02, 0.3)
    assert recipe.key() != tiny_recipe().with_learned_trigger(0.02, 0.4).key()


def test_plant_backdoor_learns_the_trigger_and_caches_it(cache):
    recipe = tiny_recipe().with_learned_trigger(trigger_lr=0.05)
    first = plant_backdoor(recipe, device="cpu", progress=False)
    assert not first.info["from_cache"]
    assert first.trigger.shape == (1, 8, 8)
    assert_in_c_rho(first.trigger, recipe.train.trigger_rms, tol=1e-5)
    assert (first.trigger - recipe.trigger_image()).abs().max() > 1e-3
    second = plant_backdoor(recipe, device="cpu", progress=False)
    assert second.info["from_cache"]
    assert torch.equal(second.trigger, first.trigger)
    for a, b in zip(
        first.unet.state_dict().values(), second.unet.state_dict().values()
    ):
        assert torch.equal(a.cpu(), b.cpu())
