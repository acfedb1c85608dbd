"""No call leaves the user's model changed: parameters, buffers, hooks, ``.grad``, modes, RNG.

For every operator family (and the exact diagonals, the report function and a CG inverse), a
small float64 model with a ``BatchNorm1d`` layer (whole model in eval mode, or in train mode),
a user forward hook, some ``.grad`` fields set and a registered buffer is snapshotted; then the
operator is built and multiplied, and the snapshot must still describe the model exactly:

- parameters: the same ``nn.Parameter`` objects in every module, same values and
  ``requires_grad``;
- buffers: same names and values (BatchNorm running statistics and ``num_batches_tracked``
  included);
- hooks: every ``*hooks*`` dict of every module and torch's global module hooks hold the same
  entries (no hook left behind, none removed);
- ``.grad``: the same tensor objects (or ``None``) with the same values;
- the ``training`` flag of every module, and the global torch RNG state.

The same holds when the computation fails half-way: a model that raises on its 2nd forward
call of a product, and a batch of the wrong shape in the middle of the data. Unchanged means
bit for bit here: these are the same tensors in the same process, nothing is recomputed.
"""

import pytest
import torch
from model_state import changes, snapshot
from torch import nn

from curvlinops import (
    CGInverseLinearOperator,
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvlinops.diagonal.exact import ef_diagonal, fisher_mc_diagonal, ggn_diagonal
from curvlinops.examples import IdentityLinearOperator
from curvlinops.experimental import ActivationHessianLinearOperator
from curvlinops.report import curvature_report

DT = torch.float64
BATCH_SIZES = (4, 3, 5)
D_IN, D_HIDDEN, D_OUT = 3, 4, 2


class Boom(RuntimeError):
    """The failure injected into the model's forward pass."""


class Net(nn.Module):
    """``Linear -> BatchNorm1d -> tanh -> Linear``, scaled by a registered buffer.

    ``fail_in`` arms a failure: the forward call that brings it to zero raises :class:`Boom`.
    """

    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(D_IN, D_HIDDEN)
        self.bn = nn.BatchNorm1d(D_HIDDEN)
        self.lin2 = nn.Linear(D_HIDDEN, D_OUT)
        self.register_buffer("scale", torch.tensor([1.5, 0.5]))
        self.fail_in = None

    def forward(self, x):
        if self.fail_in is not None:
            self.fail_in -= 1
            if self.fail_in == 0:
                raise Boom("injected failure in the forward pass")
        return self.lin2(torch.tanh(self.bn(self.lin1(x)))) * self.scale


def problem(mode: str):
    """The model (in ``mode``), MSE loss, the trainable Linear parameters and 3 batches."""
    torch.manual_seed(0)
    model = Net().to(DT)
    with torch.no_grad():  # non-trivial BatchNorm state, so a reset or an update shows
        model.bn.running_mean.copy_(torch.randn(D_HIDDEN))
        model.bn.running_var.copy_(torch.rand(D_HIDDEN) + 0.5)
        model.bn.num_batches_tracked.fill_(7)
        model.bn.weight.copy_(torch.rand(D_HIDDEN) + 0.5)
        model.bn.bias.copy_(torch.randn(D_HIDDEN))
    model.train(mode == "train")
    seen = []
    model.lin1.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model.lin1.weight.grad = torch.randn_like(model.lin1.weight)
    model.bn.bias.grad = torch.randn_like(model.bn.bias)
    # KFAC supports Linear (and Conv2d) layers only, so the BatchNorm affine parameters are
    # not in params; they are model parameters all the same and must stay untouched.
    params = [model.lin1.weight, model.lin1.bias, model.lin2.weight, model.lin2.bias]
    data = [(torch.randn(n, D_IN, dtype=DT), torch.randn(n, D_OUT, dtype=DT)) for n in BATCH_SIZES]
    return model, nn.MSELoss(), params, data


# ------------------------------------------------------------------ the families
def param_vector(params):
    return torch.cat([torch.rand(p.numel(), dtype=DT) for p in params]) * 2 - 1


def damped_ggn(model, loss_func, params, data, **kwargs):
    G = GGNLinearOperator(model, loss_func, params, data, **kwargs)
    identity = IdentityLinearOperator([p.shape for p in params], G.device, G.dtype)
    return G + 0.5 * identity


def activation_hessian(model, loss_func, params, data, **kwargs):
    return ActivationHessianLinearOperator(
        model, loss_func, ("lin2", "input", 0), data[:1], **kwargs
    )


def kfac_inverse(model, loss_func, params, data, **kwargs):
    K = KFACLinearOperator(model, loss_func, params, data, **kwargs)
    return KFACInverseLinearOperator(K, damping=1e-2)


def ekfac_inverse(model, loss_func, params, data, **kwargs):
    K = EKFACLinearOperator(model, loss_func, params, data, **kwargs)
    return KFACInverseLinearOperator(K, damping=1e-2, use_exact_damping=True)


def cg_inverse(model, loss_func, params, data, **kwargs):
    return CGInverseLinearOperator(
        damped_ggn(model, loss_func, params, data, **kwargs), tolerance=1e-8, max_iter=100
    )


def lsmr_inverse(model, loss_func, params, data, **kwargs):
    return LSMRInverseLinearOperator(damped_ggn(model, loss_func, params, data, **kwargs))


def neumann_inverse(model, loss_func, params, data, **kwargs):
    A = damped_ggn(model, loss_func, params, data, **kwargs)
    return NeumannInverseLinearOperator(A, num_terms=5, scale=0.1)


OPERATORS = {
    "hessian": lambda m, lf, p, d, **kw: HessianLinearOperator(m, lf, p, d, **kw),
    "ggn": lambda m, lf, p, d, **kw: GGNLinearOperator(m, lf, p, d, **kw),
    "ef": lambda m, lf, p, d, **kw: EFLinearOperator(m, lf, p, d, **kw),
    "mc_fisher": lambda m, lf, p, d, **kw: FisherMCLinearOperator(m, lf, p, d, seed=3, **kw),
    "jacobian": lambda m, lf, p, d, **kw: JacobianLinearOperator(m, p, d, **kw),
    "transposed_jacobian": lambda m, lf, p, d, **kw: TransposedJacobianLinearOperator(
        m, p, d, **kw
    ),
    "kfac": lambda m, lf, p, d, **kw: KFACLinearOperator(m, lf, p, d, **kw),
    "kfac_empirical": lambda m, lf, p, d, **kw: KFACLinearOperator(
        m, lf, p, d, fisher_type="empirical", **kw
    ),
    "ekfac": lambda m, lf, p, d, **kw: EKFACLinearOperator(m, lf, p, d, **kw),
    "kfac_inverse": kfac_inverse,
    "ekfac_inverse": ekfac_inverse,
    "activation_hessian": activation_hessian,
    "cg_inverse": cg_inverse,
    "lsmr_inverse": lsmr_inverse,
    "neumann_inverse": neumann_inverse,
}
# Functions that do all their work in one call (construction and "product" at once).
FUNCTIONS = {
    "ggn_diagonal": lambda m, lf, p, d: ggn_diagonal(m, lf, p, d),
    "ef_diagonal": lambda m, lf, p, d: ef_diagonal(m, lf, p, d),
    "fisher_mc_diagonal": lambda m, lf, p, d: fisher_mc_diagonal(m, lf, p, d, seed=1),
    "report": lambda m, lf, p, d: curvature_report(
        m, lf, d, k=1, num_samples=2, lanczos_steps=3, num_points=8
    ),
}
MODES = ("eval", "train")


def multiply(A) -> torch.Tensor:
    """One product with a two-column random matrix of the right size (fixed generator)."""
    generator = torch.Generator().manual_seed(0)
    return A @ torch.rand(A.shape[1], 2, dtype=DT, generator=generator)


# ------------------------------------------------------------------ the tests
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", OPERATORS)
def test_construction_and_products_leave_the_model_unchanged(family, mode):
    model, loss_func, params, data = problem(mode)
    before = snapshot(model)
    A = OPERATORS[family](model, loss_func, params, data)
    assert changes(before, model) == [], "construction"
    first = multiply(A)
    assert torch.isfinite(first).all()
    assert changes(before, model) == [], "first product"
    torch.testing.assert_close(multiply(A), first, rtol=1e-10, atol=1e-12)
    assert changes(before, model) == [], "second product"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FUNCTIONS)
def test_functions_leave_the_model_unchanged(family, mode):
    model, loss_func, params, data = problem(mode)
    before = snapshot(model)
    FUNCTIONS[family](model, loss_func, params, data)
    assert changes(before, model) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", OPERATORS)
def test_failure_in_the_middle_of_a_product_leaves_the_model_unchanged(family, mode):
    """The model raises on its 2nd forward call of a product (1st for the one-batch operator).

    Built without the determinism check, so the KFAC family computes its factors (with its
    hooks installed) inside this very product.
    """
    model, loss_func, params, data = problem(mode)
    before = snapshot(model)
    A = OPERATORS[family](model, loss_func, params, data, check_deterministic=False)
    model.fail_in = 1 if family == "activation_hessian" else 2
    with pytest.raises(Boom, match="injected failure"):
        multiply(A)
    model.fail_in = None
    assert changes(before, model) == []
    # and the operator still works afterwards, with the model as it was
    assert torch.isfinite(multiply(A)).all()
    assert changes(before, model) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", [f for f in OPERATORS if f != "activation_hessian"])
def test_batch_of_the_wrong_shape_in_the_middle_leaves_the_model_unchanged(family, mode):
    """The 2nd of three batches has the wrong number of features (a shape error inside)."""
    model, loss_func, params, data = problem(mode)
    good, bad = data[1], (torch.randn(3, D_IN + 1, dtype=DT), data[1][1])
    before = snapshot(model)
    A = OPERATORS[family](model, loss_func, params, data, check_deterministic=False)
    data[1] = bad
    with pytest.raises((RuntimeError, ValueError)):
        multiply(A)
    data[1] = good
    assert changes(before, model) == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FUNCTIONS)
def test_functions_failing_in_the_middle_leave_the_model_unchanged(family, mode):
    model, loss_func, params, data = problem(mode)
    data[1] = (torch.randn(3, D_IN + 1, dtype=DT), data[1][1])
    before = snapshot(model)
    with pytest.raises((RuntimeError, ValueError)):
        FUNCTIONS[family](model, loss_func, params, data)
    assert changes(before, model) == []


def last_bit_up(t: torch.Tensor):
    """Move one entry of ``t`` to the next float: the smallest possible change."""
    flat = t.view(-1)
    flat[0] = torch.nextafter(flat[0], flat[0] + 1)


def test_the_snapshot_sees_every_kind_of_change():
    """The checker itself: each kind of change it must catch is reported."""
    model, loss_func, params, data = problem("train")
    before = snapshot(model)
    assert changes(before, model) == []
    model(data[0][0])  # a train-mode forward updates the running statistics
    assert any("buffer bn.running_mean" in c for c in changes(before, model))
    assert any("buffer bn.num_batches_tracked" in c for c in changes(before, model))

    edits = {
        "parameter lin2.bias was replaced": lambda m: setattr(
            m.lin2, "bias", nn.Parameter(m.lin2.bias.detach().clone())
        ),
        "parameter lin1.weight changed its values": lambda m: last_bit_up(m.lin1.weight.data),
        "_forward_hooks of module 'bn'": lambda m: m.bn.register_forward_hook(lambda *a: None),
        "_forward_pre_hooks of module ''": lambda m: m.register_forward_pre_hook(lambda *a: None),
        "_backward_hooks of module 'lin2'": lambda m: m.lin2.register_full_backward_hook(
            lambda *a: None
        ),
        "lin2.weight.grad was replaced": lambda m: setattr(
            m.lin2.weight, "grad", torch.zeros_like(m.lin2.weight)
        ),
        "lin1.weight.grad changed its values": lambda m: m.lin1.weight.grad.mul_(2),
        "training flags": lambda m: m.bn.train(),
        "global torch RNG": lambda m: torch.rand(1),
        "requires_grad": lambda m: m.bn.weight.requires_grad_(False),
        "torch's global hooks": lambda m: nn.modules.module.register_module_forward_hook(
            lambda *a: None
        ),
    }
    for message, edit in edits.items():
        model, *_ = problem("eval")
        before = snapshot(model)
        handle = edit(model)
        try:
            assert any(message in c for c in changes(before, model)), message
        finally:
            if hasattr(handle, "remove"):
                handle.remove()
