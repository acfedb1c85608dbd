"""The routes for ``J V`` in the GGN family (issue 14): the transposed pullback
(``JVP_ROUTE = "reverse"``), forward mode (``"forward"``, ``torch.func.jvp`` vmapped over the
columns), the rule by the model's layers (``"auto"``, default) and the measured choice
(``"measure"``) give the same operator."""

import warnings

import pytest
import torch
from cases import make_case
from torch.func import functional_call

from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator
from curvlinops._autodiff import (
    FunctionalAutodiff,
    MeasuredRoute,
    forward_linearize,
    prefers_forward_route,
)

GGN_FAMILY = [GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator]


@pytest.mark.parametrize("cls", GGN_FAMILY, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["mlp_ce", "cnn_mse", "mlp_bce", "transformer_ce", "seq_mse"])
@pytest.mark.parametrize("num_columns", [1, 5])
def test_forward_route_equals_reverse_route(cls, name, num_columns):
    c = make_case(name)
    op = cls(c.model, c.loss_func, c.params, c.data, check_deterministic=False, **c.kwargs())
    V = torch.randn(
        op.shape[1], num_columns, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    assert op.JVP_ROUTE == "auto"
    op.JVP_ROUTE = "reverse"
    reverse = op @ V
    for route in ["forward", "auto", "measure"]:
        op.JVP_ROUTE = route
        torch.testing.assert_close(op @ V, reverse, rtol=1e-10, atol=1e-10)
        op.MAX_COLUMNS_PER_CHUNK = 2  # chunked columns take the same route
        torch.testing.assert_close(op @ V, reverse, rtol=1e-10, atol=1e-10)
        op.MAX_COLUMNS_PER_CHUNK = 16
    for setting, choice in op._jvp_route_choices.items():
        assert set(choice.choices) == ({1} if num_columns == 1 else {num_columns, 2, 1})
        assert set(choice.choices.values()) <= {"reverse", "forward"}
        assert choice.choices[1] == "reverse" or setting == "measure"


def test_forward_route_checks_construction():
    """The determinism check runs on the chosen route too (a class-level setting)."""
    c = make_case("mlp_ce")

    class ForwardGGN(GGNLinearOperator):
        JVP_ROUTE = "forward"

    A = ForwardGGN(c.model, c.loss_func, c.params, c.data, **c.kwargs())
    B = GGNLinearOperator(c.model, c.loss_func, c.params, c.data, **c.kwargs())
    V = torch.randn(A.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(A @ V, B @ V, rtol=1e-10, atol=1e-10)


def test_unknown_route_raises():
    c = make_case("mlp_ce")
    op = GGNLinearOperator(c.model, c.loss_func, c.params, c.data, check_deterministic=False)
    op.JVP_ROUTE = "sideways"
    with pytest.raises(ValueError, match="JVP_ROUTE"):
        op @ torch.ones(op.shape[1], dtype=torch.float64)


def test_forward_mode_through_layer_norm_matches_finite_differences():
    """``torch.func.jvp`` through ``LayerNorm`` (and attention) against central differences."""
    c = make_case("transformer_ce")  # embedding, LayerNorm, multi-head attention, linear head
    X = c.data[0][0]
    names = [n for n, p in c.model.named_parameters()]
    values = [p.detach() for p in c.model.parameters()]

    def f(*v):
        return functional_call(c.model, dict(zip(names, v)), (X,))

    gen = torch.Generator().manual_seed(2)
    tangents = [torch.randn(v.shape, dtype=v.dtype, generator=gen) for v in values]
    jv = forward_linearize(f, values)(tangents, False)
    eps = 1e-6
    plus = f(*(v + eps * t for v, t in zip(values, tangents)))
    minus = f(*(v - eps * t for v, t in zip(values, tangents)))
    torch.testing.assert_close(jv, (plus - minus) / (2 * eps), rtol=1e-7, atol=1e-8)
    assert any(isinstance(m, torch.nn.LayerNorm) for m in c.model.modules())


def test_measured_route_is_measured_once_and_skips_failing_routes():
    calls = {"reverse": 0, "forward": 0}

    def reverse(tangents, batched):
        calls["reverse"] += 1
        return tangents[0] * 2

    def forward(tangents, batched):
        calls["forward"] += 1
        raise NotImplementedError("no forward-mode rule")

    measured = MeasuredRoute()
    jvp = measured.jvp({"reverse": lambda: reverse, "forward": lambda: forward})
    t = [torch.ones(3, 4)]
    torch.testing.assert_close(jvp(t, True), 2 * t[0])
    assert measured.choices == {3: "reverse"}
    first = dict(calls)
    jvp(t, True)  # kept: no measurement again
    assert calls == {"reverse": first["reverse"] + 1, "forward": first["forward"]}


@pytest.mark.parametrize("setting", ["auto", "measure"])
def test_chosen_routes_are_reverse_when_traced(setting):
    c = make_case("mlp_ce")
    op = GGNLinearOperator(c.model, c.loss_func, c.params, c.data, check_deterministic=False)
    op.JVP_ROUTE = setting
    assert op._jvp_route(FunctionalAutodiff([p.detach() for p in c.params])) == "reverse"


@pytest.mark.parametrize(
    "name, forward", [("mlp_ce", False), ("cnn_mse", False), ("transformer_ce", True)]
)
def test_auto_rule_takes_forward_mode_for_several_columns_on_transformers(name, forward):
    c = make_case(name)
    op = GGNLinearOperator(c.model, c.loss_func, c.params, c.data, check_deterministic=False)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    op @ V
    op @ V[:, 0]
    choices = op._jvp_route_choices["auto"].choices
    assert choices == {3: "forward" if forward else "reverse", 1: "reverse"}


def test_rule_prefers_forward_only_without_convolutions():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert prefers_forward_route(block)
    assert not prefers_forward_route(torch.nn.Sequential(torch.nn.Conv1d(1, 1, 1), block))
    assert not prefers_forward_route(torch.nn.Linear(2, 2))
    assert not prefers_forward_route(lambda x: x)  # a function: nothing known


def test_auto_falls_back_to_reverse_where_forward_mode_raises():
    """Dropout under ``vmap`` raises in forward mode; ``"auto"`` then keeps the reverse route."""
    c = make_case("transformer_ce")
    model = torch.nn.Sequential(c.model, torch.nn.Dropout(0.5)).train()
    op = GGNLinearOperator(model, c.loss_func, c.params, c.data, check_deterministic=False)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    op @ V
    assert op._jvp_route_choices["auto"].choices == {3: "reverse"}
    op.JVP_ROUTE = "forward"
    with pytest.raises(RuntimeError):  # forced: the forward route's error is not hidden
        op @ V


def test_forward_route_does_not_warn_about_torch_internals():
    """The first forward-mode product loads torch's decompositions without its warning."""
    c = make_case("transformer_ce")
    op = GGNLinearOperator(c.model, c.loss_func, c.params, c.data, check_deterministic=False)
    op.JVP_ROUTE = "forward"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op @ torch.randn(op.shape[1], 2, dtype=torch.float64)
