"""``CrossEntropyLoss(ignore_index=...)`` and label smoothing (issue 16).

Padded positions (labels ``ignore_index``) must give exactly the operator of the unpadded
batch: KFAC (all Fisher types), EKFAC, MC-Fisher, GGN, EF and the exact diagonals. The model
acts on each position separately, so padded positions cannot influence counted ones.
"""

import pytest
import torch
from reference import assert_close, densify
from torch import nn

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    KFACInverseLinearOperator,
)
from curvlinops.diagonal.exact import ef_diagonal, fisher_mc_diagonal, ggn_diagonal
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.kfac import KFACLinearOperator

DT = torch.float64
TOL = {"rtol": 1e-10, "atol_scale": 1e-10}
IGNORE = -7


class PerPosition(nn.Module):
    """Linear -> tanh -> Linear on every position, logits ``[N, C, T]``."""

    def __init__(self, d=3, h=4, C=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C))

    def forward(self, x):
        return self.net(x).transpose(1, 2)


def _data(pad: int, lengths=(3, 2), seed=0):
    """One datum per batch, padded with ignored positions to ``max(lengths) + pad`` if ``pad``."""
    gen = torch.Generator().manual_seed(seed)
    pad_gen = torch.Generator().manual_seed(seed + 100)  # padding does not shift the data
    batches = []
    for T in lengths:
        x = torch.randn(1, T, 3, generator=gen, dtype=DT)
        y = torch.randint(3, (1, T), generator=gen)
        num_pad = max(lengths) + pad - T if pad else 0
        x_pad = torch.randn(1, num_pad, 3, generator=pad_gen, dtype=DT)
        y_pad = torch.full((1, num_pad), IGNORE)
        batches.append((torch.cat([x, x_pad], 1), torch.cat([y, y_pad], 1)))
    return batches


def _model():
    torch.manual_seed(0)
    return PerPosition().to(DT)


def _build(cls, model, loss, data, **kwargs):
    params = list(model.parameters())
    # unpadded batches have different lengths: give the loss terms per datum explicitly
    K = cls(
        model,
        loss,
        params,
        data,
        check_deterministic=False,
        num_per_example_loss_terms=data[0][1].shape[1],
        **kwargs,
    )
    K.compute_kronecker_factors()
    return K


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc", "forward-only"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_kfac_padded_equals_unpadded(fisher_type, reduction, kfac_approx):
    model = _model()
    loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=IGNORE)
    kwargs = {"fisher_type": fisher_type, "kfac_approx": kfac_approx}
    padded = _build(KFACLinearOperator, model, loss, _data(pad=2), **kwargs)
    unpadded = [_build(KFACLinearOperator, model, loss, [b], **kwargs) for b in _data(pad=0)]
    # the unpadded reference: one operator per datum (different lengths), summed with the
    # data weights 1/N of the mean (sum: the sum)
    if fisher_type == "forward-only":
        ref_A = sum(densify(K) for K in unpadded) / 2  # G = I in both
        assert_close(densify(padded), ref_A, **TOL)
        return
    dense = densify(padded)
    for name in padded._mapping:
        A = padded._input_covariances[name]
        A_ref = sum(K._input_covariances[name] for K in unpadded) / 2
        assert_close(A, A_ref, **TOL)
        G = padded._gradient_covariances[name]
        G_ref = sum(K._gradient_covariances[name] * K._N_data for K in unpadded)
        scale = 1.0 if reduction == "sum" else 1 / 2
        if fisher_type != "mc":
            assert_close(G, G_ref * scale, **TOL)
    assert torch.isfinite(dense).all()


def _sum_of_unpadded(cls, model, loss, **kwargs):
    """The operator of the unpadded data: data points as separate one-datum operators."""
    parts = [densify(cls(model, loss, list(model.parameters()), [b], **kwargs)) for b in _data(0)]
    weight = 0.5 if loss.reduction == "mean" else 1.0
    return sum(parts) * weight


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_operators_padded_equal_unpadded(reduction):
    model = _model()
    loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=IGNORE)
    params = list(model.parameters())
    padded = _data(pad=2)
    dense = densify(GGNLinearOperator(model, loss, params, padded, check_deterministic=False))
    assert_close(dense, _sum_of_unpadded(GGNLinearOperator, model, loss), **TOL)
    for fn in (ggn_diagonal, ef_diagonal):
        diagonal = torch.cat([d.flatten() for d in fn(model, loss, params, padded)])
        reference = sum(
            torch.cat([d.flatten() for d in fn(model, loss, params, [b])]) for b in _data(0)
        ) * (0.5 if reduction == "mean" else 1.0)
        assert_close(diagonal, reference, **TOL)


def test_ef_padded_equals_unpadded_mean():
    model = _model()
    loss = nn.CrossEntropyLoss(ignore_index=IGNORE)
    params = list(model.parameters())
    dense = densify(EFLinearOperator(model, loss, params, _data(pad=2), check_deterministic=False))
    assert_close(dense, _sum_of_unpadded(EFLinearOperator, model, loss), **TOL)


def test_ef_padded_equals_unpadded_sum():
    model = _model()
    loss = nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE)
    params = list(model.parameters())
    dense = densify(EFLinearOperator(model, loss, params, _data(pad=2), check_deterministic=False))
    assert_close(dense, _sum_of_unpadded(EFLinearOperator, model, loss), **TOL)


def test_mc_fisher_and_diagonal_with_ignore_index():
    """MC-Fisher with ignore_index: padded rows count nothing; its diagonal matches."""
    model = _model()
    loss = nn.CrossEntropyLoss(ignore_index=IGNORE)
    params = list(model.parameters())
    padded = _data(pad=2)
    F = densify(FisherMCLinearOperator(model, loss, params, padded, seed=5))
    diagonal = torch.cat(
        [d.flatten() for d in fisher_mc_diagonal(model, loss, params, padded, seed=5)]
    )
    assert_close(diagonal, F.diagonal(), **TOL)
    # only counted rows enter: zeroing the padded inputs changes nothing
    zeroed = [(x.clone(), y) for x, y in padded]
    for x, y in zeroed:
        x[y == IGNORE] = 0.0
    F_zeroed = densify(FisherMCLinearOperator(model, loss, params, zeroed, seed=5))
    assert_close(F, F_zeroed, **TOL)
    # KFAC-MC's fallback-free blocks see the same samples: the last layer's bias block of
    # KFAC (G only, exact for a bias) equals the MC-Fisher's
    K = KFACLinearOperator(model, loss, params, padded, seed=5, check_deterministic=False)
    dense = densify(K)
    assert_close(dense[-3:, -3:], F[-3:, -3:], **TOL)


def test_label_smoothing_same_curvature_as_plain():
    """The logit Hessian of the smoothed loss is the plain one: type-2/MC KFAC are equal."""
    model = _model()
    data = _data(pad=0, lengths=(3, 3))
    params = list(model.parameters())
    for fisher_type in ("type-2", "mc"):
        K = KFACLinearOperator(
            model, nn.CrossEntropyLoss(label_smoothing=0.2), params, data, fisher_type=fisher_type
        )
        K_plain = KFACLinearOperator(
            model, nn.CrossEntropyLoss(), params, data, fisher_type=fisher_type
        )
        assert_close(densify(K), densify(K_plain), **TOL)
    F = FisherMCLinearOperator(model, nn.CrossEntropyLoss(label_smoothing=0.2), params, data)
    F_plain = FisherMCLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    assert_close(densify(F), densify(F_plain), **TOL)
    with pytest.raises(NotImplementedError, match="weight"):
        FisherMCLinearOperator(
            model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)), params, data
        )


def test_ekfac_and_inverse_with_ignore_index():
    """EKFAC on rows: ignored rows enter neither factors nor corrections."""
    model = _model()
    loss = nn.CrossEntropyLoss(ignore_index=IGNORE)
    data = [(x.reshape(-1, 3), y.reshape(-1)) for x, y in _data(pad=2, lengths=(3, 3))]
    # other inputs at the ignored rows: the same operator
    other = [(torch.where((y == IGNORE).unsqueeze(-1), 5.0 + x, x), y) for x, y in data]
    params = list(model.net.parameters())
    E = EKFACLinearOperator(model.net, loss, params, data, fisher_type="type-2")
    E_other = EKFACLinearOperator(model.net, loss, params, other, fisher_type="type-2")
    assert_close(densify(E), densify(E_other), **TOL)
    K = KFACLinearOperator(model.net, loss, params, data, fisher_type="type-2")
    K_other = KFACLinearOperator(model.net, loss, params, other, fisher_type="type-2")
    assert_close(densify(K), densify(K_other), **TOL)
    inverse = densify(KFACInverseLinearOperator(E, damping=1e-2, use_exact_damping=True))
    eye = torch.eye(E.shape[0], dtype=DT)
    assert_close(inverse @ (densify(E) + 1e-2 * eye), eye, rtol=1e-9, atol_scale=1e-9)


def test_ekfac_stash_with_partially_padded_batches():
    """A batch without and one with ignored rows: the eigenbasis still diagonalises ``A``."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 3)).to(DT)  # few rows: EKFAC's low-rank eigenbasis path
    gen = torch.Generator().manual_seed(9)
    X1, X2, X3 = (torch.randn(1, 6, generator=gen, dtype=DT) for _ in range(3))
    data = [(X1, torch.tensor([1])), (torch.cat([X2, X3]), torch.tensor([2, IGNORE]))]
    loss = nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE)
    params = [model[0].weight]
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    A = K._input_covariances["0"]
    E = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    Q = E._input_covariances_eigenvectors["0"]
    rotated = Q.T @ A @ Q
    off_diagonal = rotated - torch.diag(rotated.diagonal())
    assert off_diagonal.abs().max() < 1e-12 * A.abs().max()
    assert_close(rotated.diagonal().sum(), A.trace(), **TOL)
