"""The determinism check at construction (issue 14): it takes every batch's prediction, loss
and gradient from the forward and backward passes of its two products instead of separate
gradient passes (counted here), accumulates their products, draws the contract's probe vector,
tests finiteness cheaply, and still catches a gradient or a product that alone differs between
passes."""

import pytest
import torch
from cases import make_case

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)
from curvlinops._torch_base import (
    CurvatureLinearOperator,
    _all_finite,
    _check_batch_values,
)

LOSS_OPERATORS = [
    HessianLinearOperator,
    GGNLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
]


def _probed(op, v):
    """Run one probing pass: summed probe loss and gradient, and the product with ``v``."""
    M = [b.reshape(*s, 1) for b, s in zip(v.split(op._in_shape_flat), op._in_shape)]
    out = []
    loss, gradient = 0.0, [torch.zeros_like(p) for p in op._params]
    for _, _, batch_loss, batch_gradient in op._probing_product(M, out):
        loss = loss + batch_loss
        gradient = [g + b for g, b in zip(gradient, batch_gradient)]
    return loss, gradient, torch.cat([t.flatten() for t in out])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "cls, route",
    [(HessianLinearOperator, "reverse")]  # JVP_ROUTE applies to the GGN family only
    + [(cls, route) for cls in LOSS_OPERATORS[1:] for route in ("reverse", "forward")],
    ids=lambda x: getattr(x, "__name__", x),
)
@pytest.mark.parametrize("name", ["mlp_ce", "cnn_mse", "seq_bce", "transformer_ce"])
def test_probed_loss_gradient_and_product_are_exact(name, cls, reduction, route):
    """The probe's loss, gradient and product equal ``gradient_and_loss`` and ``A @ v``.

    The GGN family takes the gradient from the transposed pullback evaluated at the loss's
    output gradient (reverse route) or from one more pullback (forward route); several
    batches with weights other than 1 (mean) and equal to 1 (sum).
    """
    c = make_case(name, reduction)
    op = cls(c.model, c.loss_func, c.params, c.data, check_deterministic=False, **c.kwargs())
    op.JVP_ROUTE = route
    v = torch.rand(op.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss, gradient, product = _probed(op, v)
    gradient_ref, loss_ref = op.gradient_and_loss()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    for g, g_ref in zip(gradient, gradient_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(product, op @ v, rtol=1e-10, atol=1e-13)


class _Identity(CurvatureLinearOperator):
    """``A = number of batches * I`` whose batch product returns its input (an alias)."""

    SELF_ADJOINT = True

    def _prepare_batch(self, X, y, ad=None):
        return lambda M: M


def test_batch_results_aliasing_the_input_are_not_summed_into():
    """A batch product may return ``M`` itself: the check must not add into it.

    Two simultaneous passes share ``M``; summing the next batch into the first batch's
    result in place would change ``M`` and make the passes disagree (or the product wrong).
    """
    c = make_case("mlp_ce", "sum")
    assert len(c.data) > 1
    op = _Identity(c.model, c.loss_func, c.params, c.data)  # runs the check
    v = torch.rand(op.shape[1], dtype=torch.float64)
    expected = len(c.data) * v
    _, _, product = _probed(op, v.clone())
    torch.testing.assert_close(product, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(op @ v, expected, rtol=0, atol=1e-14)


def _alternating_shift_model(model, calls, power):
    """Wrap ``model``: add ``(-1)^n * shift^power`` to the first logit at the ``n``-th call.

    At ``shift = 0`` the output never changes. With ``power=1`` the gradient w.r.t. ``shift``
    alternates in sign between calls; with ``power=2`` the gradient is zero too and only the
    Hessian (+-2) alternates. One logit only: cross-entropy is invariant to shifting all.
    """

    class Flaky(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.shift = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, X):
            calls[0] += 1
            out = self.model(X)
            mask = torch.zeros_like(out)
            mask[:, 0] = 1.0
            return out + ((-1.0) ** calls[0] * self.shift**power) * mask

    return Flaky(model)


def test_hessian_product_alone_differing_is_caught():
    """Predictions, losses and gradients agree; only the Hessian product differs."""
    c = make_case("mlp_ce")
    calls = [0]
    model = _alternating_shift_model(c.model, calls, power=2)
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="Non-deterministic matrix-vector product"):
        HessianLinearOperator(model, c.loss_func, params, c.data)
    calls[0] = 0
    HessianLinearOperator(model, c.loss_func, params, c.data, check_deterministic=False)


@pytest.mark.parametrize("cls", [GGNLinearOperator, HessianLinearOperator])
def test_loss_hessian_alone_differing_is_caught(cls):
    """A loss whose value and gradient agree but whose curvature flips between passes."""
    c = make_case("mlp_ce")
    calls = [0]

    def loss_func(output, y):
        calls[0] += 1
        deviation = output - output.detach()  # zero, with gradient zero and Hessian 2 I
        # a curvature that grows with every call (any number of calls per pass)
        return c.loss_func(output, y) + calls[0] * (deviation**2).sum()

    loss_func.reduction = "mean"  # read by the operators' weighting
    with pytest.raises(RuntimeError, match="Non-deterministic matrix-vector product"):
        cls(c.model, loss_func, c.params, c.data)


def test_probe_vector_is_the_contracts_draw(monkeypatch):
    """API.md section 2.2, step 4: ``v = torch.rand(A.shape[1])`` from the global generator."""
    c = make_case("mlp_ce")
    draws = []
    rand = torch.rand

    def recording_rand(*args, **kwargs):
        draws.append((args, kwargs.get("dtype")))
        return rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", recording_rand)
    G = GGNLinearOperator(c.model, c.loss_func, c.params, c.data)
    assert draws == [((G.shape[1],), G.dtype)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite(dtype):
    """Exactly ``isfinite(t).all()``, including sums that overflow from finite entries."""
    big = torch.finfo(dtype).max
    cases = [
        torch.zeros(0, dtype=dtype),
        torch.tensor([1.0, -2.0], dtype=dtype),
        torch.tensor([big, big, big], dtype=dtype),  # finite, the sum overflows
        torch.tensor([-big, -big], dtype=dtype),
        torch.tensor([1.0, float("nan")], dtype=dtype),
        torch.tensor([float("inf"), 1.0], dtype=dtype),
        torch.tensor([float("-inf"), 1.0], dtype=dtype),
        torch.tensor([float("inf"), float("-inf")], dtype=dtype),
        torch.tensor([big, big, float("nan")], dtype=dtype),
        torch.full((3, 1000), 0.5, dtype=dtype),
    ]
    for t in cases:
        assert _all_finite(t) == bool(torch.isfinite(t).all()), t
    assert _all_finite(torch.tensor([1 + 2j, 3j]))
    assert not _all_finite(torch.tensor([1 + 2j, complex(float("nan"), 0)]))


def test_data_check_with_large_finite_values():
    """Finite data whose sum overflows pass; a single NaN or Inf among them is rejected."""
    big = torch.finfo(torch.float32).max
    X = torch.full((4, 3), big)
    _check_batch_values(X, torch.zeros(4), 0, torch.float32)
    for bad in (float("nan"), float("inf"), float("-inf")):
        X_bad = X.clone()
        X_bad[2, 1] = bad
        with pytest.raises(ValueError, match="contains NaN or Inf"):
            _check_batch_values(X_bad, torch.zeros(4), 0, torch.float32)


def _count_forward_passes(model: torch.nn.Module) -> list:
    """Count top-level forward calls of ``model`` (returns the counter and the hook handle)."""
    counter = [0]

    def hook(module, inputs, output):
        counter[0] += 1

    return counter, model.register_forward_hook(hook)


@pytest.mark.parametrize("cls", LOSS_OPERATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["mlp_ce", "transformer_ce"])
def test_check_runs_one_forward_pass_per_product_and_batch(cls, name):
    """Two products, each one forward pass per batch; no separate gradient passes."""
    c = make_case(name)
    num_batches = len(c.data)
    counter, handle = _count_forward_passes(c.model)
    try:
        cls(c.model, c.loss_func, c.params, c.data, **c.kwargs())
        with_check = counter[0]
        counter[0] = 0
        cls(c.model, c.loss_func, c.params, c.data, check_deterministic=False, **c.kwargs())
        without_check = counter[0]
    finally:
        handle.remove()
    assert with_check - without_check == 2 * num_batches


@pytest.mark.parametrize("cls", LOSS_OPERATORS, ids=lambda c: c.__name__)
def test_check_still_compares_gradients(cls):
    """A model whose gradient alone changes between passes is still caught as such."""
    c = make_case("mlp_ce")
    calls = [0]

    model = _alternating_shift_model(c.model, calls, power=1)
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="Non-deterministic gradient"):
        cls(model, c.loss_func, params, c.data, **c.kwargs())


@pytest.mark.parametrize("cls", LOSS_OPERATORS[1:], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ["mlp_ce", "transformer_ce"])
def test_default_route_check_needs_no_extra_backward_pass(cls, name, monkeypatch):
    """The check's GGN-type products take the gradient from the transposed pullback under the
    default route too (``"auto"`` picks the reverse route for the single probe column), so
    they run exactly as many backward passes as with ``"reverse"`` forced."""
    c = make_case(name)
    calls = [0]
    grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls[0] += 1
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    counts = {}
    for route in ("auto", "reverse"):
        calls[0] = 0

        class Routed(cls):
            JVP_ROUTE = route

        Routed(c.model, c.loss_func, c.params, c.data, **c.kwargs())
        counts[route] = calls[0]
    assert counts["auto"] == counts["reverse"]
