"""Structured blocks, layer pass and loss strategies against dense references (float64)."""

import math

import pytest
import torch
from reference import assert_close
from torch import nn

from curvlinops._blocks import (
    DiagonalBlock,
    EigenbasisBlock,
    InverseOptions,
    KroneckerBlock,
    apply_block_diagonal,
    block_layout,
)
from curvlinops._layer_pass import LayerPass, layer_rows, partition_parameters
from curvlinops._losses import (
    BCEWithLogitsStrategy,
    CrossEntropyStrategy,
    MSEStrategy,
    loss_strategy,
)
from curvlinops.kfac_utils import loss_hessian_matrix_sqrt

DT = torch.float64


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * n, dtype=DT, generator=g)
    return X @ X.T / n + 0.1 * torch.eye(n, dtype=DT)


def dense(block, kind: str, d_out: int, n: int) -> torch.Tensor:
    """The block as a matrix in the row-major flattening of ``[d_out, n]``."""
    eye = torch.eye(d_out * n, dtype=DT)
    V = eye.reshape(d_out, n, d_out * n)
    return block.matmat(V, kind).reshape(d_out * n, d_out * n)


@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_kronecker_block_formulas(kind):
    G, A = spd(3, 0), spd(4, 1)
    block = KroneckerBlock("layer", G, A)
    n = 1 if kind == "bias" else 4
    M = torch.kron(G, torch.eye(1, dtype=DT) if kind == "bias" else A)
    assert_close(dense(block, kind, 3, n), M)
    assert_close(block.trace(kind), M.trace())
    assert_close(block.det(kind), M.det())
    assert_close(block.logdet(kind), M.logdet())
    assert_close(block.squared_frobenius_norm(kind), (M**2).sum())
    # single column and columns-last layouts agree
    V = torch.randn(3, n, 5, dtype=DT, generator=torch.Generator().manual_seed(2))
    assert_close(block.matmat(V, kind)[..., 0], block.matmat(V[..., 0], kind))


def test_kronecker_block_inverses():
    G, A = spd(3, 0), spd(4, 1)
    block = KroneckerBlock("layer", G, A)
    kinds = ["weight", "bias"]
    eye_G, eye_A = torch.eye(3, dtype=DT), torch.eye(4, dtype=DT)
    # factor damping with a pair (delta_A, delta_G)
    options = InverseOptions(damping=(0.2, 0.3))
    inverse = block.inverse_from_parts(block.inverse_parts(options), options, kinds)
    expected = torch.kron(torch.linalg.inv(G + 0.3 * eye_G), torch.linalg.inv(A + 0.2 * eye_A))
    assert_close(dense(inverse, "weight", 3, 4), expected)
    # heuristic damping: delta_A * delta_G = delta, ratio pi^2 = (tr A / n) / (tr G / m)
    delta_A, delta_G = block.factor_dampings(InverseOptions(damping=0.04, heuristic=True))
    pi = math.sqrt((A.trace() / 4) / (G.trace() / 3))
    assert math.isclose(delta_A * delta_G, 0.04) and math.isclose(delta_A / delta_G, pi**2)
    # exact damping inverts G (x) A + delta I, the bias G + delta I
    options = InverseOptions(damping=0.1, exact=True)
    inverse = block.inverse_from_parts(block.inverse_parts(options), options, kinds)
    assert isinstance(inverse, EigenbasisBlock)
    exact = torch.linalg.inv(torch.kron(G, A) + 0.1 * torch.eye(12, dtype=DT))
    assert_close(dense(inverse, "weight", 3, 4), exact)
    assert_close(dense(inverse, "bias", 3, 1), torch.linalg.inv(G + 0.1 * eye_G))


def test_eigenbasis_and_diagonal_blocks():
    Q_G = torch.linalg.qr(torch.randn(3, 3, dtype=DT))[0]
    Q_A = torch.linalg.qr(torch.randn(4, 4, dtype=DT))[0]
    values = torch.rand(3, 4, dtype=DT) + 0.5
    block = EigenbasisBlock("layer", Q_G, Q_A, {"weight": values})
    Q = torch.kron(Q_G, Q_A)
    M = Q @ torch.diag(values.flatten()) @ Q.T
    assert_close(dense(block, "weight", 3, 4), M)
    assert_close(block.trace("weight"), M.trace())
    assert_close(block.logdet("weight"), M.logdet())
    assert_close(block.det("weight"), M.det())
    assert_close(block.squared_frobenius_norm("weight"), (M**2).sum())
    assert_close(
        dense(block.inverse(0.1), "weight", 3, 4),
        torch.linalg.inv(M + 0.1 * torch.eye(12, dtype=DT)),
    )
    diagonal = DiagonalBlock("layer", {"weight": values})
    assert_close(dense(diagonal, "weight", 3, 4), torch.diag(values.flatten()))
    assert_close(
        dense(diagonal.inverse(0.1), "weight", 3, 4), torch.diag(1 / (values.flatten() + 0.1))
    )
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        DiagonalBlock("layer", {"weight": values - values.max()}).inverse(0.0)


def test_block_layout_and_application():
    mapping = {"0": {"weight": 1, "bias": 0}, "2": {"bias": 2}}
    assert block_layout(mapping, True) == [
        ("0", "weight", (1,)),
        ("0", "bias", (0,)),
        ("2", "bias", (2,)),
    ]
    assert block_layout(mapping, False) == [("0", "joint", (1, 0)), ("2", "bias", (2,))]
    M = [torch.randn(3, 2, dtype=DT), torch.randn(3, 4, 2, dtype=DT), torch.randn(5, 2, dtype=DT)]
    result = [torch.empty_like(m) for m in M]
    out = apply_block_diagonal(block_layout(mapping, False), M, result, lambda n, k, V: 2 * V)
    for o, m in zip(out, M):
        assert_close(o, 2 * m)


def test_layer_pass_identity_matching_and_reuse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(DT)
    params = list(model.parameters())
    mapping, missing = partition_parameters([params[2], params[0].detach()], model)
    # a detached copy shares the storage but is not the parameter: matched by identity only
    assert mapping == {"2": {"weight": 0}} and missing == [1]
    shared = nn.Linear(3, 3).to(DT)
    tied = nn.Sequential(shared, nn.ReLU(), shared)
    strategy = loss_strategy(nn.MSELoss())
    layer_pass = LayerPass(tied, {"0": shared}, strategy.to_rows, strategy.flatten_labels, 8)
    data = [(torch.randn(5, 3, dtype=DT), torch.randn(5, 3, dtype=DT))]

    def vectors(X, y, output, f_flat, y_flat):
        return torch.ones(1, *f_flat.shape, dtype=DT)

    (batch,) = layer_pass.run(data, ["0"], lambda name, x: layer_rows(shared, x, False), vectors)
    assert batch.reused == ["0"]  # the second call is reported, not raised
    assert batch.grads["0"].shape == (1, 5, 1, 3)


@pytest.mark.parametrize("strategy_cls", [MSEStrategy, CrossEntropyStrategy, BCEWithLogitsStrategy])
def test_strategy_hessian_sqrt_and_draws(strategy_cls):
    loss = strategy_cls.loss_class(reduction="sum")
    strategy = loss_strategy(loss)
    assert type(strategy) is strategy_cls
    f = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 1]) if strategy_cls is CrossEntropyStrategy else (f > 0).to(DT)
    S = strategy.hessian_sqrt_columns(f)  # [C, R, C]
    for r in range(4):
        H = torch.autograd.functional.hessian(
            lambda row, label=y[r : r + 1]: loss(row.unsqueeze(0), label), f[r]
        )
        assert_close(S[:, r, :].T @ S[:, r, :], H)
        one = loss_hessian_matrix_sqrt(f[r : r + 1], y[r : r + 1], loss)
        assert_close(one @ one.T, H)
    # the same seed gives the same samples; with M = 1 the MC-Fisher's draw and KFAC's label
    # draw consume the generator alike (the MSE sample of one is the other's negative)
    samples = strategy.grad_samples(f, 3, torch.Generator().manual_seed(1))
    assert samples.shape == (3, 4, 3)
    assert_close(samples, strategy.grad_samples(f, 3, torch.Generator().manual_seed(1)))
    one = strategy.grad_samples(f, 1, torch.Generator().manual_seed(2))
    label_one = strategy.label_grad_samples(f, 1, torch.Generator().manual_seed(2))
    sign = -1.0 if strategy_cls is MSEStrategy else 1.0
    # 3.0.1's MSE draw scales by a float32 sqrt(1/2) (section 20): agreement to float32 rounding
    assert_close(one, sign * label_one, rtol=1e-7)
    for draw in (
        lambda: strategy.grad_samples(f[0], 1, None),
        lambda: strategy.draw_label(f.unsqueeze(0), None),
        lambda: strategy.label_grad_samples(f[0], 2, None),
    ):
        with pytest.raises(ValueError, match="Only 2d output"):
            draw()
    with pytest.raises(NotImplementedError, match="MyOperator supports"):
        loss_strategy(nn.L1Loss(), "MyOperator")
