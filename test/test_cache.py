"""The opt-in product cache (``A.cache()``): same products, no repeated forward passes."""

import pytest
import torch
from cases import make_case
from reference import assert_close, block_diagonal, cached_reference, ggn, hessian

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
)


class CountingData(list):
    """A list of batches that counts how often it is iterated."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def columns(dim: int, K: int, seed: int) -> torch.Tensor:
    return torch.randn(dim, K, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "operator, kind, name, reduction",
    [
        (HessianLinearOperator, "hessian", "transformer_ce", "mean"),
        (HessianLinearOperator, "hessian", "dict_ce", "sum"),
        (GGNLinearOperator, "ggn", "cnn_mse", "mean"),
        (GGNLinearOperator, "ggn", "seq_bce", "sum"),
        (EFLinearOperator, "ef", "mlp_ce", "mean"),
        (EFLinearOperator, "ef", "seq_mse", "sum"),
    ],
)
def test_cached_products_match_reference_without_data_passes(operator, kind, name, reduction):
    c = make_case(name, reduction)
    data = CountingData(c.data)
    A = operator(c.model, c.loss_func, c.params, data, **c.kwargs()).cache()
    expected = cached_reference(kind, name, reduction)
    passes = data.passes
    for seed, K in [(0, 1), (1, 3), (2, 20)]:  # 20 columns: two chunks per cached batch
        M = columns(A.shape[1], K, seed)
        assert_close(A @ M, expected @ M)
    assert data.passes == passes + 1  # only the first product reads the data


def test_cached_hessian_blocks():
    c = make_case("mlp_ce", "mean")
    H = HessianLinearOperator(*c.tensors(), block_sizes=[1, 3]).cache()
    expected = block_diagonal(cached_reference("hessian", "mlp_ce", "mean"), c.params, [1, 3])
    for seed in range(2):
        M = columns(H.shape[1], 4, seed)
        assert_close(H @ M, expected @ M)


def test_cached_mc_fisher_equals_uncached():
    c = make_case("seq_mse", "mean")
    eager = FisherMCLinearOperator(*c.tensors(), mc_samples=3, seed=5)
    cached = FisherMCLinearOperator(*c.tensors(), mc_samples=3, seed=5).cache()
    for seed in range(3):
        M = columns(eager.shape[1], 2, seed)
        assert_close(cached @ M, eager @ M)


def test_cache_follows_parameter_updates():
    c = make_case("mlp_ce", "mean")
    H = HessianLinearOperator(*c.tensors()).cache()
    G = GGNLinearOperator(*c.tensors()).cache()
    M = columns(H.shape[1], 2, 0)
    H @ M, G @ M  # fill the caches
    with torch.no_grad():  # an optimizer step changes the parameters in place
        for p in c.params:
            p.mul_(1.1).add_(0.05)
    assert_close(H @ M, hessian(c.model, c.loss_func, c.params, c.data) @ M)
    assert_close(G @ M, ggn(c.model, c.loss_func, c.params, c.data) @ M)


def test_cache_over_memory_bound_warns_and_stays_correct():
    c = make_case("mlp_ce", "mean")
    data = CountingData(c.data)
    H = HessianLinearOperator(c.model, c.loss_func, c.params, data).cache(max_bytes=0)
    M = columns(H.shape[1], 2, 0)
    expected = cached_reference("hessian", "mlp_ce", "mean") @ M
    with pytest.warns(UserWarning, match="max_bytes"):
        assert_close(H @ M, expected)
    passes = data.passes
    assert_close(H @ M, expected)  # uncached now, and without another warning
    assert data.passes == passes + 1
    assert H._product_cache is None


def test_cache_bound_admits_a_large_enough_budget():
    c = make_case("mlp_ce", "mean")
    H = HessianLinearOperator(*c.tensors()).cache(max_bytes=10**8)
    H @ columns(H.shape[1], 1, 0)
    assert H._product_cache is not None and len(H._product_cache[1]) == len(c.data)
    H.clear_cache()
    assert H._product_cache is None and H._product_cache_max_bytes is None


def test_cache_errors():
    c = make_case("mlp_ce", "mean")
    with pytest.raises(NotImplementedError, match="JacobianLinearOperator"):
        JacobianLinearOperator(c.model, c.params, c.data).cache()
    with pytest.raises(NotImplementedError, match="KFACLinearOperator"):
        KFACLinearOperator(*c.tensors()).cache()
    H = HessianLinearOperator(*c.tensors())
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="max_bytes"):
            H.cache(max_bytes=bad)


def test_cached_mc_fisher_follows_seed_and_mc_samples():
    """Changing ``_seed`` (or ``_mc_samples``) draws fresh samples also with the cache on."""
    c = make_case("mlp_ce", "mean")
    cached = FisherMCLinearOperator(*c.tensors(), seed=5).cache()
    M = columns(cached.shape[1], 2, 0)
    first = cached @ M
    for attribute, value in [("_seed", 6), ("_mc_samples", 3)]:
        setattr(cached, attribute, value)
        fresh = FisherMCLinearOperator(
            *c.tensors(), seed=cached._seed, mc_samples=cached._mc_samples
        )
        result = cached @ M
        assert_close(result, fresh @ M)
        assert not torch.allclose(result, first)


@pytest.mark.parametrize(
    "operator, kind, name",
    [
        (HessianLinearOperator, "hessian", "mlp_ce"),
        (GGNLinearOperator, "ggn", "cnn_mse"),
        (EFLinearOperator, "ef", "seq_bce"),
    ],
)
def test_cache_and_compile_combine(operator, kind, name):
    """A compiled operator caches too: correct products, data read by the first product only."""
    torch._dynamo.reset()
    c = make_case(name, "mean")
    data = CountingData(c.data)
    A = operator(c.model, c.loss_func, c.params, data, **c.kwargs())
    A.compile(backend="eager", fullgraph=True).cache()
    passes = data.passes
    expected = cached_reference(kind, name, "mean")
    for seed in range(2):
        M = columns(A.shape[1], 3, seed)
        assert_close(A @ M, expected @ M)
    assert A._product_cache is not None and data.passes == passes + 1
    torch._dynamo.reset()


def test_cached_then_compiled_mc_fisher_draws_the_eager_samples():
    torch._dynamo.reset()
    c = make_case("seq_mse", "mean")
    eager = FisherMCLinearOperator(*c.tensors(), mc_samples=2, seed=3)
    both = FisherMCLinearOperator(*c.tensors(), mc_samples=2, seed=3).cache()
    M = columns(eager.shape[1], 2, 0)
    both @ M  # builds an eager cache, which compile() must drop
    both.compile(backend="eager", fullgraph=True)
    assert_close(both @ M, eager @ M)
    assert_close(both @ M, eager @ M)
    torch._dynamo.reset()
