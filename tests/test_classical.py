"""Tests for baddiff_core.classical (chapter 1, What is diffusion?).

Every check compares against an independent computation: a hand-derived
formula, scipy.linalg.expm, an explicit Kronecker-product Laplacian, the exact
Bessel solution, or scipy.ndimage. Thresholds come from measured values (noted
next to each) with headroom.
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from scipy import linalg, ndimage

from baddiff_core import classical as c

# --------------------------------------------------------------------------- #
# Fixtures and independent helpers.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def karate() -> np.ndarray:
    return c.graph_laplacian(nx.karate_club_graph(), weight=None)


def path_laplacian(n: int) -> np.ndarray:
    """1-d Neumann Laplacian (path graph) written out by hand."""
    lap = 2.0 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    lap[0, 0] = lap[-1, -1] = 1.0
    return lap


def grid_laplacian(height: int, width: int) -> np.ndarray:
    """Laplacian of the pixel grid graph (row-major pixels), as a Kronecker sum."""
    return np.kron(path_laplacian(height), np.eye(width)) + np.kron(
        np.eye(height), path_laplacian(width)
    )


def bessel_solution(image: np.ndarray, t: float, radius: int = 40) -> np.ndarray:
    """Exact continuous-time solution on the grid: separable Bessel convolution."""
    kernel = c.bessel_heat_kernel(t, radius)
    rows = ndimage.convolve1d(image, kernel, axis=0, mode="reflect")
    return ndimage.convolve1d(rows, kernel, axis=1, mode="reflect")


def make_image(height: int = 96, width: int = 128) -> np.ndarray:
    """Smooth waves plus a bright disk (sharp edges) plus a little noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    image = 0.5 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    image += 0.2 * ((xx - 60) ** 2 + (yy - 45) ** 2 < 25**2)
    return c.add_gaussian_noise(image, sigma=0.05, seed=1)


def noisy_step_edge(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    clean = np.full((64, 64), 0.2)
    clean[:, 32:] = 0.8
    return clean, c.add_gaussian_noise(clean, sigma=0.1, seed=seed)


def edge_jump(image: np.ndarray) -> float:
    """Mean difference of the two columns adjacent to the edge (0.6 when clean)."""
    return float(np.mean(image[:, 32] - image[:, 31]))


# --------------------------------------------------------------------------- #
# Graph Laplacian and exact heat kernel.
# --------------------------------------------------------------------------- #


def test_graph_laplacian_matches_hand_written_matrix() -> None:
    graph = nx.Graph()
    graph.add_nodes_from(["b", "a", "c", "d"])  # node order is not sorted on purpose
    graph.add_edge("a", "b", weight=2.0)
    graph.add_edge("b", "c", weight=0.5)
    graph.add_edge("a", "c")  # no weight: counts as 1
    expected = np.array(
        [  # rows/cols: b, a, c, d (d isolated)
            [2.5, -2.0, -0.5, 0.0],
            [-2.0, 3.0, -1.0, 0.0],
            [-0.5, -1.0, 1.5, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    lap = c.graph_laplacian(graph)
    assert lap.dtype == np.float64
    np.testing.assert_allclose(lap, expected, atol=1e-15)
    unweighted = c.graph_laplacian(graph, weight=None)
    np.testing.assert_allclose(unweighted[0], [2.0, -1.0, -1.0, 0.0], atol=1e-15)


def test_heat_kernel_two_nodes_matches_hand_solution() -> None:
    # One edge of weight w: L = w [[1, -1], [-1, 1]] has eigenvalues 0 and 2w,
    # so x(t) = mean + (x0 - mean) exp(-2 w t).
    w = 0.7
    graph = nx.Graph()
    graph.add_edge(0, 1, weight=w)
    lap = c.graph_laplacian(graph)
    x0 = np.array([3.0, -1.0])
    times = np.array([0.0, 0.1, 0.5, 1.0, 3.0])
    expected = x0.mean() + np.outer(np.exp(-2 * w * times), x0 - x0.mean())
    np.testing.assert_allclose(c.heat_kernel(lap, x0, times), expected, atol=1e-13)
    np.testing.assert_allclose(c.heat_kernel(lap, x0, 0.5), expected[2], atol=1e-13)
    np.testing.assert_allclose(c.laplacian_spectrum(lap), [0.0, 2 * w], atol=1e-13)
    assert c.algebraic_connectivity(lap) == pytest.approx(2 * w, rel=1e-12)


def test_heat_kernel_matches_expm_on_karate_club(karate: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(34)
    x0_multi = rng.standard_normal((34, 3))
    times = np.array([0.0, 0.05, 0.3, 1.0, 5.0])
    trajectory = c.heat_kernel(karate, x0, times)
    trajectory_multi = c.heat_kernel(karate, x0_multi, times)
    assert trajectory.shape == (5, 34)
    assert trajectory_multi.shape == (5, 34, 3)
    for k, t in enumerate(times):
        propagator = linalg.expm(-t * karate)
        np.testing.assert_allclose(trajectory[k], propagator @ x0, atol=1e-12)
        np.testing.assert_allclose(
            trajectory_multi[k], propagator @ x0_multi, atol=1e-12
        )
        np.testing.assert_allclose(
            c.heat_kernel(karate, x0, float(t)), propagator @ x0, atol=1e-12
        )


def test_spectrum_matches_networkx(karate: np.ndarray) -> None:
    expected = np.sort(nx.laplacian_spectrum(nx.karate_club_graph(), weight=None))
    np.testing.assert_allclose(c.laplacian_spectrum(karate), expected, atol=1e-10)
    assert c.algebraic_connectivity(karate) == pytest.approx(
        nx.algebraic_connectivity(
            nx.karate_club_graph(), weight=None, method="lanczos"
        ),
        rel=1e-6,
    )


# --------------------------------------------------------------------------- #
# Explicit Euler and consensus.
# --------------------------------------------------------------------------- #


def test_heat_diffusion_is_first_order(karate: np.ndarray) -> None:
    x0 = np.random.default_rng(1).standard_normal(34)
    final_time = 1.0
    exact = linalg.expm(-final_time * karate) @ x0
    errors = []
    # lambda_max = 18.1, all below 2 / lambda_max = 0.110
    for tau in (
        0.02,
        0.01,
        0.005,
    ):
        trajectory = c.heat_diffusion(
            karate, x0, tau=tau, steps=round(final_time / tau)
        )
        assert trajectory.shape == (round(final_time / tau) + 1, 34)
        np.testing.assert_array_equal(trajectory[0], x0)
        errors.append(np.linalg.norm(trajectory[-1] - exact))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    # Measured: 2.0028, 2.0014.
    assert np.all((1.7 < ratios) & (ratios < 2.3)), ratios


def test_heat_diffusion_single_step_by_hand() -> None:
    lap = path_laplacian(3)
    x0 = np.array([1.0, 0.0, 0.0])
    trajectory = c.heat_diffusion(lap, x0, tau=0.25, steps=1)
    # x1 = x0 - tau L x0 with L x0 = [1, -1, 0].
    np.testing.assert_allclose(trajectory[1], [0.75, 0.25, 0.0], atol=1e-15)
    assert c.heat_diffusion(lap, x0, tau=0.25, steps=0).shape == (1, 3)


def test_heat_diffusion_and_consensus_conserve_the_sum(karate: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((34, 2))
    heat = c.heat_diffusion(karate, x0, tau=0.1, steps=300)
    agents = c.consensus(karate, x0, steps=300)
    for trajectory in (heat, agents):
        drift = trajectory.mean(axis=1) - x0.mean(axis=0)  # (301, 2)
        assert np.max(np.abs(drift)) < 1e-12


def test_consensus_reaches_mean_on_random_geometric_graph() -> None:
    graph = nx.random_geometric_graph(40, radius=0.35, seed=3)
    assert nx.is_connected(graph)
    lap = c.graph_laplacian(graph, weight=None)
    # robots in the unit square
    positions = np.random.default_rng(4).uniform(size=(40, 2))
    # Convergence factor per step is 1 - step lambda_2; choose enough steps for 1e-9.
    rate = c.consensus_rate(lap, c.consensus_step(lap))
    steps = math.ceil(math.log(1e-11) / math.log(rate))
    trajectory = c.consensus(lap, positions, steps=steps)
    assert trajectory.shape == (steps + 1, 40, 2)
    np.testing.assert_allclose(
        trajectory[-1], np.broadcast_to(positions.mean(axis=0), (40, 2)), atol=1e-9
    )


def test_consensus_step_is_inverse_twice_max_degree(karate: np.ndarray) -> None:
    max_degree = max(d for _, d in nx.karate_club_graph().degree())
    assert c.consensus_step(karate) == pytest.approx(1 / (2 * max_degree), rel=1e-15)
    # Gershgorin guarantee: every factor 1 - step lambda_i is in [0, 1].
    factors = 1 - c.consensus_step(karate) * np.linalg.eigvalsh(karate)
    assert np.all((factors >= 0) & (factors <= 1 + 1e-12))


def test_measured_disagreement_decay_matches_consensus_rate(karate: np.ndarray) -> None:
    x0 = np.random.default_rng(5).standard_normal((34, 2))
    step = c.consensus_step(karate)
    trajectory = c.consensus(karate, x0, steps=1500)
    spread = c.disagreement(trajectory)
    # Independent disagreement: distance to the mean of the initial positions.
    np.testing.assert_allclose(
        spread,
        np.linalg.norm((trajectory - x0.mean(axis=0)).reshape(1501, -1), axis=1),
        atol=1e-12,
    )
    # Fit log(spread) on the late part, when only the lambda_2 mode is left
    # (the lambda_3 mode is then weaker by (0.973 / 0.986)^800 ~ 1e-5).
    late = np.arange(800, 1501)
    measured_rate = math.exp(np.polyfit(late, np.log(spread[late]), 1)[0])
    lambda_2 = np.linalg.eigvalsh(karate)[1]
    predicted = c.consensus_rate(karate, step)
    assert predicted == pytest.approx(1 - step * lambda_2, rel=1e-12)
    # Measured relative difference: 1.7e-11.
    assert measured_rate == pytest.approx(predicted, rel=1e-3)


def test_consensus_rate_large_step_is_dominated_by_lambda_max(
    karate: np.ndarray,
) -> None:
    # With step = 1.99 / lambda_max the fastest mode flips sign every step with
    # factor |1 - 1.99| = 0.99, slower than the lambda_2 mode (1 - 0.051 = 0.949).
    lam = np.linalg.eigvalsh(karate)
    step = 1.99 / lam[-1]
    assert c.consensus_rate(karate, step) == pytest.approx(0.99, rel=1e-12)
    x0 = np.random.default_rng(10).standard_normal(34)
    spread = c.disagreement(c.consensus(karate, x0, steps=1500, step=step))
    late = np.arange(800, 1501)
    measured_rate = math.exp(np.polyfit(late, np.log(spread[late]), 1)[0])
    assert measured_rate == pytest.approx(0.99, rel=1e-3)


def test_disconnected_graph_does_not_reach_global_mean() -> None:
    graph = nx.disjoint_union(nx.cycle_graph(6), nx.path_graph(5))
    lap = c.graph_laplacian(graph)
    assert abs(c.algebraic_connectivity(lap)) < 1e-10
    assert c.consensus_rate(lap, c.consensus_step(lap)) == pytest.approx(1.0, abs=1e-10)
    x0 = np.arange(11, dtype=float)
    final = c.consensus(lap, x0, steps=3000)[-1]
    # Each component agrees on its own mean, which differs from the global mean.
    np.testing.assert_allclose(final[:6], x0[:6].mean(), atol=1e-8)
    np.testing.assert_allclose(final[6:], x0[6:].mean(), atol=1e-8)
    assert np.max(np.abs(final - x0.mean())) > 2.0


# --------------------------------------------------------------------------- #
# Heat equation on images.
# --------------------------------------------------------------------------- #


def test_heat_equation_equals_graph_heat_diffusion_on_pixel_grid() -> None:
    image = np.random.default_rng(6).uniform(size=(7, 9))
    lap = grid_laplacian(7, 9)
    graph_result = c.heat_diffusion(lap, image.ravel(), tau=0.2, steps=5)[-1]
    result = c.heat_equation(image, t=1.0, dt=0.2)
    np.testing.assert_allclose(result, graph_result.reshape(7, 9), atol=1e-13)


def test_bessel_reflect_convolution_is_exact_neumann_solution() -> None:
    # Check the claim that mode="reflect" (half-sample symmetric) matches the
    # zero-flux boundary, border included: compare with expm of the grid Laplacian.
    image = np.random.default_rng(7).uniform(size=(10, 12))
    lap = grid_laplacian(10, 12)
    for t in (0.3, 2.0):
        exact = (linalg.expm(-t * lap) @ image.ravel()).reshape(10, 12)
        np.testing.assert_allclose(
            bessel_solution(image, t, radius=40), exact, atol=1e-12
        )


def test_bessel_kernel_moments() -> None:
    t = 3.0
    kernel = c.bessel_heat_kernel(t, 40)
    k = np.arange(-40, 41)
    assert kernel.shape == (81,)
    assert kernel.sum() == pytest.approx(1.0, abs=1e-14)
    # variance = sigma^2 = 2t
    assert np.sum(k**2 * kernel) == pytest.approx(2 * t, rel=1e-12)
    np.testing.assert_array_equal(c.bessel_heat_kernel(0.0, 2), [0, 0, 1, 0, 0])


def test_heat_equation_converges_first_order_to_bessel_solution() -> None:
    image = make_image()
    t = 4.0
    exact = bessel_solution(image, t)
    errors = [
        np.linalg.norm(c.heat_equation(image, t=t, dt=dt) - exact)
        for dt in (0.2, 0.1, 0.05)
    ]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    # Measured: 1.9992, 1.9996.
    assert np.all((1.7 < ratios) & (ratios < 2.3)), ratios


def test_heat_equation_is_close_to_gaussian_blur() -> None:
    image = make_image()
    t = 4.0
    sigma = c.gaussian_blur_equivalent_sigma(t)
    assert sigma == pytest.approx(math.sqrt(8.0), rel=1e-15)
    gaussian = ndimage.gaussian_filter(image, sigma=sigma, mode="reflect")

    def relative(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - gaussian) / np.linalg.norm(gaussian))

    # Not zero: the exact grid kernel exp(-2t) I_k(2t) has variance 2t like
    # the Gaussian but is not Gaussian (its 4th cumulant is 2t, not 0), and
    # scipy samples and truncates the Gaussian. Measured at t=4:
    # Bessel vs Gaussian 2.9e-4, heat_equation(dt=0.2) vs Gaussian 1.7e-4,
    # while the blur itself changes the image by 9.7e-2.
    assert relative(bessel_solution(image, t)) < 1e-3
    assert relative(c.heat_equation(image, t=t)) < 1e-3
    assert relative(image) > 5e-2  # the comparison is not trivially small


def test_heat_equation_time_zero_and_exact_final_time() -> None:
    image = make_image(16, 20)
    result = c.heat_equation(image, t=0.0)
    np.testing.assert_array_equal(result, image)
    assert result is not image
    # t = 0.3 with dt = 0.2: two steps of 0.15 each, not one 0.2 step + one 0.1 step.
    lap = grid_laplacian(16, 20)
    by_hand = image.ravel()
    for _ in range(2):
        by_hand = by_hand - 0.15 * (lap @ by_hand)
    result = c.heat_equation(image, t=0.3, dt=0.2)
    np.testing.assert_allclose(result, by_hand.reshape(16, 20), atol=1e-13)


# --------------------------------------------------------------------------- #
# Perona-Malik.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("conductance", ["exp", "rational"])
def test_perona_malik_constant_image_is_fixed_point(conductance: str) -> None:
    image = np.full((12, 15), 0.37)
    np.testing.assert_array_equal(
        c.perona_malik(image, steps=20, kappa=0.1, conductance=conductance), image
    )


@pytest.mark.parametrize("conductance", ["exp", "rational"])
def test_perona_malik_conserves_mean(conductance: str) -> None:
    image = make_image(48, 64)
    result = c.perona_malik(image, steps=100, kappa=0.05, conductance=conductance)
    assert abs(result.mean() - image.mean()) < 1e-10
    assert not np.allclose(result, image)


@pytest.mark.parametrize("conductance", ["exp", "rational"])
def test_perona_malik_with_huge_kappa_is_heat_equation(conductance: str) -> None:
    image = make_image(48, 64)
    steps, dt = 30, 0.2
    result = c.perona_malik(
        image, steps=steps, kappa=1e8, dt=dt, conductance=conductance
    )
    np.testing.assert_allclose(
        result, c.heat_equation(image, t=steps * dt, dt=dt), atol=1e-12
    )


def test_perona_malik_matches_hand_step_with_conductance() -> None:
    image = np.array([[0.0, 1.0], [0.0, 0.0]])
    kappa, dt = 0.5, 0.1
    g = math.exp(-((1.0 / kappa) ** 2))
    # Pixel (0, 1) differs by -1 from its two neighbours; each face conducts g.
    expected = np.array([[dt * g, 1 - 2 * dt * g], [0.0, dt * g]])
    result = c.perona_malik(image, steps=1, kappa=kappa, dt=dt)
    np.testing.assert_allclose(result, expected, atol=1e-15)


def test_perona_malik_denoises_and_keeps_edge() -> None:
    clean, noisy = noisy_step_edge(seed=0)
    steps, dt = 50, 0.2
    denoised = c.perona_malik(noisy, steps=steps, kappa=0.15, dt=dt)
    blurred = c.heat_equation(noisy, t=steps * dt)  # same smoothing time
    heat_psnrs = {
        t: c.psnr(c.heat_equation(noisy, t=t), clean)
        for t in (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    }
    best_t = max(heat_psnrs, key=heat_psnrs.get)
    best_blur = c.heat_equation(noisy, t=best_t)

    # Measured: noisy 20.0 dB, Perona-Malik 40.9 dB, best heat blur 27.3 dB (t=0.5).
    assert c.psnr(denoised, clean) > c.psnr(noisy, clean) + 10
    assert c.psnr(denoised, clean) > max(heat_psnrs.values()) + 5
    # Measured jumps (clean: 0.6): Perona-Malik 0.596, heat t=10: 0.053,
    # best-PSNR heat blur (t=0.5): 0.243.
    assert abs(edge_jump(denoised) - 0.6) < 0.03
    assert abs(edge_jump(blurred) - 0.6) > 0.4
    assert abs(edge_jump(best_blur) - 0.6) > 0.2


# --------------------------------------------------------------------------- #
# Image utilities.
# --------------------------------------------------------------------------- #


def test_psnr_matches_hand_computation() -> None:
    rng = np.random.default_rng(8)
    reference = rng.uniform(size=(20, 30))
    image = reference + 0.05 * rng.standard_normal((20, 30))
    mse = np.mean((image - reference) ** 2)
    assert c.psnr(image, reference) == pytest.approx(10 * np.log10(1 / mse), rel=1e-12)
    assert c.psnr(255 * image, 255 * reference, data_range=255.0) == pytest.approx(
        10 * np.log10(1 / mse), rel=1e-12
    )
    assert c.psnr(reference, reference.copy()) == math.inf


def test_add_gaussian_noise_statistics_and_seed() -> None:
    image = np.full((256, 256), 0.5)
    noisy = c.add_gaussian_noise(image, sigma=0.1, seed=9)
    np.testing.assert_array_equal(noisy, c.add_gaussian_noise(image, sigma=0.1, seed=9))
    assert not np.array_equal(noisy, c.add_gaussian_noise(image, sigma=0.1, seed=10))
    np.testing.assert_array_equal(image, 0.5)  # input untouched
    # 65536 samples: std of the std estimate ~ 0.1 / sqrt(2 * 65536) = 2.8e-4.
    assert np.std(noisy - image) == pytest.approx(0.1, abs=2e-3)
    assert abs(np.mean(noisy - image)) < 2e-3


def test_gradient_magnitude_of_linear_ramp() -> None:
    yy, xx = np.mgrid[0:10, 0:14].astype(float)
    ramp = 0.3 * xx - 0.4 * yy  # |grad| = 0.5 everywhere, border included
    np.testing.assert_allclose(c.gradient_magnitude(ramp), 0.5, atol=1e-14)


def test_sharpen_steepens_a_blurred_edge() -> None:
    edge = np.zeros((32, 32))
    edge[:, 16:] = 1.0
    blurred = ndimage.gaussian_filter(edge, sigma=2.0, mode="nearest")
    sharpened = c.sharpen(blurred, amount=1.5, sigma=2.0)
    # Independent gradient: forward difference across the edge in the middle row.
    slope_before = np.max(np.diff(blurred[16]))
    slope_after = np.max(np.diff(sharpened[16]))
    assert slope_after > 1.3 * slope_before  # measured: 0.199 -> 0.287
    assert c.gradient_magnitude(sharpened).max() > c.gradient_magnitude(blurred).max()
    constant = c.sharpen(np.full((8, 8), 0.4), amount=2.0, sigma=1.0)
    np.testing.assert_allclose(constant, 0.4, atol=1e-15)


# --------------------------------------------------------------------------- #
# Bad inputs.
# --------------------------------------------------------------------------- #


def test_heat_diffusion_rejects_unstable_tau(karate: np.ndarray) -> None:
    # Independent bound: lambda_max = 18.137 for the karate club, 2 / 18.137 = 0.1103.
    assert 2 / np.linalg.eigvalsh(karate)[-1] == pytest.approx(0.1103, abs=5e-5)
    with pytest.raises(ValueError, match=r"2 / lambda_max = 0\.1103.*tau=0\.5"):
        c.heat_diffusion(karate, np.zeros(34), tau=0.5, steps=3)
    with pytest.raises(ValueError, match=r"tau=-0\.1"):
        c.heat_diffusion(karate, np.zeros(34), tau=-0.1, steps=3)


def test_bad_steps_raise(karate: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"steps=-1"):
        c.heat_diffusion(karate, np.zeros(34), tau=0.01, steps=-1)
    with pytest.raises(ValueError, match=r"steps=-2"):
        c.perona_malik(np.zeros((4, 4)), steps=-2, kappa=0.1)
    with pytest.raises(TypeError, match=r"steps=2\.5"):
        c.consensus(karate, np.zeros(34), steps=2.5)


def test_non_square_or_mismatched_laplacian_raises() -> None:
    with pytest.raises(ValueError, match=r"square.*\(3, 4\)"):
        c.heat_diffusion(np.zeros((3, 4)), np.zeros(3), tau=0.1, steps=1)
    with pytest.raises(ValueError, match=r"symmetric"):
        c.heat_kernel(np.array([[1.0, -1.0], [0.0, 0.0]]), np.zeros(2), 1.0)
    with pytest.raises(ValueError, match=r"x0.shape=\(4,\)"):
        c.heat_kernel(path_laplacian(3), np.zeros(4), 1.0)
    with pytest.raises(ValueError, match=r"t must be finite and >= 0"):
        c.heat_kernel(path_laplacian(3), np.zeros(3), -1.0)


def test_image_argument_errors() -> None:
    image = np.zeros((8, 8))
    allowed = r"conductance='gauss' is not known; use one of 'exp', 'rational'"
    with pytest.raises(ValueError, match=allowed):
        c.perona_malik(image, steps=1, kappa=0.1, conductance="gauss")
    with pytest.raises(
        ValueError, match=r"dt must be a real number in \(0, 0\.25\].*dt=0\.3"
    ):
        c.heat_equation(image, t=1.0, dt=0.3)
    with pytest.raises(ValueError, match=r"dt=0\.26"):
        c.perona_malik(image, steps=1, kappa=0.1, dt=0.26)
    with pytest.raises(ValueError, match=r"kappa=0\.0"):
        c.perona_malik(image, steps=1, kappa=0.0)
    with pytest.raises(ValueError, match=r"t=-1\.0"):
        c.heat_equation(image, t=-1.0)
    with pytest.raises(ValueError, match=r"image.shape=\(8,\)"):
        c.heat_equation(np.zeros(8), t=1.0)
    with pytest.raises(
        ValueError, match=r"image.shape=\(8, 8\) and reference.shape=\(8, 9\)"
    ):
        c.psnr(image, np.zeros((8, 9)))
    with pytest.raises(TypeError, match=r"directed|networkx"):
        c.graph_laplacian(np.eye(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"undirected"):
        c.graph_laplacian(nx.DiGraph([(0, 1)]))
