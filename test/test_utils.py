"""Tests for ``curvlinops.utils``."""

from types import SimpleNamespace

import numpy
import pytest
import torch
from torch import nn

from curvlinops.utils import (
    allclose_report,
    assert_divisible_by,
    assert_is_square,
    assert_matvecs_subseed_dim,
    make_functional_call,
    make_functional_flattened_model_and_loss,
    make_functional_model_and_loss,
    split_list,
)

DT = torch.float64


def test_split_list():
    assert split_list([1, 2, 3, 4, 5], [2, 0, 3]) == [[1, 2], [], [3, 4, 5]]
    chunks = split_list((1, 2, 3), [1, 2])
    assert chunks == [[1], [2, 3]]
    assert all(isinstance(c, list) for c in chunks)
    with pytest.raises(ValueError, match="does not match"):
        split_list([1, 2, 3], [1, 1])


def test_allclose_report_close(capsys):
    a = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    assert allclose_report(a, a + 1e-10)
    assert allclose_report(a, numpy.array([1.0, 2.0, 3.0]))
    assert allclose_report(a.numpy(), numpy.array([1.0, 2.0, 3.0]))
    # different dtypes are compared in the promoted dtype
    assert allclose_report(a.float(), a)
    assert capsys.readouterr().out == ""


def test_allclose_report_mismatch(capsys):
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DT)
    b = a.clone()
    b[1, 0] = 6.0
    assert not allclose_report(a, b)
    out = capsys.readouterr().out
    assert "(1, 0)" in out
    assert "3.00000e+00" in out and "6.00000e+00" in out and "5.00000e-01" in out
    assert "Mismatches: 1 / 4" in out
    assert "rtol = 1e-05" in out and "atol = 1e-08" in out
    # largest / smallest absolute values of the second input
    assert "6.00000e+00, abs min 1.00000e+00" in out
    # tolerances are honoured
    assert allclose_report(a, b, rtol=1.0)
    assert not allclose_report(a, a + 1e-3, atol=1e-4, rtol=0.0)


def test_assert_is_square():
    assert assert_is_square(torch.zeros(3, 3)) == 3
    assert assert_is_square(SimpleNamespace(shape=(5, 5))) == 5
    with pytest.raises(ValueError, match="square"):
        assert_is_square(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="square"):
        assert_is_square(torch.zeros(3, 3, 3))
    with pytest.raises(ValueError, match="square"):
        assert_is_square(torch.zeros(3))


def test_assert_matvecs_subseed_dim():
    assert_matvecs_subseed_dim(torch.zeros(5, 6), 4)
    with pytest.raises(ValueError, match="num_matvecs"):
        assert_matvecs_subseed_dim(torch.zeros(5, 6), 5)
    with pytest.raises(ValueError, match="num_matvecs"):
        assert_matvecs_subseed_dim(SimpleNamespace(shape=(10, 3)), 7)


def test_assert_divisible_by():
    assert_divisible_by(6, 3, "num_matvecs")
    with pytest.raises(ValueError, match=r"^num_matvecs \(7\) must be divisible by 3"):
        assert_divisible_by(7, 3, "num_matvecs")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def test_make_functional_call():
    model = _mlp()
    X = torch.randn(6, 4, dtype=DT)
    new_w = torch.randn(3, 5, dtype=DT)
    new_b0 = torch.randn(5, dtype=DT)
    fn = make_functional_call(model, ["2.weight", "0.bias"])
    out = fn(new_w, new_b0, X)
    expected = torch.tanh(X @ model[0].weight.T + new_b0) @ new_w.T + model[2].bias
    assert torch.allclose(out, expected)
    # the module itself is not modified
    assert not torch.allclose(model[2].weight, new_w)
    # no free parameters
    assert torch.allclose(make_functional_call(model, [])(X), model(X))


def test_make_functional_call_uses_buffers():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(DT).eval()
    model[1].running_mean.fill_(0.5)
    model[1].running_var.fill_(4.0)
    X = torch.randn(5, 3, dtype=DT)
    new_w = torch.randn(4, 3, dtype=DT)
    out = make_functional_call(model, ["0.weight"])(new_w, X)
    z = X @ new_w.T + model[0].bias
    expected = (z - 0.5) / (4.0 + model[1].eps) ** 0.5 * model[1].weight + model[1].bias
    assert torch.allclose(out, expected)


def test_make_functional_model_and_loss():
    model = _mlp()
    loss_func = nn.MSELoss()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    params = [model[2].bias, model[0].weight]  # subset, unusual order
    f, c = make_functional_model_and_loss(model, loss_func, params)
    assert torch.allclose(f(*params, X), model(X))
    new = [torch.zeros(3, dtype=DT), torch.ones(5, 4, dtype=DT)]
    expected = torch.tanh(X @ new[1].T + model[0].bias) @ model[2].weight.T
    assert torch.allclose(f(*new, X), expected)
    assert torch.allclose(c(f(*params, X), y), loss_func(model(X), y))
    with pytest.raises(ValueError, match="not a parameter"):
        make_functional_model_and_loss(model, loss_func, [model[0].weight.clone()])


class _Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


def test_flattened_cross_entropy_sequence():
    torch.manual_seed(2)
    B, T, C = 3, 4, 5
    # output [B, C, T]
    model = nn.Sequential(nn.Linear(2, C), _Permute(0, 2, 1)).to(DT)
    loss_func = nn.CrossEntropyLoss()
    X, y = torch.randn(B, T, 2, dtype=DT), torch.randint(0, C, (B, T))
    params = list(model.parameters())
    f_flat, c_flat = make_functional_flattened_model_and_loss(model, loss_func, params)
    out_flat = f_flat(*params, X)
    out = model(X)
    assert out_flat.shape == (B * T, C)
    for b in range(B):
        for t in range(T):
            assert torch.equal(out_flat[b * T + t], out[b, :, t])
    assert torch.allclose(c_flat(out_flat, y), loss_func(out, y))
    # sum reduction, and a row-wise check of the label flattening
    loss_sum = nn.CrossEntropyLoss(reduction="sum")
    _, c_sum = make_functional_flattened_model_and_loss(model, loss_sum, params)
    manual = sum(
        loss_sum(out[b, :, t].unsqueeze(0), y[b, t].unsqueeze(0))
        for b in range(B)
        for t in range(T)
    )
    assert torch.allclose(c_sum(out_flat, y), manual)


def test_flattened_cross_entropy_2d_spatial():
    torch.manual_seed(3)
    model = nn.Conv2d(2, 3, 1).to(DT)  # output [B, C=3, H, W]
    loss_func = nn.CrossEntropyLoss()
    X, y = torch.randn(2, 2, 3, 4, dtype=DT), torch.randint(0, 3, (2, 3, 4))
    params = list(model.parameters())
    f_flat, c_flat = make_functional_flattened_model_and_loss(model, loss_func, params)
    out = model(X)
    out_flat = f_flat(*params, X)
    assert out_flat.shape == (2 * 3 * 4, 3)
    assert torch.equal(out_flat[1 * 12 + 2 * 4 + 3], out[1, :, 2, 3])
    assert torch.allclose(c_flat(out_flat, y), loss_func(out, y))


def test_flattened_cross_entropy_2d_output():
    model = _mlp()
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    f_flat, c_flat = make_functional_flattened_model_and_loss(model, loss_func, params)
    assert torch.equal(f_flat(*params, X), model(X))
    assert torch.allclose(c_flat(f_flat(*params, X), y), loss_func(model(X), y))


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_flattened_last_axis_features(loss_cls, reduction):
    torch.manual_seed(4)
    B, T, C = 3, 4, 5
    model = nn.Linear(2, C).to(DT)  # output [B, T, C]
    loss_func = loss_cls(reduction=reduction)
    X, y = torch.randn(B, T, 2, dtype=DT), torch.rand(B, T, C, dtype=DT)
    params = list(model.parameters())
    f_flat, c_flat = make_functional_flattened_model_and_loss(model, loss_func, params)
    out = model(X)
    out_flat = f_flat(*params, X)
    assert out_flat.shape == (B * T, C)
    assert torch.equal(out_flat[2 * T + 1], out[2, 1])
    assert torch.allclose(c_flat(out_flat, y), loss_func(out, y))
    with pytest.raises(ValueError, match="not a parameter"):
        make_functional_flattened_model_and_loss(model, loss_func, [torch.zeros(1)])


def test_allclose_report_caps_printed_mismatches(capsys):
    a = torch.zeros(100, dtype=torch.float64)
    b = torch.ones(100, dtype=torch.float64)
    assert not allclose_report(a, b, max_mismatches_printed=3)
    out = capsys.readouterr().out
    assert out.count("at index") == 3
    assert "Mismatches: 100 / 100" in out
