"""Tests for the trace, diagonal and Frobenius-norm estimators.

Each estimator is compared with a naive implementation of its algorithm written here under
the same seed (which pins the draw order of the contract), and checked statistically
against the exact value.
"""

import pytest
import torch
from cases import make_case
from reference import assert_close, cached_reference

import curvlinops
from curvlinops import (
    GGNLinearOperator,
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)
from curvlinops.diagonal.epperly2024xtrace import xdiag as xdiag_home
from curvlinops.diagonal.hutchinson import hutchinson_diag as hutchinson_diag_home
from curvlinops.examples import TensorLinearOperator
from curvlinops.norm.hutchinson import hutchinson_squared_fro as fro_home
from curvlinops.trace.epperly2024xtrace import xtrace as xtrace_home
from curvlinops.trace.hutchinson import hutchinson_trace as hutchinson_trace_home
from curvlinops.trace.meyer2020hutch import hutchpp_trace as hutchpp_home

DT = torch.float64


def test_exports():
    assert curvlinops.hutchinson_trace is hutchinson_trace_home
    assert curvlinops.hutchpp_trace is hutchpp_home
    assert curvlinops.xtrace is xtrace_home
    assert curvlinops.hutchinson_diag is hutchinson_diag_home
    assert curvlinops.xdiag is xdiag_home
    assert curvlinops.hutchinson_squared_fro is fro_home


def low_rank_plus_noise(dim=60, rank=5, noise=1e-2, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U = torch.randn(dim, rank, dtype=DT, generator=gen)
    N = torch.randn(dim, dim, dtype=DT, generator=gen)
    return U @ U.T + noise * (N + N.T)


def naive_draw(dim, k, distribution):
    cols = []
    for _ in range(k):
        if distribution == "rademacher":
            cols.append(torch.empty(dim, dtype=DT).bernoulli_(0.5) * 2 - 1)
        else:
            cols.append(torch.randn(dim, dtype=DT))
    return torch.stack(cols, 1)


def naive_hutchinson_trace(A, k, dist):
    G = naive_draw(A.shape[0], k, dist)
    return sum(G[:, i] @ A @ G[:, i] for i in range(k)) / k


def naive_hutchpp(A, k, dist):
    n = k // 3
    S = naive_draw(A.shape[0], n, dist)
    Q, _ = torch.linalg.qr(A @ S)
    G = naive_draw(A.shape[0], n, dist)
    P = torch.eye(A.shape[0], dtype=DT) - Q @ Q.T
    return torch.trace(Q.T @ A @ Q) + torch.trace(G.T @ P @ A @ P @ G) / n


def leave_one_out(Y):
    Q, R = torch.linalg.qr(Y)
    S = torch.linalg.inv(R.T)
    S = S / S.norm(dim=0)
    return Q, S


def naive_xtrace(A, k, dist):
    W = naive_draw(A.shape[0], k // 2, dist)
    Q, S = leave_one_out(A @ W)
    Id = torch.eye(A.shape[0], dtype=DT)
    ests = []
    for i in range(k // 2):
        Qi = Q @ (torch.eye(k // 2, dtype=DT) - torch.outer(S[:, i], S[:, i])) @ Q.T
        w = W[:, i]
        ests.append(torch.trace(Qi @ A) + w @ (Id - Qi) @ A @ (Id - Qi) @ w)
    return torch.stack(ests).mean()


def naive_hutchinson_diag(A, k, dist):
    G = naive_draw(A.shape[0], k, dist)
    return sum(G[:, i] * (A @ G[:, i]) for i in range(k)) / k


def naive_xdiag(A, k):
    W = naive_draw(A.shape[0], k // 2, "rademacher")
    Q, S = leave_one_out(A @ W)
    Id = torch.eye(A.shape[0], dtype=DT)
    total = 0
    for i in range(k // 2):
        Qi = Q @ (torch.eye(k // 2, dtype=DT) - torch.outer(S[:, i], S[:, i])) @ Q.T
        w = W[:, i]
        total = total + torch.diag(Qi @ A) + w * ((Id - Qi) @ A @ w) / w**2
    return total / (k // 2)


def naive_fro(A, k, dist):
    if A.shape[1] > A.shape[0]:
        A = A.T
    G = naive_draw(A.shape[1], k, dist)
    return sum((A @ G[:, i]).pow(2).sum() for i in range(k)) / k


NONSYM = low_rank_plus_noise() + 0.05 * torch.triu(torch.ones(60, 60, dtype=DT))


@pytest.mark.parametrize("dist", ["rademacher", "normal"])
@pytest.mark.parametrize(
    "estimator, naive, k",
    [
        (hutchinson_trace, naive_hutchinson_trace, 10),
        (hutchpp_trace, naive_hutchpp, 12),
        (xtrace, naive_xtrace, 12),
        (hutchinson_diag, naive_hutchinson_diag, 10),
    ],
)
@pytest.mark.parametrize("as_operator", [False, True])
def test_matches_naive_implementation(estimator, naive, k, dist, as_operator):
    A = NONSYM
    torch.manual_seed(7)
    expected = naive(A, k, dist)
    torch.manual_seed(7)
    actual = estimator(TensorLinearOperator(A) if as_operator else A, k, distribution=dist)
    assert_close(actual, expected, rtol=1e-9)


@pytest.mark.parametrize("as_operator", [False, True])
def test_xdiag_and_fro_match_naive(as_operator):
    wrap = TensorLinearOperator if as_operator else (lambda M: M)
    torch.manual_seed(3)
    expected = naive_xdiag(NONSYM, 10)
    torch.manual_seed(3)
    assert_close(xdiag(wrap(NONSYM), 10), expected, rtol=1e-9)
    wide = NONSYM[:20]
    for M in (wide, wide.T):
        torch.manual_seed(4)
        expected = naive_fro(M, 8, "normal")
        torch.manual_seed(4)
        assert_close(hutchinson_squared_fro(wrap(M), 8, distribution="normal"), expected)


def exact_values(A):
    return {
        "trace": torch.trace(A),
        "diag": torch.diag(A),
        "fro": (A**2).sum(),
    }


@pytest.mark.parametrize(
    "estimator, kind, k",
    [
        (hutchinson_trace, "trace", 6),
        (hutchpp_trace, "trace", 6),
        (xtrace, "trace", 6),
        (hutchinson_diag, "diag", 6),
        (xdiag, "diag", 6),
        (hutchinson_squared_fro, "fro", 6),
    ],
)
def test_unbiased_within_three_standard_errors(estimator, kind, k):
    A = NONSYM
    exact = exact_values(A)[kind]
    gen = torch.Generator().manual_seed(0)
    samples = torch.stack([estimator(A, k, generator=gen) for _ in range(400)])
    mean, sem = samples.mean(0), samples.std(0) / 400**0.5
    assert ((mean - exact).abs() <= 3 * sem + 1e-10).float().mean() >= 0.95


def test_sketching_beats_hutchinson_on_low_rank_plus_noise():
    A = low_rank_plus_noise(rank=3, noise=1e-3)
    gen = torch.Generator().manual_seed(1)
    k = 12

    def mse(estimator, exact):
        return torch.stack(
            [((estimator(A, k, generator=gen) - exact) ** 2).mean() for _ in range(50)]
        ).mean()

    hutch = mse(hutchinson_trace, torch.trace(A))
    assert mse(hutchpp_trace, torch.trace(A)) < 0.1 * hutch
    assert mse(xtrace, torch.trace(A)) < 0.1 * hutch
    assert mse(xdiag, torch.diag(A)) < 0.1 * mse(hutchinson_diag, torch.diag(A))


def test_curvature_operator():
    c = make_case("mlp_ce", "mean")
    G = GGNLinearOperator(*c.tensors(), check_deterministic=False)
    G_dense = cached_reference("ggn", "mlp_ce", "mean")
    for estimator in (hutchinson_trace, xtrace, hutchinson_diag, xdiag, hutchinson_squared_fro):
        torch.manual_seed(0)
        on_op = estimator(G, 10)
        torch.manual_seed(0)
        assert_close(on_op, estimator(G_dense, 10), rtol=1e-8)
    # enough products -> XTrace is exact up to roundoff for a matrix of low rank
    rank = torch.linalg.matrix_rank(G_dense).item()
    if 2 * (rank + 1) < c.dim:
        torch.manual_seed(0)
        assert_close(xtrace(G, 2 * (rank + 1)), torch.trace(G_dense), rtol=1e-8)


def test_generator_leaves_global_state_alone():
    A = NONSYM
    torch.manual_seed(11)
    state = torch.get_rng_state()
    a = xtrace(A, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = xtrace(A, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hutchinson_trace(torch.zeros(3, 4), 1), "square"),
        (lambda: hutchinson_diag(torch.zeros(5, 5), 5), r"num_matvecs \(5\) must be less"),
        (lambda: hutchpp_trace(torch.zeros(9, 9), 4), r"num_matvecs \(4\) must be divisible by 3"),
        (lambda: xtrace(torch.zeros(9, 9), 5), "divisible by 2"),
        (lambda: xdiag(torch.zeros(9, 9), 3), "divisible by 2"),
        (lambda: xtrace(torch.zeros(9, 4), 2), "square"),
        (lambda: hutchinson_trace(torch.zeros(9, 9), 2, distribution="uniform"), "uniform"),
        (lambda: hutchinson_squared_fro(torch.zeros(9), 2), "2-d"),
        (lambda: hutchinson_squared_fro(torch.zeros(9, 3), 3), r"min\(A.shape\) = 3"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
