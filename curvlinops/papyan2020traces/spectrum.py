r"""Spectral densities of symmetric operators by Lanczos quadrature (Papyan, 2020).

A Lanczos run of :math:`n` steps (``ncv``) from a random unit vector
:math:`\mathbf{v}` gives a tridiagonal :math:`\mathbf{T} = \mathbf{V}^\top \mathbf{A} \mathbf{V}`
with eigenpairs :math:`(\theta_i, \mathbf{u}_i)`. The nodes :math:`\theta_i` and weights
:math:`\tau_i^2 = (\mathbf{u}_i)_1^2` form a Gauss quadrature of the spectral measure
:math:`\mathbf{v}^\top \delta(\lambda - \mathbf{A}) \mathbf{v}`, whose expectation over
:math:`\mathbf{v}` is the spectral density :math:`\frac{1}{D}\sum_j \delta(\lambda -
\lambda_j)`. Papyan smooths each node with a Gaussian on the spectrum rescaled to
:math:`[-1, 1]`:

.. math::
    \phi(t) = \sum_i \tau_i^2\, \mathcal{N}(t; t_i, \sigma^2),\quad
    \sigma = \frac{2}{(n - 1)\sqrt{8 \ln \kappa}},

where :math:`\kappa > 1` controls the width. Densities are returned on a grid in the original
units and integrate to one. The log-spectrum variant does the same for
:math:`\log(|\lambda| + \epsilon)` and returns the density of :math:`|\lambda| + \epsilon`
(grid in those units, log-spaced).

Lanczos runs without re-orthogonalisation, entirely on the operator's device and in its
dtype; only the spectral boundaries come from SciPy's ``eigsh`` on ``A.to_scipy()``.
"""

import warnings
from math import log, pi, sqrt
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch import Tensor

from curvlinops._checks import (
    check_generator,
    check_int,
    check_number,
    is_finite_number,
    is_int,
)
from curvlinops._distributed import operator_group, shared_draw
from curvlinops._torch_base import PyTorchLinearOperator
from curvlinops.utils import assert_is_square

Boundaries = Tuple[Optional[float], Optional[float]]


def _check(A: PyTorchLinearOperator, ncv: int, kappa: Optional[float] = None):
    """Raise unless ``A`` is square and ``ncv`` an integer in ``[2, D]`` (and ``kappa > 1``)."""
    assert_is_square(A)
    if not is_int(ncv) or ncv < 2:
        raise ValueError(f"ncv must be at least 2 (an integer), got {ncv!r}.")
    if ncv > A.shape[0]:
        raise ValueError(f"ncv ({ncv}) must not exceed the dimension {A.shape[0]}.")
    if kappa is not None:
        _check_kappa(kappa)


def _check_kappa(kappa: float):
    """Raise unless the width parameter ``kappa`` is a finite number above 1."""
    if not is_finite_number(kappa) or kappa <= 1:
        raise ValueError(f"kappa must be greater than 1, got {kappa}.")


def _check_density_args(
    num_points: int, kappa: float, margin: float, epsilon: Optional[float] = None
):
    """Raise a ``ValueError`` naming the first density argument outside its range."""
    check_int("num_points", num_points, 1)
    _check_kappa(kappa)
    check_number("margin", margin, 0, note=" (relative widening of the interval)")
    check_number(
        "epsilon",
        epsilon,
        0,
        strict=True,
        optional=True,
        note=" (it keeps log(|lambda| + epsilon) finite)",
    )


def _check_all(
    A: PyTorchLinearOperator,
    ncv: int,
    num_points: int,
    num_repeats: int,
    kappa: float,
    margin: float,
    epsilon: Optional[float] = None,
):
    """Check every argument of a density before the boundaries cost products."""
    _check(A, ncv, kappa)
    _check_density_args(num_points, kappa, margin, epsilon)
    check_int("num_repeats", num_repeats, 1)


def _check_given_boundaries(boundaries: Optional[Boundaries], magnitudes: bool = False):
    """Check a (partially) given boundary pair before anything is computed."""
    if boundaries is None:
        return
    if not isinstance(boundaries, (tuple, list)) or len(boundaries) != 2:
        raise ValueError(f"boundaries must be None or a pair (lower, upper), got {boundaries!r}.")
    for value in boundaries:
        if value is not None and not is_finite_number(value):
            raise ValueError(f"boundaries must hold finite numbers or None, got {boundaries}.")
    lower, upper = boundaries
    if magnitudes and lower is not None and upper is not None:
        lower, upper = abs(lower), abs(upper)
    if lower is not None and upper is not None and not lower < upper:
        what = (
            "eigenvalue magnitudes (min |lambda|, max |lambda|)"
            if magnitudes
            else ("eigenvalues (lambda_min, lambda_max)")
        )
        raise ValueError(
            f"boundaries must be the extreme {what} with lower < upper, got {boundaries}; "
            "swap them if reversed, or widen an interval of zero width around the spectrum."
        )


def _check_lanczos_iter(lanczos_iter: Tuple[Tensor, Tensor]):
    """Raise unless ``lanczos_iter`` has the shapes of a :func:`fast_lanczos` result."""
    evals, evecs = lanczos_iter
    n = evals.numel()
    if evals.ndim != 1 or n < 2 or evecs.shape != (n, n):
        raise ValueError(
            "lanczos_iter must be the Ritz values [ncv] and tridiagonal eigenvectors "
            f"[ncv, ncv] of fast_lanczos with ncv >= 2, got shapes {tuple(evals.shape)} and "
            f"{tuple(evecs.shape)}."
        )


def fast_lanczos(
    A: PyTorchLinearOperator,
    ncv: int,
    use_eigh_tridiagonal: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Lanczos iteration without re-orthogonalisation from a random unit vector.

    Args:
        A: A symmetric operator.
        ncv: Number of Lanczos steps (size of the tridiagonal matrix).
        use_eigh_tridiagonal: Decompose the tridiagonal matrix with SciPy's
            ``eigh_tridiagonal`` instead of ``torch.linalg.eigh``.
        generator: Optional random number generator for the start vector; the global one
            if ``None``.

    Returns:
        Ritz values ``[ncv]`` (ascending) and the tridiagonal matrix's eigenvectors
        ``[ncv, ncv]`` (column ``i`` belongs to value ``i``).

    Raises:
        ValueError: If ``A`` is not square or ``ncv`` is out of range.
    """
    _check(A, ncv)
    check_generator(generator)
    dim = A.shape[0]
    v = torch.randn(dim, device=A.device, dtype=A.dtype, generator=generator)
    v = shared_draw(A, v)  # data-parallel operators: the same start on every rank
    v = v / v.norm()
    v_prev = torch.zeros_like(v)
    beta = v.new_zeros(())
    alphas, betas = [], []
    tiny = torch.finfo(A.dtype).tiny
    for step in range(ncv):
        w = A @ v
        alpha = w @ v
        w = w - alpha * v - beta * v_prev
        alphas.append(alpha)
        if step < ncv - 1:
            beta = w.norm()
            betas.append(beta)
            # No host synchronisation: a breakdown (beta = 0) gives zero vectors, not NaNs.
            v_prev, v = v, w / beta.clamp_min(tiny)
    alpha_t, beta_t = torch.stack(alphas), torch.stack(betas)
    if use_eigh_tridiagonal:
        evals, evecs = eigh_tridiagonal(
            alpha_t.detach().cpu().double().numpy(), beta_t.detach().cpu().double().numpy()
        )
        to = {"device": A.device, "dtype": A.dtype}
        return torch.as_tensor(evals).to(**to), torch.as_tensor(evecs).to(**to)
    T = torch.diag(alpha_t) + torch.diag(beta_t, 1) + torch.diag(beta_t, -1)
    return torch.linalg.eigh(T)


def _shared_v0(A: PyTorchLinearOperator) -> Optional[np.ndarray]:
    """ARPACK's start vector: ``None`` (ARPACK draws one), or a shared one for data parallelism.

    For a data-parallel operator the vector is drawn on rank 0 and broadcast, so that ARPACK
    takes the same path on every rank.
    """
    if operator_group(A) is None:
        return None
    return shared_draw(A, torch.randn(A.shape[0], dtype=torch.float64)).numpy()


def _extreme_eigenvalue(A: PyTorchLinearOperator, which: str, tol: float) -> float:
    v0 = _shared_v0(A)
    try:
        return float(
            eigsh(A.to_scipy(), k=1, which=which, tol=tol, v0=v0, return_eigenvectors=False)[0]
        )
    except ArpackNoConvergence as error:
        if which == "SM":
            # ARPACK rarely converges to the smallest magnitude of a singular matrix (e.g. a
            # GGN); 0 is a valid lower bound of |lambda| for the log spectrum.
            warnings.warn(
                "The smallest eigenvalue magnitude did not converge; using 0 as lower boundary.",
                RuntimeWarning,
                stacklevel=3,
            )
            return 0.0
        raise RuntimeError(
            f"SciPy's eigsh did not find the {which} eigenvalue for the spectrum boundaries; "
            "pass boundaries explicitly or increase boundaries_tol."
        ) from error


def approximate_boundaries(
    A: PyTorchLinearOperator, tol: float = 1e-2, boundaries: Optional[Boundaries] = None
) -> Tuple[float, float]:
    """Smallest and largest eigenvalue, computing only what ``boundaries`` leaves open.

    Args:
        A: A symmetric operator.
        tol: Relative accuracy of SciPy's ``eigsh``.
        boundaries: ``None``, or a pair whose ``None`` entries are computed.

    Returns:
        ``(lambda_min, lambda_max)``.
    """
    return _complete_boundaries(A, tol, boundaries, magnitudes=False)


def approximate_boundaries_abs(
    A: PyTorchLinearOperator, tol: float = 1e-2, boundaries: Optional[Boundaries] = None
) -> Tuple[float, float]:
    """Smallest and largest eigenvalue magnitude, computing what ``boundaries`` leaves open.

    Args:
        A: A symmetric operator.
        tol: Relative accuracy of SciPy's ``eigsh``.
        boundaries: ``None``, or a pair (of magnitudes) whose ``None`` entries are computed.

    Returns:
        ``(min |lambda|, max |lambda|)``.
    """
    return _complete_boundaries(A, tol, boundaries, magnitudes=True)


def _complete_boundaries(
    A: PyTorchLinearOperator, tol: float, boundaries: Optional[Boundaries], magnitudes: bool
) -> Tuple[float, float]:
    """Compute the ``None`` entries of ``boundaries`` with SciPy's ``eigsh``.

    The ends are the smallest and largest eigenvalue (``"SA"``, ``"LA"``; both at once by
    ``"BE"`` if both are open) or, for ``magnitudes``, the smallest and largest magnitude
    (``"SM"``, ``"LM"``, returned as absolute values).
    """
    assert_is_square(A)
    check_number("boundaries_tol", tol, 0, note=" (0: machine precision)")
    _check_given_boundaries(boundaries, magnitudes=magnitudes)
    lower, upper = (None, None) if boundaries is None else boundaries
    if lower is None and upper is None and not magnitudes:
        evals = eigsh(
            A.to_scipy(), k=2, which="BE", tol=tol, v0=_shared_v0(A), return_eigenvectors=False
        )
        return float(min(evals)), float(max(evals))
    low_end, high_end = ("SM", "LM") if magnitudes else ("SA", "LA")
    if lower is None:
        lower = _extreme_eigenvalue(A, low_end, tol)
    if upper is None:
        upper = _extreme_eigenvalue(A, high_end, tol)
    lower, upper = float(lower), float(upper)
    if magnitudes:
        lower, upper = abs(lower), abs(upper)
    _check_estimated(lower, upper, boundaries)
    return lower, upper


def _check_estimated(lower: float, upper: float, given: Optional[Boundaries]):
    """A pair completed by estimation must still be ordered (a given value may be off)."""
    if not lower < upper:
        raise ValueError(
            f"The spectrum boundaries ({lower:.6g}, {upper:.6g}) (given: {given}) are not "
            "increasing: a given value lies beyond the estimated other end, or the "
            "spectrum is a single point. Pass boundaries=(lower, upper) with lower < upper "
            "that enclose the spectrum."
        )


def _sigma(ncv: int, kappa: float) -> float:
    """Papyan's Gaussian width on ``[-1, 1]``: ``2 / ((ncv - 1) sqrt(8 ln kappa))``."""
    return 2 / (ncv - 1) / sqrt(8 * log(kappa))


def _gaussian_mixture(t: Tensor, nodes: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """Evaluate sum_i weights_i N(t; nodes_i, sigma^2) on the grid ``t``."""
    z = (t.unsqueeze(1) - nodes.unsqueeze(0)) / sigma
    return (torch.exp(-0.5 * z**2) * weights).sum(1) / (sigma * sqrt(2 * pi))


def _check_from_iter(
    lanczos_iter: Tuple[Tensor, Tensor],
    boundaries: Tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
    epsilon: Optional[float] = None,
):
    """Check the arguments of a density from one Lanczos run, density arguments first."""
    _check_density_args(num_points, kappa, margin, epsilon)
    _check_lanczos_iter(lanczos_iter)
    _check_given_boundaries(boundaries)


def _widened_interval(
    lower: float, upper: float, margin: float
) -> Tuple[float, float, float, float]:
    """``[lower, upper]`` widened by ``margin`` times its width on both sides.

    Returns:
        The widened ends, their centre ``c`` and half width ``d`` (at least ``1e-300``), so
        that ``t = (x - c) / d`` maps the widened interval to ``[-1, 1]``.
    """
    width = upper - lower
    lower, upper = lower - margin * width, upper + margin * width
    return lower, upper, (upper + lower) / 2, max((upper - lower) / 2, 1e-300)


def _smoothed_on_unit_grid(
    nodes: Tensor, weights: Tensor, num_points: int, kappa: float
) -> Tuple[Tensor, Tensor]:
    """The grid ``t = linspace(-1, 1, num_points)`` and the weighted, smoothed nodes on it."""
    t = torch.linspace(-1, 1, num_points, device=nodes.device, dtype=nodes.dtype)
    return t, _gaussian_mixture(t, nodes, weights, _sigma(nodes.numel(), kappa))


def lanczos_approximate_spectrum_from_iter(
    lanczos_iter: Tuple[Tensor, Tensor],
    boundaries: Tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
) -> Tuple[Tensor, Tensor]:
    """Smoothed spectral density from one Lanczos run.

    The nodes are the Ritz values mapped to ``[-1, 1]`` by ``t = (theta - c) / d``, the weights
    ``tau_i^2 / d`` (so that the density is per unit eigenvalue).

    Args:
        lanczos_iter: Ritz values ``[ncv]`` and tridiagonal eigenvectors ``[ncv, ncv]``.
        boundaries: ``(lambda_min, lambda_max)`` of the spectrum.
        num_points: Number of grid points.
        kappa: Width parameter (> 1); larger gives narrower Gaussians.
        margin: Relative widening of the interval on both sides.

    Returns:
        The grid ``[num_points]`` and the density on it.

    Raises:
        ValueError: If an argument is outside its range (e.g. ``kappa <= 1``).
    """
    _check_from_iter(lanczos_iter, boundaries, num_points, kappa, margin)
    evals, evecs = lanczos_iter
    lower, upper, center, half_width = _widened_interval(*boundaries, margin)
    nodes = (evals - center) / half_width
    _, density = _smoothed_on_unit_grid(nodes, evecs[0, :] ** 2 / half_width, num_points, kappa)
    grid = torch.linspace(lower, upper, num_points, device=evals.device, dtype=evals.dtype)
    return grid, density


def lanczos_approximate_log_spectrum_from_iter(
    lanczos_iter: Tuple[Tensor, Tensor],
    boundaries: Tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
    epsilon: float,
) -> Tuple[Tensor, Tensor]:
    """Smoothed density of ``|lambda| + epsilon`` from one Lanczos run, on a log-spaced grid.

    The nodes are ``log(|theta| + epsilon)`` mapped to ``[-1, 1]``, the weights ``tau_i^2``;
    the density on the grid ``x = exp(d t + c)`` is the one on ``t`` divided by ``d x``.

    Args:
        lanczos_iter: Ritz values ``[ncv]`` and tridiagonal eigenvectors ``[ncv, ncv]``.
        boundaries: ``(min |lambda|, max |lambda|)``.
        num_points: Number of grid points.
        kappa: Width parameter (> 1).
        margin: Relative widening of the log interval on both sides.
        epsilon: Shift that keeps the logarithm finite.

    Returns:
        The grid ``[num_points]`` (in units of ``|lambda| + epsilon``) and the density.

    Raises:
        ValueError: If an argument is outside its range (e.g. ``kappa <= 1``).
    """
    _check_from_iter(lanczos_iter, boundaries, num_points, kappa, margin, epsilon)
    if boundaries[0] < 0:
        raise ValueError(
            f"boundaries must be eigenvalue magnitudes (>= 0) for the log spectrum, got "
            f"{boundaries}."
        )
    evals, evecs = lanczos_iter
    log_ends = log(boundaries[0] + epsilon), log(boundaries[1] + epsilon)
    _, _, center, half_width = _widened_interval(*log_ends, margin)
    nodes = (torch.log(evals.abs() + epsilon) - center) / half_width
    t, density = _smoothed_on_unit_grid(nodes, evecs[0, :] ** 2, num_points, kappa)
    grid = torch.exp(t * half_width + center)
    return grid, density / (half_width * grid)


def lanczos_approximate_spectrum(
    A: PyTorchLinearOperator,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 3.0,
    boundaries: Optional[Boundaries] = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Spectral density of a symmetric operator, averaged over Lanczos runs.

    Args:
        A: A symmetric operator.
        ncv: Lanczos steps per run.
        num_points: Number of grid points.
        num_repeats: Number of independent runs to average.
        kappa: Width parameter (> 1).
        boundaries: Known ``(lambda_min, lambda_max)``; ``None`` entries are estimated.
        margin: Relative widening of the interval.
        boundaries_tol: Relative accuracy of the boundary estimation.
        generator: Optional random number generator for the start vectors.

    Returns:
        The grid and the density.
    """
    _check_all(A, ncv, num_points, num_repeats, kappa, margin)
    cache = LanczosApproximateSpectrumCached(A, ncv, boundaries, boundaries_tol, generator)
    return cache.approximate_spectrum(num_repeats, num_points, kappa, margin)


def lanczos_approximate_log_spectrum(
    A: PyTorchLinearOperator,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 1.04,
    boundaries: Optional[Boundaries] = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
    epsilon: float = 1e-5,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """Density of ``|lambda| + epsilon`` on a log-spaced grid, averaged over Lanczos runs.

    Args:
        A: A symmetric operator.
        ncv: Lanczos steps per run.
        num_points: Number of grid points.
        num_repeats: Number of independent runs to average.
        kappa: Width parameter (> 1).
        boundaries: Known ``(min |lambda|, max |lambda|)``; ``None`` entries are estimated.
        margin: Relative widening of the log interval.
        boundaries_tol: Relative accuracy of the boundary estimation.
        epsilon: Shift that keeps the logarithm finite.
        generator: Optional random number generator for the start vectors.

    Returns:
        The grid and the density.
    """
    _check_all(A, ncv, num_points, num_repeats, kappa, margin, epsilon)
    cache = LanczosApproximateLogSpectrumCached(A, ncv, boundaries, boundaries_tol, generator)
    return cache.approximate_log_spectrum(num_repeats, num_points, kappa, margin, epsilon)


class _LanczosCache:
    """Boundaries estimated once and Lanczos runs kept for reuse.

    Subclasses name the boundaries they need as ``_estimate_boundaries``
    (:func:`approximate_boundaries` or :func:`approximate_boundaries_abs`).
    """

    _estimate_boundaries: Callable[..., Tuple[float, float]]

    def __init__(
        self,
        A: PyTorchLinearOperator,
        ncv: int,
        boundaries: Optional[Boundaries] = None,
        boundaries_tol: float = 1e-2,
        generator: Optional[torch.Generator] = None,
    ):
        """Estimate the boundaries (the ones ``boundaries`` leaves open).

        Args:
            A: A symmetric operator.
            ncv: Lanczos steps per run.
            boundaries: Known boundaries, ``(lambda_min, lambda_max)`` for the spectrum or
                ``(min |lambda|, max |lambda|)`` for the log spectrum; ``None`` entries are
                estimated.
            boundaries_tol: Relative accuracy of the boundary estimation.
            generator: Optional random number generator for the start vectors.
        """
        _check(A, ncv)
        self._boundaries = self._estimate_boundaries(A, tol=boundaries_tol, boundaries=boundaries)
        self._A, self._ncv, self._generator = A, ncv, generator
        self._runs: List[Tuple[Tensor, Tensor]] = []

    def _average(
        self, num_repeats: int, from_iter: Callable, *density_args
    ) -> Tuple[Tensor, Tensor]:
        """Grid of the first run and mean density over the first ``num_repeats`` runs.

        Args:
            num_repeats: Number of runs to average (more are run if needed).
            from_iter: The density of one run, called as
                ``from_iter(run, boundaries, *density_args)``.
            *density_args: ``num_points, kappa, margin`` (and ``epsilon``), checked before
                any product.
        """
        _check_density_args(*density_args)
        check_int("num_repeats", num_repeats, 1)
        while len(self._runs) < num_repeats:
            self._runs.append(fast_lanczos(self._A, self._ncv, generator=self._generator))
        results = [
            from_iter(run, self._boundaries, *density_args) for run in self._runs[:num_repeats]
        ]
        return results[0][0], torch.stack([density for _, density in results]).mean(0)


class LanczosApproximateSpectrumCached(_LanczosCache):
    """Spectral density with cached boundaries ``(lambda_min, lambda_max)`` and Lanczos runs.

    For trying density parameters without new products.
    """

    _estimate_boundaries = staticmethod(approximate_boundaries)

    def approximate_spectrum(
        self,
        num_repeats: int = 1,
        num_points: int = 1024,
        kappa: float = 3.0,
        margin: float = 0.05,
    ) -> Tuple[Tensor, Tensor]:
        """Density averaged over the first ``num_repeats`` cached runs (run more if needed).

        Args:
            num_repeats: Number of runs to average.
            num_points: Number of grid points.
            kappa: Width parameter (> 1).
            margin: Relative widening of the interval.

        Returns:
            The grid (of the first run) and the mean density.
        """
        return self._average(
            num_repeats, lanczos_approximate_spectrum_from_iter, num_points, kappa, margin
        )


class LanczosApproximateLogSpectrumCached(_LanczosCache):
    """Log-spectral density with cached boundaries ``(min |lambda|, max |lambda|)`` and runs."""

    _estimate_boundaries = staticmethod(approximate_boundaries_abs)

    def approximate_log_spectrum(
        self,
        num_repeats: int = 1,
        num_points: int = 1024,
        kappa: float = 3.0,
        margin: float = 0.05,
        epsilon: float = 1e-5,
    ) -> Tuple[Tensor, Tensor]:
        """Log-density averaged over the first ``num_repeats`` cached runs.

        Args:
            num_repeats: Number of runs to average.
            num_points: Number of grid points.
            kappa: Width parameter (> 1).
            margin: Relative widening of the log interval.
            epsilon: Shift that keeps the logarithm finite.

        Returns:
            The grid (of the first run) and the mean density.
        """
        return self._average(
            num_repeats,
            lanczos_approximate_log_spectrum_from_iter,
            num_points,
            kappa,
            margin,
            epsilon,
        )
