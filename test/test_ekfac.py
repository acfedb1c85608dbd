"""Tests for ``curvlinops.ekfac`` (EKFAC and the eigenvalue correction)."""

import warnings

import pytest
import torch
from kfac_cases import (
    DT,
    block_mask,
    deep_linear,
    layer_groups,
    regression_data,
    relu_mlp,
    tensor_groups,
)
from reference import assert_close, densify, empirical_fisher, ggn, rel_fro_error
from torch import nn

import curvlinops
import curvlinops._ekfac_correction as correction_module
from curvlinops import FisherMCLinearOperator
from curvlinops._ekfac_correction import batched_eigh
from curvlinops.ekfac import (
    EKFACLinearOperator,
    KFACLinearOperator,
    compute_eigenvalue_correction_linear_weight_sharing,
)


def blockdiag(reference, model, params, separate):
    groups = tensor_groups(params) if separate else layer_groups(model, params)
    return reference * block_mask(params, groups)


def test_exports():
    assert curvlinops.EKFACLinearOperator is EKFACLinearOperator
    assert EKFACLinearOperator._SUPPORTED_FISHER_TYPE == ("type-2", "mc", "empirical")


@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_cases(reduction, separate):
    model = deep_linear()
    params = list(model.parameters())
    data = regression_data()
    loss = nn.MSELoss(reduction=reduction)
    E = EKFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", separate_weight_and_bias=separate
    )
    assert_close(densify(E), blockdiag(ggn(model, loss, params, data), model, params, separate))
    # the raw factors are dropped once the eigenbases exist
    assert not E._input_covariances and not E._gradient_covariances
    one = [(torch.randn(1, 3, dtype=DT), torch.tensor([1]))]
    model = relu_mlp()
    params = list(model.parameters())
    loss = nn.CrossEntropyLoss(reduction=reduction)
    E = EKFACLinearOperator(model, loss, params, one, fisher_type="type-2")
    assert_close(densify(E), blockdiag(ggn(model, loss, params, one), model, params, True))


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("conv", [False, True])
def test_closer_than_kfac(fisher_type, conv):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)
        ).to(DT)
        gen = torch.Generator().manual_seed(0)
        data = [
            (
                torch.randn(5, 2, 4, 4, dtype=DT, generator=gen),
                torch.randint(0, 3, (5,), generator=gen),
            )
        ]
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
        gen = torch.Generator().manual_seed(0)
        data = [
            (torch.randn(n, 3, dtype=DT, generator=gen), torch.randint(0, 3, (n,), generator=gen))
            for n in (4, 6)
        ]
    params = list(model.parameters())
    loss = nn.CrossEntropyLoss()
    if fisher_type == "type-2":
        exact = ggn(model, loss, params, data)
    elif fisher_type == "empirical":
        exact = empirical_fisher(model, loss, params, data)
    else:
        exact = densify(FisherMCLinearOperator(model, loss, params, data, seed=1))
    exact = blockdiag(exact, model, params, True)
    kwargs = {"fisher_type": fisher_type, "seed": 1}
    K = densify(KFACLinearOperator(model, loss, params, data, **kwargs))
    E = densify(EKFACLinearOperator(model, loss, params, data, **kwargs))
    assert rel_fro_error(E, exact) <= rel_fro_error(K, exact) + 1e-12
    assert rel_fro_error(E, exact) < rel_fro_error(K, exact) * 0.99


def test_properties_and_checkpoint(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    params = list(model.parameters())
    data = regression_data(num_batches=2, batch=10)
    E = EKFACLinearOperator(
        model, nn.MSELoss(), params, data, fisher_type="empirical", separate_weight_and_bias=False
    )
    dense = densify(E)
    assert_close(E.trace, dense.trace())
    assert_close(E.logdet, torch.linalg.slogdet(dense)[1], rtol=1e-8)
    assert_close(E.det, torch.linalg.det(dense), rtol=1e-8)
    assert_close(E.frobenius_norm, dense.norm())
    torch.save(E.state_dict(), tmp_path / "ekfac.pt")
    state = torch.load(tmp_path / "ekfac.pt", weights_only=False)
    with pytest.warns(UserWarning, match="will overwrite"):
        E2 = EKFACLinearOperator.from_state_dict(state, model, params, data)
    assert isinstance(E2, EKFACLinearOperator)
    assert_close(densify(E2), dense)
    state["input_covariances_eigenvectors"] = {"x": torch.eye(2)}
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="another model"):
        E2.load_state_dict(state)


def test_errors():
    model = relu_mlp()
    params = list(model.parameters())
    with pytest.raises(ValueError, match="Invalid fisher_type"):
        EKFACLinearOperator(
            model, nn.MSELoss(), params, regression_data(d_out=3), fisher_type="forward-only"
        )
    with pytest.raises(ValueError, match="Only 2d output"):
        EKFACLinearOperator(model, nn.MSELoss(), params, regression_data(d_out=3, shape=(2,)))


def naive_correction(g, Q1, a, Q2):
    result = 0
    for n in range(g.shape[0]):
        grad = g[n].T @ a[n] if a is not None else g[n].sum(0)
        rotated = Q1.T @ grad @ Q2 if a is not None else Q1.T @ grad
        result = result + rotated**2
    return result


def test_correction_strategies():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(5, 3, 4, dtype=DT, generator=gen)
    a = torch.randn(5, 3, 6, dtype=DT, generator=gen)
    Q1 = torch.linalg.qr(torch.randn(4, 4, dtype=DT, generator=gen))[0]
    Q2 = torch.linalg.qr(torch.randn(6, 6, dtype=DT, generator=gen))[0]
    expected = naive_correction(g, Q1, a, Q2)
    for strategy in (None, "per_example_gradients", "gramian"):
        assert_close(
            compute_eigenvalue_correction_linear_weight_sharing(
                g, Q1, a, Q2, _force_strategy=strategy
            ),
            expected,
        )
    assert_close(
        compute_eigenvalue_correction_linear_weight_sharing(g, Q1, None, None),
        naive_correction(g, Q1, None, None),
    )
    assert_close(
        compute_eigenvalue_correction_linear_weight_sharing(g[:, :1], Q1, a[:, :1], Q2, "gramian"),
        naive_correction(g[:, :1], Q1, a[:, :1], Q2),
    )
    with pytest.raises(ValueError, match="Invalid _force_strategy"):
        compute_eigenvalue_correction_linear_weight_sharing(g, Q1, a, Q2, _force_strategy="x")


def test_batched_eigh_and_fallbacks(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    mats = {}
    for key, n in (("a", 3), ("b", 3), ("c", 5)):
        X = torch.randn(n, n, generator=gen)
        mats[key] = X @ X.T
    result = batched_eigh(mats)
    for key, M in mats.items():
        evals, evecs = result[key]
        torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, M, rtol=1e-4, atol=1e-4)

    real_eigh = torch.linalg.eigh
    # the fallbacks of large lower-precision matrices (small ones start in float64)
    monkeypatch.setattr(correction_module, "FLOAT64_EIGH_MAX_DIM", 0)

    def fail_in_float32(M):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", fail_in_float32)
    with pytest.warns(UserWarning, match="float64"):
        evals, evecs = batched_eigh({"a": mats["a"]})["a"]
    assert evals.dtype == torch.float32
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, mats["a"], rtol=1e-4, atol=1e-4)

    calls = []

    def fail_undamped(M):
        calls.append(M)
        if len(calls) < 3:
            raise torch.linalg.LinAlgError("did not converge")
        return real_eigh(M)

    monkeypatch.setattr(torch.linalg, "eigh", fail_undamped)
    with pytest.warns(UserWarning, match="damping"):
        evals, _ = batched_eigh({"a": mats["a"]})["a"]
    torch.testing.assert_close(
        evals, real_eigh(mats["a"].double())[0].float(), rtol=1e-4, atol=1e-4
    )
    monkeypatch.setattr(
        torch.linalg, "eigh", lambda M: (_ for _ in ()).throw(torch.linalg.LinAlgError("no"))
    )
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="eigh failed"):
        batched_eigh({"a": mats["a"]})


def test_rank_limited_factor_uses_gram_matrix():
    """Few data, wide inputs: the input eigenbasis comes from the Gram matrix, still exact."""
    model = deep_linear(d_in=12, hidden=4, d_out=2)
    params = list(model.parameters())
    data = regression_data(num_batches=2, batch=2, d_in=12)  # 5 rows < 12 / 2
    loss = nn.MSELoss()
    E = EKFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", check_deterministic=False
    )
    E.compute_kronecker_factors()
    assert sum(r.shape[0] for r in E._rank_limited_rows["0"]) == 5
    expected = blockdiag(ggn(model, loss, params, data), model, params, True)
    assert_close(densify(E), expected)
    Q = E._input_covariances_eigenvectors["0"]
    assert_close(Q.T @ Q, torch.eye(12, dtype=DT), atol_scale=1e-12)


def test_eigenbasis_from_rows():
    from curvlinops._ekfac_correction import eigenbasis_from_rows

    R = torch.randn(3, 8, dtype=DT, generator=torch.Generator().manual_seed(0))
    Q = eigenbasis_from_rows(R)
    assert_close(Q.T @ Q, torch.eye(8, dtype=DT), atol_scale=1e-12)
    D = Q.T @ (R.T @ R) @ Q
    assert_close(D, torch.diag(torch.diagonal(D)), atol_scale=1e-12, scale=D.abs().max().item())
    assert_close(torch.diagonal(D).sort().values[-3:], torch.linalg.eigvalsh(R @ R.T))
