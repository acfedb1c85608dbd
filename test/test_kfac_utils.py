"""Tests for ``curvlinops.kfac_utils.loss_hessian_matrix_sqrt``."""

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian

from curvlinops.kfac_utils import loss_hessian_matrix_sqrt

DT = torch.float64
C = 4


def _target(loss_cls):
    if loss_cls is nn.CrossEntropyLoss:
        return torch.randint(0, C, (1,))
    if loss_cls is nn.BCEWithLogitsLoss:
        return torch.randint(0, 2, (1, C)).to(DT)
    return torch.randn(1, C, dtype=DT)


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sqrt_matches_loss_hessian(loss_cls, reduction, seed):
    torch.manual_seed(seed)
    loss_func = loss_cls(reduction=reduction)
    output = 2 * torch.randn(1, C, dtype=DT)
    target = _target(loss_cls)
    S = loss_hessian_matrix_sqrt(output, target, loss_func)
    assert S.shape == (C, C) and S.dtype == DT
    H = hessian(lambda f: loss_func(f, target), output).reshape(C, C)
    assert torch.allclose(S @ S.T, H, atol=1e-12)
    assert not torch.allclose(H, torch.zeros_like(H))


def test_explicit_formulas():
    torch.manual_seed(2)
    output = torch.randn(1, C, dtype=DT)
    # MSE: sqrt(2c) I
    S = loss_hessian_matrix_sqrt(output, torch.zeros(1, C, dtype=DT), nn.MSELoss())
    assert torch.allclose(S, (2.0 / C) ** 0.5 * torch.eye(C, dtype=DT))
    S = loss_hessian_matrix_sqrt(output, torch.zeros(1, C, dtype=DT), nn.MSELoss(reduction="sum"))
    assert torch.allclose(S, 2.0**0.5 * torch.eye(C, dtype=DT))
    # CE: diag(sqrt p) - p sqrt(p)^T, no reduction factor
    p = output.softmax(1).squeeze(0)
    expected = torch.diag(p.sqrt()) - torch.outer(p, p.sqrt())
    for reduction in ["mean", "sum"]:
        S = loss_hessian_matrix_sqrt(
            output, torch.tensor([1]), nn.CrossEntropyLoss(reduction=reduction)
        )
        assert torch.allclose(S, expected)
    # BCE: diagonal
    s = output.sigmoid().squeeze(0)
    y = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=DT)
    S = loss_hessian_matrix_sqrt(output, y, nn.BCEWithLogitsLoss())
    assert torch.allclose(S, torch.diag((s * (1 - s) / C).sqrt()))


def test_errors():
    out = torch.randn(1, C, dtype=DT)
    with pytest.raises(ValueError, match=r"\[1, C\]"):
        loss_hessian_matrix_sqrt(torch.randn(2, C, dtype=DT), torch.zeros(2, C), nn.MSELoss())
    with pytest.raises(ValueError, match=r"\[1, C\]"):
        loss_hessian_matrix_sqrt(torch.randn(C, dtype=DT), torch.zeros(1, C), nn.MSELoss())
    with pytest.raises(ValueError, match=r"\[1, C\]"):
        loss_hessian_matrix_sqrt(torch.randn(1, C, 2, dtype=DT), torch.zeros(1), nn.MSELoss())
    with pytest.raises(ValueError, match="leading axis"):
        loss_hessian_matrix_sqrt(out, torch.tensor([0, 1]), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="leading axis"):
        loss_hessian_matrix_sqrt(out, torch.tensor(0), nn.CrossEntropyLoss())
    with pytest.raises(NotImplementedError, match="binary"):
        loss_hessian_matrix_sqrt(out, torch.full((1, C), 0.5, dtype=DT), nn.BCEWithLogitsLoss())
    with pytest.raises(NotImplementedError, match="L1Loss"):
        loss_hessian_matrix_sqrt(out, torch.zeros(1, C, dtype=DT), nn.L1Loss())
    with pytest.raises(ValueError, match="reduction"):
        loss_hessian_matrix_sqrt(out, torch.zeros(1, C, dtype=DT), nn.MSELoss(reduction="none"))
