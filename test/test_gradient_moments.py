"""Tests for ``curvlinops.gradient_moments.EFLinearOperator`` (empirical Fisher)."""

import pytest
import torch
from cases import ALL_CASES, REDUCTIONS, make_case
from reference import apply_batch_product, assert_close, cached_reference, densify, empirical_fisher
from torch import nn

import curvlinops
from curvlinops.gradient_moments import EFLinearOperator, make_batch_ef_matrix_product


def test_class_attributes():
    assert EFLinearOperator.SELF_ADJOINT is True
    assert EFLinearOperator.SUPPORTS_BLOCKS is False
    assert EFLinearOperator.SUPPORTED_LOSSES == (
        nn.MSELoss,
        nn.CrossEntropyLoss,
        nn.BCEWithLogitsLoss,
    )
    assert curvlinops.EFLinearOperator is EFLinearOperator


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ALL_CASES)
def test_ef_matches_reference(name, reduction):
    c = make_case(name, reduction)
    E = EFLinearOperator(*c.tensors(), **c.kwargs())
    assert E.shape == (c.dim, c.dim)
    E_dense = densify(E)
    assert_close(E_dense, cached_reference("ef", name, reduction))
    assert torch.linalg.eigvalsh(E_dense).min() > -1e-10 * E_dense.abs().max()


def test_ef_two_dimensional_outputs_are_per_example_outer_products():
    """For 2-d outputs and CE-mean the EF is (1/N) Σ_n g_n g_nᵀ of per-example gradients."""
    c = make_case("mlp_ce", "mean")
    grads = []
    for X, y in c.data:
        for n in range(X.shape[0]):
            loss = nn.functional.cross_entropy(c.model(X[n : n + 1]), y[n : n + 1])
            g = torch.autograd.grad(loss, c.params)
            grads.append(torch.cat([t.flatten() for t in g]))
    G = torch.stack(grads)
    E = EFLinearOperator(*c.tensors())
    assert_close(densify(E), G.T @ G / c.num_data)


@pytest.mark.parametrize(
    "case_name, loss_func",
    [("cnn_mse", nn.L1Loss()), ("mlp_ce", nn.NLLLoss()), ("cnn_mse", nn.HuberLoss())],
    ids=["L1", "NLL", "Huber"],
)
def test_ef_unsupported_loss(case_name, loss_func):
    c = make_case(case_name)
    name = type(loss_func).__name__
    match = rf"(?i){name}|unsupported|not supported|only supports|supported"
    # lazily, at the first multiplication: at construction with check_deterministic=True ...
    with pytest.raises(NotImplementedError, match=match):
        EFLinearOperator(c.model, loss_func, c.params, c.data)
    # ... and at multiplication without the check
    E = EFLinearOperator(c.model, loss_func, c.params, c.data, check_deterministic=False)
    with pytest.raises(NotImplementedError, match=match):
        E @ torch.ones(c.dim, dtype=torch.float64)


def test_ef_rejects_block_sizes():
    c = make_case("mlp_bce")
    with pytest.raises(ValueError, match=r"(?i)block"):
        EFLinearOperator(*c.tensors(), block_sizes=[len(c.params)])


@pytest.mark.parametrize("name", ["seq_mse", "transformer_ce"])
def test_make_batch_ef_matrix_product(name):

    c = make_case(name, "mean")
    X, y = c.data[1]
    shapes = [p.shape for p in c.params]
    K = 2
    M = torch.randn(c.dim, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fn = make_batch_ef_matrix_product(c.model, c.loss_func, tuple(c.params))
    result = apply_batch_product(fn, shapes, M, X, y)
    assert_close(result, empirical_fisher(c.model, c.loss_func, c.params, [(X, y)]) @ M)
