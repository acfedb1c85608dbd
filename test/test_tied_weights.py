"""Models with tied weights: products are right and the parameters keep their identity."""

import torch
from reference import assert_close, densify, ggn, hessian
from torch import nn

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.diagonal.exact import ggn_diagonal

DT = torch.float64


def test_tied_weights():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3).to(DT)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    params = list(model.parameters())
    ids = [id(p) for p in params]
    data = [(torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT))]
    loss = nn.MSELoss()
    H = HessianLinearOperator(model, loss, params, data)
    assert_close(densify(H), hessian(model, loss, params, data))
    G = GGNLinearOperator(model, loss, params, data)
    G_dense = ggn(model, loss, params, data)
    assert_close(densify(G), G_dense)
    diagonal = torch.cat([d.flatten() for d in ggn_diagonal(model, loss, params, data)])
    assert_close(diagonal, G_dense.diagonal())
    assert [id(p) for p in model.parameters()] == ids  # optimizers keep working
    assert model[0].weight is model[2].weight
