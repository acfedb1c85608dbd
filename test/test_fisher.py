"""Tests for ``curvlinops.fisher.FisherMCLinearOperator`` (Monte-Carlo Fisher, section 3.4)."""

import pytest
import torch
from cases import HARD_CASES, REDUCTIONS, make_case
from reference import (
    apply_batch_product,
    assert_close,
    cached_reference,
    densify,
    ggn,
    output_hessian,
    rel_fro_error,
    row_loss,
    unflatten,
)
from torch import nn

import curvlinops
from curvlinops.fisher import (
    FisherMCLinearOperator,
    make_batch_fmc_matrix_product,
    make_grad_output_sampler,
)

DT = torch.float64


def test_class_attributes():
    assert FisherMCLinearOperator.SELF_ADJOINT is True
    assert FisherMCLinearOperator.FIXED_DATA_ORDER is True
    assert FisherMCLinearOperator.supported_losses == (
        nn.MSELoss,
        nn.CrossEntropyLoss,
        nn.BCEWithLogitsLoss,
    )
    assert curvlinops.FisherMCLinearOperator is FisherMCLinearOperator


def test_defaults_and_attributes():
    c = make_case("mlp_ce")
    F = FisherMCLinearOperator(*c.tensors())
    assert F._seed == 2147483647
    assert F._mc_samples == 1
    F = FisherMCLinearOperator(*c.tensors(), seed=3, mc_samples=5)
    assert F._seed == 3
    assert F._mc_samples == 5
    assert F.shape == (c.dim, c.dim)


@pytest.mark.parametrize("name", HARD_CASES)
def test_repeated_products_identical(name):
    c = make_case(name, "mean")
    F = FisherMCLinearOperator(*c.tensors(), seed=7, **c.kwargs())
    v = torch.randn(c.dim, dtype=DT, generator=torch.Generator().manual_seed(0))
    Fv1 = F @ v
    Fv2 = F @ v
    assert torch.equal(Fv1, Fv2)
    # a fresh operator with the same seed also reproduces the product
    F_again = FisherMCLinearOperator(*c.tensors(), seed=7, check_deterministic=False, **c.kwargs())
    assert_close(F_again @ v, Fv1)


@pytest.mark.parametrize("mc_samples", [1, 3])
@pytest.mark.parametrize("name", ["mlp_ce", "cnn_mse", "seq_bce", "transformer_ce"])
def test_columns_at_once_equal_one_by_one(name, mc_samples):
    c = make_case(name, "mean")
    F = FisherMCLinearOperator(*c.tensors(), mc_samples=mc_samples, **c.kwargs())
    M = torch.randn(c.dim, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    FM = F @ M
    one_by_one = torch.stack([F @ M[:, k] for k in range(M.shape[1])], dim=1)
    assert_close(FM, one_by_one)
    # list format (columns on the trailing axis) gives the same result
    shapes = [p.shape for p in c.params]
    FM_list = F @ unflatten(M, shapes, trailing=4)
    assert_close(torch.cat([t.reshape(-1, 4) for t in FM_list]), FM)
    # the dense matrix is symmetric positive semi-definite
    F_dense = densify(F)
    assert_close(F_dense, F_dense.T)
    assert torch.linalg.eigvalsh(F_dense).min() > -1e-10 * F_dense.abs().max()


@pytest.mark.parametrize("name", ["mlp_ce", "cnn_mse", "mlp_bce", "seq_mse"])
def test_seed_changes_product(name):
    c = make_case(name, "sum")
    F = FisherMCLinearOperator(*c.tensors(), seed=1, **c.kwargs())
    v = torch.randn(c.dim, dtype=DT, generator=torch.Generator().manual_seed(2))
    Fv = F @ v
    F._seed += 1
    Fv_new = F @ v
    assert not torch.allclose(Fv, Fv_new)
    assert torch.equal(Fv_new, F @ v)  # the new seed is used consistently
    # an operator built with that seed reproduces it
    F2 = FisherMCLinearOperator(*c.tensors(), seed=2, check_deterministic=False, **c.kwargs())
    assert_close(F2 @ v, Fv_new)
    # going back to the old seed reproduces the old product
    F._seed -= 1
    assert_close(F @ v, Fv)


def test_global_rng_does_not_influence_product():
    c = make_case("mlp_ce")
    F = FisherMCLinearOperator(*c.tensors(), seed=5)
    v = torch.ones(c.dim, dtype=DT)
    torch.manual_seed(0)
    Fv1 = F @ v
    torch.manual_seed(123)
    Fv2 = F @ v
    assert torch.equal(Fv1, Fv2)


@pytest.mark.parametrize(
    "name, factor",
    [
        ("mlp_ce", lambda N: N),  # c_b = R_b = B_b
        ("cnn_mse", lambda N: N * 2),  # c_b = R_b · C, C = 2
        ("mlp_bce", lambda N: N * 2),
        ("transformer_ce", lambda N: N * 3),  # R_b = 3 B_b (T = 3 positions)
        ("seq_mse", lambda N: N * 3 * 2),  # R_b = 3 B_b, C = 2
        ("seq_bce", lambda N: N * 3 * 2),
    ],
)
def test_mean_and_sum_reduction_normalisation(name, factor):
    """With identical samples (same seed), F_sum = (N·∏S / rows-per-datum · c) · F_mean exactly.

    Mean: F = Σ_b (B_b/N) (1/(M c_b)) Σ_r ...; sum: F = Σ_b (1/M) Σ_r ...; with c_b = B_b·k
    this gives F_sum = N·k · F_mean.
    """
    c_mean, c_sum = make_case(name, "mean"), make_case(name, "sum")
    F_mean = FisherMCLinearOperator(*c_mean.tensors(), seed=11, mc_samples=2, **c_mean.kwargs())
    F_sum = FisherMCLinearOperator(*c_sum.tensors(), seed=11, mc_samples=2, **c_sum.kwargs())
    assert_close(densify(F_mean) * factor(c_mean.num_data), densify(F_sum))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", HARD_CASES)
def test_many_samples_approach_ggn(name, reduction):
    """E[F] = GGN; with 2000 samples the relative Frobenius error is ~1-3% (bound: 10%)."""
    c = make_case(name, reduction)
    F = FisherMCLinearOperator(*c.tensors(), seed=42, mc_samples=2000, **c.kwargs())
    G = cached_reference("ggn", name, reduction)
    assert rel_fro_error(densify(F), G) < 0.1


def test_single_sample_is_noisy_but_unbiased():
    """Averaging single-sample operators over seeds approaches the GGN; one sample does not."""
    c = make_case("mlp_bce", "mean")
    G = cached_reference("ggn", "mlp_bce", "mean")
    F = FisherMCLinearOperator(*c.tensors(), seed=0)
    single = densify(F)
    average = torch.zeros_like(single)
    num = 100
    for seed in range(num):
        F._seed = seed
        average += densify(F) / num
    assert rel_fro_error(average, G) < 0.1
    assert rel_fro_error(single, G) > rel_fro_error(average, G)


@pytest.mark.parametrize(
    "case_name, loss_func",
    [("cnn_mse", nn.L1Loss()), ("mlp_ce", nn.NLLLoss()), ("cnn_mse", nn.HuberLoss())],
    ids=["L1", "NLL", "Huber"],
)
@pytest.mark.parametrize("check_deterministic", [True, False])
def test_unsupported_loss_at_construction(case_name, loss_func, check_deterministic):
    c = make_case(case_name)
    name = type(loss_func).__name__
    with pytest.raises(NotImplementedError, match=rf"(?i){name}|support"):
        FisherMCLinearOperator(
            c.model, loss_func, c.params, c.data, check_deterministic=check_deterministic
        )


@pytest.mark.parametrize("name", ["mlp_bce_soft", "seq_bce_soft"])
def test_bce_non_binary_targets(name):
    c = make_case(name)
    match = r"(?i)binary|0 ?(and|or|/|,) ?1|\{0, ?1\}|bernoulli"
    with pytest.raises(NotImplementedError, match=match):
        FisherMCLinearOperator(*c.tensors())
    F = FisherMCLinearOperator(*c.tensors(), check_deterministic=False)
    with pytest.raises(NotImplementedError, match=match):
        F @ torch.ones(c.dim, dtype=DT)


def test_no_block_sizes_parameter():
    c = make_case("mlp_ce")
    with pytest.raises(TypeError):
        FisherMCLinearOperator(*c.tensors(), block_sizes=[4])


@pytest.mark.parametrize(
    "loss_func", [nn.MSELoss(), nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()], ids=str
)
def test_grad_output_sampler(loss_func):
    """E[ĝ ĝᵀ] of each row equals the Hessian of the sum-reduced row loss w.r.t. the output."""

    gen = torch.Generator().manual_seed(0)
    R, C = 2, 3
    output = torch.randn(R, C, dtype=DT, generator=gen)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        y = torch.tensor([0, 2])
    elif isinstance(loss_func, nn.BCEWithLogitsLoss):
        y = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=DT)
    else:
        y = torch.randn(R, C, dtype=DT, generator=gen)
    sampler = make_grad_output_sampler(loss_func)
    S = 40_000
    samples = sampler(output, S, y, torch.Generator().manual_seed(1))
    assert samples.shape == (S, R, C)
    assert samples.dtype == DT
    again = sampler(output, S, y, torch.Generator().manual_seed(1))
    assert torch.equal(samples, again)
    for r in range(R):
        second_moment = samples[:, r].T @ samples[:, r] / S
        expected = output_hessian(
            type(loss_func)(reduction="sum"), output[r], y[r]
        )  # Hessian of the sum-reduced row loss
        expected_alt = torch.autograd.functional.hessian(
            lambda f, r=r: row_loss(loss_func, f, y[r]), output[r]
        )
        assert_close(expected, expected_alt)
        assert (second_moment - expected).abs().max() < 0.06 * max(1.0, expected.abs().max())
    if isinstance(loss_func, nn.CrossEntropyLoss):
        assert_close(samples.sum(-1), torch.zeros(S, R, dtype=DT), atol_scale=1e-14, scale=1.0)
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        sig = output.sigmoid()
        is_valid = torch.isclose(samples, sig) | torch.isclose(samples, sig - 1)
        assert is_valid.all()

    with pytest.raises(NotImplementedError):
        sampler(output.unsqueeze(0), 1, y.unsqueeze(0), torch.Generator())


def test_grad_output_sampler_unsupported_loss():

    with pytest.raises(NotImplementedError):
        sampler = make_grad_output_sampler(nn.L1Loss())
        sampler(torch.zeros(2, 3), 1, torch.zeros(2, 3), torch.Generator())


def test_make_batch_fmc_matrix_product():

    c = make_case("cnn_mse", "sum")
    X, y = c.data[0]
    shapes = [p.shape for p in c.params]
    K = c.dim
    M = torch.eye(K, dtype=DT)
    fn = make_batch_fmc_matrix_product(c.model, c.loss_func, tuple(c.params))
    F_batch = apply_batch_product(fn, shapes, M, X, y, 4000, torch.Generator().manual_seed(0))
    G_batch = ggn(c.model, c.loss_func, c.params, [(X, y)])
    assert rel_fro_error(F_batch, G_batch) < 0.1
