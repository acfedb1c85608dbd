"""Tests for ``curvlinops.submatrix.SubmatrixLinearOperator``."""

import pytest
import torch
from reference import assert_close, densify

import curvlinops
from curvlinops.examples import TensorLinearOperator
from curvlinops.submatrix import SubmatrixLinearOperator

DT = torch.float64


def test_export():
    assert curvlinops.SubmatrixLinearOperator is SubmatrixLinearOperator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sliced_dense(seed):
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(9, 13, dtype=DT, generator=gen)
    rows = torch.randperm(9, generator=gen)[:5].tolist()
    cols = torch.randperm(13, generator=gen)[:7].tolist()
    S = SubmatrixLinearOperator(TensorLinearOperator(M), rows, cols)
    expected = M[rows][:, cols]
    assert S.shape == (5, 7)
    assert_close(densify(S), expected)
    X = torch.randn(7, 3, dtype=DT, generator=gen)
    assert_close(S @ X, expected @ X)
    assert_close(S @ X[:, 0], expected @ X[:, 0])
    assert_close(densify(S.adjoint()), expected.T)
    assert_close(
        torch.as_tensor(S.to_scipy().rmatvec(torch.ones(5, dtype=DT).numpy())),
        expected.T @ torch.ones(5, dtype=DT),
    )


def test_set_submatrix_changes_shape():
    M = torch.arange(20, dtype=DT).reshape(4, 5)
    S = SubmatrixLinearOperator(TensorLinearOperator(M), [0, 1], [2])
    S.set_submatrix([3, 0, 2], [4, 1])
    assert S.shape == (3, 2)
    assert_close(densify(S), M[[3, 0, 2]][:, [4, 1]])


@pytest.mark.parametrize(
    "rows, cols, match",
    [
        ([0, 0], [1], "row_idxs contains duplicate"),
        ([0], [1, 1], "col_idxs contains duplicate"),
        ([4], [1], r"row_idxs must lie in \[0, 4\)"),
        ([0], [-1], r"col_idxs must lie in \[0, 5\)"),
        ([0.0], [1], "row_idxs must contain Python ints"),
        ([0], [torch.tensor(1)], "col_idxs must contain Python ints"),
    ],
)
def test_invalid_indices(rows, cols, match):
    A = TensorLinearOperator(torch.zeros(4, 5, dtype=DT))
    with pytest.raises(ValueError, match=match):
        SubmatrixLinearOperator(A, rows, cols)
