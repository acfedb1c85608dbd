"""Tests for ``curvlinops.inverse.KFACInverseLinearOperator``."""

import pytest
import torch
from kfac_cases import DT, regression_data, relu_mlp
from reference import assert_close, densify
from torch import nn

import curvlinops
from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
from curvlinops.examples import TensorLinearOperator


def make_kfac(cls=KFACLinearOperator, separate=True, **kwargs):
    model = relu_mlp()
    params = list(model.parameters())
    data = regression_data(d_out=3)
    return cls(model, nn.MSELoss(), params, data, separate_weight_and_bias=separate, **kwargs)


def eye(n):
    return torch.eye(n, dtype=DT)


def test_exports():
    assert curvlinops.KFACInverseLinearOperator is KFACInverseLinearOperator
    assert curvlinops.inverse.KFACInverseLinearOperator is KFACInverseLinearOperator


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
@pytest.mark.parametrize("separate", [True, False])
def test_exact_damping_inverts(cls, separate):
    K = make_kfac(cls, separate, fisher_type="type-2")
    dense = densify(K)
    inv = KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    assert_close(densify(inv) @ (dense + 0.1 * eye(K.shape[0])), eye(K.shape[0]), atol_scale=1e-10)
    n_cached = len(inv._inverse_input_covariances)
    assert n_cached == (0 if cls is EKFACLinearOperator else 2)


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("damping", [0.1, (0.1, 0.3)])
def test_factor_damping(separate, damping):
    K = make_kfac(separate=separate, fisher_type="type-2")
    inv = KFACInverseLinearOperator(K, damping=damping)
    inv_dense = densify(inv)
    delta_A, delta_G = damping if isinstance(damping, tuple) else (damping, damping)
    # the inverse of KFAC with damped factors: edit the factors in place (products read them live)
    for factors, delta in ((K._input_covariances, delta_A), (K._gradient_covariances, delta_G)):
        for name, M in factors.items():
            factors[name] = M + delta * eye(M.shape[0])
    assert_close(inv_dense @ densify(K), eye(K.shape[0]), atol_scale=1e-10)


def test_heuristic_damping():
    K = make_kfac(fisher_type="empirical")
    delta, min_damping = 0.04, 1e-3
    inv = KFACInverseLinearOperator(
        K, damping=delta, use_heuristic_damping=True, min_damping=min_damping
    )
    inv_dense = densify(inv)
    for name in K._gradient_covariances:
        A, G = K._input_covariances[name], K._gradient_covariances[name]
        pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
        K._input_covariances[name] = A + max(pi * delta**0.5, min_damping) * eye(A.shape[0])
        K._gradient_covariances[name] = G + max(delta**0.5 / pi, min_damping) * eye(G.shape[0])
    assert_close(inv_dense @ densify(K), eye(K.shape[0]), atol_scale=1e-10)


def test_cache_semantics():
    K = make_kfac(fisher_type="type-2")
    inv = KFACInverseLinearOperator(K, damping=0.1, cache=False)
    v = torch.ones(K.shape[1], dtype=DT)
    inv @ v
    assert len(inv._inverse_input_covariances) == 0 and len(inv._inverse_gradient_covariances) == 0
    inv = KFACInverseLinearOperator(K, damping=0.1)
    before = inv @ v
    assert len(inv._inverse_input_covariances) == 2
    A_inv, G_inv, evals = inv._compute_or_get_cached_inverse("0")
    assert evals is None and A_inv is inv._inverse_input_covariances["0"]
    K._gradient_covariances["0"] = 2 * K._gradient_covariances["0"]  # the cache is not invalidated
    assert_close(inv @ v, before)


def test_cholesky_retry(monkeypatch):
    model = relu_mlp().float()
    data = [(x.float(), y.float()) for x, y in regression_data(d_out=3)]
    K = KFACLinearOperator(model, nn.MSELoss(), list(model.parameters()), data)
    real = torch.linalg.cholesky

    def fail_in_float32(M):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("not positive definite")
        return real(M)

    monkeypatch.setattr(torch.linalg, "cholesky", fail_in_float32)
    inv = KFACInverseLinearOperator(K, damping=0.1)
    with pytest.warns(UserWarning, match="retrying in float64"):
        result = inv @ torch.ones(K.shape[1])
    assert result.dtype == torch.float32
    inv = KFACInverseLinearOperator(K, damping=0.1, retry_double_precision=False)
    with pytest.raises(RuntimeError, match="positive definite"):
        inv @ torch.ones(K.shape[1])


def test_checkpoint(tmp_path):
    K = make_kfac(fisher_type="type-2")
    inv = KFACInverseLinearOperator(K, damping=0.1)
    expected = densify(inv)
    torch.save(inv.state_dict(), tmp_path / "inv.pt")
    state = torch.load(tmp_path / "inv.pt", weights_only=False)
    K2 = make_kfac(fisher_type="type-2", check_deterministic=False)
    with pytest.warns(UserWarning, match="will overwrite"):
        inv2 = KFACInverseLinearOperator.from_state_dict(state, K2)
    assert_close(densify(inv2), expected)


def test_errors():
    K = make_kfac(check_deterministic=False)
    with pytest.raises(ValueError, match="needs a KFACLinearOperator"):
        KFACInverseLinearOperator(TensorLinearOperator(eye(3)))
    with pytest.raises(ValueError, match="not both"):
        KFACInverseLinearOperator(K, use_heuristic_damping=True, use_exact_damping=True)
    with pytest.raises(ValueError, match="tuple cannot be combined"):
        KFACInverseLinearOperator(K, damping=(0.1, 0.1), use_exact_damping=True)
    E = make_kfac(EKFACLinearOperator, check_deterministic=False)
    with pytest.raises(ValueError, match="use_exact_damping=True"):
        KFACInverseLinearOperator(E, damping=0.1)
    for bad in (-0.1, (0.1, -1.0), (0.1, 0.2, 0.3), "0.1"):
        with pytest.raises(ValueError, match="non-negative float"):
            KFACInverseLinearOperator(K, damping=bad)
