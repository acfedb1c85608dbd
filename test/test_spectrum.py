"""Tests for ``curvlinops.papyan2020traces.spectrum`` on small dense matrices."""

import numpy as np
import pytest
import torch

import curvlinops
from curvlinops.examples import TensorLinearOperator
from curvlinops.papyan2020traces.spectrum import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    approximate_boundaries,
    approximate_boundaries_abs,
    fast_lanczos,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)

DT = torch.float64


def matrix_with_spectrum(evals, seed=0) -> torch.Tensor:
    evals = torch.as_tensor(evals, dtype=DT)
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), dtype=DT, generator=gen))
    return (Q * evals) @ Q.T


# three clusters: 60% near -1, 30% near 2, 10% near 10
CLUSTERS = [(-1.0, 0.6), (2.0, 0.3), (10.0, 0.1)]
DIM = 100
EVALS = torch.cat(
    [c + 0.01 * torch.linspace(-1, 1, int(DIM * share), dtype=DT) for c, share in CLUSTERS]
)
A_DENSE = matrix_with_spectrum(EVALS)


class Counting(TensorLinearOperator):
    calls = 0

    def _matmat(self, X):
        Counting.calls += 1
        return super()._matmat(X)


def test_exports():
    assert curvlinops.lanczos_approximate_spectrum is lanczos_approximate_spectrum
    assert curvlinops.LanczosApproximateSpectrumCached is LanczosApproximateSpectrumCached
    assert curvlinops.lanczos_approximate_log_spectrum is lanczos_approximate_log_spectrum
    assert curvlinops.LanczosApproximateLogSpectrumCached is LanczosApproximateLogSpectrumCached


def test_boundaries():
    A = TensorLinearOperator(A_DENSE)
    lo, hi = approximate_boundaries(A, tol=1e-10)
    assert np.isclose(lo, EVALS.min().item()) and np.isclose(hi, EVALS.max().item())
    # partially given boundaries only compute the missing one
    assert approximate_boundaries(A, boundaries=(-5.0, None), tol=1e-10)[0] == -5.0
    assert np.isclose(approximate_boundaries(A, boundaries=(-5.0, None), tol=1e-10)[1], hi)
    assert approximate_boundaries(A, boundaries=(1.0, 2.0)) == (1.0, 2.0)
    Counting.calls = 0
    approximate_boundaries(Counting(A_DENSE), boundaries=(1.0, 2.0))
    assert Counting.calls == 0
    lo_abs, hi_abs = approximate_boundaries_abs(A, tol=1e-10)
    assert np.isclose(lo_abs, EVALS.abs().min().item(), rtol=1e-6)
    assert np.isclose(hi_abs, EVALS.abs().max().item())


def test_fast_lanczos_extremes_and_tridiagonal_solver():
    A = TensorLinearOperator(A_DENSE)
    evals, evecs = fast_lanczos(A, 40, generator=torch.Generator().manual_seed(0))
    assert evals.shape == (40,) and evecs.shape == (40, 40)
    assert torch.isclose(evals[-1], EVALS.max(), rtol=1e-3)
    assert torch.isclose(evals[0], EVALS.min(), rtol=1e-3)
    evals2, evecs2 = fast_lanczos(
        A, 40, use_eigh_tridiagonal=True, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(evals2, evals)
    torch.testing.assert_close(evecs2.abs(), evecs.abs())
    # the first components are quadrature weights: they sum to one
    torch.testing.assert_close((evecs[0] ** 2).sum(), torch.tensor(1.0, dtype=DT))


def cluster_masses(grid, density):
    masses = []
    edges = [-np.inf, 0.5, 6.0, np.inf]
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (grid > lo) & (grid <= hi)
        masses.append(torch.trapezoid(density[mask], grid[mask]).item())
    return masses


def test_spectrum_integrates_to_one_and_finds_clusters():
    A = TensorLinearOperator(A_DENSE)
    grid, density = lanczos_approximate_spectrum(
        A, ncv=30, num_repeats=20, kappa=3.0, margin=0.1, generator=torch.Generator().manual_seed(1)
    )
    assert grid.shape == density.shape == (1024,)
    assert abs(torch.trapezoid(density, grid).item() - 1) < 1e-2
    masses = cluster_masses(grid, density)
    for mass, (_, share) in zip(masses, CLUSTERS):
        assert abs(mass - share) < 0.07, masses
    # density-weighted mean = normalised trace
    mean = torch.trapezoid(grid * density, grid).item()
    assert abs(mean - EVALS.mean().item()) < 0.15


def test_log_spectrum():
    evals = torch.cat([torch.full((50,), 1e-3), torch.full((50,), 1.0)]).to(DT)
    evals = evals * (1 + 0.01 * torch.rand(100, dtype=DT, generator=torch.Generator()))
    A = TensorLinearOperator(matrix_with_spectrum(evals, seed=3))
    grid, density = lanczos_approximate_log_spectrum(
        A, ncv=30, num_repeats=10, kappa=3.0, margin=0.1, generator=torch.Generator().manual_seed(2)
    )
    assert abs(torch.trapezoid(density, grid).item() - 1) < 2e-2
    assert torch.all(grid[1:] / grid[:-1] > 1)  # log-spaced, increasing
    low = grid < 0.03
    assert abs(torch.trapezoid(density[low], grid[low]).item() - 0.5) < 0.1


def test_cached_classes_reuse_runs_and_match_functions():
    Counting.calls = 0
    A = Counting(A_DENSE)
    cached = LanczosApproximateSpectrumCached(
        A, 20, boundaries=(-2.0, 11.0), generator=torch.Generator().manual_seed(5)
    )
    grid, density = cached.approximate_spectrum(num_repeats=3, kappa=2.0)
    assert Counting.calls == 3 * 20
    grid2, density2 = cached.approximate_spectrum(num_repeats=2, kappa=3.0)
    assert Counting.calls == 3 * 20  # reused
    expected = lanczos_approximate_spectrum(
        A,
        20,
        num_repeats=3,
        kappa=2.0,
        boundaries=(-2.0, 11.0),
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(density, expected[1])
    torch.testing.assert_close(grid, expected[0])

    log_cached = LanczosApproximateLogSpectrumCached(
        A, 20, boundaries=(0.5, 11.0), generator=torch.Generator().manual_seed(6)
    )
    grid, density = log_cached.approximate_log_spectrum(num_repeats=2)
    expected = lanczos_approximate_log_spectrum(
        A,
        20,
        num_repeats=2,
        kappa=3.0,
        boundaries=(0.5, 11.0),
        generator=torch.Generator().manual_seed(6),
    )
    torch.testing.assert_close(density, expected[1])


def test_errors():
    A = TensorLinearOperator(A_DENSE)
    with pytest.raises(ValueError, match="kappa must be greater than 1"):
        lanczos_approximate_spectrum(A, 10, kappa=1.0, boundaries=(0.0, 1.0))
    with pytest.raises(ValueError, match="ncv must be at least 2"):
        fast_lanczos(A, 1)
    with pytest.raises(ValueError, match="square"):
        fast_lanczos(TensorLinearOperator(torch.zeros(3, 4, dtype=DT)), 2)


def test_smallest_magnitude_fallback(monkeypatch):
    from scipy.sparse.linalg import ArpackNoConvergence

    from curvlinops.papyan2020traces import spectrum

    def fail(*args, which=None, **kwargs):
        raise ArpackNoConvergence("no convergence", [], [])

    monkeypatch.setattr(spectrum, "eigsh", fail)
    A = TensorLinearOperator(A_DENSE)
    with pytest.warns(RuntimeWarning, match="using 0"):
        assert approximate_boundaries_abs(A, boundaries=(None, 3.0)) == (0.0, 3.0)
    with pytest.raises(RuntimeError, match="pass boundaries explicitly"):
        approximate_boundaries(A, boundaries=(None, 3.0))
