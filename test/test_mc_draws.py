"""Monte-Carlo draws identical to curvlinops 3.0.1 (API contract, section 20).

The draws are written out here exactly as the contract states them (same torch calls on a
``torch.Generator`` seeded by the test, same order, same seeding points), and the MC-Fisher,
KFAC-MC, EKFAC-MC and the exact MC-Fisher diagonal are rebuilt from them with plain autograd,
independently of the library's code. The operators must match to 1e-10 (float64).
"""

from math import sqrt

import pytest
import torch
from reference import assert_close, densify
from torch import nn
from torch.nn.functional import one_hot

from curvlinops import EKFACLinearOperator, FisherMCLinearOperator, KFACLinearOperator
from curvlinops.diagonal.exact import FisherMCDiagonalLinearOperator, fisher_mc_diagonal

DT = torch.float64
C = 3
LOSSES = [nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss]


class ClassAxisFirst(nn.Module):
    """``[B, T, C] -> [B, C, T]`` (cross-entropy keeps its classes on axis 1)."""

    def forward(self, x):
        return x.transpose(1, 2)


def make_problem(loss_cls, reduction, seq, seed=0):
    """A two-layer MLP with three unequal batches; ``seq`` adds a sequence axis (T = 2)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)]
    if seq and loss_cls is nn.CrossEntropyLoss:
        layers.append(ClassAxisFirst())
    model = nn.Sequential(*layers).to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (2,) if seq else ()
    data = []
    for B in (2, 3, 4):
        X = torch.randn(B, *shape, 3, dtype=DT, generator=gen)
        if loss_cls is nn.MSELoss:
            y = torch.randn(B, *shape, C, dtype=DT, generator=gen)
        elif loss_cls is nn.CrossEntropyLoss:
            y = torch.randint(0, C, (B, *shape), generator=gen)
        else:
            y = torch.randint(0, 2, (B, *shape, C), generator=gen).to(DT)
        data.append((X, y))
    return model, loss_cls(reduction=reduction), list(model.parameters()), data


def flatten(loss_func, f):
    """The 2-d view of section 0: CE classes on axis 1, MSE/BCE features last."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return f.movedim(1, -1).reshape(-1, f.shape[1])
    return f.reshape(-1, f.shape[-1])


# ---------------------------------------------------------------- the draws of section 20
def fisher_mc_draw(loss_func, f, M, g):
    """FisherMCLinearOperator: all M samples of a batch in one call, ``[M, R, C]`` gradients."""
    R, C_ = f.shape
    if isinstance(loss_func, nn.MSELoss):
        return 2 * torch.normal(
            torch.zeros(M, R, C_, dtype=f.dtype), torch.as_tensor(sqrt(0.5)), generator=g
        )
    if isinstance(loss_func, nn.CrossEntropyLoss):
        p = torch.softmax(f, dim=1)
        classes = p.multinomial(num_samples=M, replacement=True, generator=g)  # [R, M]
        return p - one_hot(classes.T, C_).to(f.dtype)
    p = torch.sigmoid(f)
    labels = p.unsqueeze(0).expand(M, R, C_).bernoulli(generator=g)
    return p - labels


def kfac_draw_label(loss_func, f, g):
    """KFAC/EKFAC ``draw_label``: one label draw."""
    if isinstance(loss_func, nn.MSELoss):
        return f + sqrt(0.5) * torch.randn(f.shape, dtype=f.dtype, generator=g)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return torch.softmax(f, dim=1).multinomial(num_samples=1, generator=g).squeeze(-1)
    return torch.sigmoid(f).bernoulli(generator=g)


# ---------------------------------------------------------------- references (plain autograd)
def loss_terms_divisor(loss_func, f_flat):
    if loss_func.reduction == "sum":
        return 1.0
    return f_flat.shape[0] * (1 if isinstance(loss_func, nn.CrossEntropyLoss) else f_flat.shape[1])


def reference_fisher_mc(model, loss_func, params, data, seed, M):
    """Dense MC-Fisher: sum_b w_b / (M c_b) sum_{r,m} J_r^T g_rm g_rm^T J_r."""
    g = torch.Generator().manual_seed(seed)
    N = sum(X.shape[0] for X, _ in data)
    D = sum(p.numel() for p in params)
    F = torch.zeros(D, D, dtype=DT)
    for X, _ in data:
        f_flat = flatten(loss_func, model(X))
        samples = fisher_mc_draw(loss_func, f_flat.detach(), M, g)  # [M, R, C]
        R = f_flat.shape[0]
        jac = torch.stack(
            [
                torch.cat(
                    [
                        t.reshape(-1)
                        for t in torch.autograd.grad(f_flat[r, c], params, retain_graph=True)
                    ]
                )
                for r in range(R)
                for c in range(C)
            ]
        ).reshape(R, C, D)
        w = 1.0 if loss_func.reduction == "sum" else X.shape[0] / N
        scale = w / (M * loss_terms_divisor(loss_func, f_flat))
        for r in range(R):
            u = jac[r].T @ samples[:, r].T  # [D, M]
            F += scale * u @ u.T
    return F


def layer_pass(model, loss_func, X, layers):
    """Forward pass keeping the inputs and outputs of ``layers``."""
    inputs, outputs = {}, {}

    def hook(module, args, out):
        inputs[module] = args[0].detach()
        outputs[module] = out

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        f_flat = flatten(loss_func, model(X))
    finally:
        for h in handles:
            h.remove()
    return f_flat, inputs, outputs


def kfac_mc_quantities(model, loss_func, data, seed, M):
    """Per batch and sample: layer inputs [B, S, d_in] and scaled output gradients [B, S, d_out].

    The generator is seeded once, labels are drawn sample by sample on each batch (section 20),
    and ``loss_func(f, y_tilde)`` (times sqrt(C) for mean MSE/BCE) is backpropagated.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(seed)
    for X, _ in data:
        f_flat, inputs, outputs = layer_pass(model, loss_func, X, layers)
        B = X.shape[0]
        a = {layer: inputs[layer].reshape(B, -1, layer.in_features) for layer in layers}
        grads = []
        for _ in range(M):
            y_tilde = kfac_draw_label(loss_func, f_flat.detach(), g)
            loss = loss_func(f_flat, y_tilde)
            if loss_func.reduction == "mean" and not isinstance(loss_func, nn.CrossEntropyLoss):
                loss = loss * sqrt(C)
            gs = torch.autograd.grad(loss, [outputs[layer] for layer in layers], retain_graph=True)
            grads.append(
                {layer: gr.reshape(B, -1, layer.out_features) for layer, gr in zip(layers, gs)}
            )
        yield B, f_flat.shape[0] // B, layers, a, grads


def kappa(loss_func, B, R, N, M):
    return 1.0 / M if loss_func.reduction == "sum" else (B * R) ** 2 / (N * M * R)


def reference_kfac_mc(model, loss_func, params, data, seed, M):
    """Dense KFAC (expand) from the test's own draws: blocks G (x) A and G."""
    N = sum(X.shape[0] for X, _ in data)
    A, G = {}, {}
    for B, R, layers, a, grads in kfac_mc_quantities(model, loss_func, data, seed, M):
        for layer in layers:
            x = a[layer].reshape(-1, layer.in_features)
            A[layer] = A.get(layer, 0) + x.T @ x / (N * a[layer].shape[1])
            for gm in grads:
                gr = gm[layer].reshape(-1, layer.out_features)
                G[layer] = G.get(layer, 0) + kappa(loss_func, B, R, N, M) * gr.T @ gr
    blocks = []
    for layer in layers:
        blocks += [torch.kron(G[layer], A[layer]), G[layer]]
    assert [p.numel() for p in params] == [b.shape[0] for b in blocks]
    return torch.block_diag(*blocks), A, G, layers


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("seq", [False, True], ids=["2d", "seq"])
@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_fisher_mc_draws(loss_cls, reduction, mc_samples, seq):
    model, loss_func, params, data = make_problem(loss_cls, reduction, seq)
    for seed in (0, 42):
        F = FisherMCLinearOperator(
            model,
            loss_func,
            params,
            data,
            seed=seed,
            mc_samples=mc_samples,
            check_deterministic=seed == 0,
        )
        expected = reference_fisher_mc(model, loss_func, params, data, seed, mc_samples)
        assert_close(densify(F), expected)
        # the generator is re-seeded at every product: repeated products are identical
        assert_close(densify(F), expected)
        # the exact diagonal draws the same samples (layer-wise path for 2-d outputs,
        # per-datum path for sequences)
        diagonal = fisher_mc_diagonal(
            model, loss_func, params, data, seed=seed, mc_samples=mc_samples
        )
        assert_close(torch.cat([d.reshape(-1) for d in diagonal]), expected.diagonal())


@pytest.mark.parametrize("seq", [False, True], ids=["2d", "seq"])
@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_kfac_mc_draws(loss_cls, reduction, mc_samples, seq):
    model, loss_func, params, data = make_problem(loss_cls, reduction, seq)
    for seed in (0, 42):
        K = KFACLinearOperator(
            model,
            loss_func,
            params,
            data,
            seed=seed,
            mc_samples=mc_samples,
            check_deterministic=seed == 0,
        )
        expected, *_ = reference_kfac_mc(model, loss_func, params, data, seed, mc_samples)
        assert_close(densify(K), expected)
        # recomputing the factors re-seeds the generator
        K.compute_kronecker_factors()
        assert_close(densify(K), expected)


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_ekfac_mc_draws(loss_cls, reduction, mc_samples):
    """EKFAC-MC: the factor pass and the correction pass both start from ``seed``."""
    model, loss_func, params, data = make_problem(loss_cls, reduction, seq=False)
    seed = 5
    E = EKFACLinearOperator(model, loss_func, params, data, seed=seed, mc_samples=mc_samples)
    densify(E)
    _, A, G, layers = reference_kfac_mc(model, loss_func, params, data, seed, mc_samples)
    names = {module: name for name, module in model.named_modules()}
    N = sum(X.shape[0] for X, _ in data)
    corrected = {}
    for B, R, _, a, grads in kfac_mc_quantities(model, loss_func, data, seed, mc_samples):
        for layer in layers:
            Q_A = E._input_covariances_eigenvectors[names[layer]]
            Q_G = E._gradient_covariances_eigenvectors[names[layer]]
            for gm in grads:
                per_example = torch.einsum("nso,nsi->noi", gm[layer], a[layer])
                k = kappa(loss_func, B, R, N, mc_samples)
                weight = k * ((Q_G.T @ per_example @ Q_A) ** 2).sum(0)
                bias = k * ((gm[layer].sum(1) @ Q_G) ** 2).sum(0)
                old_w, old_b = corrected.get(layer, (0, 0))
                corrected[layer] = (old_w + weight, old_b + bias)
    for layer in layers:
        Q_A = E._input_covariances_eigenvectors[names[layer]]
        Q_G = E._gradient_covariances_eigenvectors[names[layer]]
        # the eigenbases diagonalise the factors built from the test's draws
        for Q, factor in ((Q_A, A[layer]), (Q_G, G[layer])):
            rotated = Q.T @ factor @ Q
            off = rotated - torch.diag(rotated.diagonal())
            assert off.abs().max() <= 1e-10 * factor.abs().max()
        stored = E._corrected_eigenvalues[names[layer]]
        w_pos, b_pos = E._mapping[names[layer]]["weight"], E._mapping[names[layer]]["bias"]
        assert_close(stored[w_pos], corrected[layer][0])
        assert_close(stored[b_pos], corrected[layer][1])


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_draw_label_method(loss_cls):
    """``KFACLinearOperator.draw_label`` draws from the operator's generator as section 20 says."""
    model, loss_func, params, data = make_problem(loss_cls, "mean", seq=False)
    K = KFACLinearOperator(model, loss_func, params, data, seed=9, check_deterministic=False)
    K._generator = torch.Generator().manual_seed(3)
    f = torch.randn(4, C, dtype=DT)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        expected = kfac_draw_label(loss_func, f, g)
        actual = K.draw_label(f)
        assert actual.dtype == expected.dtype
        assert (
            torch.equal(actual, expected)
            if actual.dtype == torch.int64
            else torch.allclose(actual, expected, rtol=1e-15, atol=0)
        )


def test_mc_diagonal_operator_same_draws_as_fisher_mc():
    """The diagonal operator's product and the MC-Fisher's diagonal agree (same samples)."""
    model, loss_func, params, data = make_problem(nn.CrossEntropyLoss, "mean", seq=False)
    F = densify(FisherMCLinearOperator(model, loss_func, params, data, seed=11, mc_samples=2))
    Dg = FisherMCDiagonalLinearOperator(model, loss_func, params, data, seed=11, mc_samples=2)
    assert_close(torch.cat([d.reshape(-1) for d in Dg.diagonal]), F.diagonal())
