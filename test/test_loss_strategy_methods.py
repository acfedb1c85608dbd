"""The strategy methods that replaced the function wrappers of ``curvlinops._losses``."""

import pytest
import torch
from torch import nn

from curvlinops import EFLinearOperator, KFACLinearOperator, _distributed
from curvlinops._losses import MonteCarloSampling, loss_strategy
from curvlinops.diagonal.exact import FisherMCDiagonalLinearOperator
from curvlinops.fisher import FisherMCLinearOperator, make_grad_output_sampler

DT = torch.float64


def test_flatten_matches_to_rows_and_flatten_labels():
    gen = torch.Generator().manual_seed(0)
    output = torch.randn(2, 3, 5, dtype=DT, generator=gen)  # [B, C, S] for cross-entropy
    y = torch.randint(0, 3, (2, 5), generator=gen)
    strategy = loss_strategy(nn.CrossEntropyLoss())
    output_flat, y_flat = strategy.flatten(output, y)
    assert torch.equal(output_flat, output.movedim(1, -1).reshape(-1, 3))
    assert torch.equal(y_flat, y.reshape(-1))
    loss = nn.CrossEntropyLoss(reduction="sum")
    torch.testing.assert_close(loss(output_flat, y_flat), loss(output, y), rtol=1e-14, atol=0)


def test_sum_loss_keeps_options_and_leaves_the_loss_alone():
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    summed = loss_strategy(loss).sum_loss()
    assert summed.reduction == "sum" and loss.reduction == "mean"
    assert summed.weight is weight and summed.label_smoothing == 0.1


def test_bce_sampler_checks_targets_through_the_strategy():
    sampler = make_grad_output_sampler(nn.BCEWithLogitsLoss())
    f = torch.zeros(4, 2, dtype=DT)
    with pytest.raises(NotImplementedError, match="binary targets"):
        sampler(f, 1, torch.full((4, 2), 0.5, dtype=DT), None)
    assert sampler(f, 3, torch.ones(4, 2, dtype=DT), torch.Generator()).shape == (3, 4, 2)
    # the other losses accept any target
    make_grad_output_sampler(nn.MSELoss())(f, 1, torch.full((4, 2), 0.5, dtype=DT), None)


def test_monte_carlo_sampling_reseeds_every_pass():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    data = [(torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT))]
    F = FisherMCLinearOperator(model, nn.MSELoss(), list(model.parameters()), data, seed=3)
    assert isinstance(F, MonteCarloSampling)
    v = torch.randn(F.shape[1], dtype=DT)
    first, second = F @ v, F @ v
    torch.testing.assert_close(first, second, rtol=1e-13, atol=1e-13)
    F._seed = 4
    assert not torch.allclose(F @ v, first)
    with pytest.raises(ValueError, match="mc_samples"):
        FisherMCLinearOperator(model, nn.MSELoss(), list(model.parameters()), data, mc_samples=0)
    with pytest.raises(NotImplementedError, match="FisherMCLinearOperator"):
        FisherMCLinearOperator(
            model,
            nn.CrossEntropyLoss(weight=torch.ones(2, dtype=DT)),
            list(model.parameters()),
            data,
        )


def _sampling_operators():
    """The three Monte-Carlo operators on one small problem (float64, mean CE)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    data = [(torch.randn(4, 3, dtype=DT), torch.tensor([0, 2, 1, 1]))]
    args = (model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    return [
        FisherMCLinearOperator(*args, seed=5),
        FisherMCDiagonalLinearOperator(*args, seed=5),
        KFACLinearOperator(*args, seed=5),
    ]


def test_one_sampling_mechanism_with_rank_seeds(monkeypatch):
    """MC-Fisher, its exact diagonal and KFAC seed alike: ``seed`` alone, mixed with the rank."""
    operators = _sampling_operators()
    for op in operators:
        assert isinstance(op, MonteCarloSampling)
        op._start_pass()
        assert op._generator.initial_seed() == 5
    monkeypatch.setattr(_distributed, "rank", lambda group: 1)
    for op in operators:
        op._start_pass()  # no process group here, but the rank decides the seed
        assert op._generator.initial_seed() == _distributed.rank_seed(5, None) != 5


def test_bad_seed_assigned_later_raises_in_every_sampling_operator():
    """``op._seed = 1.5`` used to seed KFAC and the MC diagonal silently with ``int(1.5)``."""
    for op in _sampling_operators():
        op._seed = 1.5
        with pytest.raises(ValueError, match="_seed must be an integer"):
            op._start_pass()
    _, diagonal_op, kfac = _sampling_operators()
    diagonal_op._cached_diagonal, diagonal_op._seed = None, "1"
    with pytest.raises(ValueError, match="_seed must be an integer"):
        diagonal_op.diagonal  # noqa: B018 (the property computes the diagonal)
    kfac._seed = 2.5
    with pytest.raises(ValueError, match="_seed must be an integer"):
        kfac.compute_kronecker_factors()


def test_mc_diagonal_reseeds_every_pass_like_the_mc_fisher():
    """Recomputing the MC diagonal draws the same samples; a new ``_seed`` draws new ones."""
    op = _sampling_operators()[1]
    first = [d.clone() for d in op.diagonal]
    op._cached_diagonal = None
    for d, e in zip(op.diagonal, first):
        torch.testing.assert_close(d, e, rtol=1e-13, atol=1e-15)
    op._cached_diagonal, op._seed = None, 6
    assert not all(torch.allclose(d, e) for d, e in zip(op.diagonal, first))


@pytest.mark.parametrize("operator", [EFLinearOperator, FisherMCLinearOperator])
@pytest.mark.parametrize("ignore", [False, True], ids=["all_rows", "ignore_index"])
def test_compiled_cross_entropy_normalization_matches_eager(operator, ignore):
    """The mean over the counted rows is traceable (it read ``bool(mask.all())`` before)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    labels = [torch.tensor([0, 2, 1, 1]), torch.tensor([2, 0, 1])]
    if ignore:
        labels = [torch.tensor([0, -100, 1, 1]), torch.tensor([2, -100, -100])]
    data = [(torch.randn(len(y), 3, dtype=DT), y) for y in labels]
    args = (model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    M = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=DT)
    eager = operator(*args) @ M
    compiled_op = operator(*args)
    compiled_op.compile(backend=lambda gm, inputs: gm.forward, fullgraph=True)
    torch.testing.assert_close(compiled_op @ M, eager, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()
