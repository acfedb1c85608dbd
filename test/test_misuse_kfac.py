"""Misuse of the KFAC family: clear errors, contract phrases, and an untouched model.

Covers issue 12 items 7 (singular exact damping), 10 (atomic ``load_state_dict``), 11
(``torch.load`` with ``weights_only=True``), 16 (argument ranges) and the error phrases of
API section 19, plus the audit that construction and products leave parameters, buffers,
hooks, ``.grad``, train/eval mode and the global RNG as they were, also after an error.
"""

import copy
import io

import pytest
import torch
from kfac_cases import DT, regression_data, relu_mlp
from model_state import changes
from model_state import snapshot as model_snapshot
from reference import assert_close, densify
from torch import nn

from curvlinops import (
    EKFACLinearOperator,
    FisherMCLinearOperator,
    FisherType,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KFACType,
)
from curvlinops.diagonal.exact import FisherMCDiagonalLinearOperator, fisher_mc_diagonal


def classification_data(num_batches=2, batch=3, d_in=3, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch + i, d_in, dtype=DT, generator=gen),
            torch.randint(0, classes, (batch + i,), generator=gen),
        )
        for i in range(num_batches)
    ]


def problem(cls=KFACLinearOperator, reduction="mean", seed=0, **kwargs):
    model = relu_mlp(seed=seed)
    data = classification_data()
    loss = nn.CrossEntropyLoss(reduction=reduction)
    return model, cls(model, loss, list(model.parameters()), data, **kwargs)


# ----------------------------------------------------------------- section 19 phrases
def test_ekfac_only_2d_output():
    model = relu_mlp(d_out=3)
    data = regression_data(d_out=3, shape=(2,))
    with pytest.raises(ValueError, match="Only 2d output"):
        EKFACLinearOperator(model, nn.MSELoss(), list(model.parameters()), data)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_inverse_damping_phrases(cls):
    _, K = problem(cls)
    with pytest.raises(ValueError, match="Either use heuristic damping or exact damping"):
        KFACInverseLinearOperator(K, use_heuristic_damping=True, use_exact_damping=True)
    for flag in ("use_heuristic_damping", "use_exact_damping"):
        with pytest.raises(
            ValueError, match="Heuristic and exact damping require a single damping value."
        ):
            KFACInverseLinearOperator(K, damping=(1e-3, 1e-3), **{flag: True})


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_load_mismatch_phrases(cls):
    _, K = problem(cls)
    state = K.state_dict()
    for other, word in (
        (nn.MSELoss(), "loss"),
        (nn.CrossEntropyLoss(reduction="sum"), "reduction"),
    ):
        model = relu_mlp()
        data = (
            classification_data()
            if isinstance(other, nn.CrossEntropyLoss)
            else regression_data(d_out=3)
        )
        target = cls(model, other, list(model.parameters()), data, check_deterministic=False)
        with pytest.warns(UserWarning, match="will overwrite the parameters"):
            with pytest.raises(ValueError, match=f"mismatch.*{word}|{word}.*mismatch") as info:
                target.load_state_dict(state)
        assert "mismatch" in str(info.value) and word in str(info.value)
        inverse = KFACInverseLinearOperator(target, damping=1e-2, use_exact_damping=True)
        source = KFACInverseLinearOperator(K, damping=1e-2, use_exact_damping=True)
        with pytest.warns(UserWarning, match="will overwrite the parameters"):
            with pytest.raises(ValueError, match="mismatch") as info:
                inverse.load_state_dict(source.state_dict())
        assert word in str(info.value)


# ----------------------------------------------------------------- item 16: ranges
@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_kfac_argument_ranges(cls):
    model = relu_mlp()
    params, data, loss = list(model.parameters()), classification_data(), nn.CrossEntropyLoss()
    for bad in (0, -1, 1.5, 2.0, True, "2", None):
        with pytest.raises(ValueError, match=r"mc_samples.*positive integer"):
            cls(model, loss, params, data, mc_samples=bad)
    for bad in (0, -2, 1.5, "1"):
        with pytest.raises(ValueError, match=r"num_per_example_loss_terms.*positive integer"):
            cls(model, loss, params, data, num_per_example_loss_terms=bad)
    for bad in (1.5, "1", None, 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"seed must be an integer"):
            cls(model, loss, params, data, seed=bad)
    with pytest.raises(ValueError, match="separate_weight_and_bias"):
        cls(model, loss, params, data, separate_weight_and_bias="no")
    # valid corners
    cls(model, loss, params, data, seed=-5, mc_samples=2, check_deterministic=False)


def test_fisher_mc_argument_ranges():
    model = relu_mlp()
    params, data, loss = list(model.parameters()), classification_data(), nn.CrossEntropyLoss()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"mc_samples.*positive integer"):
            FisherMCLinearOperator(model, loss, params, data, mc_samples=bad)
        with pytest.raises(ValueError, match=r"mc_samples.*positive integer"):
            fisher_mc_diagonal(model, loss, params, data, mc_samples=bad)
    for bad in (0.5, "3", None):
        with pytest.raises(ValueError, match=r"seed must be an integer"):
            FisherMCLinearOperator(model, loss, params, data, seed=bad)
        with pytest.raises(ValueError, match=r"seed must be an integer"):
            fisher_mc_diagonal(model, loss, params, data, seed=bad)


# ----------------------------------------------------------------- item 7: singular exact damping
def singular_problem(cls):
    """One datum: A = x x^T has rank 1, so the factors are singular."""
    model = relu_mlp()
    data = [(torch.randn(1, 3, dtype=DT), torch.tensor([1]))]
    return cls(model, nn.CrossEntropyLoss(), list(model.parameters()), data)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_exact_damping_zero_on_singular_factors_raises(cls):
    K = singular_problem(cls)
    inverse = KFACInverseLinearOperator(K, damping=0.0, use_exact_damping=True)
    v = torch.randn(K.shape[1], dtype=DT)
    with pytest.raises(RuntimeError, match="damping") as info:
        inverse @ v
    assert "singular" in str(info.value)
    # with damping the product is finite and inverts K + damping I
    damped = KFACInverseLinearOperator(K, damping=1e-2, use_exact_damping=True)
    result = damped @ v
    assert torch.isfinite(result).all()
    dense = densify(K) + 1e-2 * torch.eye(K.shape[0], dtype=DT)
    assert_close(result, torch.linalg.solve(dense, v), rtol=1e-8)


# ----------------------------------------------------------------- item 10: atomic load
def snapshot(model, K):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {k: v.clone() for k, v in K._input_covariances.items()},
        {k: v.clone() for k, v in K._gradient_covariances.items()},
        K._fisher_type,
        K._seed,
        K._N_data,
    )


def assert_same_snapshot(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a[3:] == b[3:]


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_failed_load_changes_nothing(cls):
    _, source = problem(cls, seed=1, fisher_type="empirical")
    good = source.state_dict()

    def target():
        model, K = problem(cls, seed=2)
        K @ torch.ones(K.shape[1], dtype=DT)  # factors computed
        return model, K

    bad_states = []
    # other model: other widths, other keys
    other = copy.deepcopy(good)
    other["model_func_state_dict"] = relu_mlp(hidden=5).state_dict()
    bad_states.append((other, RuntimeError, "loading state_dict"))
    other = copy.deepcopy(good)
    other["model_func_state_dict"] = {"x" + k: v for k, v in good["model_func_state_dict"].items()}
    bad_states.append((other, RuntimeError, "loading state_dict"))
    # other loss / reduction (the model's state dict fits: it must not be loaded)
    other = copy.deepcopy(good)
    other["loss_type"] = "MSELoss"
    bad_states.append((other, ValueError, "mismatch"))
    other = copy.deepcopy(good)
    other["loss_reduction"] = "sum"
    bad_states.append((other, ValueError, "reduction"))
    # other parameters: factors of other layers or sizes
    other = copy.deepcopy(good)
    other["gradient_covariances"] = {"7": torch.eye(3, dtype=DT)}
    bad_states.append((other, ValueError, "another model"))
    other = copy.deepcopy(good)
    if cls is KFACLinearOperator:
        other["input_covariances"] = {
            k: torch.eye(v.shape[0] + 1, dtype=DT) for k, v in good["input_covariances"].items()
        }
    else:
        other["input_covariances_eigenvectors"] = {
            k: torch.eye(v.shape[0] + 1, dtype=DT)
            for k, v in good["input_covariances_eigenvectors"].items()
        }
    bad_states.append((other, ValueError, "shape"))
    # invalid hyper-parameters
    other = copy.deepcopy(good)
    other["mc_samples"] = 0
    bad_states.append((other, ValueError, "mc_samples"))
    other = copy.deepcopy(good)
    other["fisher_type"] = "nonsense"
    bad_states.append((other, ValueError, "fisher_type"))
    for state, error, phrase in bad_states:
        model, K = target()
        before = snapshot(model, K)
        dense_before = densify(K)
        with pytest.warns(UserWarning, match="will overwrite the parameters"):
            with pytest.raises(error, match=phrase):
                K.load_state_dict(state)
        assert_same_snapshot(before, snapshot(model, K))
        assert_close(densify(K), dense_before)
        # the inverse's load is atomic as well
        inverse = KFACInverseLinearOperator(K, damping=1e-3, use_exact_damping=True)
        inv_state = KFACInverseLinearOperator(
            source, damping=1e-3, use_exact_damping=True
        ).state_dict()
        inv_state["A"] = state
        with pytest.warns(UserWarning), pytest.raises(error, match=phrase):
            inverse.load_state_dict(inv_state)
        assert_same_snapshot(before, snapshot(model, K))
    # the inverse's own checks run before the wrapped operator changes
    model, K = target()
    before = snapshot(model, K)
    inverse = KFACInverseLinearOperator(K, damping=1e-3, use_exact_damping=True)
    inv_state = KFACInverseLinearOperator(source, damping=1e-3, use_exact_damping=True).state_dict()
    inv_state["inverse_gradient_covariances"] = {"nope": None}
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="nope"):
        inverse.load_state_dict(inv_state)
    assert_same_snapshot(before, snapshot(model, K))
    # and a good checkpoint still loads
    with pytest.warns(UserWarning):
        K.load_state_dict(good)
    assert_close(densify(K), densify(source))


# ----------------------------------------------------------------- item 11: weights_only load
def roundtrip(state, weights_only=True):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer) if weights_only else torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
@pytest.mark.parametrize("as_enum", [False, True], ids=["str", "enum"])
def test_checkpoints_load_with_weights_only(cls, as_enum):
    fisher = FisherType.EMPIRICAL if as_enum else "empirical"
    approx = KFACType.REDUCE if as_enum else "reduce"
    model, K = problem(cls, fisher_type=fisher, kfac_approx=approx)
    inverse = KFACInverseLinearOperator(K, damping=1e-2, use_exact_damping=True)
    v = torch.randn(K.shape[1], dtype=DT)
    expected, expected_inv = K @ v, inverse @ v
    state = roundtrip(K.state_dict())  # torch.load's default weights_only=True
    assert state["fisher_type"] == "empirical" and type(state["fisher_type"]) is str
    assert state["kfac_approx"] == "reduce" and type(state["kfac_approx"]) is str
    inv_state = roundtrip(inverse.state_dict())
    model2 = relu_mlp(seed=5)
    data = classification_data()
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        K2 = cls.from_state_dict(state, model2, list(model2.parameters()), data)
    assert_close(K2 @ v, expected)
    model3 = relu_mlp(seed=6)
    K3 = cls(
        model3,
        nn.CrossEntropyLoss(),
        list(model3.parameters()),
        data,
        fisher_type="empirical",
        kfac_approx="reduce",
        check_deterministic=False,
    )
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        inverse3 = KFACInverseLinearOperator.from_state_dict(inv_state, K3)
    assert_close(inverse3 @ v, expected_inv)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_old_checkpoints_with_enums_still_load(cls):
    """Checkpoints written before the change hold enum members; they keep loading."""
    model, K = problem(cls, fisher_type=FisherType.TYPE2)
    v = torch.randn(K.shape[1], dtype=DT)
    expected = K @ v
    state = K.state_dict()
    state["fisher_type"] = FisherType.TYPE2
    state["kfac_approx"] = KFACType.EXPAND
    old = roundtrip(state, weights_only=False)
    assert isinstance(old["fisher_type"], FisherType)
    model2 = relu_mlp(seed=5)
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        K2 = cls.from_state_dict(old, model2, list(model2.parameters()), classification_data())
    assert_close(K2 @ v, expected)
    assert roundtrip(K2.state_dict())["fisher_type"] == "type-2"  # re-saved as a string


# ----------------------------------------------------------------- model left as it was
class WithBuffers(nn.Module):
    """An MLP with a training-mode BatchNorm (buffers) and a user hook."""

    def __init__(self, fail_on_call=None):
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.lin2 = nn.Linear(4, 3)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def forward(self, x):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("boom in forward")
        return self.lin2(torch.tanh(self.norm(self.lin1(x))))


@pytest.mark.parametrize(
    "cls, fisher_type",
    [(KFACLinearOperator, t) for t in ("type-2", "mc", "empirical", "forward-only")]
    + [(EKFACLinearOperator, t) for t in ("type-2", "mc", "empirical")],  # no forward-only
    ids=lambda x: getattr(x, "__name__", x),
)
def test_model_left_unchanged(cls, fisher_type):
    torch.manual_seed(0)
    model = WithBuffers().to(DT)
    model.lin1.register_forward_hook(lambda *args: None)
    params = [model.lin1.weight, model.lin1.bias, model.lin2.weight]
    model.lin2.weight.grad = torch.ones_like(model.lin2.weight)
    data = classification_data()
    loss = nn.CrossEntropyLoss()
    before = model_snapshot(model)
    K = cls(
        model, loss, params, data, fisher_type=fisher_type, check_deterministic=False, num_data=7
    )
    K @ torch.ones(K.shape[1], dtype=DT)
    _ = K.trace
    KFACInverseLinearOperator(K, damping=1e-2, use_exact_damping=True) @ torch.ones(
        K.shape[1], dtype=DT
    )
    assert changes(before, model) == []
    # an exception in the middle of a pass (second batch's forward) leaves it unchanged too
    failing = WithBuffers(fail_on_call=2).to(DT)
    failing.load_state_dict(model.state_dict())
    failing.lin1.register_forward_pre_hook(lambda *args: None)
    params = [failing.lin1.weight, failing.lin2.weight, failing.lin2.bias]
    K = cls(
        failing,
        loss,
        params,
        data,
        fisher_type=fisher_type,
        check_deterministic=False,
        num_data=7,
    )
    before = model_snapshot(failing)
    with pytest.raises(RuntimeError, match="boom in forward"):
        K @ torch.ones(K.shape[1], dtype=DT)
    assert changes(before, failing) == []


# ----------------------------------------------------------------- audit of the other entry points
def test_other_argument_ranges():
    from curvlinops.diagonal.exact import DiagonalLinearOperator
    from curvlinops.fisher import make_grad_output_sampler
    from curvlinops.kfac_utils import extract_averaged_patches, extract_patches
    from curvlinops.sampling import normal, rademacher, random_vector

    x = torch.randn(2, 4, 5, 5, dtype=DT)
    for fn in (extract_patches, extract_averaged_patches):
        for kwargs, name in (
            (dict(kernel_size=0), "kernel_size"),
            (dict(kernel_size=(3, -1)), "kernel_size"),
            (dict(stride=0), "stride"),
            (dict(dilation=0), "dilation"),
            (dict(padding=-1), "padding"),
            (dict(kernel_size=2.5), "kernel_size"),
            (dict(groups=0), "groups"),
            (dict(groups=1.5), "groups"),
        ):
            args = dict(kernel_size=3, stride=1, padding=1, dilation=1, groups=1)
            args.update(kwargs)
            with pytest.raises(ValueError, match=name):
                fn(x, **args)
    for fn in (rademacher, normal):
        for bad in (-1, 2.5, "3"):
            with pytest.raises(ValueError, match="dim must be a non-negative integer"):
                fn(bad, "cpu", DT)
    with pytest.raises(ValueError, match="dim"):
        random_vector(-2, "normal", "cpu", DT)
    assert rademacher(0, "cpu", DT).shape == (0,)
    _, K = problem()
    for flag in ("use_heuristic_damping", "use_exact_damping", "cache", "retry_double_precision"):
        with pytest.raises(ValueError, match=f"{flag} must be True or False"):
            KFACInverseLinearOperator(K, damping=1e-2, **{flag: "no"})
    diagonal = DiagonalLinearOperator([torch.ones(3, dtype=DT)])
    for bad in (float("nan"), float("inf"), "1", None):
        with pytest.raises(ValueError, match="damping must be a finite number"):
            diagonal.inverse(bad)
    sampler = make_grad_output_sampler(nn.CrossEntropyLoss())
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_samples"):
            sampler(torch.zeros(2, 3, dtype=DT), bad, torch.tensor([0, 1]), None)


def test_ekfac_checkpoint_of_other_parameter_order_is_refused():
    """EKFAC's corrected eigenvalues are keyed by parameter position: another order is refused."""
    model = relu_mlp()
    data = classification_data()
    params = list(model.parameters())
    source = EKFACLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    densify(source)
    state = source.state_dict()
    model2 = relu_mlp(seed=3)
    shuffled = list(reversed(list(model2.parameters())))
    target = EKFACLinearOperator(model2, nn.CrossEntropyLoss(), shuffled, data)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    dense_before = densify(target)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="parameter position"):
        target.load_state_dict(state)
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in before.items())
    assert_close(densify(target), dense_before)


def test_num_per_example_loss_terms_must_fit_the_outputs():
    """A wrong explicit count would silently mis-scale mean-reduced factors."""
    model = relu_mlp(d_out=2)
    data = regression_data(shape=(3,))  # 3 loss terms per data point
    params = list(model.parameters())
    with pytest.raises(ValueError, match="num_per_example_loss_terms=2"):
        KFACLinearOperator(model, nn.MSELoss(), params, data, num_per_example_loss_terms=2)
    K = KFACLinearOperator(model, nn.MSELoss(), params, data, num_per_example_loss_terms=3)
    assert_close(densify(K), densify(KFACLinearOperator(model, nn.MSELoss(), params, data)))


def test_cholesky_path_refuses_numerically_singular_factors():
    """Cross-entropy gradient factors are singular (rows of softmax - onehot sum to zero).

    Cholesky often passes them with a round-off pivot and returns 1e16-sized inverses; the
    inverse must refuse them, naming the damping, as when the factorisation fails.
    """
    v = None
    for seed in range(6):
        model = relu_mlp(seed=seed)
        data = classification_data(num_batches=3, batch=8, seed=seed)
        K = KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
        v = torch.ones(K.shape[1], dtype=DT)
        with pytest.raises(RuntimeError, match="damping"):
            KFACInverseLinearOperator(K, damping=0.0) @ v
        result = KFACInverseLinearOperator(K, damping=1e-3) @ v
        assert torch.isfinite(result).all() and result.abs().max() < 1e8


def test_fisher_mc_and_diagonal_leave_model_unchanged():
    """MC-Fisher and its exact diagonal draw from their own generator (eval-mode model)."""
    torch.manual_seed(0)
    model = WithBuffers().to(DT).eval()
    model.lin2.register_forward_hook(lambda *args: None)
    model.lin1.weight.grad = torch.ones_like(model.lin1.weight)
    params = [model.lin1.weight, model.lin2.bias]
    data = classification_data()
    before = model_snapshot(model)
    F = FisherMCLinearOperator(model, nn.CrossEntropyLoss(), params, data, mc_samples=2)
    F @ torch.ones(F.shape[1], dtype=DT)
    fisher_mc_diagonal(model, nn.CrossEntropyLoss(), params, data, mc_samples=2)
    diagonal = FisherMCDiagonalLinearOperator(model, nn.CrossEntropyLoss(), params, data).diagonal
    assert len(diagonal) == len(params)
    assert changes(before, model) == []


def test_bad_seed_assigned_later_is_reported():
    model = relu_mlp()
    params, data = list(model.parameters()), classification_data()
    F = FisherMCLinearOperator(model, nn.CrossEntropyLoss(), params, data)
    F._seed = 0.5
    with pytest.raises(ValueError, match="_seed must be an integer"):
        F @ torch.ones(F.shape[1], dtype=DT)
    F._seed = 3  # the idiom op._seed += 1 keeps working
    F._seed += 1
    F @ torch.ones(F.shape[1], dtype=DT)


@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_determinism_check_leaves_global_rng_unchanged(cls):
    model = relu_mlp()
    state = torch.get_rng_state()
    cls(model, nn.CrossEntropyLoss(), list(model.parameters()), classification_data())
    assert torch.equal(state, torch.get_rng_state())
