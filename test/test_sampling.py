"""Tests for ``curvlinops.sampling``."""

import pytest
import torch

from curvlinops.sampling import normal, rademacher, random_vector

DT = torch.float64


def test_rademacher_values_and_draw_procedure():
    torch.manual_seed(0)
    v = rademacher(1000, "cpu", DT)
    assert v.shape == (1000,) and v.dtype == DT and v.device.type == "cpu"
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    # roughly balanced (the probability of failing is astronomically small)
    assert abs(v.mean().item()) < 0.2
    # exact draw procedure: Bernoulli(1/2) in place on an uninitialised vector, then 2b - 1
    torch.manual_seed(0)
    expected = torch.empty(1000, dtype=DT).bernoulli_(0.5) * 2 - 1
    assert torch.equal(v, expected)


def test_rademacher_float32():
    torch.manual_seed(1)
    v = rademacher(7, torch.device("cpu"), torch.float32)
    assert v.dtype == torch.float32
    assert torch.equal(v.abs(), torch.ones(7))


def test_normal():
    torch.manual_seed(0)
    v = normal(2000, "cpu", DT)
    assert v.shape == (2000,) and v.dtype == DT
    assert abs(v.mean().item()) < 0.15
    assert abs(v.std().item() - 1.0) < 0.15
    torch.manual_seed(0)
    assert torch.equal(v, torch.randn(2000, dtype=DT))


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_random_vector_dispatch(distribution):
    func = {"rademacher": rademacher, "normal": normal}[distribution]
    torch.manual_seed(3)
    v = random_vector(50, distribution, "cpu", DT)
    torch.manual_seed(3)
    assert torch.equal(v, func(50, "cpu", DT))
    # a different seed gives a different vector
    torch.manual_seed(4)
    assert not torch.equal(v, random_vector(50, distribution, "cpu", DT))


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_generator(distribution):
    gen = torch.Generator().manual_seed(42)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    v1 = random_vector(30, distribution, "cpu", DT, generator=gen)
    # the global RNG is not used
    assert torch.equal(state, torch.get_rng_state())
    v2 = random_vector(30, distribution, "cpu", DT, generator=gen)
    assert not torch.equal(v1, v2)
    gen.manual_seed(42)
    assert torch.equal(v1, random_vector(30, distribution, "cpu", DT, generator=gen))
    # the global RNG is used without a generator
    torch.manual_seed(42)
    v3 = random_vector(30, distribution, "cpu", DT)
    assert not torch.equal(state, torch.get_rng_state())
    assert torch.equal(v1, v3)


def test_random_vector_unknown_distribution():
    with pytest.raises(ValueError, match="'uniform'.*'rademacher', 'normal'"):
        random_vector(5, "uniform", "cpu", DT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_columns_reproduce_bernoulli_draws(dtype):
    """One fast call equals column-by-column Bernoulli(1/2) draws, generator state included."""
    from curvlinops.sampling import rademacher_columns

    for generator_seed in (0, 1):
        g1 = torch.Generator().manual_seed(generator_seed)
        expected = torch.stack(
            [
                torch.empty(1001, dtype=dtype).bernoulli_(0.5, generator=g1) * 2 - 1
                for _ in range(5)
            ],
            dim=1,
        )
        g2 = torch.Generator().manual_seed(generator_seed)
        actual = rademacher_columns(1001, 5, "cpu", dtype, generator=g2)
        assert torch.equal(actual, expected)
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    torch.manual_seed(3)
    expected = torch.empty(50, dtype=dtype).bernoulli_(0.5) * 2 - 1
    torch.manual_seed(3)
    assert torch.equal(rademacher(50, "cpu", dtype), expected)
