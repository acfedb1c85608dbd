"""Tests for ``curvlinops.examples.functorch`` against independent autograd references."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian as autograd_hessian
from torch.func import functional_call
from torch.func import hessian as func_hessian

from curvlinops.examples.functorch import (
    blocks_to_matrix,
    functorch_empirical_fisher,
    functorch_ggn,
    functorch_gradient_and_loss,
    functorch_hessian,
    functorch_jacobian,
)

DT = torch.float64
BATCH_SIZES = [3, 2]  # unequal batch sizes test the mean normalisation
C = 3


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class DictModel(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, X):
        return self.net(X["x"])


def make_model(name):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))
        in_shape = (4,)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 2 * 2, C)
        )
        in_shape = (2, 3, 3)
    elif name == "layernorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, C))
        # non-trivial LayerNorm parameters
        with torch.no_grad():
            model[1].weight.add_(0.5 * torch.randn(5))
            model[1].bias.add_(0.5 * torch.randn(5))
        in_shape = (4,)
    elif name == "seq_ce":  # output [B, C, T]
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, C), Permute(0, 2, 1))
        in_shape = (3, 2)
    elif name == "seq_last":  # output [B, T, C]
        model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, C))
        in_shape = (3, 2)
    else:
        raise ValueError(name)
    return model.to(DT), in_shape


def make_labels(loss_name, out_shape, model_name):
    B = out_shape[0]
    if loss_name == "ce":
        spatial = out_shape[2:]
        return torch.randint(0, C, (B, *spatial))
    if loss_name == "bce":
        return torch.rand(*out_shape, dtype=DT)
    return torch.randn(*out_shape, dtype=DT)


def make_loss(loss_name, reduction):
    cls = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}[loss_name]
    return cls(reduction=reduction)


def make_problem(model_name, loss_name, reduction, binary=False):
    model, in_shape = make_model(model_name)
    loss_func = make_loss(loss_name, reduction)
    torch.manual_seed(1)
    data = []
    for B in BATCH_SIZES:
        X = torch.randn(B, *in_shape, dtype=DT)
        with torch.no_grad():
            out_shape = model(X).shape
        y = make_labels(loss_name, out_shape, model_name)
        if binary:
            y = y.round()
        data.append((X, y))
    return model, loss_func, list(model.parameters()), data


def total_loss(model, loss_func, data):
    """L = sum_b w_b l_b with w_b = B_b / N for mean reduction (section 0)."""
    N = sum(X.shape[0] for X, _ in data)
    weights = [X.shape[0] / N if loss_func.reduction == "mean" else 1.0 for X, _ in data]
    return sum(w * loss_func(model(X), y) for w, (X, y) in zip(weights, data))


def flat_grad(output, params, **kwargs):
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat(
        [torch.zeros_like(p).flatten() if g is None else g.flatten() for g, p in zip(grads, params)]
    )


def hessian_double_backward(model, loss_func, params, data):
    g = flat_grad(total_loss(model, loss_func, data), params, create_graph=True)
    return torch.stack([flat_grad(g_i, params, retain_graph=True) for g_i in g])


def hessian_finite_differences(model, loss_func, params, data, eps=1e-5):
    theta = torch.cat([p.detach().flatten() for p in params])

    def grad_at(t):
        with torch.no_grad():
            for p, chunk in zip(params, t.split([p.numel() for p in params])):
                p.copy_(chunk.reshape(p.shape))
        return flat_grad(total_loss(model, loss_func, data), params)

    rows = []
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = eps
        rows.append((grad_at(theta + e) - grad_at(theta - e)) / (2 * eps))
    grad_at(theta)  # restore the parameters
    return torch.stack(rows)


def jacobian_rows(model, params, data):
    rows = []
    for X, _ in data:
        out = model(X).flatten()
        rows.extend(flat_grad(o, params, retain_graph=True) for o in out)
    return torch.stack(rows)


MODELS = ["mlp", "cnn", "layernorm"]
LOSSES = ["ce", "mse", "bce"]
REDUCTIONS = ["mean", "sum"]


def cases_with_sequences(model_names):
    """(model, loss) pairs: all losses for 2-d outputs, sequence models with matching losses."""
    cases = [(m, loss) for m in model_names for loss in LOSSES]
    return cases + [("seq_ce", "ce"), ("seq_last", "mse"), ("seq_last", "bce")]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("model_name", MODELS)
def test_functorch_hessian(model_name, loss_name, reduction):
    model, loss_func, params, data = make_problem(model_name, loss_name, reduction)
    H = functorch_hessian(model, loss_func, params, data)
    D = sum(p.numel() for p in params)
    assert H.shape == (D, D)
    H_fd = hessian_finite_differences(model, loss_func, params, data)
    assert torch.allclose(H, H_fd, rtol=1e-6, atol=1e-8)
    H_ref = hessian_double_backward(model, loss_func, params, data)
    assert torch.allclose(H, H_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(H, H.T, atol=1e-12)
    # parameter .grad fields are untouched
    assert all(p.grad is None for p in params)


def test_functorch_hessian_sequence_output():
    model, loss_func, params, data = make_problem("seq_ce", "ce", "mean")
    H = functorch_hessian(model, loss_func, params, data)
    assert torch.allclose(H, hessian_double_backward(model, loss_func, params, data))


def test_functorch_hessian_layernorm_nonzero_ln_block():
    """The LayerNorm weight block is the one torch.func.hessian gets wrong in torch 2.13."""
    model, loss_func, params, data = make_problem("layernorm", "ce", "sum")
    params_ln = [model[1].weight, model[1].bias]
    H = functorch_hessian(model, loss_func, params_ln, data)
    H_fd = hessian_finite_differences(model, loss_func, params_ln, data)
    assert H.abs().max() > 1e-3
    assert torch.allclose(H, H_fd, rtol=1e-6, atol=1e-8)


def test_functorch_hessian_params_subset_and_order():
    model, loss_func, params, data = make_problem("mlp", "mse", "mean")
    H_full = functorch_hessian(model, loss_func, params, data)
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    order = [3, 0]
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in order])
    H_sub = functorch_hessian(model, loss_func, [params[i] for i in order], data)
    assert torch.allclose(H_sub, H_full[idx][:, idx])
    # params are located by storage: `.data` views of the parameters work
    H_data = functorch_hessian(model, loss_func, [params[i].data for i in order], data)
    assert torch.allclose(H_data, H_sub)
    with pytest.raises(ValueError, match="storage"):
        functorch_hessian(model, loss_func, [params[0].clone()], data)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("model_name, loss_name", cases_with_sequences(["mlp", "layernorm"]))
def test_functorch_ggn(model_name, loss_name, reduction):
    model, loss_func, params, data = make_problem(model_name, loss_name, reduction)
    G = functorch_ggn(model, loss_func, params, data)
    # independent reference: sum_b w_b J_b^T H_b J_b, J_b by autograd rows
    N = sum(X.shape[0] for X, _ in data)
    G_ref = 0
    for X, y in data:
        w = X.shape[0] / N if reduction == "mean" else 1.0
        J = jacobian_rows(model, params, [(X, y)])
        out = model(X).detach()
        H_out = autograd_hessian(lambda f, y=y: loss_func(f, y), out).reshape(
            out.numel(), out.numel()
        )
        G_ref = G_ref + w * J.T @ H_out @ J
    assert torch.allclose(G, G_ref, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # positive semi-definite


def test_functorch_ggn_equals_hessian_for_linear_model_and_mse():
    torch.manual_seed(0)
    model = nn.Linear(4, C).to(DT)
    data = [(torch.randn(3, 4, dtype=DT), torch.randn(3, C, dtype=DT))]
    params = list(model.parameters())
    loss_func = nn.MSELoss()
    G = functorch_ggn(model, loss_func, params, data)
    H = functorch_hessian(model, loss_func, params, data)
    assert torch.allclose(G, H)
    # and differs from the Hessian for a nonlinear model
    model, loss_func, params, data = make_problem("mlp", "mse", "sum")
    G = functorch_ggn(model, loss_func, params, data)
    H = functorch_hessian(model, loss_func, params, data)
    assert not torch.allclose(G, H, atol=1e-6)


def empirical_fisher_loop(model, loss_name, reduction, params, data):
    """Per-sample (and per-position) gradient outer products."""
    loss_sum = make_loss(loss_name, "sum")
    EF, num_terms = 0, 0
    for X, y in data:
        for n in range(X.shape[0]):
            out = model(X[n : n + 1])
            if out.ndim == 2:
                terms = [(out, y[n : n + 1])]
            elif loss_name == "ce":  # [1, C, T]
                terms = [(out[:, :, t], y[n : n + 1, t]) for t in range(out.shape[2])]
            else:  # [1, T, C]
                terms = [(out[:, t], y[n : n + 1, t]) for t in range(out.shape[1])]
            for o, t in terms:
                g = flat_grad(loss_sum(o, t), params, retain_graph=True)
                EF = EF + torch.outer(g, g)
                num_terms += 1
    if reduction == "mean":
        EF = EF / num_terms
        if loss_name != "ce":
            EF = EF / C
    return EF


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("model_name, loss_name", cases_with_sequences(["mlp", "cnn"]))
def test_functorch_empirical_fisher(model_name, loss_name, reduction):
    model, loss_func, params, data = make_problem(model_name, loss_name, reduction)
    EF = functorch_empirical_fisher(model, loss_func, params, data)
    EF_ref = empirical_fisher_loop(model, loss_name, reduction, params, data)
    assert torch.allclose(EF, EF_ref, rtol=1e-10, atol=1e-12)
    assert EF.abs().max() > 1e-6


def test_functorch_empirical_fisher_errors():
    model, _, params, data = make_problem("mlp", "mse", "mean")
    with pytest.raises(NotImplementedError, match="L1Loss"):
        functorch_empirical_fisher(model, nn.L1Loss(), params, data)
    with pytest.raises(ValueError, match="reduction"):
        functorch_empirical_fisher(model, nn.MSELoss(reduction="none"), params, data)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "seq_ce"])
def test_functorch_jacobian(model_name):
    model, _, params, data = make_problem(model_name, "mse", "sum")
    J = functorch_jacobian(model, params, data)
    N = sum(BATCH_SIZES)
    out_numel = model(data[0][0]).shape[1:].numel()
    assert J.shape == (N * out_numel, sum(p.numel() for p in params))
    assert torch.allclose(J, jacobian_rows(model, params, data), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_functorch_gradient_and_loss(loss_name, reduction):
    model, loss_func, params, data = make_problem("layernorm", loss_name, reduction)
    grads, loss = functorch_gradient_and_loss(model, loss_func, params, data)
    loss_ref = total_loss(model, loss_func, data)
    grads_ref = torch.autograd.grad(loss_ref, params)
    assert torch.allclose(loss, loss_ref)
    assert len(grads) == len(params)
    for g, g_ref, p in zip(grads, grads_ref, params):
        assert g.shape == p.shape
        assert torch.allclose(g, g_ref)
    assert all(p.grad is None for p in params)


def test_dict_inputs():
    model, loss_func, params, data = make_problem("mlp", "ce", "mean")
    dict_model = DictModel(model)
    dict_data = [({"x": X, "unused": torch.zeros(1)}, y) for X, y in data]
    for func in [functorch_hessian, functorch_ggn, functorch_empirical_fisher]:
        M = func(dict_model, loss_func, params, dict_data, input_key="x")
        assert torch.allclose(M, func(model, loss_func, params, data))
    J = functorch_jacobian(dict_model, params, dict_data, input_key="x")
    assert torch.allclose(J, functorch_jacobian(model, params, data))
    grads, loss = functorch_gradient_and_loss(
        dict_model, loss_func, params, dict_data, input_key="x"
    )
    grads_ref, loss_ref = functorch_gradient_and_loss(model, loss_func, params, data)
    assert torch.allclose(loss, loss_ref)
    assert all(torch.allclose(g, g_ref) for g, g_ref in zip(grads, grads_ref))
    with pytest.raises(ValueError, match="input_key"):
        functorch_hessian(dict_model, loss_func, params, dict_data)
    with pytest.raises(ValueError, match="input_key"):
        functorch_jacobian(dict_model, params, dict_data, input_key="y")


def test_blocks_to_matrix_small():
    blocks = {
        "a": {"a": torch.ones(2, 2), "b": 2 * torch.ones(2, 1, 3)},
        "b": {"a": 3 * torch.ones(1, 3, 2), "b": 4 * torch.ones(1, 3, 1, 3)},
    }
    M = blocks_to_matrix(blocks)
    expected = torch.tensor(
        [
            [1, 1, 2, 2, 2],
            [1, 1, 2, 2, 2],
            [3, 3, 4, 4, 4],
            [3, 3, 4, 4, 4],
            [3, 3, 4, 4, 4],
        ],
        dtype=M.dtype,
    )
    assert torch.equal(M, expected)


# torch.func.hessian's forward-mode AD triggers a torch-internal torch.jit deprecation warning
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_blocks_to_matrix_from_torch_func_hessian():
    model, loss_func, params, data = make_problem("mlp", "ce", "sum")
    X = torch.cat([X for X, _ in data])
    y = torch.cat([y for _, y in data])
    param_dict = {name: p.detach() for name, p in model.named_parameters()}

    def loss(d):
        return loss_func(functional_call(model, d, (X,)), y)

    H = blocks_to_matrix(func_hessian(loss)(param_dict))
    assert torch.allclose(H, functorch_hessian(model, loss_func, params, data))
