"""The two routes for ``J V`` in the GGN family (issue 14): the transposed pullback
(``JVP_ROUTE = "reverse"``, default) and forward mode (``"forward"``, ``torch.func.jvp``
vmapped over the columns) give the same operator."""

import pytest
import torch
from cases import make_case
from torch.func import functional_call

from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator
from curvlinops._autodiff import FunctionalAutodiff, MeasuredRoute, forward_linearize

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
    assert op.JVP_ROUTE == "reverse"
    reverse = op @ V
    for route in ["forward", "auto"]:
        op.JVP_ROUTE = route
        torch.testing.assert_close(op @ V, reverse, rtol=1e-10, atol=1e-10)
        op.MAX_COLUMNS_PER_CHUNK = 2  # chunked columns take the same route
        torch.testing.assert_close(op @ V, reverse, rtol=1e-10, atol=1e-10)
        op.MAX_COLUMNS_PER_CHUNK = 16
    choices = op._measured_jvp_route.choices
    assert set(choices) == ({1} if num_columns == 1 else {num_columns, 2, 1})
    assert set(choices.values()) <= {"reverse", "forward"}


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


def test_auto_route_is_reverse_when_traced():
    c = make_case("mlp_ce")
    op = GGNLinearOperator(c.model, c.loss_func, c.params, c.data, check_deterministic=False)
    op.JVP_ROUTE = "auto"
    assert op._jvp_route(FunctionalAutodiff([p.detach() for p in c.params])) == "reverse"
