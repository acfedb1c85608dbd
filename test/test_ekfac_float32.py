"""EKFAC in float32 is as accurate as KFAC where both are exact (issue 12).

Where KFAC's block is exact (bias-only parameter sets, deep linear networks with MSE and
type-2, a single datum with the empirical Fisher), EKFAC is exact too. In float32 both then
differ from the float64 reference only by round-off; EKFAC must not lose more than float32
round-off beyond KFAC (its eigenbases used to be decomposed in float32, about 1e-6 away
where KFAC was 1e-7).
"""

import copy

import pytest
import torch
from kfac_cases import block_mask, tensor_groups
from reference import densify, empirical_fisher, ggn
from torch import nn

from curvlinops import EKFACLinearOperator, KFACLinearOperator

EPS32 = torch.finfo(torch.float32).eps


def relative_errors(model64, loss, pick, data64, fisher_type, groups_fn):
    """Relative Frobenius errors of KFAC and EKFAC (float32) w.r.t. the exact float64 blocks."""
    params64 = pick(model64)
    reference = empirical_fisher if fisher_type == "empirical" else ggn
    exact = reference(model64, loss, params64, data64)
    exact = exact * block_mask(params64, groups_fn(model64, params64))
    model32 = copy.deepcopy(model64).float()
    data32 = [(X.float(), y.float() if y.is_floating_point() else y) for X, y in data64]
    errors = []
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        op = cls(model32, loss, pick(model32), data32, fisher_type=fisher_type)
        dense = densify(op).double()
        errors.append(((dense - exact).norm() / exact.norm()).item())
    return errors


def mlp(seed, d_in=6, hidden=16, d_out=10, act=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, hidden)]
    if act:
        layers.append(nn.Tanh())
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers).double()


def biases(model):
    return [m.bias for m in model if isinstance(m, nn.Linear)]


def all_params(model):
    return list(model.parameters())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "case",
    ["bias-only-ef", "bias-only-type2", "deep-linear-mse", "one-datum-ef"],
)
def test_ekfac_float32_not_worse_than_kfac(case, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    if case.startswith("bias-only"):
        model = mlp(seed)
        X = torch.randn(32, 6, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        loss, pick, groups = nn.CrossEntropyLoss(), biases, tensor_groups_of
        fisher_type = "empirical" if case.endswith("ef") else "type-2"
    elif case == "deep-linear-mse":
        model = mlp(seed, d_in=5, hidden=8, d_out=6, act=False)
        X = torch.randn(40, 5, dtype=torch.float64, generator=gen)
        y = torch.randn(40, 6, dtype=torch.float64, generator=gen)
        loss, pick, groups, fisher_type = nn.MSELoss(), all_params, tensor_groups_of, "type-2"
    else:
        model = mlp(seed, hidden=12)
        X = torch.randn(1, 6, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 10, (1,), generator=gen)
        # separate weight and bias blocks: each is exact for one datum
        loss, pick, groups = nn.CrossEntropyLoss(), all_params, tensor_groups_of
        fisher_type = "empirical"
    kfac_error, ekfac_error = relative_errors(model, loss, pick, [(X, y)], fisher_type, groups)
    assert kfac_error < 20 * EPS32, kfac_error  # KFAC is exact here
    assert ekfac_error <= kfac_error + 2 * EPS32, (ekfac_error, kfac_error)


def tensor_groups_of(model, params):
    return tensor_groups(params)
