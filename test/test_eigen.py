"""Tests for ``curvlinops.eigsh`` against ``numpy.linalg.eigh``."""

import numpy as np
import pytest
import torch
from cases import make_case
from reference import assert_close, cached_reference

import curvlinops
from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.examples import TensorLinearOperator

DT = torch.float64


def matrix(evals, seed=0):
    evals = torch.as_tensor(evals, dtype=DT)
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), dtype=DT, generator=gen))
    return (Q * evals) @ Q.T


SPECTRA = {
    "clustered": torch.cat(
        [torch.linspace(0, 1, 150), torch.tensor([3, 3 + 1e-4, 3 + 2e-4, 5, 7, 9])]
    ),
    "negative": torch.cat(
        [torch.linspace(-9, -2, 10), torch.linspace(-1, 1, 140), torch.tensor([4.0, 6.0])]
    ),
}


def expected(A: torch.Tensor, k: int, which: str) -> np.ndarray:
    true = np.linalg.eigvalsh(A.numpy())
    if which == "LA":
        return np.sort(true)[-k:]
    if which == "SA":
        return np.sort(true)[:k]
    return np.sort(true[np.argsort(-np.abs(true))[:k]])


def check_pairs(A, vals, vecs, k, which, tol):
    assert vals.shape == (k,) and vecs.shape == (A.shape[0], k)
    np.testing.assert_allclose(
        vals.numpy(), expected(A, k, which), atol=1e2 * tol * A.abs().max().item()
    )
    residual = (A @ vecs - vecs * vals).norm(dim=0)
    assert residual.max() <= 10 * tol * np.abs(np.linalg.eigvalsh(A.numpy())).max()
    assert_close(vecs.T @ vecs, torch.eye(k, dtype=DT), atol_scale=1e-8)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_dense(spectrum, which):
    A = matrix(SPECTRA[spectrum])
    gen = torch.Generator().manual_seed(1)
    vals, vecs = curvlinops.eigsh(
        TensorLinearOperator(A), k=5, which=which, tol=1e-9, generator=gen, ncv=40, max_iter=500
    )
    check_pairs(A, vals, vecs, 5, which, 1e-9)
    # eigenvectors up to sign, where the eigenvalues are separated
    true_vals, true_vecs = np.linalg.eigh(A.numpy())
    i = int(np.argmin(np.abs(true_vals - vals[-1].item())))
    assert abs(abs(true_vecs[:, i] @ vecs[:, -1].numpy()) - 1) < 1e-6


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_network_curvature(kind):
    c = make_case("mlp_ce", "mean")
    cls = GGNLinearOperator if kind == "ggn" else HessianLinearOperator
    op = cls(*c.tensors(), check_deterministic=False)
    dense = cached_reference(kind, "mlp_ce")
    for which in ("LA", "SA") if kind == "hessian" else ("LA",):
        vals, vecs = curvlinops.eigsh(
            op, k=4, which=which, tol=1e-10, generator=torch.Generator().manual_seed(0)
        )
        check_pairs(dense, vals, vecs, 4, which, 1e-10)
    vals, vecs = curvlinops.eigsh(op, k=2, list_format=True, tol=1e-8)
    assert [v.shape for v in vecs] == [(*p.shape, 2) for p in c.params]


def test_reproducible_and_progressbar(capsys):
    A = TensorLinearOperator(matrix(SPECTRA["negative"]))
    a = curvlinops.eigsh(
        A, k=2, generator=torch.Generator().manual_seed(2), return_eigenvectors=False
    )
    b = curvlinops.eigsh(
        A,
        k=2,
        generator=torch.Generator().manual_seed(2),
        return_eigenvectors=False,
        progressbar=True,
    )
    assert torch.equal(a, b)
    assert "eigsh" in capsys.readouterr().err


def test_not_converged_warns():
    A = TensorLinearOperator(matrix(SPECTRA["clustered"]))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        curvlinops.eigsh(A, k=5, which="SA", tol=1e-12, max_iter=2)


def test_errors():
    A = TensorLinearOperator(matrix(SPECTRA["negative"]))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 152\)"):
        curvlinops.eigsh(A, k=152)
    with pytest.raises(ValueError, match="which must be one of"):
        curvlinops.eigsh(A, which="BE")
    with pytest.raises(ValueError, match="square"):
        curvlinops.eigsh(TensorLinearOperator(torch.zeros(3, 4, dtype=DT)))


@pytest.mark.parametrize("rank", [0, 2])
def test_eigsh_on_operators_of_rank_below_k(rank):
    """An exhausted Krylov space (invariant subspace) restarts from a fresh direction."""
    gen = torch.Generator().manual_seed(3)
    U = torch.randn(30, rank, dtype=torch.float64, generator=gen)
    A = U @ U.T
    evals, evecs = curvlinops.eigsh(TensorLinearOperator(A), k=4, generator=gen)
    expected = torch.linalg.eigvalsh(A)[-4:]
    assert torch.allclose(evals, expected, atol=1e-10 * max(1.0, expected.abs().max().item()))
    assert torch.allclose(A @ evecs, evecs * evals, atol=1e-9 * max(1.0, A.norm().item()))
