"""Misuse and edge cases of the solvers and estimators (issue 12): no silent wrong answers.

Covers ``eigsh`` (low-rank operators, repeated eigenvalues, argument ranges), the CG, LSMR
and Neumann inverses (indefinite or divergent cases, argument ranges), XTrace/XDiag of zero
and low-rank operators, the estimators' ``num_matvecs``, the spectral densities' arguments
and the sub-matrix indices. Dense float64 matrices keep every test fast and exact.
"""

import warnings

import numpy as np
import pytest
import torch

import curvlinops
from curvlinops import (
    CGInverseLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
    SubmatrixLinearOperator,
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
    xdiag,
    xtrace,
)
from curvlinops.examples import TensorLinearOperator
from curvlinops.inverse import LSMRNotConvergedWarning, NeumannDivergenceWarning
from curvlinops.papyan2020traces.spectrum import (
    LanczosApproximateSpectrumCached,
    approximate_boundaries,
    fast_lanczos,
    lanczos_approximate_log_spectrum_from_iter,
    lanczos_approximate_spectrum_from_iter,
)

DT = torch.float64


def with_spectrum(evals, seed=0) -> torch.Tensor:
    """A symmetric matrix with the given eigenvalues in a random orthonormal basis."""
    evals = torch.as_tensor(evals, dtype=DT)
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), dtype=DT, generator=gen))
    return (Q * evals) @ Q.T


def low_rank_psd(dim=26, rank=7, seed=0) -> torch.Tensor:
    """A PSD matrix of the given rank (like a GGN with fewer outputs than parameters)."""
    gen = torch.Generator().manual_seed(seed)
    B = torch.randn(dim, rank, dtype=DT, generator=gen)
    return B @ B.T


def check_eigenpairs(A, vals, vecs, which, k):
    """Eigenvalues against numpy.linalg.eigh, residuals and orthonormality."""
    true = np.linalg.eigh(A.numpy())[0]
    expected = np.sort(true)[:k] if which == "SA" else np.sort(true)[-k:]
    scale = np.abs(true).max()
    np.testing.assert_allclose(vals.numpy(), expected, rtol=0, atol=1e-9 * scale)
    residuals = (A @ vecs - vecs * vals).norm(dim=0)
    assert residuals.max() <= 1e-6 * scale
    assert torch.allclose(vecs.T @ vecs, torch.eye(k, dtype=DT), atol=1e-8)


# ----------------------------------------------------------------------------------------
# eigsh (defects 5 and 16)


@pytest.mark.parametrize("which", ["SA", "LA"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eigsh_low_rank_finds_all_copies(which, seed):
    """Rank 7, D = 26, k = 4: SA must give four zeros (was [0, 9.9, 16.3, 17.6])."""
    A = low_rank_psd(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged, nothing to report
        vals, vecs = curvlinops.eigsh(
            TensorLinearOperator(A), k=4, which=which, generator=torch.Generator().manual_seed(seed)
        )
    check_eigenpairs(A, vals, vecs, which, 4)


@pytest.mark.parametrize("which, k", [("LA", 4), ("LA", 6), ("SA", 5)])
def test_eigsh_multiplicities_after_exhausted_krylov_space(which, k):
    """Eigenvalues 5 (x3), 4 (x2), 2 and 0 (x20): every copy is found with block_size=1."""
    A = with_spectrum([5.0] * 3 + [4.0] * 2 + [2.0] + [0.0] * 20, seed=3)
    vals, vecs = curvlinops.eigsh(
        TensorLinearOperator(A), k=k, which=which, generator=torch.Generator().manual_seed(4)
    )
    check_eigenpairs(A, vals, vecs, which, k)


def test_eigsh_zero_operator():
    A = torch.zeros(12, 12, dtype=DT)
    vals, vecs = curvlinops.eigsh(TensorLinearOperator(A), k=3, which="SA")
    assert vals.abs().max() <= 1e-14
    assert torch.allclose(vecs.T @ vecs, torch.eye(3, dtype=DT), atol=1e-12)


@pytest.mark.parametrize("which, k", [("LA", 4), ("LA", 6), ("SA", 3)])
def test_eigsh_repeated_values_without_exhausted_krylov_space(which, k):
    """Full rank, repeated extreme eigenvalues: block_size=1 returned [4, 4, 5, 5]."""
    A = with_spectrum([5.0] * 3 + [4.0] * 3 + list(np.linspace(1, 2, 17)) + [0.5] * 3, seed=0)
    for block_size in (None, 3):
        vals, vecs = curvlinops.eigsh(
            TensorLinearOperator(A),
            k=k,
            which=which,
            block_size=block_size,
            generator=torch.Generator().manual_seed(0),
        )
        check_eigenpairs(A, vals, vecs, which, k)


@pytest.mark.parametrize("which", ["SA", "LM"])
def test_eigsh_null_space_larger_than_basis(which):
    """Rank 17 of 25 (8 zeros), k = 6: the Krylov space is not exhausted within ncv."""
    A = low_rank_psd(dim=25, rank=17, seed=7)
    if which == "LM":
        A = low_rank_psd(dim=25, rank=3, seed=7)  # LM wants three values and three zeros
    vals, vecs = curvlinops.eigsh(
        TensorLinearOperator(A), k=6, which=which, generator=torch.Generator().manual_seed(7)
    )
    true = np.linalg.eigvalsh(A.numpy())
    expected = np.sort(true[np.argsort(-np.abs(true))[:6]]) if which == "LM" else true[:6]
    np.testing.assert_allclose(vals.numpy(), expected, rtol=0, atol=1e-9 * np.abs(true).max())
    residuals = (A @ vecs - vecs * vals).norm(dim=0)
    assert residuals.max() <= 1e-6 * np.abs(true).max()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"block_size": 0}, r"block_size must be None or an integer in \[1, 16\]"),
        ({"block_size": -1}, "block_size"),
        ({"block_size": 1.5}, "block_size"),
        ({"block_size": 17}, "block_size"),
        ({"k": 2.0}, "k must be an integer"),
        ({"k": 0}, "k must be an integer"),
        ({"ncv": 4}, "ncv must be None or an integer >= k"),
        ({"ncv": 10.0}, "ncv"),
        ({"tol": -1e-3}, "tol must be a finite number >= 0"),
        ({"tol": float("nan")}, "tol"),
        ({"generator": 0}, "generator must be a torch.Generator"),
    ],
)
def test_eigsh_argument_ranges(kwargs, match):
    A = TensorLinearOperator(with_spectrum(np.linspace(1, 2, 20)))
    kwargs = {"k": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        curvlinops.eigsh(A, **kwargs)


def test_eigsh_tol_zero_means_machine_precision():
    A = with_spectrum(np.linspace(1, 2, 20))
    vals, vecs = curvlinops.eigsh(TensorLinearOperator(A), k=2, tol=0)
    check_eigenpairs(A, vals, vecs, "LA", 2)


# ----------------------------------------------------------------------------------------
# Neumann (defect 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": 0.0}, "scale must be a finite number > 0"),
        ({"scale": -0.1}, "scale"),
        ({"scale": float("inf")}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"num_terms": 2.5}, "num_terms must be an integer >= 0"),
        ({"num_terms": True}, "num_terms"),
        ({"num_terms": -1}, "num_terms"),
        ({"check_nan": "yes"}, "check_nan must be a bool"),
    ],
)
def test_neumann_argument_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeumannInverseLinearOperator(TensorLinearOperator(torch.eye(4, dtype=DT)), **kwargs)


def test_neumann_growing_terms_warn():
    """Scale too large: norms of 1e23 came back silently."""
    A = TensorLinearOperator(with_spectrum(np.linspace(0.5, 3, 10)))
    x = torch.ones(10, 2, dtype=DT)
    with pytest.warns(NeumannDivergenceWarning, match="diverges.*Decrease scale"):
        NeumannInverseLinearOperator(A, num_terms=100, scale=0.9) @ x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converging series stays quiet
        y = NeumannInverseLinearOperator(A, num_terms=200, scale=0.5) @ x
    assert torch.allclose(y, torch.linalg.solve(A @ torch.eye(10, dtype=DT), x), atol=1e-10)


def test_neumann_infinities_raise():
    """Infinities (not only NaNs) in the partial sum raise with check_nan=True."""
    A = TensorLinearOperator(1e200 * torch.eye(6, dtype=DT))  # (1 - 1e200)^2 overflows
    x = torch.ones(6, dtype=DT)
    with pytest.raises(ValueError, match="infinities at term 2.*Decrease scale"):
        NeumannInverseLinearOperator(A, num_terms=10) @ x
    with pytest.warns(NeumannDivergenceWarning):  # unchecked: still not silent
        NeumannInverseLinearOperator(A, num_terms=10, check_nan=False) @ x


# ----------------------------------------------------------------------------------------
# CG and LSMR (defects 8 and 16)


def test_cg_indefinite_operator_raises():
    """An indefinite A diverged to 1e18 with only 'increase max_iter'."""
    A = TensorLinearOperator(with_spectrum(np.linspace(-1, 3, 10)))
    x = torch.ones(10, 2, dtype=DT)
    for kwargs in ({}, {"eps": 0.0, "tolerance": 1e-10}):
        with pytest.raises(ValueError, match="not positive definite"):
            CGInverseLinearOperator(A, **kwargs) @ x


def test_cg_singular_psd_consistent_system_is_accepted():
    P = with_spectrum([0.0] * 3 + list(np.linspace(1, 3, 7)))
    b = P @ torch.randn(10, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    inv = CGInverseLinearOperator(TensorLinearOperator(P), eps=0.0, tolerance=1e-10)
    assert torch.allclose(P @ (inv @ b), b, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_iter": 0, "max_tridiag_iter": 0}, "max_iter must be an integer >= 1"),
        ({"max_iter": -3}, "max_iter must be an integer >= 1"),
        ({"max_iter": 10.5}, "max_iter"),
        ({"tolerance": -1.0}, "tolerance must be a finite number >= 0"),
        ({"eps": float("nan")}, "eps"),
        ({"stop_updating_after": -1e-3}, "stop_updating_after"),
        ({"max_tridiag_iter": -1}, "max_tridiag_iter"),
        ({"preconditioner": 3.0}, "preconditioner must be None or a callable"),
        ({"initial_guess": np.zeros(5)}, "initial_guess must be None or a tensor"),
        ({"initial_guess": torch.zeros(4, dtype=DT)}, r"initial_guess must have shape \[D\]"),
        ({"initial_guess": torch.zeros(6, 2, dtype=DT)}, "initial_guess"),
    ],
)
def test_cg_argument_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CGInverseLinearOperator(TensorLinearOperator(torch.eye(5, dtype=DT)), **kwargs)


def test_cg_initial_guess_size_checked_before_reshape():
    """A [D] guess for K = 2 right-hand sides: a clear ValueError, not a reshape error."""
    inv = CGInverseLinearOperator(
        TensorLinearOperator(torch.eye(5, dtype=DT)), initial_guess=torch.zeros(5, dtype=DT)
    )
    with pytest.raises(ValueError, match=r"initial_guess must have shape \[5, 2\]"):
        inv @ torch.ones(5, 2, dtype=DT)
    assert torch.allclose(inv @ torch.ones(5, dtype=DT), torch.ones(5, dtype=DT))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"damp": -1.0}, "damp must be a finite number >= 0"),
        ({"atol": float("nan")}, "atol"),
        ({"maxiter": 0}, "maxiter must be None or an integer >= 1"),
        ({"maxiter": 2.5}, "maxiter"),
        ({"x0": np.zeros(3)}, r"x0 must be None or a vector of shape \(5,\)"),
    ],
)
def test_lsmr_argument_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LSMRInverseLinearOperator(TensorLinearOperator(torch.eye(5, dtype=DT)), **kwargs)


# ----------------------------------------------------------------------------------------
# XTrace / XDiag of zero and low-rank operators (defect 12)


@pytest.mark.parametrize("as_operator", [False, True])
def test_xtrace_xdiag_zero_operator(as_operator):
    A = torch.zeros(20, 20, dtype=DT)
    A = TensorLinearOperator(A) if as_operator else A
    assert xtrace(A, 10).item() == 0.0
    assert torch.equal(xdiag(A, 10), torch.zeros(20, dtype=DT))
    assert hutchpp_trace(A, 9).item() == 0.0


def test_xtrace_xdiag_exactly_low_rank_sketch():
    """A sketch with exactly dependent columns (R singular) gave NaN; now exact."""
    A = torch.zeros(20, 20, dtype=DT)
    A[0, 0] = 3.0
    torch.manual_seed(0)
    assert abs(xtrace(A, 10).item() - 3.0) < 1e-12
    assert torch.allclose(xdiag(A, 10), A.diagonal(), atol=1e-12)
    B = torch.zeros(20, 20, dtype=DT)
    B[0, 0], B[1, 1] = 3.0, 2.0  # rank 2, Gaussian test vectors capture its range
    torch.manual_seed(1)
    assert abs(xtrace(B, 10, distribution="normal").item() - 5.0) < 1e-12


# ----------------------------------------------------------------------------------------
# Estimators' arguments (defect 16)

ESTIMATORS = {
    "hutchinson_trace": (hutchinson_trace, 1),
    "hutchpp_trace": (hutchpp_trace, 3),
    "xtrace": (xtrace, 2),
    "hutchinson_diag": (hutchinson_diag, 1),
    "xdiag": (xdiag, 2),
    "hutchinson_squared_fro": (hutchinson_squared_fro, 1),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("bad", [2.5, 6.0, True, "4"])
def test_non_integer_num_matvecs(name, bad):
    estimator, _ = ESTIMATORS[name]
    with pytest.raises(ValueError, match="num_matvecs must be an integer"):
        estimator(torch.eye(12, dtype=DT), bad)


@pytest.mark.parametrize("bad", [0, -1, -6])
def test_squared_fro_non_positive_num_matvecs(bad):
    """num_matvecs <= 0 divided by zero (NaN) or drew a negative number of vectors."""
    with pytest.raises(ValueError, match="num_matvecs must be at least 1"):
        hutchinson_squared_fro(torch.eye(12, dtype=DT), bad)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_non_positive_num_matvecs(name):
    estimator, divisor = ESTIMATORS[name]
    with pytest.raises(ValueError, match="num_matvecs"):
        estimator(torch.eye(12, dtype=DT), -divisor)


def test_sampling_arguments_checked_before_products():
    calls = []

    class Counting(TensorLinearOperator):
        def _matmat(self, X):
            calls.append(1)
            return super()._matmat(X)

    A = Counting(torch.eye(12, dtype=DT))
    with pytest.raises(ValueError, match="distribution must be one of"):
        hutchpp_trace(A, 6, distribution="gaussian")
    with pytest.raises(ValueError, match="distribution must be one of"):
        hutchinson_squared_fro(A, 6, distribution="uniform")
    with pytest.raises(ValueError, match="generator must be a torch.Generator"):
        xtrace(A, 6, generator=1)
    assert calls == []


# ----------------------------------------------------------------------------------------
# Spectral densities (defect 16)


@pytest.fixture(scope="module")
def spectrum_operator():
    return TensorLinearOperator(with_spectrum(np.linspace(1, 2, 20)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"boundaries": (2.0, 1.0)}, "lower < upper"),
        ({"boundaries": (1.0, 1.0)}, "lower < upper"),
        ({"boundaries": (1.0, float("nan"))}, "finite numbers"),
        ({"margin": -0.1}, "margin must be a finite number >= 0"),
        ({"num_points": 0}, "num_points must be an integer >= 1"),
        ({"num_points": 10.5}, "num_points"),
        ({"num_repeats": 1.5}, "num_repeats must be an integer >= 1"),
        ({"kappa": float("inf")}, "kappa must be greater than 1"),
        ({"boundaries_tol": -1.0}, "boundaries_tol must be a finite number >= 0"),
    ],
)
def test_spectrum_argument_ranges(spectrum_operator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos_approximate_spectrum(spectrum_operator, 8, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epsilon": 0.0}, "epsilon must be a finite number > 0"),
        ({"epsilon": -1e-5}, "epsilon"),
        ({"boundaries": (2.0, 1.0)}, "lower < upper"),
        ({"margin": -0.5}, "margin"),
    ],
)
def test_log_spectrum_argument_ranges(spectrum_operator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lanczos_approximate_log_spectrum(spectrum_operator, 8, **kwargs)


def test_spectrum_from_iter_and_cached_arguments(spectrum_operator):
    run = fast_lanczos(spectrum_operator, 6, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="lower < upper"):
        lanczos_approximate_spectrum_from_iter(run, (2.0, 1.0), 50, 3.0, 0.05)
    with pytest.raises(ValueError, match="margin"):
        lanczos_approximate_spectrum_from_iter(run, (1.0, 2.0), 50, 3.0, -0.05)
    with pytest.raises(ValueError, match="epsilon"):
        lanczos_approximate_log_spectrum_from_iter(run, (1.0, 2.0), 50, 3.0, 0.05, 0.0)
    with pytest.raises(ValueError, match="magnitudes"):
        lanczos_approximate_log_spectrum_from_iter(run, (-1.0, 2.0), 50, 3.0, 0.05, 1e-5)
    with pytest.raises(ValueError, match="ncv >= 2"):  # was a ZeroDivisionError
        lanczos_approximate_spectrum_from_iter((run[0][:1], run[1][:1, :1]), (1, 2), 5, 3.0, 0)
    with pytest.raises(ValueError, match="ncv must be at least 2"):
        fast_lanczos(spectrum_operator, 4.0)
    cached = LanczosApproximateSpectrumCached(spectrum_operator, 6, boundaries=(1.0, 2.0))
    with pytest.raises(ValueError, match="margin"):
        cached.approximate_spectrum(margin=-1.0)
    with pytest.raises(ValueError, match="lower < upper"):
        approximate_boundaries(spectrum_operator, boundaries=(3.0, 1.0))
    with pytest.raises(ValueError, match="not increasing"):  # given lower above the top
        approximate_boundaries(spectrum_operator, boundaries=(5.0, None))


# ----------------------------------------------------------------------------------------
# Sub-matrix indices


@pytest.mark.parametrize("rows", [torch.tensor([0, 1]), 3, np.array([0, 1])])
def test_submatrix_indices_must_be_lists(rows):
    A = TensorLinearOperator(torch.eye(4, dtype=DT))
    with pytest.raises(ValueError, match="row_idxs must"):
        SubmatrixLinearOperator(A, rows, [0])


def test_lsmr_iteration_limit_warns():
    A = TensorLinearOperator(with_spectrum(np.logspace(0, 3, 12)))
    inv = LSMRInverseLinearOperator(A, maxiter=2)
    with pytest.warns(LSMRNotConvergedWarning, match="iteration limit"):
        inv @ torch.ones(12, 2, dtype=DT)
    assert [info[0] for info in inv._lsmr_info] == [7, 7]


@pytest.mark.parametrize("which", ["SA", "LA"])
def test_eigsh_low_rank_ggn(which):
    """The issue's setting: a GGN with D = 26 parameters and rank 6 (3 samples, 2 outputs)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=DT, generator=gen))
    params = list(model.parameters())
    data = [
        (torch.randn(3, 5, dtype=DT, generator=gen), torch.randn(3, 2, dtype=DT, generator=gen))
    ]
    G = curvlinops.GGNLinearOperator(model, torch.nn.MSELoss(), params, data)
    dense = G @ torch.eye(26, dtype=DT)
    assert torch.linalg.matrix_rank(dense).item() == 6
    vals, vecs = curvlinops.eigsh(G, k=4, which=which, generator=torch.Generator().manual_seed(1))
    check_eigenpairs(dense, vals, vecs, which, 4)
