"""Tests for ``curvlinops.hessian.HessianLinearOperator`` against dense autograd references."""

import pytest
import torch
from cases import ALL_CASES, REDUCTIONS, make_case
from reference import (
    apply_batch_product,
    assert_close,
    block_diagonal,
    cached_reference,
    densify,
    finite_difference_hessian,
    hessian,
    rel_fro_error,
)
from torch import nn

import curvlinops
from curvlinops.hessian import HessianLinearOperator, make_batch_hessian_matrix_product


def test_class_attributes():
    assert HessianLinearOperator.SELF_ADJOINT is True
    assert HessianLinearOperator.SUPPORTS_BLOCKS is True
    assert curvlinops.HessianLinearOperator is HessianLinearOperator


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ALL_CASES)
def test_hessian_matches_reference(name, reduction):
    c = make_case(name, reduction)
    H = HessianLinearOperator(*c.tensors(), **c.kwargs())
    D = c.dim
    assert H.shape == (D, D)
    assert H._in_shape == H._out_shape == [p.shape for p in c.params]
    assert H._N_data == c.num_data
    assert_close(densify(H), cached_reference("hessian", name, reduction))


def test_transformer_reference_matches_finite_differences():
    """The double-backward reference itself is checked once (LayerNorm + attention, float64)."""
    c = make_case("transformer_ce", "mean")
    H_ref = hessian(c.model, c.loss_func, c.params, c.data)
    H_fd = finite_difference_hessian(c.model, c.loss_func, c.params, c.data)
    assert rel_fro_error(H_fd, H_ref) < 1e-7
    # the LayerNorm weight block in particular (the torch.func pitfall)
    numels = [p.numel() for p in c.params]
    start = numels[0]
    sl = slice(start, start + numels[1])
    assert rel_fro_error(H_fd[sl, sl], H_ref[sl, sl]) < 1e-7
    assert H_ref[sl, sl].abs().max() > 1e-3  # the block is not trivially zero


@pytest.mark.parametrize(
    "name, block_sizes",
    [
        ("mlp_ce", [4]),
        ("mlp_ce", [1, 1, 1, 1]),
        ("mlp_ce", [2, 2]),
        ("mlp_ce", [1, 3]),
        ("transformer_ce", [1, 2, 4, 2]),
        ("dict_ce", [2, 2, 1]),
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hessian_block_sizes(name, block_sizes, reduction):
    c = make_case(name, reduction)
    H = HessianLinearOperator(*c.tensors(), block_sizes=block_sizes, **c.kwargs())
    assert H._block_sizes == block_sizes
    expected = block_diagonal(cached_reference("hessian", name, reduction), c.params, block_sizes)
    assert_close(densify(H), expected)


def test_hessian_default_block_sizes():
    c = make_case("mlp_ce")
    H = HessianLinearOperator(*c.tensors())
    assert H._block_sizes == [len(c.params)]


@pytest.mark.parametrize(
    "block_sizes, match",
    [
        ([1, 1], r"(?i)block.*sum|sum.*block|len\(params\)|number of param"),
        ([2, 3], r"(?i)block.*sum|sum.*block|len\(params\)|number of param"),
        ([2, 0, 2], r"(?i)block.*(positive|> ?0|zero|non-?positive|≤ ?0|<= ?0)"),
        ([3, -1, 2], r"(?i)block.*(positive|> ?0|negative|non-?positive|≤ ?0|<= ?0)"),
    ],
)
def test_hessian_invalid_block_sizes(block_sizes, match):
    c = make_case("mlp_ce")
    with pytest.raises(ValueError, match=match):
        HessianLinearOperator(*c.tensors(), block_sizes=block_sizes)


def test_hessian_any_loss_module():
    """Hessian supports arbitrary loss modules with mean/sum reduction (e.g. HuberLoss)."""
    c = make_case("cnn_mse", "mean")
    for reduction in REDUCTIONS:
        loss_func = nn.HuberLoss(reduction=reduction, delta=0.5)
        H = HessianLinearOperator(c.model, loss_func, c.params, c.data)
        assert_close(densify(H), hessian(c.model, loss_func, c.params, c.data))


def test_hessian_num_data_rescales_mean():
    """num_data enters w_b = B_b / N; a different N rescales a mean-reduced operator."""
    c = make_case("mlp_ce", "mean")
    N = c.num_data
    H = HessianLinearOperator(*c.tensors(), num_data=N)
    assert H._N_data == N
    assert_close(densify(H), cached_reference("hessian", "mlp_ce", "mean"))
    H2 = HessianLinearOperator(*c.tensors(), num_data=2 * N, check_deterministic=False)
    assert H2._N_data == 2 * N
    assert_close(densify(H2), cached_reference("hessian", "mlp_ce", "mean") / 2)
    # sum reduction does not depend on num_data
    c = make_case("mlp_ce", "sum")
    H3 = HessianLinearOperator(*c.tensors(), num_data=2 * N, check_deterministic=False)
    assert_close(densify(H3), cached_reference("hessian", "mlp_ce", "sum"))


def test_hessian_unused_parameter():
    """A parameter that does not influence the loss has zero rows and columns."""

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1, self.lin2, self.unused = nn.Linear(3, 2), nn.Linear(2, 2), nn.Linear(2, 1)

        def forward(self, x):
            return self.lin2(torch.tanh(self.lin1(x)))

    torch.manual_seed(0)
    model = WithUnused().double()
    params = list(model.parameters())
    data = [(torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))]
    loss_func = nn.MSELoss()
    H = HessianLinearOperator(model, loss_func, params, data)
    expected = hessian(model, loss_func, params, data)
    assert_close(densify(H), expected)
    assert expected[-3:].abs().max() == 0


@pytest.mark.parametrize("block_sizes", [None, [1, 3]])
def test_make_batch_hessian_matrix_product(block_sizes):
    """The helper computes the mini-batch Hessian (loss's own reduction, no w_b) times M."""

    c = make_case("mlp_ce", "mean")
    X, y = c.data[2]
    shapes = [p.shape for p in c.params]
    K = 3
    M = torch.randn(c.dim, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fn = make_batch_hessian_matrix_product(
        c.model, c.loss_func, tuple(c.params), block_sizes=block_sizes
    )
    result = apply_batch_product(fn, shapes, M, X, y)
    H_batch = hessian(c.model, c.loss_func, c.params, [(X, y)])
    if block_sizes is not None:
        H_batch = block_diagonal(H_batch, c.params, block_sizes)
    assert_close(result, H_batch @ M)


def test_batchnorm_eval_mode_uses_buffers():
    """Buffers are used as they are (BatchNorm in eval mode with non-trivial running stats)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.double().eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    c = make_case("mlp_ce", "mean")
    params = list(model.parameters())
    H = HessianLinearOperator(model, c.loss_func, params, c.data)
    assert_close(densify(H), hessian(model, c.loss_func, params, c.data))
