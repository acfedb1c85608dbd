"""Construction cost of the determinism check (issue 14): the check takes every batch's
prediction, loss and gradient from the forward and backward passes of its two products,
instead of running separate gradient passes."""

import pytest
import torch
from cases import make_case

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
)

LOSS_OPERATORS = [
    HessianLinearOperator,
    GGNLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
]


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

    class Flaky(torch.nn.Module):
        """Adds ``s * p.sum()`` with a fixed output and a gradient that changes per call."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self.shift = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, X):
            calls[0] += 1
            out = self.model(X)
            # value zero, gradient w.r.t. shift alternating in sign between calls (one class
            # only: cross-entropy is invariant to shifting all logits)
            mask = torch.zeros_like(out)
            mask[:, 0] = 1.0
            return out + (self.shift * (-1.0) ** calls[0]) * mask

    model = Flaky(c.model)
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
