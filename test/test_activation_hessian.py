"""Tests for ``curvlinops.experimental`` (activation Hessian, store_activation)."""

import pytest
import torch
from reference import assert_close, densify
from torch import nn

from curvlinops.experimental import ActivationHessianLinearOperator
from curvlinops.experimental.activation_hessian import store_activation

DT = torch.float64


def make_problem(reduction="mean"):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)
    ).to(DT)
    X = torch.randn(3, 4, dtype=DT)
    y = torch.randint(0, 3, (3,))
    return model, nn.CrossEntropyLoss(reduction=reduction), [(X, y)]


def dense_activation_hessian(model, loss_func, X, y, start: int, use_output: bool):
    """Hessian of the loss w.r.t. the input of model[start] (or its output)."""
    head = model[: start + 1] if use_output else model[:start]
    tail = model[start + 1 :] if use_output else model[start:]
    Z = head(X).detach()

    def rest(z):
        return loss_func(tail(z), y)

    H = torch.autograd.functional.hessian(rest, Z)
    return H.reshape(Z.numel(), Z.numel())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "name, io_type, start, use_output",
    [
        ("2", "input", 2, False),
        ("2", "output", 2, True),
        ("1", "input", 1, False),
        ("0", "input", 0, False),
    ],
)
def test_equals_dense_hessian(reduction, name, io_type, start, use_output):
    model, loss_func, data = make_problem(reduction)
    H = ActivationHessianLinearOperator(model, loss_func, (name, io_type, 0), data)
    X, y = data[0]
    expected = dense_activation_hessian(model, loss_func, X, y, start, use_output)
    assert H.shape == expected.shape
    assert_close(densify(H), expected)
    V = torch.randn(H.shape[1], 20, dtype=DT)  # more columns than one chunk
    assert_close(H @ V, expected @ V)


def test_relu_input_equals_linear_output():
    model, loss_func, data = make_problem()
    H_relu = ActivationHessianLinearOperator(model, loss_func, ("3", "input", 0), data)
    H_lin = ActivationHessianLinearOperator(model, loss_func, ("2", "output", 0), data)
    assert_close(densify(H_relu), densify(H_lin))


def test_store_activation():
    model, _, data = make_problem()
    X, _ = data[0]
    stored = []
    with store_activation(model, "1", "output", 0, stored):
        model(X)
        model(X)
    model(X)
    assert len(stored) == 2
    assert_close(stored[0], model[:2](X))
    with pytest.raises(ValueError, match="io_type"):
        store_activation(model, "1", "weights", 0, [])
    with pytest.raises(ValueError, match="No module named 'foo'"):
        store_activation(model, "foo", "input", 0, [])
    with pytest.raises(ValueError, match="empty"):
        store_activation(model, "1", "input", 0, [1])
    with pytest.raises(ValueError, match="io_idx must be 0"):
        with store_activation(model, "1", "output", 1, []):
            model(X)


def test_errors():
    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match="exactly one batch"):
        ActivationHessianLinearOperator(model, loss_func, ("1", "input", 0), data * 2)
    with pytest.raises(ValueError, match="No module named"):
        ActivationHessianLinearOperator(model, loss_func, ("9", "input", 0), data)
    with pytest.raises(ValueError, match="io type"):
        ActivationHessianLinearOperator(model, loss_func, ("1", "middle", 0), data)


def test_compile_is_refused_clearly():
    """The activation hooks cannot be traced: compile() says so instead of failing later."""
    from cases import make_case

    c = make_case("mlp_ce", "mean")
    name = next(n for n, m in c.model.named_modules() if isinstance(m, torch.nn.Linear))
    A = ActivationHessianLinearOperator(c.model, c.loss_func, (name, "input", 0), c.data[:1])
    with pytest.raises(NotImplementedError, match="cannot be compiled"):
        A.compile()


def test_cached_products_equal_uncached():
    from cases import make_case

    c = make_case("mlp_ce", "mean")
    name = next(n for n, m in c.model.named_modules() if isinstance(m, torch.nn.Linear))
    args = (c.model, c.loss_func, (name, "output", 0), c.data[:1])
    eager = ActivationHessianLinearOperator(*args)
    cached = ActivationHessianLinearOperator(*args).cache()
    for seed in range(2):
        M = torch.randn(
            eager.shape[1], 3, dtype=eager.dtype, generator=torch.Generator().manual_seed(seed)
        )
        assert_close(cached @ M, eager @ M)
    assert cached._product_cache is not None
