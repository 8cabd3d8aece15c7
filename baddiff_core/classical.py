"""Classical diffusion: values on graph nodes or image pixels flowing toward their
neighbours.

Introduced in chapter 1 (What is diffusion?).

Before diffusion *models* there was diffusion: heat spreading through a metal
plate, opinions averaging over a social network, robots agreeing on a meeting
point, blurring of an image. All of them are the same linear equation

    dx/dt = -L x,

where ``L`` is a Laplacian: the graph Laplacian ``L = D - W`` for values on the
nodes of a graph, or minus the 5-point stencil for the pixels of an image. This
module implements the equation three ways, from the most literal to the most
exact:

* explicit Euler steps ``x_{k+1} = x_k - tau L x_k`` (:func:`heat_diffusion`,
  :func:`consensus`, :func:`heat_equation`);
* the exact solution ``x(t) = expm(-t L) x0`` via the eigenvectors of ``L``
  (:func:`heat_kernel`, :func:`bessel_heat_kernel`);
* a nonlinear variant that stops at edges (:func:`perona_malik`).

Everything is NumPy / SciPy; arrays are float64. Images are 2-d float arrays
of shape ``(height, width)`` holding one grey channel, typically in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import networkx as nx
import numpy as np
import scipy.sparse
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage, special

from baddiff_core.checks import check_choice, check_float, check_int, check_type

__all__ = [
    "graph_laplacian",
    "heat_diffusion",
    "heat_kernel",
    "laplacian_spectrum",
    "algebraic_connectivity",
    "consensus_step",
    "consensus",
    "consensus_rate",
    "disagreement",
    "heat_equation",
    "gaussian_blur_equivalent_sigma",
    "bessel_heat_kernel",
    "perona_malik",
    "gradient_magnitude",
    "psnr",
    "add_gaussian_noise",
    "sharpen",
]

FloatArray = NDArray[np.float64]
Conductance = Literal["exp", "rational"]

# Explicit Euler on the 5-point stencil is stable iff dt * lambda_max <= 2, and
# the grid Laplacian has lambda_max < 8 (4 per axis), hence dt <= 1/4.
MAX_IMAGE_DT = 0.25


# --------------------------------------------------------------------------- #
# Input validation (numbers: baddiff_core.checks; arrays: here).
# --------------------------------------------------------------------------- #


def _image_dt(dt: object) -> float:
    return check_float(
        "dt",
        dt,
        above=0,
        at_most=MAX_IMAGE_DT,
        meaning="a stable explicit step on the 5-point stencil",
    )


def _as_laplacian(laplacian: ArrayLike) -> FloatArray:
    """Return a dense, finite, square, symmetric float64 matrix."""
    if scipy.sparse.issparse(laplacian):
        laplacian = laplacian.toarray()
    matrix = np.asarray(laplacian, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(
            f"laplacian must be a square (n, n) matrix, got laplacian.shape={matrix.shape}"
        )
    if matrix.shape[0] == 0:
        raise ValueError(
            "laplacian must have at least one node, got laplacian.shape=(0, 0)"
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("laplacian must contain only finite values, got NaN or inf")
    asymmetry = float(np.max(np.abs(matrix - matrix.T)))
    if asymmetry > 1e-10 * max(1.0, float(np.max(np.abs(matrix)))):
        raise ValueError(
            "laplacian must be symmetric (the graph must be undirected), "
            f"got max |L - L.T| = {asymmetry:.3g}"
        )
    return matrix


def _as_signal(x0: ArrayLike, n: int) -> FloatArray:
    """Return node values of shape (n,) or (n, d) as float64."""
    signal = np.asarray(x0, dtype=np.float64)
    if signal.ndim not in (1, 2) or signal.shape[0] != n:
        raise ValueError(
            f"x0 must have shape (n,) or (n, d) with n = {n} to match the laplacian, "
            f"got x0.shape={signal.shape}"
        )
    if not np.all(np.isfinite(signal)):
        raise ValueError("x0 must contain only finite values, got NaN or inf")
    return signal


def _as_image(name: str, image: ArrayLike) -> FloatArray:
    """Return a finite 2-d float64 copy-free view of ``image``."""
    array = np.asarray(image)
    if not (
        np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(
            f"{name} must be a real-valued array, got {name}.dtype={array.dtype}"
        )
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(
            f"{name} must be a non-empty 2-d (height, width) grey image, "
            f"got {name}.shape={array.shape}"
        )
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must contain only finite values, got NaN or inf")
    return array


# --------------------------------------------------------------------------- #
# Diffusion on graphs.
# --------------------------------------------------------------------------- #


def graph_laplacian(graph: nx.Graph, weight: str | None = "weight") -> FloatArray:
    """Combinatorial graph Laplacian ``L = D - W`` as a dense matrix.

    ``W[i, j]`` is the weight of edge ``(i, j)`` (edges without the ``weight``
    attribute count as 1; ``weight=None`` makes every edge 1) and ``D`` is the
    diagonal matrix of weighted degrees ``D[i, i] = sum_j W[i, j]``. Then

        (L x)_i = sum_j W[i, j] (x_i - x_j),

    so ``-L x`` pulls every node toward its neighbours. ``L`` is symmetric,
    positive semi-definite, and its rows sum to zero.

    Args:
        graph: an undirected networkx graph with n nodes.
        weight: name of the edge attribute holding the weight, or None.

    Returns:
        float64 array of shape (n, n), rows and columns in the order of
        ``list(graph.nodes)``.
    """
    check_type("graph", graph, nx.Graph, what="a networkx.Graph")
    if graph.is_directed():
        raise ValueError(
            f"graph must be undirected, got a directed {type(graph).__name__}; "
            "use graph.to_undirected()"
        )
    if graph.number_of_nodes() == 0:
        raise ValueError("graph must have at least one node, got an empty graph")
    sparse = nx.laplacian_matrix(graph, nodelist=list(graph.nodes), weight=weight)
    return sparse.toarray().astype(np.float64)


def laplacian_spectrum(laplacian: ArrayLike) -> FloatArray:
    """Eigenvalues ``0 = lambda_1 <= lambda_2 <= ... <= lambda_n`` of a Laplacian.

    Each eigenvalue is a decay rate: the eigenvector component of ``x`` along
    mode ``i`` decays like ``exp(-lambda_i t)`` under ``dx/dt = -L x``.

    Returns:
        float64 array of shape (n,), ascending.
    """
    return np.linalg.eigvalsh(_as_laplacian(laplacian))


def algebraic_connectivity(laplacian: ArrayLike) -> float:
    """Second-smallest Laplacian eigenvalue ``lambda_2`` (the Fiedler value).

    ``lambda_2 > 0`` iff the graph is connected (the multiplicity of 0 is the
    number of connected components). It is the slowest decay rate of any
    disagreement between nodes, so it sets how fast diffusion mixes.
    """
    spectrum = laplacian_spectrum(laplacian)
    if spectrum.size < 2:
        raise ValueError(
            f"algebraic_connectivity needs at least 2 nodes, got n={spectrum.size}"
        )
    return float(spectrum[1])


def heat_diffusion(
    laplacian: ArrayLike, x0: ArrayLike, *, tau: float, steps: int
) -> FloatArray:
    """Explicit Euler for ``dx/dt = -L x``: ``x_{k+1} = x_k - tau L x_k``.

    Each step moves every node a fraction of the way toward its neighbours.
    ``x_k`` approximates the exact solution ``expm(-k tau L) x0`` with an error
    of order ``tau`` (first order). The step multiplies mode ``i`` by
    ``1 - tau lambda_i``, so it is stable iff ``tau lambda_max <= 2``. When the
    rows of ``L`` sum to zero, ``sum_i x_i`` is conserved exactly.

    Args:
        laplacian: symmetric (n, n) Laplacian.
        x0: initial values, shape (n,) or (n, d) (d independent channels,
            e.g. 2-d positions).
        tau: time step, ``0 < tau <= 2 / lambda_max``.
        steps: number of Euler steps, ``>= 0``.

    Returns:
        trajectory of shape ``(steps + 1, *x0.shape)``, ``trajectory[0] == x0``
        and ``trajectory[k]`` the state at time ``k * tau``.
    """
    matrix = _as_laplacian(laplacian)
    state = _as_signal(x0, matrix.shape[0])
    tau = check_float("tau", tau, above=0)
    steps = check_int("steps", steps, minimum=0)

    lambda_max = float(np.linalg.eigvalsh(matrix)[-1])
    # Tiny relative slack so that tau = 2 / lambda_max itself is accepted.
    if tau * lambda_max > 2.0 * (1.0 + 1e-12):
        raise ValueError(
            f"tau must be > 0 and at most 2 / lambda_max = {2.0 / lambda_max:.4g} "
            f"for a stable explicit step, got tau={tau!r}"
        )

    trajectory = np.empty((steps + 1, *state.shape))
    trajectory[0] = state
    for k in range(steps):
        trajectory[k + 1] = trajectory[k] - tau * (matrix @ trajectory[k])
    return trajectory


def heat_kernel(
    laplacian: ArrayLike, x0: ArrayLike, t: float | ArrayLike
) -> FloatArray:
    """Exact solution ``x(t) = expm(-t L) x0`` of ``dx/dt = -L x``.

    With the eigendecomposition ``L = V diag(lambda) V^T`` (V orthonormal),

        x(t) = V diag(exp(-lambda t)) V^T x0,

    i.e. project ``x0`` on the eigenvectors, damp mode ``i`` by
    ``exp(-lambda_i t)``, and recombine. Mode 1 (the constant vector on a
    connected graph, ``lambda_1 = 0``) never decays: that is the conserved mean.

    Args:
        laplacian: symmetric (n, n) Laplacian.
        x0: initial values, shape (n,) or (n, d).
        t: a time ``>= 0`` or a 1-d array of times.

    Returns:
        shape x0.shape for scalar ``t``; ``(len(t), *x0.shape)`` for an array.
    """
    matrix = _as_laplacian(laplacian)
    signal = _as_signal(x0, matrix.shape[0])
    scalar = np.ndim(t) == 0
    times = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if times.ndim != 1:
        raise ValueError(
            f"t must be a float or a 1-d array of times, got t.shape={times.shape}"
        )
    if not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ValueError(f"t must be finite and >= 0, got t={t!r}")

    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    coefficients = eigenvectors.T @ signal.reshape(signal.shape[0], -1)  # (n, d)
    decay = np.exp(-np.multiply.outer(times, eigenvalues))  # (T, n)
    states = eigenvectors @ (decay[:, :, None] * coefficients)  # (T, n, d)
    states = states.reshape(times.size, *signal.shape)
    return states[0] if scalar else states


# --------------------------------------------------------------------------- #
# Consensus: heat diffusion read as agents averaging with their neighbours.
# --------------------------------------------------------------------------- #


def consensus_step(laplacian: ArrayLike) -> float:
    """Safe, locally computable consensus step ``1 / (2 max_i d_i)``.

    ``d_i = L[i, i]`` is the (weighted) degree. By Gershgorin,
    ``lambda_max <= 2 max_i d_i``, so with this step every factor
    ``1 - step lambda_i`` lies in ``[0, 1]``: no mode oscillates or grows. An
    agent only needs (a bound on) the largest degree, not the spectrum.
    """
    matrix = _as_laplacian(laplacian)
    max_degree = float(np.max(np.diag(matrix)))
    if max_degree <= 0:
        raise ValueError(
            f"laplacian must have at least one edge (max degree > 0), got max degree={max_degree!r}"
        )
    return 1.0 / (2.0 * max_degree)


def consensus(
    laplacian: ArrayLike, x0: ArrayLike, *, steps: int, step: float | None = None
) -> FloatArray:
    """Agents repeatedly move toward their neighbours: ``x_{k+1} = x_k - step L x_k``.

    Agent ``i`` only uses its neighbours' values:
    ``x_i <- x_i + step sum_j W[i, j] (x_j - x_i)``. This is exactly
    :func:`heat_diffusion`; on a connected graph every agent converges to the
    average of ``x0``, which is conserved at every step.

    Args:
        laplacian: symmetric (n, n) Laplacian of the communication graph.
        x0: initial values, shape (n,) or (n, d) (e.g. 2-d robot positions).
        steps: number of rounds, ``>= 0``.
        step: step size; default :func:`consensus_step` ``(laplacian)``.

    Returns:
        trajectory of shape ``(steps + 1, *x0.shape)``.
    """
    if step is None:
        step = consensus_step(laplacian)
    return heat_diffusion(laplacian, x0, tau=step, steps=steps)


def consensus_rate(laplacian: ArrayLike, step: float) -> float:
    """Predicted per-step contraction of the disagreement, ``max_{i>=2} |1 - step lambda_i|``.

    Write ``x_k - mean = sum_{i>=2} c_i (1 - step lambda_i)^k v_i``; the slowest
    factor wins, so ``||x_k - mean|| ~ C rate^k`` for large ``k``. With
    ``step = consensus_step(L)`` all factors lie in ``[0, 1)`` and
    ``rate = 1 - step lambda_2``. A rate of 1 means no convergence
    (disconnected graph, ``lambda_2 = 0``).
    """
    step = check_float("step", step, above=0)
    spectrum = laplacian_spectrum(laplacian)
    if spectrum.size < 2:
        raise ValueError(
            f"consensus_rate needs at least 2 nodes, got n={spectrum.size}"
        )
    return float(np.max(np.abs(1.0 - step * spectrum[1:])))


def disagreement(trajectory: ArrayLike) -> FloatArray:
    """Distance of each state from the agents' average: ``||x_k - mean_i x_k[i]||_2``.

    The average over agents is conserved when ``L`` has zero row sums, so this
    is the distance to the consensus value.

    Args:
        trajectory: shape (steps + 1, n) or (steps + 1, n, d).

    Returns:
        float64 array of shape (steps + 1,).
    """
    states = np.asarray(trajectory, dtype=np.float64)
    if states.ndim not in (2, 3):
        raise ValueError(
            "trajectory must have shape (steps + 1, n) or (steps + 1, n, d), "
            f"got trajectory.shape={states.shape}"
        )
    deviation = states - states.mean(axis=1, keepdims=True)
    return np.sqrt(np.sum(deviation.reshape(states.shape[0], -1) ** 2, axis=1))


# --------------------------------------------------------------------------- #
# Diffusion on images: the pixel grid is a graph too.
# --------------------------------------------------------------------------- #


def _flux_divergence(
    image: FloatArray, conductance: Callable[[FloatArray], FloatArray] | None = None
) -> FloatArray:
    """``sum over the 4 neighbours of g(|d|) d``, ``d`` the difference to the neighbour.

    Computed as the divergence of the fluxes across the pixel faces: every face
    carries ``g(|d|) d`` from one pixel to the other, so what one pixel loses
    the other gains and the total is conserved. Faces outside the image carry
    no flux (Neumann / reflecting boundary). ``conductance=None`` means
    ``g = 1``: the 5-point Laplacian.
    """
    result = np.zeros_like(image)
    for axis in (0, 1):
        difference = np.diff(image, axis=axis)  # u[k+1] - u[k] across each inner face
        flux = (
            difference
            if conductance is None
            else conductance(np.abs(difference)) * difference
        )
        # Zero flux through the two outer faces, then flux in minus flux out.
        padding = [(0, 0), (0, 0)]
        padding[axis] = (1, 1)
        result += np.diff(np.pad(flux, padding), axis=axis)
    return result


def heat_equation(image: ArrayLike, *, t: float, dt: float = 0.2) -> FloatArray:
    """Blur an image by running the heat equation ``du/dt = Laplacian(u)`` up to time
    ``t``.

    Explicit Euler with the 5-point stencil (unit pixel spacing)

        Laplacian(u)[i, j] = u[i+1, j] + u[i-1, j] + u[i, j+1] + u[i, j-1] - 4 u[i, j]

    and reflecting (Neumann, zero-flux) boundaries, so the mean intensity is
    conserved. This is :func:`heat_diffusion` on the grid graph of the pixels.
    ``n = ceil(t / dt)`` steps of size ``t / n`` are taken, so the final time
    is exactly ``t`` (time is in pixel^2 units).

    For ``t`` not too small the result is a Gaussian blur with
    ``sigma = sqrt(2 t)`` pixels (the heat kernel of the continuous
    equation, see :func:`gaussian_blur_equivalent_sigma`). Exactly, on the
    pixel grid the continuous-time solution is convolution with the separable
    kernel ``exp(-2t) I_k(2t)`` along each axis (:func:`bessel_heat_kernel`);
    the Euler steps match it up to an error of order ``dt``.

    Args:
        image: (height, width) float image (one grey channel, e.g. in [0, 1]).
        t: diffusion time, ``>= 0``; ``t = 0`` returns a copy.
        dt: largest step, ``0 < dt <= 0.25`` (stability limit of the stencil).

    Returns:
        float64 array of the image's shape.
    """
    u = _as_image("image", image).copy()
    t = check_float("t", t, at_least=0)
    dt = _image_dt(dt)
    # The small slack keeps e.g. t=1, dt=0.1 at 10 steps despite rounding.
    n_steps = math.ceil(t / dt - 1e-9)
    if n_steps <= 0:
        return u
    step = t / n_steps
    for _ in range(n_steps):
        u += step * _flux_divergence(u)
    return u


def gaussian_blur_equivalent_sigma(t: float) -> float:
    """Standard deviation (pixels) of the Gaussian blur made by heat diffusion up to
    time ``t``.

    The heat equation ``du/dt = Laplacian(u)`` in 2-d has kernel
    ``exp(-|x|^2 / (4 t)) / (4 pi t)``, a Gaussian with variance ``2 t`` per
    axis, so ``sigma = sqrt(2 t)``.
    """
    return math.sqrt(2.0 * check_float("t", t, at_least=0))


def bessel_heat_kernel(t: float, radius: int) -> FloatArray:
    """Exact 1-d heat kernel on the integer grid, ``exp(-2t) I_k(2t)`` for ``k =
    -radius..radius``.

    ``du/dt = u[k+1] - 2 u[k] + u[k-1]`` on the infinite grid is solved by
    convolution with ``exp(-2t) I_k(2t)`` (``I_k``: modified Bessel function
    of the first kind). The weights are positive, sum to 1 over all ``k`` and
    have variance ``2t``; for large ``t`` they approach the Gaussian of
    :func:`gaussian_blur_equivalent_sigma`. The 2-d kernel is the outer
    product of two 1-d kernels. Truncating at ``radius`` drops the tails, so
    choose ``radius`` a few times ``sqrt(2 t)``.

    Returns:
        float64 array of shape (2 * radius + 1,), centre at index ``radius``.
    """
    t = check_float("t", t, at_least=0)
    radius = check_int("radius", radius, minimum=0)
    k = np.arange(-radius, radius + 1)
    return special.ive(k, 2.0 * t)  # ive(k, x) = exp(-|x|) I_k(x)


def _conductance_function(
    conductance: str, kappa: float
) -> Callable[[FloatArray], FloatArray]:
    """Perona-Malik edge-stopping function ``g(s)``, ``g(0) = 1``, decreasing in
    ``s``."""
    conductance = check_choice("conductance", conductance, ("exp", "rational"))
    if conductance == "exp":
        return lambda s: np.exp(-((s / kappa) ** 2))
    return lambda s: 1.0 / (1.0 + (s / kappa) ** 2)


def perona_malik(
    image: ArrayLike,
    *,
    steps: int,
    kappa: float,
    dt: float = 0.2,
    conductance: Conductance = "exp",
) -> FloatArray:
    """Anisotropic diffusion (Perona & Malik 1990): smooth inside regions, not across
    edges.

    One step is::

        u <- u + dt * sum over the 4 neighbours of g(|d|) d,

    ``d`` the difference to that neighbour, with conductance

        "exp":      g(s) = exp(-(s / kappa)^2)     favours high-contrast edges,
        "rational": g(s) = 1 / (1 + (s / kappa)^2) favours wide regions.

    Small differences (noise, ``|d| << kappa``) diffuse as in the heat
    equation; large ones (edges) barely conduct. The flux ``g(s) s`` even
    *decreases* with the gradient where ``s > kappa / sqrt(2)`` ("exp") or
    ``s > kappa`` ("rational"), so in particular wherever ``|d| > kappa``;
    there diffusion runs backward and edges are kept or even sharpened. With
    ``kappa -> infinity``, ``g = 1`` and this is :func:`heat_equation` with
    ``t = steps * dt``. Fluxes are exchanged between pixel pairs with zero
    flux at the border, so the image mean is conserved. Since ``g <= 1``,
    ``dt <= 0.25`` makes each step a convex average (no new extrema).

    Args:
        image: (height, width) float image (one grey channel, e.g. in [0, 1]).
        steps: number of steps, ``>= 0``.
        kappa: edge threshold in intensity units, ``> 0``.
        dt: step, ``0 < dt <= 0.25``.
        conductance: "exp" or "rational".

    Returns:
        float64 array of the image's shape.
    """
    u = _as_image("image", image).copy()
    steps = check_int("steps", steps, minimum=0)
    kappa = check_float("kappa", kappa, above=0)
    dt = _image_dt(dt)
    g = _conductance_function(conductance, kappa)
    for _ in range(steps):
        u += dt * _flux_divergence(u, g)
    return u


def gradient_magnitude(image: ArrayLike) -> FloatArray:
    """``|grad u| = sqrt(u_y^2 + u_x^2)`` with central differences (one-sided at the border).

    Units: intensity per pixel. Returns a float64 array of the image's shape.
    """
    u = _as_image("image", image)
    if min(u.shape) < 2:
        raise ValueError(
            f"image must be at least 2 x 2 for a gradient, got image.shape={u.shape}"
        )
    d_rows, d_cols = np.gradient(u)
    return np.hypot(d_rows, d_cols)


# --------------------------------------------------------------------------- #
# Image utilities: noise, quality, sharpening.
# --------------------------------------------------------------------------- #


def psnr(image: ArrayLike, reference: ArrayLike, *, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``.

    ``MSE`` is the mean squared difference over all pixels; identical images
    give ``inf``. ``data_range`` is the span of possible values (1 for images
    in [0, 1]). Higher is closer to the reference; +6 dB halves the RMS error.
    """
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            f"image and reference must have the same shape, got image.shape={a.shape} "
            f"and reference.shape={b.shape}"
        )
    if a.size == 0:
        raise ValueError("image must not be empty, got image.size=0")
    data_range = check_float("data_range", data_range, above=0)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def add_gaussian_noise(
    image: ArrayLike, *, sigma: float, seed: int | None
) -> FloatArray:
    """Return ``image + sigma * z`` with ``z ~ N(0, 1)`` i.i.d. per pixel (no clipping).

    ``seed`` goes to ``np.random.default_rng``: the same seed gives the same
    noise. ``sigma`` is in intensity units (e.g. 0.1 on a [0, 1] image).
    """
    u = _as_image("image", image)
    sigma = check_float("sigma", sigma, at_least=0)
    rng = np.random.default_rng(seed)
    return u + sigma * rng.standard_normal(u.shape)


def sharpen(image: ArrayLike, *, amount: float, sigma: float) -> FloatArray:
    """Unsharp masking: ``u + amount * (u - G_sigma * u)``.

    ``G_sigma * u`` is a Gaussian blur, i.e. the heat equation run forward to
    ``t = sigma^2 / 2``; ``u - G_sigma * u`` is what that blur removed (about
    ``-t Laplacian(u)`` for small ``t``). Adding it back is like running heat
    diffusion *backwards* for a moment: edges get steeper and overshoot a
    little (halos). Backward diffusion is unstable, which is why one only
    takes one small step of it.

    Args:
        image: (height, width) float image.
        amount: strength, ``>= 0`` (0 returns a copy).
        sigma: blur radius in pixels, ``> 0``.
    """
    u = _as_image("image", image)
    amount = check_float("amount", amount, at_least=0)
    sigma = check_float("sigma", sigma, above=0)
    blurred = ndimage.gaussian_filter(u, sigma=sigma, mode="nearest")
    return u + amount * (u - blurred)
