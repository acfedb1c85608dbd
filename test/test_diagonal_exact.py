"""Tests for ``curvlinops.diagonal.exact`` against dense diagonals."""

import pytest
import torch
from cases import make_case
from reference import assert_close, cached_reference, densify, flatten_list

from curvlinops import FisherMCLinearOperator
from curvlinops.diagonal.exact import (
    DiagonalLinearOperator,
    EFDiagonalLinearOperator,
    FisherMCDiagonalLinearOperator,
    GGNDiagonalLinearOperator,
    ef_diagonal,
    fisher_mc_diagonal,
    ggn_diagonal,
)

CASES = ["mlp_ce", "cnn_mse", "mlp_bce", "dict_ce", "seq_mse", "seq_bce", "transformer_ce"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", CASES)
def test_diagonals_equal_dense(name, reduction):
    c = make_case(name, reduction)
    kw = c.kwargs()
    G = GGNDiagonalLinearOperator(*c.tensors(), **kw)
    assert_close(flatten_list(G.diagonal), cached_reference("ggn", name, reduction).diagonal())
    E = EFDiagonalLinearOperator(*c.tensors(), check_deterministic=False, **kw)
    assert_close(flatten_list(E.diagonal), cached_reference("ef", name, reduction).diagonal())
    F = FisherMCDiagonalLinearOperator(
        *c.tensors(), seed=3, mc_samples=2, check_deterministic=False, **kw
    )
    F_dense = densify(
        FisherMCLinearOperator(*c.tensors(), seed=3, mc_samples=2, check_deterministic=False, **kw)
    )
    assert_close(flatten_list(F.diagonal), F_dense.diagonal())


def test_functions_and_operator_algebra():
    c = make_case("mlp_ce", "mean")
    G = GGNDiagonalLinearOperator(*c.tensors())
    d = flatten_list(G.diagonal)
    assert_close(flatten_list(ggn_diagonal(*c.tensors())), d)
    assert_close(
        flatten_list(ef_diagonal(*c.tensors())), cached_reference("ef", "mlp_ce").diagonal()
    )
    F = fisher_mc_diagonal(*c.tensors(), seed=5)
    assert_close(
        flatten_list(F),
        densify(FisherMCLinearOperator(*c.tensors(), seed=5, check_deterministic=False)).diagonal(),
    )
    V = torch.randn(G.shape[1], 3, dtype=d.dtype)
    assert_close(G @ V, d.unsqueeze(1) * V)
    assert_close(G.trace, d.sum())
    inv = G.inverse(damping=0.1)
    assert isinstance(inv, DiagonalLinearOperator)
    assert_close(inv @ V, V / (d.unsqueeze(1) + 0.1))
    assert [t.shape for t in G.diagonal] == [p.shape for p in c.params]
    assert G.SELF_ADJOINT and G.adjoint() is G


def test_memory_is_chunked():
    """A tiny element budget gives the same diagonal (chunks of one data point)."""
    from curvlinops.diagonal import exact

    c = make_case("seq_mse", "sum")  # several loss terms per datum: per-datum gradients
    expected = cached_reference("ggn", "seq_mse", "sum").diagonal()
    old = exact.MAX_ELEMENTS
    try:
        exact.squared_gradient_sum.__defaults__ = (1, True)
        assert_close(flatten_list(ggn_diagonal(*c.tensors())), expected)
    finally:
        exact.squared_gradient_sum.__defaults__ = (old, True)


def test_layerwise_and_per_datum_paths_agree():
    """Linear layers with 2-d outputs take the per-layer path; force the per-datum one."""
    c = make_case("mlp_ce", "mean")
    G = GGNDiagonalLinearOperator(*c.tensors(), check_deterministic=False)
    assert G._layerwise_diagonal() is not None
    assert_close(flatten_list(G._per_datum_diagonal()), flatten_list(G._layerwise_diagonal()))
    d = make_case("dict_ce", "mean")
    D = GGNDiagonalLinearOperator(*d.tensors(), check_deterministic=False, **d.kwargs())
    assert D._layerwise_diagonal() is None  # the temperature belongs to no layer


def test_errors():
    c = make_case("mlp_ce", "mean")
    with pytest.raises(NotImplementedError, match="L1Loss"):
        GGNDiagonalLinearOperator(c.model, torch.nn.L1Loss(), c.params, c.data)
    with pytest.raises(ValueError, match="damping > 0"):
        DiagonalLinearOperator([torch.zeros(3)]).inverse()
    b = make_case("mlp_bce", "mean")
    soft = [(X, torch.full_like(y, 0.5)) for X, y in b.data]
    with pytest.raises(NotImplementedError, match="binary"):
        ggn_diagonal(b.model, b.loss_func, b.params, soft)
    with pytest.raises(ValueError, match="mc_samples"):
        FisherMCDiagonalLinearOperator(*c.tensors(), mc_samples=0)
