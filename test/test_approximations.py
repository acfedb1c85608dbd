"""Tests for ``curvlinops.approximations`` (the torch_secorder function API)."""

import inspect

import pytest
import torch
from reference import assert_close, empirical_fisher, flatten_list, ggn, jacobian
from torch import nn

from curvlinops import approximations
from curvlinops.approximations import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    gauss_newton_matrix_approximation,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
)

DT = torch.float64


def problem(out=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(DT)
    X = torch.randn(6, 4, dtype=DT)
    return model, X


def test_signatures_match_torch_secorder():
    expected = {
        "empirical_fisher_diagonal": ["model", "loss_fn", "inputs", "targets"],
        "empirical_fisher_trace": ["model", "loss_fn", "inputs", "targets", "num_samples"],
        "gauss_newton_matrix_approximation": [
            "model",
            "loss_fn",
            "inputs",
            "targets",
            "create_graph",
        ],
        "generalized_fisher_diagonal": ["model", "outputs", "targets", "loss_type", "create_graph"],
        "generalized_fisher_trace": [
            "model",
            "outputs",
            "targets",
            "loss_type",
            "num_samples",
            "create_graph",
        ],
    }
    for name, params in expected.items():
        assert list(inspect.signature(getattr(approximations, name)).parameters) == params
    assert inspect.signature(generalized_fisher_diagonal).parameters["loss_type"].default == "nll"


@pytest.mark.parametrize(
    "loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss()]
)
def test_empirical_fisher(loss_fn):
    model, X = problem()
    y = {
        nn.CrossEntropyLoss: torch.randint(0, 3, (6,)),
        nn.MSELoss: torch.randn(6, 3, dtype=DT),
        nn.BCEWithLogitsLoss: torch.randint(0, 2, (6, 3)).to(DT),
    }[type(loss_fn)]
    params = list(model.parameters())
    dense = empirical_fisher(model, loss_fn, params, [(X, y)])
    diagonal = empirical_fisher_diagonal(model, loss_fn, X, y)
    assert_close(flatten_list(diagonal), dense.diagonal())
    assert_close(empirical_fisher_trace(model, loss_fn, X, y, num_samples=4), dense.trace())


def test_gauss_newton():
    model, X = problem()
    y = torch.randn(6, 3, dtype=DT)
    J = jacobian(model, list(model.parameters()), [(X, y)])
    diagonal = list(gauss_newton_matrix_approximation(model, nn.MSELoss(), X, y))
    assert_close(flatten_list(diagonal), (J**2).sum(0))
    differentiable = gauss_newton_matrix_approximation(model, nn.MSELoss(), X, y, create_graph=True)
    assert differentiable[2].requires_grad  # J of the last layer depends on the first
    differentiable[2].sum().backward()
    assert model[0].weight.grad is not None


def test_generalized_fisher():
    model, X = problem()
    y = torch.randint(0, 3, (6,))
    params = list(model.parameters())
    outputs = model(X)
    expected = ggn(model, nn.CrossEntropyLoss(), params, [(X, y)])
    assert_close(flatten_list(generalized_fisher_diagonal(model, outputs, y)), expected.diagonal())
    assert_close(generalized_fisher_trace(model, outputs, y, num_samples=3), expected.trace())


def test_errors():
    model, X = problem()
    y = torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="least-squares"):
        gauss_newton_matrix_approximation(model, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(NotImplementedError, match="loss_type"):
        generalized_fisher_diagonal(model, model(X), y, loss_type="mse")
    with pytest.raises(NotImplementedError, match=r"\[N, C\]"):
        generalized_fisher_diagonal(model, model(X).unsqueeze(1), y)
    with pytest.raises(NotImplementedError, match="L1Loss"):
        empirical_fisher_diagonal(model, nn.L1Loss(), X, torch.randn(6, 3, dtype=DT))
    unused = nn.Linear(2, 2).to(DT)
    wrapped = nn.ModuleDict({"net": model, "unused": unused})

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = wrapped

        def forward(self, x):
            return self.inner["net"](x)

    w = Wrapped()
    with pytest.raises(ValueError, match="do not influence"):
        generalized_fisher_diagonal(w, w(X), y)
    with pytest.raises(ValueError, match="do not influence"):
        empirical_fisher_diagonal(w, nn.CrossEntropyLoss(), X, y)
    with pytest.raises(ValueError, match="num_samples"):
        empirical_fisher_trace(model, nn.CrossEntropyLoss(), X, y, num_samples=0)


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True, "4"])
@pytest.mark.parametrize("trace", ["empirical", "generalized"])
def test_num_samples_out_of_range(num_samples, trace):
    model, X = problem()
    y = torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="num_samples must be a?.*positive"):
        if trace == "empirical":
            empirical_fisher_trace(model, nn.CrossEntropyLoss(), X, y, num_samples=num_samples)
        else:
            generalized_fisher_trace(model, model(X), y, num_samples=num_samples)


def test_mismatched_or_malformed_batches():
    model, X = problem()
    y = torch.randint(0, 3, (6,))
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    # before: a deep broadcasting error, or a silently shorter sum over the first 5 points
    with pytest.raises(ValueError, match="inputs have 6 data points but targets 5"):
        empirical_fisher_diagonal(model, ce, X, y[:5])
    with pytest.raises(ValueError, match="inputs have 6 data points but targets 4"):
        empirical_fisher_trace(model, mse, X, torch.randn(4, 3, dtype=DT))
    with pytest.raises(ValueError, match="inputs have 6 data points but targets 2"):
        gauss_newton_matrix_approximation(model, mse, X, torch.randn(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="targets must be a torch.Tensor, got list"):
        empirical_fisher_diagonal(model, ce, X, y.tolist())
    with pytest.raises(ValueError, match="inputs must be a torch.Tensor, got ndarray"):
        empirical_fisher_diagonal(model, ce, X.numpy(), y)
    with pytest.raises(ValueError, match="0 data points"):
        empirical_fisher_diagonal(model, ce, X[:0], y[:0])
    with pytest.raises(ValueError, match="targets have 5 entries but outputs 6 rows"):
        generalized_fisher_diagonal(model, model(X), y[:5])
    with pytest.raises(ValueError, match="targets must be a torch.Tensor"):
        generalized_fisher_trace(model, model(X), None)
    with pytest.raises(ValueError, match="outputs must be a torch.Tensor"):
        generalized_fisher_diagonal(model, model(X).tolist(), y)
    # the Gauss-Newton matrix of least squares does not use the targets: None is fine
    expected = gauss_newton_matrix_approximation(model, mse, X, torch.randn(6, 3, dtype=DT))
    for actual, exp in zip(gauss_newton_matrix_approximation(model, mse, X, None), expected):
        assert_close(actual, exp)
