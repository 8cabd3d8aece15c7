"""Tests for baddiff_core.metrics and the shipped digits network
(baddiff_core.features).

Each metric is checked against an independent computation (by hand, NumPy/SciPy, or a
small SSIM written here); the shipped network is loaded, never retrained.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from baddiff_core import features as feat
from baddiff_core import metrics
from baddiff_core.metrics import (
    FrechetScore,
    attack_success_rate,
    class_histogram,
    digit_predictions,
    frechet_distance,
    mse_to_target,
    ssim_to_target,
    ssim_window,
    to_unit_range,
)

# --------------------------------------------------------------------------- #
# Fixtures: scikit-learn's digits, loaded here independently of the library
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


@pytest.fixture(scope="module")
def digits8(sk_digits):
    """All 1797 digits as (N, 1, 8, 8) float32 in [0, 1], and labels."""
    x = torch.tensor(sk_digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(sk_digits.target)


@pytest.fixture(scope="module")
def digits16(digits8):
    """All digits at 16x16 in [-1, 1] (how a diffusion model's samples would look), and
    labels."""
    x, y = digits8
    x16 = F.interpolate(x, size=16, mode="bilinear", align_corners=False).clamp(0, 1)
    return x16 * 2 - 1, y


@pytest.fixture(scope="module")
def recipe():
    return json.loads(feat.RECIPE_PATH.read_text())


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :])[None, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), k2, groups=x.shape[1])


# --------------------------------------------------------------------------- #
# to_unit_range, MSE
# --------------------------------------------------------------------------- #


def test_to_unit_range_maps_and_clips():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert torch.equal(to_unit_range(x), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_mse_hand_computed_values_per_image_and_mean():
    target = torch.ones(1, 4, 4)  # white in [-1, 1]
    # black: off by 1 in [0, 1] units everywhere -> MSE 1
    all_off = -torch.ones(1, 4, 4)
    exact = torch.ones(1, 4, 4)
    half = torch.ones(1, 4, 4)
    half[:, :2] = (
        0.0  # 0.5 in [0, 1] units: half the pixels off by 0.5 -> 0.5 * 0.25 = 0.125
    )
    samples = torch.stack([all_off, exact, half])

    per_image = mse_to_target(samples, target, reduction="none")
    assert per_image.shape == (3,)
    assert torch.allclose(per_image, torch.tensor([1.0, 0.0, 0.125]))
    assert mse_to_target(samples, target).item() == pytest.approx(
        (1.0 + 0.0 + 0.125) / 3
    )
    assert mse_to_target(all_off[None], target).item() == pytest.approx(1.0)


def test_mse_matches_numpy_on_random_rgb_images():
    g = torch.Generator().manual_seed(0)
    # some values outside [-1, 1]
    samples = torch.rand(5, 3, 8, 8, generator=g) * 2.4 - 1.2
    target = torch.rand(3, 8, 8, generator=g) * 2 - 1
    u = np.clip(samples.numpy() / 2 + 0.5, 0, 1)
    v = np.clip(target.numpy() / 2 + 0.5, 0, 1)
    expected = ((u - v[None]) ** 2).mean(axis=(1, 2, 3))
    got = mse_to_target(samples, target, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)
    # the paper's MSE is the mean over images, channels and pixels
    assert mse_to_target(samples, target).item() == pytest.approx(
        ((u - v[None]) ** 2).mean(), rel=1e-5
    )
    # a per-sample (B, C, H, W) target gives the same as the broadcast one
    same = mse_to_target(samples, target.expand_as(samples), reduction="none")
    assert torch.allclose(same, got)


def test_mse_quantize_rounds_to_8_bit_levels():
    target01 = torch.full((1, 2, 2), 100 / 255)
    target = target01 * 2 - 1
    near = (
        torch.full((1, 1, 2, 2), 100.3 / 255)
    ) * 2 - 1  # rounds to level 100: same as target
    far = (
        torch.full((1, 1, 2, 2), 100.7 / 255)
    ) * 2 - 1  # rounds to level 101: one level off
    assert mse_to_target(near, target).item() == pytest.approx(
        (0.3 / 255) ** 2, rel=1e-3
    )
    assert mse_to_target(near, target, quantize=True).item() == 0.0
    assert mse_to_target(far, target, quantize=True).item() == pytest.approx(
        (1 / 255) ** 2, rel=1e-5
    )

    g = torch.Generator().manual_seed(1)
    samples = torch.rand(4, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    target = torch.rand(1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    qu = np.round((samples.numpy() / 2 + 0.5) * 255) / 255
    qv = np.round((target.numpy() / 2 + 0.5) * 255) / 255
    expected = ((qu - qv[None]) ** 2).mean(axis=(1, 2, 3))
    got = mse_to_target(samples, target, reduction="none", quantize=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # every quantized difference is a multiple of 1/255, so MSE * 255^2 * pixels is an
    # integer
    sums = got.numpy() * 255**2 * 36
    np.testing.assert_allclose(sums, np.round(sums), atol=1e-6)


def test_mse_rejects_bad_inputs():
    samples = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"target.shape=\(3, 4, 4\)"):
        mse_to_target(samples, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="reduction='sum'"):
        mse_to_target(samples, torch.zeros(1, 4, 4), reduction="sum")
    with pytest.raises(ValueError, match=r"samples.shape=\(1, 4, 4\)"):
        mse_to_target(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    bad = samples.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        mse_to_target(bad, torch.zeros(1, 4, 4))


# --------------------------------------------------------------------------- #
# SSIM
# --------------------------------------------------------------------------- #


def reference_ssim(
    x01: torch.Tensor, y01: torch.Tensor, side: int, sigma: float
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), Gaussian window, reflect padding, mean over
    all pixels."""
    x01, y01 = x01.double(), y01.double()
    c1, c2 = 0.01**2, 0.03**2
    t = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    channels = x01.shape[1]
    window = torch.outer(g, g)[None, None].repeat(channels, 1, 1, 1)
    pad = (side - 1) // 2

    def local_mean(z):
        return F.conv2d(F.pad(z, (pad,) * 4, mode="reflect"), window, groups=channels)

    mx, my = local_mean(x01), local_mean(y01)
    vx = local_mean(x01 * x01) - mx**2
    vy = local_mean(y01 * y01) - my**2
    cxy = local_mean(x01 * y01) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def test_ssim_of_identical_images_is_one():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(3, 16, 16, generator=g) * 2 - 1
    samples = target.expand(4, -1, -1, -1).clone()
    assert torch.allclose(
        ssim_to_target(samples, target, reduction="none"), torch.ones(4), atol=1e-5
    )


def test_ssim_matches_independent_implementation_32px():
    g = torch.Generator().manual_seed(3)
    target = torch.rand(3, 32, 32, generator=g) * 2 - 1
    # from identical to unrelated: the target plus more and more noise
    noise = torch.randn(4, 3, 32, 32, generator=g)
    samples = (
        target + torch.tensor([0.0, 0.1, 0.5, 2.0]).view(4, 1, 1, 1) * noise
    ).clamp(-1, 1)
    got = ssim_to_target(samples, target, reduction="none")
    expected = reference_ssim(
        to_unit_range(samples), to_unit_range(target).expand_as(samples), 11, 1.5
    )
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), atol=1e-5)
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert bool((got[:-1] > got[1:]).all()), got  # more noise, less similar
    assert ssim_to_target(samples, target).item() == pytest.approx(
        float(got.mean()), abs=1e-6
    )


def test_ssim_window_for_small_images():
    assert ssim_window(32, 32) == (11, 1.5)
    assert ssim_window(11, 40) == (11, 1.5)
    side, sigma = ssim_window(8, 8)
    assert side == 7 and sigma == pytest.approx(1.5 * 7 / 11)
    assert ssim_window(10, 10)[0] == 9
    assert ssim_window(5, 9)[0] == 5
    with pytest.raises(ValueError, match="height=0"):
        ssim_window(0, 8)


def test_ssim_on_8x8_uses_the_7px_window(digits8):
    x, _ = digits8
    images = x[:6] * 2 - 1
    got = ssim_to_target(images, images[0], reduction="none")
    expected = reference_ssim(
        to_unit_range(images),
        to_unit_range(images[0]).expand_as(images),
        7,
        1.5 * 7 / 11,
    )
    np.testing.assert_allclose(got.double().numpy(), expected.numpy(), atol=1e-5)
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    assert bool((got[1:] < 0.9).all())  # other digits are not the target


# --------------------------------------------------------------------------- #
# Attack success rate
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("k", [0, 3, 7, 10])
def test_attack_success_rate_counts_samples_below_threshold(k):
    n = 10
    # black; a constant sample c in [0, 1] units has MSE c^2
    target = -torch.ones(1, 4, 4)
    # MSE 0.05 (success) or 0.2
    level01 = torch.tensor([0.05**0.5] * k + [0.2**0.5] * (n - k))
    samples = (level01 * 2 - 1).view(n, 1, 1, 1).expand(n, 1, 4, 4)
    samples = samples[torch.randperm(n, generator=torch.Generator().manual_seed(k))]
    assert attack_success_rate(samples, target) == pytest.approx(k / n)
    assert attack_success_rate(samples, target, threshold=0.3) == 1.0
    assert attack_success_rate(samples, target, threshold=0.01) == 0.0


def test_attack_success_rate_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold=-0.1"):
        attack_success_rate(
            torch.zeros(2, 1, 4, 4), torch.zeros(1, 4, 4), threshold=-0.1
        )
    with pytest.raises(ValueError, match="threshold=nan"):
        attack_success_rate(
            torch.zeros(2, 1, 4, 4), torch.zeros(1, 4, 4), threshold=float("nan")
        )


# --------------------------------------------------------------------------- #
# The shipped digits network
# --------------------------------------------------------------------------- #


def test_shipped_files_are_small_safetensors(recipe):
    files = [p for p in feat.ASSETS_DIR.rglob("*") if p.is_file()]
    assert {"digits_net.json", "digits_net.safetensors"} <= {p.name for p in files}
    pickles = [
        p.name for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
    ]
    assert pickles == [], "weights ship as safetensors only"
    raw = feat.WEIGHTS_PATH.read_bytes()
    assert len(raw) < 400_000
    # safetensors layout: u64 little-endian header length, JSON header, raw tensor bytes
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    state = feat.DigitsNet().state_dict()
    assert set(header) == set(state)
    for name, info in header.items():
        assert info["dtype"] == "F32" and tuple(info["shape"]) == tuple(
            state[name].shape
        )
    assert recipe["num_parameters"] == sum(t.numel() for t in state.values())


def test_loader_never_uses_torch_load(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(feat, "_CACHE", {})
    net = feat.load_digits_net()
    assert isinstance(net, feat.DigitsNet)


def test_loader_is_cached_eval_and_frozen():
    a = feat.load_digits_net()
    assert feat.load_digits_net() is a
    assert not a.training
    assert not any(p.requires_grad for p in a.parameters())
    assert a.num_features == 64


def test_recipe_json_matches_and_heldout_accuracy_recomputed(recipe, sk_digits):
    assert recipe["test_fraction"] == 0.2
    assert recipe["num_features"] == 64 and recipe["input_size"] == 16
    for key in (
        "seed",
        "split_seed",
        "epochs",
        "lr",
        "batch_size",
        "test_accuracy",
        "torch_version",
    ):
        assert key in recipe, key
    assert recipe["test_accuracy"] >= 0.97

    # the held-out split, recomputed with scikit-learn from the recipe's split seed
    _, test_idx = train_test_split(
        np.arange(len(sk_digits.target)),
        test_size=recipe["test_fraction"],
        random_state=recipe["split_seed"],
        stratify=sk_digits.target,
    )
    assert len(test_idx) == recipe["num_test"] == 360
    x = (
        torch.tensor(sk_digits.images[test_idx], dtype=torch.float32).unsqueeze(1)
        / 16.0
    )
    y = torch.tensor(sk_digits.target[test_idx])
    net = feat.load_digits_net()
    with torch.no_grad():
        # 8x8 input, resized inside
        accuracy = float((net(x).argmax(1) == y).float().mean())
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(recipe["test_accuracy"], abs=2 / 360)


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_net_accepts_grey_and_rgb_of_several_sizes(digits8, size, channels):
    x8, y = digits8
    x = (
        F.interpolate(x8[:300], size=size, mode="bilinear", align_corners=False)
        if size != 8
        else x8[:300]
    )
    x = x.repeat(1, channels, 1, 1)
    net = feat.load_digits_net()
    with torch.no_grad():
        logits, features = net(x), net.features(x)
    assert logits.shape == (300, 10) and features.shape == (300, 64)
    assert bool((features >= 0).all())
    assert float((logits.argmax(1) == y[:300]).float().mean()) >= 0.95


def test_rgb_with_equal_channels_equals_grey(digits8):
    x8, _ = digits8
    net = feat.load_digits_net()
    with torch.no_grad():
        assert torch.allclose(net(x8[:20]), net(x8[:20].repeat(1, 3, 1, 1)), atol=1e-5)


def test_net_rejects_bad_shapes():
    net = feat.load_digits_net()
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\)"):
        net(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(2, 2, 8, 8\)"):
        net(torch.zeros(2, 2, 8, 8))


# --------------------------------------------------------------------------- #
# Fréchet distance
# --------------------------------------------------------------------------- #


def reference_fd(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FD of DigitsNet features with NumPy / SciPy, float64.

    tr((S1 S2)^1/2) is computed as tr((A S2 A)^1/2) with A = S1^1/2, a symmetric
    positive semi-definite form (some DigitsNet features are always 0, so the
    covariances are singular).
    """
    net = feat.load_digits_net()
    with torch.no_grad():
        f1 = net.features(to_unit_range(real)).double().numpy()
        f2 = net.features(to_unit_range(fake)).double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(
        np.clip(scipy.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)
    ).sum()
    return float(
        ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    )


@pytest.fixture(scope="module")
def fd_sets(digits16):
    x, _ = digits16
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    a, b = x[perm[:898]], x[perm[898:]]
    blurred = gaussian_blur(b, sigma=1.0, radius=3)
    noise = torch.randn(b.shape, generator=g).clamp(-1, 1)
    return x, a, b, blurred, noise


def test_fd_of_a_set_with_itself_is_zero(fd_sets):
    x, a, _, _, noise = fd_sets
    scale = frechet_distance(a, noise, features="digits").value
    same = frechet_distance(x, x, features="digits")
    assert abs(same.value) < 1e-3 * scale and abs(same.value) < 0.5


def test_fd_orders_real_blurred_noise(fd_sets):
    _, a, b, blurred, noise = fd_sets
    fd_real = frechet_distance(a, b, features="digits")
    fd_blur = frechet_distance(a, blurred, features="digits")
    fd_noise = frechet_distance(a, noise, features="digits")
    assert 0 < fd_real.value < fd_blur.value < fd_noise.value
    assert 2 * fd_real.value < fd_blur.value and 5 * fd_blur.value < fd_noise.value
    assert (fd_real.num_real, fd_real.num_fake) == (898, 899)
    assert fd_real.features == "digits"
    assert "899 generated vs 898 real images" in str(fd_real) and str(
        fd_real
    ).startswith("FD ")


def test_fd_matches_scipy_reference(fd_sets):
    _, a, _, blurred, _ = fd_sets
    got = frechet_distance(a[:300], blurred[:200], features="digits")
    assert got.value == pytest.approx(reference_fd(a[:300], blurred[:200]), rel=1e-3)
    assert (got.num_real, got.num_fake) == (300, 200)


def test_fd_auto_and_rgb(fd_sets, monkeypatch):
    _, a, b, _, _ = fd_sets
    rgb_a = F.interpolate(a[:200], size=32, mode="bilinear").repeat(1, 3, 1, 1)
    # the decision rule itself, with torch-fidelity pretended present
    monkeypatch.setattr(metrics, "_torch_fidelity_available", lambda: True)
    assert metrics.resolve_features("auto", rgb_a) == "inception"
    assert metrics.resolve_features("auto", a) == "digits"  # grey, 16 px
    # RGB but 16 px
    assert metrics.resolve_features("auto", rgb_a[:, :, :16, :16]) == "digits"
    assert metrics.resolve_features("auto", rgb_a[:, :1]) == "digits"  # grey, 32 px


def test_fd_auto_never_swaps_inception_for_digits_on_rgb_32px(fd_sets, monkeypatch):
    """Without torch-fidelity, auto on CIFAR-sized colour images is an error naming the
    install command, not a quiet digits FD that would pass for an FID."""
    _, a, b, _, _ = fd_sets
    rgb_a = F.interpolate(a[:50], size=32, mode="bilinear").repeat(1, 3, 1, 1)
    rgb_b = F.interpolate(b[:50], size=32, mode="bilinear").repeat(1, 3, 1, 1)
    monkeypatch.setattr(metrics, "_torch_fidelity_available", lambda: False)
    with pytest.raises(metrics.MissingDependencyError) as info:
        frechet_distance(rgb_a, rgb_b)
    message = str(info.value)
    assert '"baddiff-core[full]"' in message and "features='digits'" in message
    assert "features='auto'" in message and "(50, 3, 32, 32)" in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, RuntimeError)


def test_fd_auto_on_small_grey_images_is_digits_offline(fd_sets, monkeypatch):
    _, a, b, _, _ = fd_sets
    monkeypatch.setattr(metrics, "_torch_fidelity_available", lambda: False)
    auto = frechet_distance(a[:100], b[:100])  # 1 x 16 x 16
    assert auto.features == "digits"
    assert auto.value == pytest.approx(reference_fd(a[:100], b[:100]), rel=1e-3)


def test_fd_explicit_digits_on_rgb_32px_works_offline(fd_sets, monkeypatch):
    _, a, b, _, _ = fd_sets
    grey_a = F.interpolate(a[:100], size=32, mode="bilinear")
    grey_b = F.interpolate(b[:100], size=32, mode="bilinear")
    monkeypatch.setattr(metrics, "_torch_fidelity_available", lambda: False)
    score = frechet_distance(
        grey_a.repeat(1, 3, 1, 1), grey_b.repeat(1, 3, 1, 1), features="digits"
    )
    assert (score.features, score.num_real, score.num_fake) == ("digits", 100, 100)
    # equal grey channels: the digits network's luminance is the grey image itself
    assert score.value == pytest.approx(reference_fd(grey_a, grey_b), rel=1e-3)


def test_fd_inception_without_torch_fidelity_raises_clearly(fd_sets, monkeypatch):
    _, a, b, _, _ = fd_sets
    monkeypatch.setattr(metrics, "_torch_fidelity_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch-fidelity") as info:
        frechet_distance(a[:10], b[:10], features="inception")
    assert "features='digits'" in str(info.value) and '"baddiff-core[full]"' in str(
        info.value
    )
    assert isinstance(info.value, ImportError)


def test_fd_rejects_bad_inputs(fd_sets):
    _, a, b, _, _ = fd_sets
    with pytest.raises(
        ValueError, match=r"real.shape=\(10, 1, 16, 16\).*fake.shape=\(10, 1, 8, 8\)"
    ):
        frechet_distance(a[:10], b[:10, :, :8, :8])
    with pytest.raises(
        ValueError, match=r"at least 2 images.*fake.shape=\(1, 1, 16, 16\)"
    ):
        frechet_distance(a[:10], b[:1])
    nan = b[:10].clone()
    nan[3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="fake must be finite, got 1 NaN"):
        frechet_distance(a[:10], nan)
    with pytest.raises(ValueError, match=r"real.max\(\)=1.5"):
        frechet_distance(a[:10] * 0 + 1.5, b[:10])
    with pytest.raises(ValueError, match="features='fid'"):
        frechet_distance(a[:10], b[:10], features="fid")
    with pytest.raises(ValueError, match="at least 8x8"):
        frechet_distance(a[:10, :, :6, :6], b[:10, :, :6, :6], features="digits")


def test_frechet_score_str():
    expected = "FD 12.3 (digits features, 256 generated vs 1797 real images)"
    assert str(FrechetScore(12.34, 1797, 256, "digits")) == expected
    assert str(FrechetScore(0.0123, 10, 5, "digits")).startswith("FD 0.012 (")
    assert str(FrechetScore(4.6, 50000, 50000, "inception")).startswith(
        "FID 4.6 (inception features"
    )
    assert float(FrechetScore(0.5, 3, 2, "digits")) == 0.5


# --------------------------------------------------------------------------- #
# Digit predictions
# --------------------------------------------------------------------------- #


def test_digit_predictions_and_histogram_on_real_digits(digits16):
    x, y = digits16
    digits, confidence = digit_predictions(x)
    assert digits.shape == confidence.shape == (len(x),) and digits.dtype == torch.int64
    assert float((digits == y).float().mean()) >= 0.95
    assert bool(((confidence >= 0.1) & (confidence <= 1.0 + 1e-6)).all())
    hist = class_histogram(x)
    assert hist.shape == (10,) and int(hist.sum()) == len(x)
    assert torch.equal(hist, torch.bincount(digits, minlength=10))
    # balanced data: every class predicted about as often as it occurs (174..183 images
    # each)
    assert bool(((hist - torch.bincount(y, minlength=10)).abs() <= 10).all())
    # RGB samples give the same answers
    rgb_digits, _ = digit_predictions(x[:50].repeat(1, 3, 1, 1))
    assert torch.equal(rgb_digits, digits[:50])


def test_digit_predictions_reject_tiny_images():
    with pytest.raises(ValueError, match="at least 8x8"):
        digit_predictions(torch.zeros(2, 1, 4, 4))


def test_regenerate_writes_both_asset_files_whole(tmp_path, monkeypatch):
    """``features.regenerate`` (run by hand to retrain the shipped classifier) replaces
    the weights and the recipe, each atomically, and the loader reads what it wrote."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net = feat.DigitsNet().eval()
    recipe = {"seed": 7, "test_accuracy": 0.5}
    monkeypatch.setattr(
        feat, "train_digits_net", lambda seed, progress: (net, dict(recipe, seed=seed))
    )
    monkeypatch.setattr(
        feat, "WEIGHTS_PATH", tmp_path / "assets" / "digits_net.safetensors"
    )
    monkeypatch.setattr(feat, "RECIPE_PATH", tmp_path / "assets" / "digits_net.json")
    (tmp_path / "assets").mkdir()
    feat.WEIGHTS_PATH.write_bytes(b"an older file")
    assert feat.regenerate(seed=7, progress=False) == recipe
    written = load_file(str(feat.WEIGHTS_PATH))
    assert all(
        torch.equal(written[name], value) for name, value in net.state_dict().items()
    )
    assert json.loads(feat.RECIPE_PATH.read_text()) == recipe
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == [
        "digits_net.json",
        "digits_net.safetensors",
    ]


def test_frechet_distance_computes_the_real_statistics_once(monkeypatch):
    # Full mode scores several models against the same real images: their features are
    # computed on the first call only, and the value is the one a fresh computation
    # gives.
    from torchmetrics.image.fid import FrechetInceptionDistance

    from baddiff_core import metrics

    monkeypatch.setattr(metrics, "_REAL_STATISTICS", {})
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(40, 1, 16, 16, generator=generator) * 2 - 1
    fakes = [torch.rand(30, 1, 16, 16, generator=generator) * 2 - 1 for _ in range(2)]
    seen = []
    update = FrechetInceptionDistance.update
    monkeypatch.setattr(
        FrechetInceptionDistance,
        "update",
        lambda self, imgs, real: (seen.append(bool(real)), update(self, imgs, real))[1],
    )
    first = [
        metrics.frechet_distance(real, fake, features="digits").value for fake in fakes
    ]
    assert seen.count(True) == 1 and seen.count(False) == 2
    metrics._REAL_STATISTICS.clear()  # a fresh computation of the second value
    assert metrics.frechet_distance(
        real, fakes[1], features="digits"
    ).value == pytest.approx(first[1], rel=1e-9)
    # other real images
    assert (
        metrics.frechet_distance(real[:39], fakes[0], features="digits").value
        != first[0]
    )
