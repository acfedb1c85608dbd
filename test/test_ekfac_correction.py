"""Tests for ``curvlinops._ekfac_correction`` (eigenvalue correction, batched ``eigh``)."""

import warnings

import pytest
import torch

import curvlinops._ekfac_correction as correction
from curvlinops._ekfac_correction import (
    batched_eigh,
    compute_eigenvalue_correction_linear_weight_sharing,
    eigenbasis_from_rows,
    per_example_square_sums,
)

DT = torch.float64
STRATEGIES = ["per_example_gradients", "gramian"]


def random_data(N, S, D1, D2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(N, S, D1, dtype=DT, generator=gen)
    a = torch.randn(N, S, D2, dtype=DT, generator=gen)
    Q1 = torch.linalg.qr(torch.randn(D1, D1, dtype=DT, generator=gen))[0]
    Q2 = torch.linalg.qr(torch.randn(D2, D2, dtype=DT, generator=gen))[0]
    return g, Q1, a, Q2


def naive_correction(g, Q1, a, Q2):
    """Loop over examples: rotate each per-example gradient and square it."""
    N, S, _ = g.shape
    total = 0.0
    for n in range(N):
        if Q2 is None:
            gradient = sum(g[n, s] for s in range(S))
            total = total + (Q1.T @ gradient) ** 2
        else:
            gradient = sum(torch.outer(g[n, s], a[n, s]) for s in range(S))
            total = total + (Q1.T @ gradient @ Q2) ** 2
    return total


def assert_close(actual, expected, rtol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max())


# (N, S, D1, D2): default gramian for the first two, per-example gradients for the others
SHAPES = [(5, 1, 3, 4), (4, 2, 9, 10), (6, 3, 3, 2), (3, 4, 2, 5)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_correction_matches_naive_loop(shape, strategy):
    g, Q1, a, Q2 = random_data(*shape)
    expected = naive_correction(g, Q1, a, Q2)
    result = compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, Q2, strategy)
    assert result.shape == (shape[2], shape[3])
    assert_close(result, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_strategies_agree(shape):
    g, Q1, a, Q2 = random_data(*shape, seed=3)
    results = [
        compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, Q2, s) for s in STRATEGIES
    ]
    assert_close(results[0], results[1], rtol=1e-12)


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_bias_correction(strategy):
    g, Q1, a, _ = random_data(4, 3, 5, 2)
    expected = naive_correction(g, Q1, None, None)
    result = compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, None, strategy)
    assert result.shape == (5,)
    assert_close(result, expected)
    # the inputs do not matter for a bias
    assert_close(compute_eigenvalue_correction_linear_weight_sharing(g, Q1, None, None), expected)


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((2, 1, 3, 3), "gramian"),  # 1 * 6 < 9
        ((2, 2, 8, 8), "per_example_gradients"),  # 4 * 16 = 64: not strictly smaller
        ((2, 2, 9, 8), "gramian"),  # 4 * 17 = 68 < 72
        ((2, 3, 3, 3), "per_example_gradients"),  # 9 * 6 > 9
    ],
    ids=str,
)
def test_default_strategy_rule(shape, expected, monkeypatch):
    """The per-example strategy is the only one that contracts with ``nsi,nsj->nij``."""
    equations = []
    einsum = torch.einsum

    def spy(equation, *operands):
        equations.append(equation)
        return einsum(equation, *operands)

    monkeypatch.setattr(torch, "einsum", spy)
    g, Q1, a, Q2 = random_data(*shape)
    compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, Q2)
    used = "per_example_gradients" if "nsi,nsj->nij" in equations else "gramian"
    assert used == expected


def test_chunked_sum_is_exact(monkeypatch):
    """A tiny memory budget splits the examples into chunks without changing the result."""
    g, Q1, a, Q2 = random_data(7, 3, 4, 5)
    expected = {s: naive_correction(g, Q1, a, Q2) for s in STRATEGIES}
    bias_expected = naive_correction(g, Q1, None, None)
    monkeypatch.setattr(correction, "MAX_CHUNK_ENTRIES", 1)
    assert correction._chunk_size(7, 60) == 1
    for strategy in STRATEGIES:
        result = compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, Q2, strategy)
        assert_close(result, expected[strategy])
    assert_close(compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, None), bias_expected)


@pytest.mark.parametrize("strategy", [None, *STRATEGIES])
def test_per_example_square_sums_without_rotation(strategy):
    g, _, a, _ = random_data(4, 2, 3, 5)
    I1, I2 = torch.eye(3, dtype=DT), torch.eye(5, dtype=DT)
    assert_close(per_example_square_sums(g, a, strategy), naive_correction(g, I1, a, I2))
    assert_close(per_example_square_sums(g, None, strategy), naive_correction(g, I1, None, None))


def test_correction_errors():
    g, Q1, a, Q2 = random_data(3, 2, 3, 4)
    for bad in ("gram", "PER_EXAMPLE_GRADIENTS", ""):
        with pytest.raises(ValueError, match="Invalid _force_strategy"):
            compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, Q2, bad)
        with pytest.raises(ValueError, match="Invalid _force_strategy"):
            compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, None, bad)
        with pytest.raises(ValueError, match="Invalid _force_strategy"):
            per_example_square_sums(g, a, bad)
    with pytest.raises(ValueError, match=r"g must have shape \[N, S, D1\]"):
        compute_eigenvalue_correction_linear_weight_sharing(g[:, 0], Q1, a, Q2)
    with pytest.raises(ValueError, match="ggT_eigvecs must have shape"):
        compute_eigenvalue_correction_linear_weight_sharing(g, Q2, a, Q2)
    with pytest.raises(ValueError, match="a must have shape"):
        compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a[:2], Q2)
    with pytest.raises(ValueError, match="a must have shape"):
        compute_eigenvalue_correction_linear_weight_sharing(g, Q1, None, Q2)
    with pytest.raises(ValueError, match="aaT_eigvecs must have shape"):
        compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, Q1)


# ---------------------------------------------------------------------------- batched_eigh
def spd(n, seed, dtype=DT, rank=None):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n if rank is None else rank, dtype=DT, generator=gen)
    return (X @ X.T).to(dtype)


def assert_eigh(evals, evecs, M, rtol=1e-10):
    n = M.shape[0]
    assert evals.shape == (n,) and evecs.shape == (n, n)
    assert evals.dtype == M.dtype and evecs.dtype == M.dtype
    assert (evals[1:] >= evals[:-1]).all()
    eye = torch.eye(n, dtype=M.dtype)
    torch.testing.assert_close(evecs.T @ evecs, eye, rtol=0, atol=rtol * 10)
    scale = M.abs().max()
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, M, rtol=0, atol=rtol * scale)
    expected = torch.linalg.eigvalsh(M.double()).to(M.dtype)
    torch.testing.assert_close(evals, expected, rtol=0, atol=rtol * scale)


def count_eigh_calls(monkeypatch):
    shapes = []
    eigh = torch.linalg.eigh

    def spy(M):
        shapes.append(tuple(M.shape))
        return eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    return shapes


def test_batched_eigh_list_mixed_sizes(monkeypatch):
    matrices = [spd(3, 0), spd(5, 1), spd(3, 2), spd(1, 3), spd(5, 4, rank=2), spd(3, 5)]
    calls = count_eigh_calls(monkeypatch)
    result = batched_eigh(matrices)
    assert isinstance(result, list) and len(result) == len(matrices)
    for (evals, evecs), M in zip(result, matrices):
        assert_eigh(evals, evecs, M)
    # one call per size, each on the stack of all matrices of that size
    assert sorted(calls) == [(1, 1, 1), (2, 5, 5), (3, 3, 3)]


def test_batched_eigh_dict_and_dtypes(monkeypatch):
    matrices = {
        ("A", "0"): spd(4, 0),
        ("G", "0"): spd(4, 1, dtype=torch.float32),
        "x": spd(4, 2),
        7: spd(2, 3),
    }
    calls = count_eigh_calls(monkeypatch)
    result = batched_eigh(matrices)
    assert list(result) == list(matrices)
    for key, M in matrices.items():
        assert_eigh(*result[key], M, rtol=1e-10 if M.dtype == DT else 1e-5)
    # float32 and float64 matrices of equal size are decomposed separately
    assert sorted(calls) == [(1, 2, 2), (1, 4, 4), (2, 4, 4)]
    assert batched_eigh([]) == [] and batched_eigh({}) == {}


def test_batched_eigh_small_float32_in_float64(monkeypatch):
    """Small lower-precision matrices are decomposed in float64 (accuracy) and cast back."""
    calls = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda M: calls.append(M.dtype) or real_eigh(M))
    M = spd(6, 0, dtype=torch.float32, rank=3)
    ((evals, evecs),) = batched_eigh([M])
    assert calls == [torch.float64] and evals.dtype == evecs.dtype == torch.float32
    orthogonality = evecs.double().T @ evecs.double() - torch.eye(6, dtype=DT)
    assert orthogonality.abs().max() < 2 * torch.finfo(torch.float32).eps


def test_batched_eigh_float64_retry(monkeypatch):
    # large lower-precision matrices are decomposed in their dtype first
    monkeypatch.setattr(correction, "FLOAT64_EIGH_MAX_DIM", 0)
    real_eigh = torch.linalg.eigh
    dtypes = []

    def fail_in_float32(M):
        dtypes.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", fail_in_float32)
    matrices = [spd(3, 0, torch.float32), spd(3, 1, torch.float32), spd(2, 2)]
    with pytest.warns(UserWarning, match=r"did not converge in torch.float32.*float64"):
        result = batched_eigh(matrices)
    for (evals, evecs), M in zip(result, matrices):
        assert_eigh(evals, evecs, M, rtol=1e-10 if M.dtype == DT else 1e-5)
    # float64 group: one call; float32 group: one failing and one float64 call
    assert sorted(map(str, dtypes)) == sorted(["torch.float64", "torch.float32", "torch.float64"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_eigh_damped_retry(dtype, monkeypatch):
    monkeypatch.setattr(correction, "FLOAT64_EIGH_MAX_DIM", 0)  # the large-matrix path
    real_eigh = torch.linalg.eigh
    inputs = []
    undamped_failures = 1 if dtype == torch.float64 else 2  # float64 skips the dtype retry

    def fail_undamped(M):
        inputs.append(M)
        if len(inputs) <= undamped_failures:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", fail_undamped)
    M = spd(4, 0, dtype=dtype, rank=2)  # two zero eigenvalues
    with pytest.warns(UserWarning, match="damping"):
        ((evals, evecs),) = batched_eigh([M])
    assert len(inputs) == undamped_failures + 1
    shift = inputs[-1][0] - M.double()  # the calls see stacks [1, 4, 4]
    mean_abs_diag = M.double().diagonal().abs().mean()
    torch.testing.assert_close(
        shift, correction.EIGH_DAMPING * mean_abs_diag * torch.eye(4, dtype=DT), rtol=1e-6, atol=0
    )
    assert_eigh(evals, evecs, M, rtol=1e-10 if dtype == DT else 1e-5)


def test_batched_eigh_damped_zero_matrix(monkeypatch):
    """An all-zero matrix still gets a positive shift (relative scale 1) in the last retry."""
    real_eigh = torch.linalg.eigh
    inputs = []

    def fail_undamped(M):
        inputs.append(M)
        if len(inputs) == 1:
            raise torch.linalg.LinAlgError("failed to converge")
        return real_eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", fail_undamped)
    with pytest.warns(UserWarning, match="damping"):
        ((evals, _),) = batched_eigh([torch.zeros(3, 3, dtype=DT)])
    torch.testing.assert_close(inputs[-1][0], correction.EIGH_DAMPING * torch.eye(3, dtype=DT))
    torch.testing.assert_close(evals, torch.zeros(3, dtype=DT), rtol=0, atol=1e-20)


def test_batched_eigh_errors(monkeypatch):
    with pytest.raises(ValueError, match="square matrices"):
        batched_eigh([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="square matrices"):
        batched_eigh({"v": torch.zeros(3)})
    with pytest.raises(ValueError, match="square matrices"):
        batched_eigh([[1.0]])
    bad = spd(3, 0)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite entries: \[1\]"):
        batched_eigh([spd(3, 1), bad])

    def always_fail(M):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", always_fail)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="eigh failed for"):
        warnings.simplefilter("error")  # no warning before the error
        batched_eigh({"A": spd(3, 0, torch.float32)})


# ---------------------------------------------------------------------------- rank-limited
@pytest.mark.parametrize("r, d", [(3, 8), (1, 5), (6, 6), (8, 4)])
def test_eigenbasis_from_rows(r, d):
    gen = torch.Generator().manual_seed(r * d)
    rows = torch.randn(r, d, dtype=DT, generator=gen)
    if r > 2:
        rows[-1] = rows[0] - rows[1]  # rank-deficient rows
    factor = rows.T @ rows
    Q = eigenbasis_from_rows(rows)
    eye = torch.eye(d, dtype=DT)
    torch.testing.assert_close(Q.T @ Q, eye, rtol=0, atol=1e-12)
    D = Q.T @ factor @ Q
    scale = factor.abs().max()
    torch.testing.assert_close(D, torch.diag(D.diagonal()), rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(
        D.diagonal().sort().values, torch.linalg.eigvalsh(factor), rtol=0, atol=1e-12 * scale
    )


def test_eigenbasis_from_rows_edge_cases():
    Q = eigenbasis_from_rows(torch.zeros(2, 4, dtype=DT))
    torch.testing.assert_close(Q, torch.eye(4, dtype=DT), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"rows must be a matrix \[r, d\]"):
        eigenbasis_from_rows(torch.zeros(4, dtype=DT))
