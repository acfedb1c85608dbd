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


# ---------------------------------------------------------------- patch extraction
import itertools  # noqa: E402

from torch.nn import functional as F  # noqa: E402

from curvlinops.kfac_utils import (  # noqa: E402
    _extract_averaged_patches_nd,
    _extract_patches_nd,
    extract_averaged_patches,
    extract_patches,
)

CONV_SETTINGS = [
    (stride, padding, dilation, groups)
    for stride, padding, dilation, groups in itertools.product(
        [1, 2, (2, 1)], [0, 1, (1, 2), "same", "valid"], [1, 2], [1, 2]
    )
    if not (padding == "same" and stride != 1)
]


@pytest.mark.parametrize("stride, padding, dilation, groups", CONV_SETTINGS)
def test_patches_reproduce_conv2d(stride, padding, dilation, groups):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, generator=gen)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, generator=gen)
    patches = extract_patches(x, 3, stride, padding, dilation, groups)
    averaged = extract_averaged_patches(x, (3, 3), stride, padding, dilation, groups)
    torch.testing.assert_close(averaged, patches.mean(1), rtol=1e-12, atol=1e-12)
    # group-averaged input, convolved with one group's kernel = patches @ weight
    x_avg = x.reshape(2, groups, 4 // groups, 7, 8).mean(1)
    out = F.conv2d(x_avg, w, stride=stride, padding=padding, dilation=dilation)
    expected = out.flatten(2).transpose(1, 2)
    torch.testing.assert_close(patches @ w.flatten(1).T, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 3])
def test_patches_reproduce_conv1d_conv3d(dims):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *([6] * dims), dtype=torch.float64, generator=gen)
    w = torch.randn(4, 3, *([3] * dims), dtype=torch.float64, generator=gen)
    conv = {1: F.conv1d, 3: F.conv3d}[dims]
    for stride, padding, dilation in [(1, "same", 1), (2, 1, 1), (1, 0, 2)]:
        patches = _extract_patches_nd(x, 3, stride, padding, dilation, 1)
        out = conv(x, w, stride=stride, padding=padding, dilation=dilation)
        torch.testing.assert_close(
            patches @ w.flatten(1).T, out.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12
        )
        averaged = _extract_averaged_patches_nd(x, 3, stride, padding, dilation, 1)
        torch.testing.assert_close(averaged, patches.mean(1), rtol=1e-12, atol=1e-12)


def test_patch_errors():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(NotImplementedError, match="asymmetric padding"):
        extract_patches(x, 2, 1, "same", 1, 1)
    with pytest.raises(ValueError, match="padding must be"):
        extract_averaged_patches(x, 3, 1, "full", 1, 1)
    with pytest.raises(ValueError, match=r"\[B, C_in, I1, I2\]"):
        extract_patches(torch.randn(1, 2, 5), 3, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="divisible by groups"):
        extract_patches(x, 3, 1, 0, 1, 3)
