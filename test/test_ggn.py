"""Tests for ``curvlinops.ggn.GGNLinearOperator`` against dense autograd references."""

import pytest
import torch
from cases import ALL_CASES, REDUCTIONS, make_case
from reference import (
    apply_batch_product,
    assert_close,
    cached_reference,
    densify,
    ggn,
    hessian,
    unflatten,
)
from torch import nn

import curvlinops
from curvlinops.ggn import (
    GGNLinearOperator,
    make_batch_ggn_matrix_product,
    make_ggn_vector_product,
)


def test_class_attributes():
    assert GGNLinearOperator.SELF_ADJOINT is True
    assert GGNLinearOperator.SUPPORTS_BLOCKS is False
    assert curvlinops.GGNLinearOperator is GGNLinearOperator


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ALL_CASES)
def test_ggn_matches_reference(name, reduction):
    c = make_case(name, reduction)
    G = GGNLinearOperator(*c.tensors(), **c.kwargs())
    assert G.shape == (c.dim, c.dim)
    assert G._in_shape == G._out_shape == [p.shape for p in c.params]
    G_dense = densify(G)
    assert_close(G_dense, cached_reference("ggn", name, reduction))
    # a GGN of a convex loss is symmetric positive semi-definite
    assert_close(G_dense, G_dense.T)
    assert torch.linalg.eigvalsh(G_dense).min() > -1e-10 * G_dense.abs().max()


@pytest.mark.parametrize("block_sizes", [[4], [2, 2], [1, 1, 1, 1]])
def test_ggn_rejects_block_sizes(block_sizes):
    c = make_case("mlp_ce")
    with pytest.raises(ValueError, match=r"(?i)block"):
        GGNLinearOperator(*c.tensors(), block_sizes=block_sizes)


def test_ggn_equals_hessian_for_linear_model_and_mse():
    """For a model linear in its parameters with MSE, GGN = Hessian (independent identity)."""
    c = make_case("cnn_mse", "sum")
    linear_model = nn.Sequential(nn.Flatten(), nn.Linear(25, 2)).double()
    params = list(linear_model.parameters())
    G = densify(GGNLinearOperator(linear_model, c.loss_func, params, c.data))
    assert_close(G, hessian(linear_model, c.loss_func, params, c.data))


def test_ggn_any_loss_module():
    """Any loss module with mean/sum reduction works (e.g. HuberLoss, SmoothL1Loss)."""
    c = make_case("seq_mse")
    for loss_func in [nn.HuberLoss(delta=0.3), nn.SmoothL1Loss(reduction="sum", beta=0.7)]:
        G = GGNLinearOperator(c.model, loss_func, c.params, c.data)
        assert_close(densify(G), ggn(c.model, loss_func, c.params, c.data))


def test_make_batch_ggn_matrix_product():

    c = make_case("transformer_ce", "sum")
    X, y = c.data[0]
    shapes = [p.shape for p in c.params]
    K = 2
    M = torch.randn(c.dim, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fn = make_batch_ggn_matrix_product(c.model, c.loss_func, tuple(c.params))
    result = apply_batch_product(fn, shapes, M, X, y)
    assert_close(result, ggn(c.model, c.loss_func, c.params, [(X, y)]) @ M)


def test_make_ggn_vector_product():
    """Functional interface: f(*params, X), c(pred, y, *c_args); returns Jᵀ H J v."""

    c = make_case("seq_bce", "mean")
    X, y = c.data[1]
    names = [n for n, _ in c.model.named_parameters()]

    def f(*args):
        *params, X = args
        return torch.func.functional_call(c.model, dict(zip(names, params)), (X,))

    def criterion(pred, y, scale):
        return scale * c.loss_func(pred, y)

    shapes = [p.shape for p in c.params]
    v = torch.randn(c.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor(0.7, dtype=torch.float64)
    fn = make_ggn_vector_product(f, criterion, num_c_extra_args=1)
    params = tuple(p.detach() for p in c.params)
    out = fn(params, X, y, scale, *unflatten(v, shapes))
    assert isinstance(out, tuple)
    assert [t.shape for t in out] == shapes
    G_batch = 0.7 * ggn(c.model, c.loss_func, c.params, [(X, y)])
    assert_close(torch.cat([t.reshape(-1) for t in out]), G_batch @ v)
