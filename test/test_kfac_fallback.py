"""``fallback="diagonal"`` of KFAC/EKFAC (issue 16): exact diagonal blocks for other parameters.

References: dense GGN and empirical Fisher by double backward (test/reference.py), the dense
MC-Fisher operator with the same seed, and dense linear algebra for inverses and properties.
"""

import pytest
import torch
from reference import assert_close, densify, empirical_fisher, ggn
from torch import nn

from curvlinops import FisherMCLinearOperator, KFACInverseLinearOperator
from curvlinops.ekfac import EKFACLinearOperator
from curvlinops.kfac import KFACLinearOperator

DT = torch.float64
TOL = {"rtol": 1e-10, "atol_scale": 1e-10}


class NormNet(nn.Module):
    """Linear -> LayerNorm -> tanh -> Linear, with a free-standing scale tensor."""

    def __init__(self, d_in=3, d=4, C=3):
        super().__init__()
        self.first = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.scale = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, C)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.first(x)) * self.scale))


def _setup(seed=0, sequence=False):
    torch.manual_seed(seed)
    model = NormNet().to(DT)
    with torch.no_grad():  # non-trivial LayerNorm parameters
        model.norm.weight.add_(torch.randn_like(model.norm.weight))
        model.norm.bias.add_(torch.randn_like(model.norm.bias))
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (2,) if sequence else ()
    data = [
        (
            torch.randn(3, *shape, 3, generator=gen, dtype=DT),
            torch.randint(3, (3, *shape), generator=gen),
        )
        for _ in range(2)
    ]
    if sequence:  # CE over [N, C, T]
        model_forward = model.forward
        model.forward = lambda x: model_forward(x).transpose(1, 2)
    return model, data


def _fallback_params(model):
    return [model.norm.weight, model.norm.bias, model.scale]


def _diagonal_blocks(dense, params, all_params):
    """The diagonal entries of ``dense`` (over ``all_params``) belonging to ``params``."""
    offsets, start = {}, 0
    for p in all_params:
        offsets[id(p)] = (start, start + p.numel())
        start += p.numel()
    return torch.cat([dense.diagonal()[slice(*offsets[id(p)])] for p in params])


@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
def test_fallback_blocks_equal_exact_diagonals(fisher_type, reduction, sequence):
    model, data = _setup(sequence=sequence)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    params = list(model.parameters())
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type=fisher_type, fallback="diagonal", seed=3
    )
    fallback = _fallback_params(model)
    if fisher_type == "type-2":
        reference = ggn(model, loss, fallback, data).diagonal()
    elif fisher_type == "empirical":
        reference = empirical_fisher(model, loss, fallback, data).diagonal()
    else:
        mc = FisherMCLinearOperator(model, loss, fallback, data, seed=3)
        reference = densify(mc).diagonal()
    dense = densify(K)
    assert_close(_diagonal_blocks(dense, fallback, params), reference, **TOL)
    # the fallback blocks are diagonal and do not couple to the Kronecker blocks
    positions = torch.cat(
        [torch.full((p.numel(),), any(p is f for f in fallback), dtype=torch.bool) for p in params]
    )
    off_diagonal = dense[positions] - torch.diag(dense.diagonal())[positions]
    assert off_diagonal.abs().max() == 0
    # the Kronecker blocks are those of the operator without the fallback parameters
    kronecker = [model.first.weight, model.first.bias, model.head.weight, model.head.bias]
    K_plain = KFACLinearOperator(model, loss, kronecker, data, fisher_type=fisher_type, seed=3)
    assert_close(dense[~positions][:, ~positions], densify(K_plain), **TOL)


def test_fallback_properties_inverse_and_structure():
    model, data = _setup()
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2", fallback="diagonal")
    dense = densify(K)
    assert_close(K.trace, dense.trace(), **TOL)
    assert_close(K.frobenius_norm, dense.norm(), **TOL)
    eye = torch.eye(dense.shape[0], dtype=DT)
    delta = 1e-2
    exact = densify(KFACInverseLinearOperator(K, damping=delta, use_exact_damping=True))
    assert_close(exact @ (dense + delta * eye), eye, rtol=1e-9, atol_scale=1e-9)
    for damping in (delta, (delta, 2 * delta)):
        for kwargs in ({}, {"cache": False}):
            inverse = densify(KFACInverseLinearOperator(K, damping=damping, **kwargs))
            fallback = _fallback_params(model)
            names = ("norm.weight", "norm.bias", "scale")  # the order of ``fallback``
            D = torch.cat([K._fallback_diagonals[n].flatten() for n in names])
            block_delta = delta if damping == delta else delta * 2 * delta
            assert_close(_diagonal_blocks(inverse, fallback, params), 1 / (D + block_delta), **TOL)
    heuristic = KFACInverseLinearOperator(K, damping=delta, use_heuristic_damping=True)
    assert torch.isfinite(densify(heuristic)).all()
    structure = K.structure()
    assert list(structure) == [n for n, _ in model.named_parameters()]
    assert structure["norm.weight"].startswith("diagonal")
    assert structure["first.weight"].startswith("kronecker")


def test_fallback_checkpoint_round_trip():
    model, data = _setup()
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2", fallback="diagonal")
    dense = densify(K)
    state = K.state_dict()
    assert state["fallback"] == "diagonal" and set(state["fallback_diagonals"]) == {
        "norm.weight",
        "norm.bias",
        "scale",
    }
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        K2 = KFACLinearOperator.from_state_dict(state, model, params, data)
    assert K2._fallback == "diagonal"
    assert_close(densify(K2), dense, **TOL)
    state["fallback_diagonals"]["scale"] = torch.ones(5, dtype=DT)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="fallback diagonals"):
        K2.load_state_dict(state)
    plain = [model.first.weight, model.head.weight]
    K3 = KFACLinearOperator(model, loss, plain, data, check_deterministic=False)
    assert "fallback" not in K3.state_dict()  # 3.0.1's keys without the fallback


def test_ekfac_fallback():
    model, data = _setup()
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    E = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2", fallback="diagonal")
    fallback = _fallback_params(model)
    reference = ggn(model, loss, fallback, data).diagonal()
    assert_close(_diagonal_blocks(densify(E), fallback, params), reference, **TOL)
    eye = torch.eye(E.shape[0], dtype=DT)
    inverse = densify(KFACInverseLinearOperator(E, damping=1e-2, use_exact_damping=True))
    assert_close(inverse @ (densify(E) + 1e-2 * eye), eye, rtol=1e-9, atol_scale=1e-9)


def test_fallback_errors_and_default():
    model, data = _setup()
    params = list(model.parameters())
    loss = nn.CrossEntropyLoss()
    with pytest.raises(NotImplementedError, match=r"norm\.weight \(LayerNorm\)"):
        KFACLinearOperator(model, loss, params, data)
    with pytest.raises(ValueError, match="fallback must be one of"):
        KFACLinearOperator(model, loss, params, data, fallback="dense")
    with pytest.raises(NotImplementedError, match="forward-only"):
        KFACLinearOperator(
            model, loss, params, data, fisher_type="forward-only", fallback="diagonal"
        )


def test_tied_embedding_head_falls_back_to_diagonal():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5)
            self.head.weight = self.embedding.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.embedding(tokens))).transpose(1, 2)

    torch.manual_seed(4)
    model = Tied().to(DT)
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randint(5, (2, 3), generator=gen), torch.randint(5, (2, 3), generator=gen))]
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())  # [table, head bias]
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2", fallback="diagonal")
    assert list(K._mapping) == ["head"] and list(K._fallback_names.values()) == ["embedding.weight"]
    reference = ggn(model, loss, [model.embedding.weight], data).diagonal()
    assert_close(K._fallback_diagonals["embedding.weight"].flatten(), reference, **TOL)


def test_calls_without_kronecker_factor_fall_back():
    """A head tied through ``F.linear`` and cross-attention slices are seen by a probe pass."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(5, 4)
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, tokens):
            h = self.embedding(tokens)
            h = self.attention(h, 2 * h, 2 * h, need_weights=False)[0]  # cross-attention
            return nn.functional.linear(h, self.embedding.weight).transpose(1, 2)

    torch.manual_seed(6)
    model = Model().to(DT)
    gen = torch.Generator().manual_seed(7)
    data = [(torch.randint(5, (2, 3), generator=gen), torch.randint(5, (2, 3), generator=gen))]
    loss = nn.CrossEntropyLoss()
    params = list(model.parameters())
    with pytest.raises(NotImplementedError, match="tied|slice"):
        KFACLinearOperator(model, loss, params, data)
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2", fallback="diagonal")
    assert list(K._mapping) == ["attention.out_proj"]
    fallback = [
        model.embedding.weight,
        model.attention.in_proj_weight,
        model.attention.in_proj_bias,
    ]
    assert [K._params[i] for i in K._fallback_names] == fallback
    reference = ggn(model, loss, fallback, data).diagonal()
    assert_close(_diagonal_blocks(densify(K), fallback, params), reference, **TOL)
