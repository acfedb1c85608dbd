"""Tests for ``curvlinops.jacobian`` (J and Jᵀ, section 3.5) against row-by-row autograd."""

import math

import pytest
import torch
from cases import HARD_CASES, make_case
from reference import assert_close, assert_list_close, cached_reference, densify, unflatten

import curvlinops
from curvlinops.jacobian import (
    JacobianLinearOperator,
    TransposedJacobianLinearOperator,
    make_batch_jacobian_matrix_product,
    make_batch_transposed_jacobian_matrix_product,
)

DT = torch.float64


def _output_shape(c):
    X0 = c.data[0][0]
    return tuple(c.model(X0).shape[1:])


def test_class_attributes():
    for cls in [JacobianLinearOperator, TransposedJacobianLinearOperator]:
        assert cls.SELF_ADJOINT is False
        assert cls.FIXED_DATA_ORDER is True
    assert curvlinops.JacobianLinearOperator is JacobianLinearOperator
    assert curvlinops.TransposedJacobianLinearOperator is TransposedJacobianLinearOperator


@pytest.mark.parametrize("name", HARD_CASES)
def test_jacobian_matches_reference(name):
    c = make_case(name)
    S = _output_shape(c)
    N, D = c.num_data, c.dim
    J = JacobianLinearOperator(c.model, c.params, c.data, **c.kwargs())
    J_ref = cached_reference("jacobian", name)
    assert J.shape == (N * math.prod(S), D)
    assert J._in_shape == [p.shape for p in c.params]
    assert J._out_shape == [torch.Size((N, *S))]
    assert J._N_data == N
    assert_close(densify(J), J_ref)

    JT = TransposedJacobianLinearOperator(c.model, c.params, c.data, **c.kwargs())
    assert JT.shape == (D, N * math.prod(S))
    assert JT._in_shape == [torch.Size((N, *S))]
    assert JT._out_shape == [p.shape for p in c.params]
    assert_close(densify(JT), J_ref.T)


@pytest.mark.parametrize("name", ["mlp_ce", "transformer_ce", "dict_ce"])
def test_adjoints(name):
    c = make_case(name)
    J_ref = cached_reference("jacobian", name)
    J = JacobianLinearOperator(c.model, c.params, c.data, **c.kwargs())
    JT = J.adjoint()
    assert isinstance(JT, TransposedJacobianLinearOperator)
    assert JT._in_shape == J._out_shape and JT._out_shape == J._in_shape
    assert JT._batch_size_fn is J._batch_size_fn or c.batch_size_fn is None
    assert JT._N_data == J._N_data
    assert_close(densify(JT), J_ref.T)
    JTT = JT.adjoint()
    assert isinstance(JTT, JacobianLinearOperator)
    assert_close(densify(JTT), J_ref)
    # adjoint of an operator built directly as a transpose
    JT2 = TransposedJacobianLinearOperator(c.model, c.params, c.data, **c.kwargs())
    assert isinstance(JT2.adjoint(), JacobianLinearOperator)
    assert_close(densify(JT2.adjoint()), J_ref)


@pytest.mark.parametrize("name", ["transformer_ce", "seq_mse", "dict_ce"])
def test_list_formats(name):
    c = make_case(name)
    S = _output_shape(c)
    N = c.num_data
    J_ref = cached_reference("jacobian", name)
    J = JacobianLinearOperator(c.model, c.params, c.data, **c.kwargs())
    JT = J.adjoint()
    shapes = [p.shape for p in c.params]
    gen = torch.Generator().manual_seed(3)

    v = torch.randn(c.dim, dtype=DT, generator=gen)
    Jv = J @ unflatten(v, shapes)
    assert isinstance(Jv, list) and len(Jv) == 1
    assert Jv[0].shape == (N, *S)
    assert_close(Jv[0].flatten(), J_ref @ v)

    K = 3
    M = torch.randn(c.dim, K, dtype=DT, generator=gen)
    JM = J @ unflatten(M, shapes, trailing=K)
    assert JM[0].shape == (N, *S, K)
    assert_close(JM[0].reshape(-1, K), J_ref @ M)
    assert_close(J @ M, J_ref @ M)

    u = torch.randn(N, *S, dtype=DT, generator=gen)
    JTu = JT @ [u]
    assert_list_close(JTu, unflatten(J_ref.T @ u.flatten(), shapes))
    U = torch.randn(N, *S, K, dtype=DT, generator=gen)
    JTU = JT @ [U]
    assert_list_close(JTU, unflatten(J_ref.T @ U.reshape(-1, K), shapes, trailing=K))
    assert_close(JT @ U.reshape(-1, K), J_ref.T @ U.reshape(-1, K))


def test_jacobian_ignores_targets():
    c = make_case("mlp_ce")
    data = [(X, torch.zeros(1)) for X, _ in c.data]  # y is only moved around
    J = JacobianLinearOperator(c.model, c.params, data)
    assert_close(densify(J), cached_reference("jacobian", "mlp_ce"))


def test_jacobian_dict_input_requires_batch_size_fn():
    c = make_case("dict_ce")
    for cls in [JacobianLinearOperator, TransposedJacobianLinearOperator]:
        with pytest.raises(ValueError, match=r"batch_size_fn"):
            cls(c.model, c.params, c.data)


def test_adjoint_keeps_progressbar():
    c = make_case("mlp_ce")
    J = JacobianLinearOperator(c.model, c.params, c.data, progressbar=True)
    assert J.adjoint()._progressbar is True
    assert J.adjoint().adjoint()._progressbar is True
    JT = TransposedJacobianLinearOperator(c.model, c.params, c.data)
    assert JT.adjoint()._progressbar is False


def test_jacobian_num_data():
    c = make_case("mlp_ce")
    J = JacobianLinearOperator(c.model, c.params, c.data, num_data=c.num_data)
    assert J._N_data == c.num_data
    assert J.adjoint()._N_data == c.num_data
    assert_close(densify(J), cached_reference("jacobian", "mlp_ce"))


def test_batch_helpers():
    c = make_case("transformer_ce")
    X, _ = c.data[2]
    S = _output_shape(c)
    B = X.shape[0]
    shapes = [p.shape for p in c.params]
    J_batch = cached_reference("jacobian", "transformer_ce")[-B * math.prod(S) :]
    K = 2
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(c.dim, K, dtype=DT, generator=gen)
    JM = make_batch_jacobian_matrix_product(c.model, tuple(c.params))(
        X, *unflatten(M, shapes, trailing=K)
    )
    assert isinstance(JM, torch.Tensor) and JM.shape == (B, *S, K)
    assert_close(JM.reshape(-1, K), J_batch @ M)
    V = torch.randn(B, *S, K, dtype=DT, generator=gen)
    JTV = make_batch_transposed_jacobian_matrix_product(c.model, tuple(c.params))(X, V)
    assert isinstance(JTV, tuple)
    assert_list_close(list(JTV), unflatten(J_batch.T @ V.reshape(-1, K), shapes, trailing=K))
