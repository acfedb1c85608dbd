"""Tests for ``curvlinops.kfac.KFACLinearOperator`` against dense block-diagonal references."""

import copy

import pytest
import torch
from kfac_cases import (
    DT,
    Flatten01,
    MeanOverPositions,
    block_mask,
    deep_linear,
    layer_groups,
    regression_data,
    relu_mlp,
    tensor_groups,
)
from reference import assert_close, densify, empirical_fisher, ggn
from torch import nn
from torch.nn import functional as F

import curvlinops
from curvlinops import FisherMCLinearOperator
from curvlinops.kfac import FisherType, KFACLinearOperator, KFACType

SEPARATE = [True, False]


def blockdiag(reference, model, params, separate):
    groups = tensor_groups(params) if separate else layer_groups(model, params)
    return reference * block_mask(params, groups)


def test_enums_and_exports():
    assert "mc" in FisherType and FisherType.MC in FisherType
    assert "foo" not in FisherType and [] not in FisherType and None not in KFACType
    assert "reduce" in KFACType and FisherType.MC == "mc"
    assert list(FisherType) == [
        FisherType.TYPE2,
        FisherType.MC,
        FisherType.EMPIRICAL,
        FisherType.FORWARD_ONLY,
    ]
    assert curvlinops.KFACLinearOperator is KFACLinearOperator
    assert curvlinops.FisherType is FisherType and curvlinops.KFACType is KFACType
    assert KFACLinearOperator._SUPPORTED_MODULES == (nn.Linear, nn.Conv2d)


@pytest.mark.parametrize("separate", SEPARATE)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deep_linear_mse_type2_exact(reduction, separate):
    model = deep_linear()
    params = list(model.parameters())
    data = regression_data()
    loss = nn.MSELoss(reduction=reduction)
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", separate_weight_and_bias=separate
    )
    expected = blockdiag(ggn(model, loss, params, data), model, params, separate)
    assert_close(densify(K), expected)


@pytest.mark.parametrize("loss_cls", [nn.CrossEntropyLoss, nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("separate", SEPARATE)
def test_one_datum_type2_and_empirical_exact(loss_cls, separate):
    model = relu_mlp()  # in-place ReLU: output gradients must not be corrupted
    params = list(model.parameters())
    X = torch.randn(1, 3, dtype=DT)
    y = (
        torch.tensor([2])
        if loss_cls is nn.CrossEntropyLoss
        else torch.tensor([[1.0, 0.0, 1.0]], dtype=DT)
    )
    data = [(X, y)]
    loss = loss_cls()
    for fisher_type, reference in (("type-2", ggn), ("empirical", empirical_fisher)):
        K = KFACLinearOperator(
            model, loss, params, data, fisher_type=fisher_type, separate_weight_and_bias=separate
        )
        expected = blockdiag(reference(model, loss, params, data), model, params, separate)
        assert_close(densify(K), expected)


@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss])
def test_mc_coupled_with_fisher_mc(loss_cls):
    """One datum: KFAC-MC equals the block-diagonal MC-Fisher drawn with the same seed."""
    model = relu_mlp()
    params = list(model.parameters())
    X = torch.randn(1, 3, dtype=DT)
    y = {
        nn.MSELoss: torch.randn(1, 3, dtype=DT),
        nn.CrossEntropyLoss: torch.tensor([0]),
        nn.BCEWithLogitsLoss: torch.tensor([[0.0, 1.0, 1.0]], dtype=DT),
    }[loss_cls]
    data = [(X, y)]
    loss = loss_cls()
    for seed in (1, 7):
        K = KFACLinearOperator(model, loss, params, data, seed=seed)
        F_mc = densify(FisherMCLinearOperator(model, loss, params, data, seed=seed))
        # 3.0.1's MC-Fisher scales its MSE samples by a float32 sqrt(0.5) (API section 20),
        # KFAC by a float64 one: the samples agree to float32 precision only
        rtol = 1e-7 if loss_cls is nn.MSELoss else 1e-10
        assert_close(densify(K), blockdiag(F_mc, model, params, True), rtol=rtol)


def test_mc_converges_to_type2():
    model = relu_mlp()
    params = list(model.parameters())
    data = [(torch.randn(2, 3, dtype=DT), torch.tensor([0, 2]))]
    loss = nn.CrossEntropyLoss()
    exact = densify(KFACLinearOperator(model, loss, params, data, fisher_type="type-2"))

    def error(mc_samples):
        K = KFACLinearOperator(model, loss, params, data, mc_samples=mc_samples, seed=3)
        return ((densify(K) - exact).norm() / exact.norm()).item()

    few, many = error(1), error(2000)
    assert many < 0.1 and many < few / 5


def test_weight_sharing_expand_exact():
    """Expand setting: position-wise linear layers, one loss term per position."""
    model = deep_linear()
    params = list(model.parameters())
    data = regression_data(shape=(5,))
    loss = nn.MSELoss()
    K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2", kfac_approx="expand")
    assert K._num_per_example_loss_terms == 5
    expected = blockdiag(ggn(model, loss, params, data), model, params, True)
    assert_close(densify(K), expected)


def test_weight_sharing_reduce_exact():
    torch.manual_seed(0)
    model = MeanOverPositions().to(DT)
    params = list(model.parameters())
    data = [(x, y[:, 0]) for x, y in regression_data(shape=(5,))]
    loss = nn.MSELoss(reduction="sum")
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="type-2", kfac_approx=KFACType.REDUCE
    )
    expected = blockdiag(ggn(model, loss, params, data), model, params, True)
    assert_close(densify(K), expected)
    K_expand = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
    assert (densify(K_expand) - expected).norm() > 1e-3 * expected.norm()


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical", "forward-only"])
@pytest.mark.parametrize("loss_cls", [nn.MSELoss, nn.BCEWithLogitsLoss])
def test_sequence_output_equals_flattened(fisher_type, loss_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    flat_model = nn.Sequential(model, Flatten01())
    params = list(model.parameters())
    data = regression_data(shape=(5,))
    if loss_cls is nn.BCEWithLogitsLoss:
        data = [(x, (y > 0).to(DT)) for x, y in data]
    flat_data = [(x, y.flatten(0, 1)) for x, y in data]
    loss = loss_cls()
    K = KFACLinearOperator(model, loss, params, data, fisher_type=fisher_type)
    K_flat = KFACLinearOperator(
        flat_model,
        loss,
        params,
        flat_data,
        fisher_type=fisher_type,
        num_per_example_loss_terms=5,
    )
    assert_close(densify(K), densify(K_flat))


def test_cross_entropy_over_class_axis_1():
    """CE on [N, C, T] equals CE on the flattened [N * T, C] output."""
    torch.manual_seed(0)

    class ToNCT(nn.Module):
        def forward(self, x):
            return x.transpose(1, 2)

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 5, 3, dtype=DT, generator=gen), torch.randint(0, 3, (4, 5), generator=gen))
        for _ in range(2)
    ]
    flat_data = [(x, y.flatten()) for x, y in data]
    loss = nn.CrossEntropyLoss()
    for fisher_type in ("type-2", "mc"):
        K = KFACLinearOperator(
            nn.Sequential(model, ToNCT()), loss, params, data, fisher_type=fisher_type
        )
        K_flat = KFACLinearOperator(
            nn.Sequential(model, Flatten01()),
            loss,
            params,
            flat_data,
            fisher_type=fisher_type,
            num_per_example_loss_terms=5,
        )
        assert_close(densify(K), densify(K_flat))


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_sum_equals_scaled_mean(fisher_type):
    model = relu_mlp()
    params = list(model.parameters())
    data = regression_data(d_out=3, shape=(2,))
    ops = {
        r: KFACLinearOperator(model, nn.MSELoss(reduction=r), params, data, fisher_type=fisher_type)
        for r in ("mean", "sum")
    }
    N, S, C = sum(x.shape[0] for x, _ in data), 2, 3
    for name, G in ops["sum"]._gradient_covariances.items():
        assert_close(G / (N * S * C), ops["mean"]._gradient_covariances[name])
    for name, A in ops["sum"]._input_covariances.items():
        assert_close(A, ops["mean"]._input_covariances[name])


def test_forward_only():
    model = relu_mlp()
    params = list(model.parameters())
    data = regression_data(d_out=3)
    K = KFACLinearOperator(model, nn.MSELoss(), params, data, fisher_type="forward-only")
    N = sum(x.shape[0] for x, _ in data)
    X = torch.cat([x for x, _ in data])
    assert_close(K._input_covariances["0"], X.T @ X / N)
    for G in K._gradient_covariances.values():
        assert torch.equal(G, torch.eye(G.shape[0], dtype=DT))


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"stride": 1, "padding": 0},
        {"stride": 2, "padding": 1, "dilation": 2},
        {"padding": "same", "groups": 2},
        {"padding": "valid", "stride": (2, 1)},
    ],
)
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_conv2d_factors(conv_kwargs, kfac_approx):
    """Factors of a Conv2d against F.unfold and plain autograd output gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **conv_kwargs).to(DT)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3).to(DT))
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(n, 4, 7, 6, dtype=DT, generator=gen), torch.randint(0, 3, (n,), generator=gen))
        for n in (3, 2)
    ]
    model(data[0][0])  # materialise the lazy layer
    params = list(conv.parameters())
    loss = nn.CrossEntropyLoss(reduction="sum")
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="empirical", kfac_approx=kfac_approx
    )
    N = 5
    A_ref = torch.zeros(4 // conv.groups * 9, 4 // conv.groups * 9, dtype=DT)
    G_ref = torch.zeros(6, 6, dtype=DT)
    for X, y in data:
        Xg = X.reshape(X.shape[0], conv.groups, -1, *X.shape[2:]).mean(1)
        padding = conv.padding if isinstance(conv.padding, tuple) else conv.padding
        if conv_kwargs.get("padding") == "same":
            padding = 1
        if conv_kwargs.get("padding") == "valid":
            padding = 0
        patches = F.unfold(Xg, 3, dilation=conv.dilation, padding=padding, stride=conv.stride)
        rows = patches.transpose(1, 2)  # [B, O, d]
        out = conv(X)
        out.retain_grad()
        rest = model[1:](out)
        loss(rest, y).backward()
        g = out.grad.flatten(2).transpose(1, 2)  # [B, O, C_out]
        if kfac_approx == "expand":
            A_ref += torch.einsum("boi,boj->ij", rows, rows) / (N * rows.shape[1])
            G_ref += torch.einsum("boi,boj->ij", g, g)
        else:
            mean_rows = rows.mean(1)
            A_ref += mean_rows.T @ mean_rows / N
            G_ref += g.sum(1).T @ g.sum(1)
        model.zero_grad()
    assert_close(K._input_covariances["0"], A_ref)
    assert_close(K._gradient_covariances["0"], G_ref)


@pytest.mark.parametrize("separate", SEPARATE)
@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_agree_with_conv2d(dims, separate):
    torch.manual_seed(0)
    conv2 = nn.Conv2d(2, 3, (1, 3), padding=(0, 1), stride=(1, 2)).to(DT)
    if dims == 1:
        conv = nn.Conv1d(2, 3, 3, padding=1, stride=2).to(DT)
        conv.weight.data = conv2.weight.data[:, :, 0].clone()
        to_input = lambda x: x[:, :, 0]  # noqa: E731
    else:
        conv = nn.Conv3d(2, 3, (1, 1, 3), padding=(0, 0, 1), stride=(1, 1, 2)).to(DT)
        conv.weight.data = conv2.weight.data.unsqueeze(2).clone()
        to_input = lambda x: x.unsqueeze(2)  # noqa: E731
    conv.bias.data = conv2.bias.data.clone()
    gen = torch.Generator().manual_seed(1)
    data2 = [
        (torch.randn(3, 2, 1, 6, dtype=DT, generator=gen), torch.randint(0, 2, (3,), generator=gen))
    ]
    data = [(to_input(x), y) for x, y in data2]
    head = nn.Sequential(nn.Flatten(), nn.Linear(9, 2)).to(DT)
    loss = nn.CrossEntropyLoss()
    ops = []
    for c, d in ((conv2, data2), (conv, data)):
        model = nn.Sequential(c, nn.Tanh(), head)
        ops.append(
            KFACLinearOperator(
                model,
                loss,
                list(model.parameters()),
                d,
                fisher_type="type-2",
                separate_weight_and_bias=separate,
            )
        )
    assert_close(densify(ops[0]), densify(ops[1]))


def test_dict_inputs():
    from cases import make_case

    c = make_case("dict_ce", "mean")
    params = [p for p in c.params if p.ndim > 0]  # the temperature belongs to no layer
    K = KFACLinearOperator(
        c.model, c.loss_func, params, c.data, fisher_type="type-2", batch_size_fn=c.batch_size_fn
    )
    # the same network fed with tensors (temperature and offset folded in)
    model = copy.deepcopy(c.model)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner({"x": x[:, :3], "offset": x[:, 3:]})

    wrapped = Wrapped()
    tensor_data = [(torch.cat([X["x"], X["offset"]], 1), y) for X, y in c.data]
    wrapped_params = [p for p in model.parameters() if p.ndim > 0]
    K_t = KFACLinearOperator(
        wrapped, c.loss_func, wrapped_params, tensor_data, fisher_type="type-2"
    )
    assert_close(densify(K), densify(K_t))


def test_properties_match_dense():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    params = list(model.parameters())
    data = regression_data(num_batches=2, batch=10)
    for separate in SEPARATE:
        K = KFACLinearOperator(
            model,
            nn.MSELoss(),
            params,
            data,
            fisher_type="type-2",
            separate_weight_and_bias=separate,
        )
        dense = densify(K)
        assert_close(K.trace, dense.trace())
        assert_close(K.logdet, torch.linalg.slogdet(dense)[1], rtol=1e-8)
        assert_close(K.det, torch.linalg.det(dense), rtol=1e-8)
        assert_close(K.frobenius_norm, dense.norm())
        assert K._trace is not None
        K.compute_kronecker_factors()
        assert (
            K._trace is None and K._det is None and K._logdet is None and K._frobenius_norm is None
        )
        # recomputation resets instead of accumulating (quirk 1)
        assert_close(densify(K), dense)


def test_factors_are_live_and_weight_exclusion():
    model = relu_mlp()
    params = list(model.parameters())
    data = regression_data(d_out=3)
    K = KFACLinearOperator(model, nn.MSELoss(), params, data)
    G = K._gradient_covariances["2"]
    K._gradient_covariances["2"] = torch.eye(G.shape[0], dtype=DT)
    v = [torch.zeros_like(p) for p in params]
    v[3] = torch.ones_like(params[3])
    assert_close((K @ v)[3], torch.ones_like(params[3]))
    biases = [p for n, p in model.named_parameters() if "bias" in n]
    K_bias = KFACLinearOperator(model, nn.MSELoss(), biases, data)
    assert len(K_bias._input_covariances) == 0
    shuffled = [params[3], params[0]]
    K_sub = KFACLinearOperator(model, nn.MSELoss(), shuffled, data)
    assert K_sub._mapping == {"0": {"weight": 1}, "2": {"bias": 0}}


def test_checkpoint_round_trip(tmp_path):
    model = relu_mlp()
    params = list(model.parameters())
    data = regression_data(d_out=3)
    loss = nn.MSELoss()
    K = KFACLinearOperator(
        model, loss, params, data, fisher_type="empirical", separate_weight_and_bias=False
    )
    dense, trace = densify(K), K.trace
    torch.save(K.state_dict(), tmp_path / "kfac.pt")
    state = torch.load(tmp_path / "kfac.pt", weights_only=False)
    model2 = relu_mlp(seed=5)
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        K2 = KFACLinearOperator.from_state_dict(state, model2, list(model2.parameters()), data)
    assert_close(densify(K2), dense)
    assert_close(K2.trace, trace)
    assert_close(model2[0].weight, model[0].weight)
    # the determinism check of from_state_dict keeps the loaded factors, even for other data
    other_data = regression_data(d_out=3, seed=9)
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        K3 = KFACLinearOperator.from_state_dict(
            state, model2, list(model2.parameters()), other_data
        )
    assert_close(densify(K3), dense)


def test_checkpoint_errors():
    model = relu_mlp()
    params = list(model.parameters())
    data = regression_data(d_out=3)
    K = KFACLinearOperator(model, nn.MSELoss(), params, data, check_deterministic=False)
    state = K.state_dict()
    other = deep_linear(d_out=3)
    K_other = KFACLinearOperator(
        other, nn.MSELoss(), list(other.parameters()), data, check_deterministic=False
    )
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="loading state_dict"):
        K_other.load_state_dict(state)
    K_ce = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        [(x, y.argmax(1)) for x, y in data],
        check_deterministic=False,
    )
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="loss"):
        K_ce.load_state_dict(state)
    K_sum = KFACLinearOperator(
        model, nn.MSELoss(reduction="sum"), params, data, check_deterministic=False
    )
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="reduction"):
        K_sum.load_state_dict(state)
    K.compute_kronecker_factors()
    state = K.state_dict()
    state["gradient_covariances"] = {"0": state["gradient_covariances"]["0"]}
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="another model"):
        K.load_state_dict(state)
    del state["input_covariances"]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="missing"):
        K.load_state_dict(state)


def test_errors():
    model = relu_mlp()
    params = list(model.parameters())
    data = regression_data(d_out=3)
    with pytest.raises(ValueError, match="Invalid loss"):
        KFACLinearOperator(model, nn.L1Loss(), params, data)
    with pytest.raises(ValueError, match="Invalid fisher_type"):
        KFACLinearOperator(model, nn.MSELoss(), params, data, fisher_type="type-1")
    with pytest.raises(ValueError, match="mc_samples=2 only makes sense"):
        KFACLinearOperator(model, nn.MSELoss(), params, data, fisher_type="type-2", mc_samples=2)
    with pytest.raises(ValueError, match="Invalid kfac_approx"):
        KFACLinearOperator(model, nn.MSELoss(), params, data, kfac_approx="both")
    ln_model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)).to(DT)
    with pytest.raises(NotImplementedError, match=r"1\.weight \(LayerNorm\)"):
        KFACLinearOperator(ln_model, nn.MSELoss(), list(ln_model.parameters()), data)
    reflect = nn.Sequential(nn.Conv1d(3, 3, 1, padding_mode="reflect"), nn.Flatten()).to(DT)
    with pytest.raises(NotImplementedError, match=r"0\.weight \(Conv1d, padding_mode='reflect'\)"):
        KFACLinearOperator(reflect, nn.MSELoss(), list(reflect.parameters()), data)
    attention = nn.MultiheadAttention(3, 1, batch_first=True).to(DT)

    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, x, x)[0]

    seq = regression_data(d_out=3, shape=(2,))
    out_proj = list(attention.out_proj.parameters())
    # issue 16: the out_proj's functional call and a layer used twice are supported now
    # (test/test_kfac_transformer.py checks their factors); an unused layer still raises
    assert list(KFACLinearOperator(Attend(), nn.MSELoss(), out_proj, seq)._mapping) == [
        "attention.out_proj"
    ]
    unused = nn.Linear(3, 3).to(DT)
    holder = nn.ModuleDict({"used": model, "unused": unused})
    holder.forward = model.forward
    with pytest.raises(RuntimeError, match=r"\['unused'\].*never called"):
        KFACLinearOperator(holder, nn.MSELoss(), list(unused.parameters()), data)
    soft = [(x, torch.full_like(y, 0.3)) for x, y in data]
    K = KFACLinearOperator(
        model, nn.BCEWithLogitsLoss(), params, soft, fisher_type="type-2", check_deterministic=False
    )
    with pytest.raises(NotImplementedError, match="binary"):
        K @ torch.ones(K.shape[1], dtype=DT)
    ce_data = [(x, y.argmax(1)) for x, y in data]
    # issue 16: label smoothing (same logit Hessian) is supported now, class weights are not
    KFACLinearOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), params, ce_data)
    with pytest.raises(NotImplementedError, match="weight"):
        KFACLinearOperator(
            model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)), params, ce_data
        )
    seq = regression_data(d_out=3, shape=(2,))
    with pytest.raises(ValueError, match="num_per_example_loss_terms"):
        KFACLinearOperator(model, nn.MSELoss(), params, seq[:1] + [(seq[1][0], seq[1][1][:, :1])])


def test_nondeterminism_detected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).to(DT)
    with pytest.raises(RuntimeError, match="Non-deterministic"):
        KFACLinearOperator(model, nn.MSELoss(), list(model.parameters()), regression_data(d_out=3))


def test_parameter_grads_untouched_and_draw_label():
    model = relu_mlp()
    params = list(model.parameters())
    K = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        [(torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 2, 0]))],
    )
    assert all(p.grad is None for p in params)
    labels = K.draw_label(torch.randn(5, 3, dtype=DT))
    assert labels.shape == (5,) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="2-d"):
        K.draw_label(torch.randn(5, dtype=DT))
