"""Misuse of the data-driven operators (issue 12): every misuse raises a clear error, and no
construction or product changes the model (parameters, buffers, hooks, ``.grad``, train/eval
mode) or the global random number generator, also when it raises half-way."""

import sys
import threading

import pytest
import torch
from model_state import changes, snapshot
from torch import nn

from curvlinops import (
    CGInverseLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvlinops.diagonal.exact import GGNDiagonalLinearOperator

DT = torch.float64
BATCH_SIZES = (3, 2, 4)
LOSS_OPERATORS = [
    HessianLinearOperator,
    GGNLinearOperator,
    EFLinearOperator,
    FisherMCLinearOperator,
]
JACOBIANS = [JacobianLinearOperator, TransposedJacobianLinearOperator]
ALL_FAMILIES = LOSS_OPERATORS + JACOBIANS + [KFACLinearOperator, GGNDiagonalLinearOperator]


def make_problem(batch_norm: bool = False, seed: int = 0):
    """A small float64 MLP (optionally with batch norm in training mode), CE loss, 3 batches."""
    gen = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)]
    if batch_norm:
        layers.insert(1, nn.BatchNorm1d(4))
    model = nn.Sequential(*layers).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    data = [
        (torch.randn(B, 3, generator=gen, dtype=DT), torch.randint(0, 3, (B,), generator=gen))
        for B in BATCH_SIZES
    ]
    return model, nn.CrossEntropyLoss(), data


def weights(model):
    """The parameters of the linear layers (KFAC supports these)."""
    return [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]


def build(cls, model, loss_func, params, data, **kwargs):
    if cls in JACOBIANS:
        return cls(model, params, data, **kwargs)
    return cls(model, loss_func, params, data, **kwargs)


def vector(A, seed=1):
    return torch.randn(A.shape[1], generator=torch.Generator().manual_seed(seed), dtype=DT)


# ------------------------------------------------------------------------------------------------
# 1. one-shot iterators as data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL_FAMILIES)
def test_generator_data_is_rejected(cls):
    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match=r"one-shot iterator.*list.*DataLoader"):
        build(cls, model, loss_func, weights(model), (batch for batch in data))


class DataThatRunsDry:
    """Re-iterable in form, but only the first ``passes`` iterations yield batches."""

    def __init__(self, data, passes):
        self.data, self.passes = data, passes

    def __iter__(self):
        self.passes -= 1
        return iter(self.data if self.passes >= 0 else [])


@pytest.mark.parametrize("cls", [GGNLinearOperator, FisherMCLinearOperator, KFACLinearOperator])
def test_a_pass_without_batches_raises(cls):
    model, loss_func, data = make_problem()
    dry = DataThatRunsDry(data, 100)
    A = build(cls, model, loss_func, weights(model), dry, check_deterministic=False)
    dry.passes = 0  # the data runs dry from now on
    if cls is KFACLinearOperator:  # the factors are computed on the first pass
        with pytest.raises(ValueError, match=r"no batch.*list.*DataLoader"):
            A.compute_kronecker_factors()
        return
    with pytest.raises(ValueError, match=r"no batch.*list.*DataLoader"):
        A @ vector(A)


# ------------------------------------------------------------------------------------------------
# 2. parameters replaced after construction
# ------------------------------------------------------------------------------------------------
def _replace_by_load_state_dict(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def _replace_by_assignment(model):
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())


@pytest.mark.parametrize("replace", [_replace_by_load_state_dict, _replace_by_assignment])
@pytest.mark.parametrize("cls", LOSS_OPERATORS + [TransposedJacobianLinearOperator])
def test_replaced_parameters_raise(cls, replace):
    model, loss_func, data = make_problem()
    A = build(cls, model, loss_func, list(model.parameters()), data)
    v = vector(A)
    A @ v
    replace(model)
    with pytest.raises(RuntimeError, match=r"params\[0\].*replaced.*Rebuild the operator"):
        A @ v


def test_replaced_parameters_raise_with_cache():
    model, loss_func, data = make_problem()
    A = GGNLinearOperator(model, loss_func, list(model.parameters()), data).cache()
    v = vector(A)
    A @ v
    _replace_by_assignment(model)
    with pytest.raises(RuntimeError, match=r"Rebuild"):
        A @ v


def test_in_place_parameter_changes_are_fine():
    model, loss_func, data = make_problem()
    A = GGNLinearOperator(model, loss_func, list(model.parameters()), data)
    v = vector(A)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    fresh = GGNLinearOperator(model, loss_func, list(model.parameters()), data)
    torch.testing.assert_close(A @ v, fresh @ v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 3. the same tensor twice in params
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", LOSS_OPERATORS + JACOBIANS + [KFACLinearOperator])
def test_duplicate_params_name_both_positions(cls):
    model, loss_func, data = make_problem()
    W = model[0].weight
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] are the same tensor"):
        build(cls, model, loss_func, [W, model[0].bias, W], data)


# ------------------------------------------------------------------------------------------------
# 6. thread safety
# ------------------------------------------------------------------------------------------------
def test_products_from_several_threads_are_correct():
    model, loss_func, data = make_problem()
    params = list(model.parameters())
    operators = [
        GGNLinearOperator(model, loss_func, params, data),
        HessianLinearOperator(model, loss_func, params, data),
        EFLinearOperator(model, loss_func, params[2:], data),
    ]
    vectors = [vector(A, seed=i) for i, A in enumerate(operators)]
    expected = [A @ v for A, v in zip(operators, vectors)]
    errors, failures = [], []

    def work(i):
        try:
            for _ in range(15):
                result = operators[i] @ vectors[i]
                if not torch.allclose(result, expected[i], rtol=1e-10, atol=1e-12):
                    failures.append(i)
        except Exception as e:  # reported below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(i % 3,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "products deadlocked"
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    assert not failures, f"wrong products in threads of operators {sorted(set(failures))}"
    assert all(p is q for p, q in zip(params, model.parameters()))


# ------------------------------------------------------------------------------------------------
# 9. batch norm in training mode; state left as it was
# ------------------------------------------------------------------------------------------------
def _prepared_model(batch_norm):
    model, loss_func, data = make_problem(batch_norm=batch_norm)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.train()
    model[0].eval()  # mixed modes must survive too
    return model, loss_func, data


@pytest.mark.parametrize("cls", ALL_FAMILIES)
def test_construction_and_products_leave_the_model_unchanged(cls):
    model, loss_func, data = _prepared_model(batch_norm=True)
    before = snapshot(model)
    A = build(cls, model, loss_func, weights(model), data)
    assert changes(before, model) == []
    A @ vector(A)
    A @ torch.zeros(A.shape[1], 2, dtype=DT)
    assert changes(before, model) == []


@pytest.mark.parametrize("cls", ALL_FAMILIES)
def test_errors_half_way_leave_the_model_unchanged(cls):
    model, loss_func, data = _prepared_model(batch_norm=True)
    before = snapshot(model)
    bad = [data[0], (data[1][0].clone(), data[1][1]), data[2]]
    bad[1][0][0, 0] = float("nan")  # the second batch: the first one has been evaluated
    with pytest.raises(ValueError, match=r"Batch 1: X contains NaN"):
        build(cls, model, loss_func, weights(model), bad)
    assert changes(before, model) == []
    mutable = list(data)
    A = build(cls, model, loss_func, weights(model), mutable)
    mutable[2] = (data[2][0].clone(), data[2][1])
    mutable[2][0][1, 1] = float("inf")
    if cls is KFACLinearOperator:
        with pytest.raises(ValueError, match=r"Batch 2: X contains NaN or Inf"):
            A.compute_kronecker_factors()
    elif cls is not GGNDiagonalLinearOperator:  # the diagonal was computed at construction
        with pytest.raises(ValueError, match=r"Batch 2: X contains NaN or Inf"):
            A @ vector(A)
    assert changes(before, model) == []


def test_train_mode_batch_norm_is_restored_and_products_use_batch_statistics():
    model, loss_func, data = make_problem(batch_norm=True)
    bn = model[1]
    mean, var = bn.running_mean, bn.running_var
    G = GGNLinearOperator(model, loss_func, list(model.parameters()), data)
    G @ vector(G)
    assert bn.running_mean is mean and bn.running_var is var
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(mean, torch.zeros(4, dtype=DT)) and torch.equal(var, torch.ones(4, dtype=DT))
    # the represented matrix is the GGN of the training-mode function (batch statistics)
    params = list(model.parameters())
    v = vector(G)
    dense = torch.zeros(G.shape[1], G.shape[1], dtype=DT)
    N = sum(BATCH_SIZES)
    for X, y in data:
        output = model(X)
        J = torch.stack(
            [
                torch.cat([g.flatten() for g in torch.autograd.grad(o, params, retain_graph=True)])
                for o in output.flatten()
            ]
        )
        f = output.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_func(f, y), f, create_graph=True)
        H = torch.stack(
            [torch.autograd.grad(gi, f, retain_graph=True)[0].flatten() for gi in g.flatten()]
        )
        dense += X.shape[0] / N * J.T @ H @ J
    with torch.no_grad():  # the reference's own forward passes updated the statistics
        bn.running_mean.zero_(), bn.running_var.fill_(1.0), bn.num_batches_tracked.zero_()
    torch.testing.assert_close(G @ v, dense @ v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 13. zero columns
# ------------------------------------------------------------------------------------------------
def test_zero_columns_give_empty_results():
    model, loss_func, data = make_problem()
    params = weights(model)
    G = GGNLinearOperator(model, loss_func, params, data)
    D = G.shape[1]
    operators = [
        G,
        G + G,
        2.0 * G @ G,
        HessianLinearOperator(model, loss_func, params, data),
        JacobianLinearOperator(model, params, data),
        KFACLinearOperator(model, loss_func, params, data),
        CGInverseLinearOperator(G + 0.1 * GGNLinearOperator(model, loss_func, params, data)),
    ]
    for A in operators:
        result = A @ torch.zeros(D, 0, dtype=DT)
        assert result.shape == (A.shape[0], 0)
        listed = A @ [torch.zeros(*s, 0, dtype=DT) for s in A._in_shape]
        assert [tuple(t.shape) for t in listed] == [(*s, 0) for s in A._out_shape]


# ------------------------------------------------------------------------------------------------
# 14. non-finite data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["X", "y"])
@pytest.mark.parametrize("cls", [GGNLinearOperator, HessianLinearOperator, KFACLinearOperator])
def test_non_finite_data_names_the_batch(cls, where):
    model, _, data = make_problem()
    loss_func = nn.MSELoss()
    data = [(X, torch.zeros(X.shape[0], 3, dtype=DT)) for X, _ in data]
    X, y = data[2][0].clone(), data[2][1].clone()
    (X if where == "X" else y)[0, 0] = float("inf") if where == "X" else float("nan")
    data[2] = (X, y)
    with pytest.raises(ValueError, match=rf"Batch 2: {where} contains NaN or Inf"):
        cls(model, loss_func, weights(model), data)


def test_non_finite_parameters_are_not_called_non_deterministic():
    model, loss_func, data = make_problem()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"Batch 0: the model output contains NaN or Inf"):
        GGNLinearOperator(model, loss_func, list(model.parameters()), data)


# ------------------------------------------------------------------------------------------------
# 15. malformed arguments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", LOSS_OPERATORS + JACOBIANS)
def test_data_of_another_dtype(cls):
    model, loss_func, data = make_problem()
    data = [(X.float(), y) for X, y in data]
    with pytest.raises(ValueError, match=r"Batch 0: X has dtype torch.float32.*torch.float64"):
        build(cls, model, loss_func, list(model.parameters()), data)


@pytest.mark.parametrize("cls", LOSS_OPERATORS + JACOBIANS + [KFACLinearOperator])
def test_bad_params(cls):
    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match=r"params is empty"):
        build(cls, model, loss_func, [], data)
    with pytest.raises(ValueError, match=r"params must be a list.*generator"):
        build(cls, model, loss_func, model.parameters(), data)
    with pytest.raises(ValueError, match=r"params\[1\] is a str"):
        build(cls, model, loss_func, [model[0].weight, "bias"], data)
    with pytest.raises(ValueError, match=r"params must be a list.*got Parameter"):
        build(cls, model, loss_func, model[0].weight, data)
    A = build(cls, model, loss_func, tuple(model.parameters()), data)  # tuples are fine
    assert isinstance(A._params, list)


@pytest.mark.parametrize(
    "batches, match",
    [
        (lambda d: [(X, y.tolist()) for X, y in d], r"Batch 0: y is a list.*torch.Tensor"),
        (lambda d: [(X, y, y) for X, y in d], r"Batch 0 of data has 3 entries.*\(X, y\)"),
        (lambda d: [X for X, _ in d], r"Batch 0 of data is a Tensor, not an \(X, y\) pair"),
        (lambda d: [{"x": X, "y": y} for X, y in d], r"Batch 0 of data is a dict"),
        (lambda d: [(X.tolist(), y) for X, y in d], r"Batch 0: X is a list"),
        (lambda d: d[:1] + [(d[1][0], None)], r"Batch 1: y is a NoneType"),
        (lambda d: 5, r"data must be an iterable.*int"),
    ],
)
@pytest.mark.parametrize("cls", [GGNLinearOperator, JacobianLinearOperator, KFACLinearOperator])
def test_malformed_batches(cls, batches, match):
    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match=match):
        build(cls, model, loss_func, weights(model), batches(data))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_data": -3}, r"num_data must be positive"),
        ({"num_data": 0}, r"num_data must be positive"),
        ({"num_data": 9.0}, r"num_data must be positive, got 9.0"),
        ({"num_data": True}, r"num_data must be positive, got True"),
        ({"check_deterministic": "yes"}, r"check_deterministic must be True or False"),
        ({"progressbar": None}, r"progressbar must be True or False"),
        ({"batch_size_fn": 3}, r"batch_size_fn must be callable"),
        ({"batch_size_fn": lambda X: -1}, r"batch_size_fn returned -1"),
        ({"batch_size_fn": lambda X: 2.5}, r"batch_size_fn returned 2.5"),
        ({"block_sizes": [True, 3]}, r"block_sizes \[True, 3\] must be positive"),
        ({"block_sizes": [2.0, 2.0]}, r"block_sizes \[2.0, 2.0\] must be positive"),
        ({"block_sizes": [5, -1]}, r"block_sizes \[5, -1\] must be positive"),
        ({"block_sizes": 4}, r"block_sizes 4 must be positive"),
    ],
)
def test_out_of_range_arguments(kwargs, match):
    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match=match):
        HessianLinearOperator(model, loss_func, list(model.parameters()), data, **kwargs)


def test_valid_block_sizes_and_numpy_flags_still_work():
    import numpy

    model, loss_func, data = make_problem()
    H = HessianLinearOperator(
        model,
        loss_func,
        list(model.parameters()),
        data,
        block_sizes=(2, 2),
        check_deterministic=numpy.bool_(True),
        num_data=numpy.int64(9),
    )
    assert H._block_sizes == [2, 2] and H._N_data == 9


# ------------------------------------------------------------------------------------------------
# 17. the product cache follows parameter values however they are changed
# ------------------------------------------------------------------------------------------------
def _edit_data_copy(p):
    p.data.copy_(p.data * 1.5 + 0.25)


def _edit_data_assign(p):
    p.data = p.data * 1.5 + 0.25


def _edit_in_place(p):
    with torch.no_grad():
        p.mul_(1.5).add_(0.25)


@pytest.mark.parametrize("edit", [_edit_data_copy, _edit_data_assign, _edit_in_place])
@pytest.mark.parametrize("cls", [GGNLinearOperator, HessianLinearOperator])
def test_cache_follows_parameter_edits(cls, edit):
    model, loss_func, data = make_problem()
    params = list(model.parameters())
    A = cls(model, loss_func, params, data).cache()
    v = vector(A)
    A @ v
    edit(params[0])
    fresh = cls(model, loss_func, params, data)
    torch.testing.assert_close(A @ v, fresh @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(A @ v, fresh @ v, rtol=1e-10, atol=1e-12)  # rebuilt cache


def test_cache_follows_in_place_data_edits():
    model, loss_func, data = make_problem()
    A = GGNLinearOperator(model, loss_func, list(model.parameters()), data).cache()
    v = vector(A)
    old = A @ v
    with torch.no_grad():
        data[0][0].mul_(2.0)  # bumps the version counter of the batch tensor
    fresh = GGNLinearOperator(model, loss_func, list(model.parameters()), data)
    assert not torch.allclose(fresh @ v, old)
    torch.testing.assert_close(A @ v, fresh @ v, rtol=1e-10, atol=1e-12)


def test_cache_does_not_follow_replaced_batches_as_documented():
    model, loss_func, data = make_problem()
    A = GGNLinearOperator(model, loss_func, list(model.parameters()), data).cache()
    v = vector(A)
    old = A @ v
    data[0] = (2.0 * data[0][0], data[0][1])  # a new batch object: not followed
    torch.testing.assert_close(A @ v, old, rtol=1e-10, atol=1e-12)
    A.clear_cache()
    fresh = GGNLinearOperator(model, loss_func, list(model.parameters()), data)
    assert not torch.allclose(fresh @ v, old)
    torch.testing.assert_close(A.cache() @ v, fresh @ v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# argument audit of the other public constructors and functions in the base files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", JACOBIANS)
@pytest.mark.parametrize("num_data", [8, 10])
def test_jacobian_num_data_must_match_the_data(cls, num_data):
    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match=rf"data points, but num_data={num_data}"):
        build(cls, model, loss_func, list(model.parameters()), data, num_data=num_data)
    J = build(
        cls,
        model,
        loss_func,
        list(model.parameters()),
        data,
        num_data=num_data,
        check_deterministic=False,
    )
    with pytest.raises(ValueError, match=rf"data points, but num_data={num_data}"):
        J @ torch.zeros(J.shape[1], dtype=DT)


@pytest.mark.parametrize(
    "activation, match",
    [
        (("0", "output"), r"activation must be a tuple"),
        ((0, "output", 0), r"activation\[0\] must be a module name"),
        (("0", "output", -1), r"activation\[2\].*non-negative integer, got -1"),
        (("0", "output", 0.0), r"activation\[2\].*non-negative integer, got 0.0"),
        (("0", "outputs", 0), r"'input' or 'output'"),
        (("nope", "output", 0), r"No module named 'nope'"),
    ],
)
def test_activation_hessian_arguments(activation, match):
    from curvlinops.experimental import ActivationHessianLinearOperator

    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match=match):
        ActivationHessianLinearOperator(model, loss_func, activation, data[:1])


def test_activation_hessian_one_shot_data_and_parameter_free_model():
    from curvlinops.experimental import ActivationHessianLinearOperator

    model, loss_func, data = make_problem()
    with pytest.raises(ValueError, match=r"one-shot iterator"):
        ActivationHessianLinearOperator(model, loss_func, ("0", "output", 0), iter(data[:1]))
    X, y = data[0]
    with pytest.raises(ValueError, match=r"model_func has no parameters"):
        ActivationHessianLinearOperator(nn.Tanh(), loss_func, ("", "input", 0), [(X, y)])


def test_utils_argument_checks():
    from curvlinops.utils import assert_divisible_by, assert_matvecs_subseed_dim, split_list

    with pytest.raises(ValueError, match=r"sizes must be non-negative integers"):
        split_list([1, 2, 3], [4, -1])
    with pytest.raises(ValueError, match=r"sizes must be non-negative integers"):
        split_list([1, 2, 3], [1.5, 1.5])
    assert split_list([1, 2, 3], [1, 0, 2]) == [[1], [], [2, 3]]
    A = torch.zeros(5, 5)
    for bad in [0, -2, 2.0, True]:
        with pytest.raises(ValueError, match=r"num_matvecs must be a positive integer"):
            assert_matvecs_subseed_dim(A, bad)
    with pytest.raises(ValueError, match=r"divisor of num_matvecs must be a positive integer"):
        assert_divisible_by(4, 0, "num_matvecs")


class FailingModel(nn.Module):
    """Wraps a model; its forward raises while ``fail`` is set."""

    def __init__(self, model):
        super().__init__()
        self.model, self.fail = model, False

    def forward(self, X):
        if self.fail:
            raise RuntimeError("forward failed on purpose")
        return self.model(X)


def test_a_failed_product_kept_in_a_traceback_does_not_block_other_threads():
    model, loss_func, data = make_problem(batch_norm=True)
    wrapped = FailingModel(model)
    G = GGNLinearOperator(wrapped, loss_func, list(wrapped.parameters()), data)
    v = vector(G)
    expected = G @ v
    before = snapshot(wrapped)
    wrapped.fail = True
    try:
        G @ v
    except RuntimeError as e:
        kept = e  # keeps the traceback, hence the interrupted pass over the data, alive
    wrapped.fail = False
    assert changes(before, wrapped) == []
    results = []
    thread = threading.Thread(target=lambda: results.append(G @ v))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the failed product left the model locked"
    torch.testing.assert_close(results[0], expected, rtol=1e-10, atol=1e-12)
    assert "on purpose" in str(kept)


@pytest.mark.parametrize("chunk", [0, -1, 2.5])
def test_max_columns_per_chunk_must_be_positive(chunk):
    model, loss_func, data = make_problem()
    G = GGNLinearOperator(model, loss_func, list(model.parameters()), data)
    G.MAX_COLUMNS_PER_CHUNK = chunk
    with pytest.raises(ValueError, match=r"MAX_COLUMNS_PER_CHUNK must be a positive integer"):
        G @ torch.zeros(G.shape[1], 3, dtype=DT)
