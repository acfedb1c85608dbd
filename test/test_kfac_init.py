"""KFAC's determinism check runs once, from the base class, after the whole constructor."""

import pytest
import torch
from kfac_cases import DT, regression_data, relu_mlp
from torch import nn

from curvlinops import EKFACLinearOperator, KFACLinearOperator
from curvlinops._torch_base import CurvatureLinearOperator


@pytest.fixture
def count_checks(monkeypatch):
    """Count calls of KFAC's override and of the base check, recording the state seen."""
    calls = {"kfac": [], "base": 0}
    kfac_check = KFACLinearOperator._check_deterministic
    base_check = CurvatureLinearOperator._check_deterministic

    def kfac_counting(self):
        calls["kfac"].append(
            (type(self).__name__, self.__dict__.get("_num_per_example_loss_terms"))
        )
        return kfac_check(self)

    def base_counting(self):
        calls["base"] += 1
        return base_check(self)

    monkeypatch.setattr(KFACLinearOperator, "_check_deterministic", kfac_counting)
    monkeypatch.setattr(CurvatureLinearOperator, "_check_deterministic", base_counting)
    return calls


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
@pytest.mark.parametrize("check", [True, False])
def test_check_runs_once_after_construction(cls, check, count_checks):
    model = relu_mlp(d_out=2).to(DT)
    params = list(model.parameters())
    cls(model, nn.MSELoss(), params, regression_data(), check_deterministic=check)
    if check:
        # once, by the base, after the constructor set _num_per_example_loss_terms
        assert count_checks["kfac"] == [(cls.__name__, 1)]
        assert count_checks["base"] == 1
    else:
        assert count_checks["kfac"] == [] and count_checks["base"] == 0


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_check_still_detects_nondeterminism(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT)
    model.train()
    with pytest.raises(RuntimeError, match="(?i)determin"):
        cls(model, nn.MSELoss(), list(model.parameters()), regression_data())
