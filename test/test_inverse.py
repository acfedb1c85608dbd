"""Tests for ``curvlinops.inverse`` (CG, LSMR, Neumann) against dense solves."""

import numpy as np
import pytest
import torch
from cases import make_case
from reference import assert_close, cached_reference

import curvlinops
from curvlinops import (
    CGInverseLinearOperator,
    GGNLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.examples import IdentityLinearOperator, TensorLinearOperator
from curvlinops.inverse import CGNotConvergedWarning

DT = torch.float64


def random_spd(dim: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=DT))
    evals = torch.logspace(0, np.log10(cond), dim, dtype=DT)
    return (Q * evals) @ Q.T


def damped_ggn():
    c = make_case("mlp_ce", "mean")
    G = GGNLinearOperator(*c.tensors(), check_deterministic=False)
    delta = 0.1
    A = G + delta * IdentityLinearOperator([p.shape for p in c.params], G.device, G.dtype)
    dense = cached_reference("ggn", "mlp_ce", "mean") + delta * torch.eye(c.dim, dtype=DT)
    return A, dense, c.params


ACCURATE_CG = {"eps": 0.0, "tolerance": 1e-10, "max_iter": 500}


def test_exports():
    assert curvlinops.CGInverseLinearOperator is CGInverseLinearOperator
    assert curvlinops.inverse.CGInverseLinearOperator is CGInverseLinearOperator
    assert issubclass(CGNotConvergedWarning, RuntimeWarning)


@pytest.mark.parametrize("seed", [0, 1])
def test_cg_random_spd(seed):
    A = random_spd(30, seed, cond=100.0)
    B = torch.randn(30, 4, dtype=DT, generator=torch.Generator().manual_seed(seed + 10))
    inv = CGInverseLinearOperator(TensorLinearOperator(A), **ACCURATE_CG)
    assert_close(inv @ B, torch.linalg.solve(A, B), rtol=1e-8, atol_scale=1e-9)
    assert_close(inv @ B[:, 0], torch.linalg.solve(A, B[:, 0]), rtol=1e-8, atol_scale=1e-9)


def test_cg_damped_ggn_list_format():
    A, dense, params = damped_ggn()
    gen = torch.Generator().manual_seed(3)
    V = [torch.randn(*p.shape, 3, dtype=DT, generator=gen) for p in params]
    inv = CGInverseLinearOperator(A, **ACCURATE_CG)
    X = inv @ V
    assert [x.shape for x in X] == [v.shape for v in V]
    flat_V = torch.cat([v.reshape(-1, 3) for v in V])
    expected = torch.linalg.solve(dense, flat_V)
    assert_close(torch.cat([x.reshape(-1, 3) for x in X]), expected, rtol=1e-8, atol_scale=1e-9)
    # beyond 3.0.1: the inverse of a self-adjoint operator is self-adjoint and exports
    assert inv.SELF_ADJOINT and inv.adjoint() is inv
    v = flat_V[:, 0].numpy()
    assert np.allclose(inv.to_scipy().rmatvec(v), expected[:, 0].numpy(), rtol=1e-7)


def test_cg_default_stops_early_and_warns():
    A = random_spd(40, 2, cond=1e4)
    B = torch.randn(40, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    calls = []

    class Counting(TensorLinearOperator):
        def _matmat(self, X):
            calls.append(X[0].shape[-1])
            return super()._matmat(X)

    inv = CGInverseLinearOperator(Counting(A), tolerance=1e-14, max_iter=11, max_tridiag_iter=11)
    with pytest.warns(CGNotConvergedWarning, match="max_iter"):
        inv @ B
    assert calls == [2] * 11  # one product per iteration with both columns
    calls.clear()
    # defaults (tolerance 1.0): a well-conditioned system stops at the minimum of 11
    CGInverseLinearOperator(Counting(random_spd(40, 2, cond=10.0))) @ B
    assert len(calls) == 11


def test_cg_initial_guess_and_preconditioner():
    A = random_spd(20, 4, cond=1e3)
    b = torch.randn(20, 1, dtype=DT, generator=torch.Generator().manual_seed(1))
    x = torch.linalg.solve(A, b)
    # starting at the solution keeps it
    inv = CGInverseLinearOperator(
        TensorLinearOperator(A), initial_guess=x, max_iter=11, max_tridiag_iter=11
    )
    assert_close(inv @ b, x, rtol=1e-9, atol_scale=1e-10)
    # the exact inverse as preconditioner solves in the first step
    A_inv = torch.linalg.inv(A)
    inv = CGInverseLinearOperator(
        TensorLinearOperator(A),
        preconditioner=lambda r: A_inv @ r,
        max_iter=11,
        max_tridiag_iter=11,
    )
    assert_close(inv @ b, x, rtol=1e-8, atol_scale=1e-10)


def test_cg_zero_rhs_and_errors():
    A = TensorLinearOperator(random_spd(10, 0))
    B = torch.zeros(10, 2, dtype=DT)
    B[:, 1] = 1.0
    X = CGInverseLinearOperator(A, tolerance=1e-10) @ B  # default eps: zero rhs -> zero
    assert torch.equal(X[:, 0], torch.zeros(10, dtype=DT))
    assert not torch.isnan(X).any()
    with pytest.raises(RuntimeError, match="max_tridiag_iter"):
        CGInverseLinearOperator(A, max_iter=5)
    with pytest.raises(ValueError, match="Unknown CG keyword"):
        CGInverseLinearOperator(A, tol=1e-3)
    with pytest.raises(RuntimeError, match="NaN"):
        CGInverseLinearOperator(A) @ torch.full((10,), float("nan"), dtype=DT)
    with pytest.raises(ValueError, match="identical input and output spaces"):
        CGInverseLinearOperator(TensorLinearOperator(torch.zeros(3, 4, dtype=DT)))


def test_cg_adjoint_of_non_symmetric():
    A = random_spd(10, 1) + 0.1 * torch.triu(torch.ones(10, 10, dtype=DT), 1)
    inv = CGInverseLinearOperator(TensorLinearOperator(A), max_iter=200)
    assert not inv.SELF_ADJOINT
    adj = inv.adjoint()
    assert isinstance(adj, CGInverseLinearOperator)
    assert torch.equal(adj._A._A, A.T)


def test_lsmr():
    A, dense, params = damped_ggn()
    inv = LSMRInverseLinearOperator(A, atol=1e-14, btol=1e-14, maxiter=2000)
    B = torch.randn(dense.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    assert_close(inv @ B, torch.linalg.solve(dense, B), rtol=1e-7, atol_scale=1e-9)
    assert len(inv._lsmr_info) == 2 and len(inv._lsmr_info[0]) == 7
    # non-symmetric matrix, adjoint and SciPy export
    M = random_spd(12, 3) + 0.2 * torch.triu(torch.ones(12, 12, dtype=DT), 1)
    inv = LSMRInverseLinearOperator(TensorLinearOperator(M), atol=1e-14, btol=1e-14, maxiter=200)
    b = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(6))
    assert_close(inv @ b, torch.linalg.solve(M, b), rtol=1e-6, atol_scale=1e-6)
    assert_close(inv.adjoint() @ b, torch.linalg.solve(M.T, b), rtol=1e-6, atol_scale=1e-6)
    assert np.allclose(inv.to_scipy().rmatvec(b.numpy()), torch.linalg.solve(M.T, b).numpy())
    with pytest.raises(ValueError, match="Unknown LSMR keyword"):
        LSMRInverseLinearOperator(TensorLinearOperator(M), tol=1.0)


def test_neumann():
    A = random_spd(15, 7, cond=5.0)  # eigenvalues in [1, 5]
    scale = 1 / 5.5
    B = torch.randn(15, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    inv = NeumannInverseLinearOperator(TensorLinearOperator(A), num_terms=400, scale=scale)
    assert_close(inv @ B, torch.linalg.solve(A, B), rtol=1e-10, atol_scale=1e-10)
    # K terms = partial sum of the series, checked against an explicit dense series
    K = 3
    I_minus = torch.eye(15, dtype=DT) - scale * A
    series = sum(torch.linalg.matrix_power(I_minus, k) for k in range(K + 1))
    inv = NeumannInverseLinearOperator(TensorLinearOperator(A), num_terms=K, scale=scale)
    assert_close(inv @ B, scale * series @ B)
    assert inv.SELF_ADJOINT


def test_neumann_damped_ggn():
    A, dense, params = damped_ggn()
    lam_max = torch.linalg.eigvalsh(dense)[-1].item()
    inv = NeumannInverseLinearOperator(A, num_terms=300, scale=1.0 / lam_max)
    b = torch.randn(dense.shape[0], dtype=DT, generator=torch.Generator().manual_seed(4))
    x = torch.linalg.solve(dense, b)
    assert torch.linalg.norm(inv @ b - x) < 1e-3 * torch.linalg.norm(x)


def test_neumann_divergence_raises():
    A = TensorLinearOperator(random_spd(10, 0, cond=10.0) * 1e100)
    with pytest.raises(ValueError, match="term .*Decrease scale"):
        NeumannInverseLinearOperator(A, num_terms=50) @ torch.ones(10, dtype=DT)
    with pytest.raises(ValueError, match="num_terms"):
        NeumannInverseLinearOperator(A, num_terms=-1)


def test_cg_reaches_tight_tolerances():
    """Residuals below sqrt(eps) keep updating (a regression: CG once froze near 1e-5)."""
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64, generator=gen))[0]
    A = Q @ torch.diag(torch.linspace(0.1, 1.5, 60, dtype=torch.float64)) @ Q.T
    B = torch.randn(60, 3, dtype=torch.float64, generator=gen)
    X = CGInverseLinearOperator(TensorLinearOperator(A), tolerance=1e-9, max_iter=200) @ B
    assert ((A @ X - B).norm(dim=0) / B.norm(dim=0)).max() < 1e-8
