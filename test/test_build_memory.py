"""Memory of the KFAC, EKFAC and KFAC-inverse builds (issue 14, "Speed II").

Structural checks: the data passes do not keep layer outputs or the autograd graph alive
after their backward pass, and the factor and inverse computations stay within a bound on
the bytes they allocate (counted by the PyTorch profiler's allocation events), where the
old code made copies (identity matrices, transposed patches and gradients, concatenations).
No timing and no resident-set measurement.
"""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity, profile

from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
from curvlinops._blocks import damped_spd_inverse
from curvlinops._calls import CallPass
from curvlinops._kfac_factors import input_factor, rows_gram, unit_gradient_factor
from curvlinops._layer_pass import LayerPass, OutputNode, output_gradient_rows
from curvlinops._losses import loss_strategy

DT = torch.float64


def peak_allocated_bytes(fn):
    """Peak of the bytes allocated and not yet freed during ``fn()``, and its result."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return peak, result


def cnn(inplace: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(5 * 6 * 6, 3),
    ).to(DT)


def cnn_data(batch_size=4):
    torch.manual_seed(1)
    return torch.randn(batch_size, 3, 6, 6, dtype=DT), torch.randint(0, 3, (batch_size,))


def output_tracker(model):
    """Forward hooks keeping weak references to every module output."""
    refs = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    return refs


def saved_tracker():
    """Saved-tensor hooks keeping weak references to the tensors autograd saves."""
    refs = []

    def pack(tensor):
        refs.append(weakref.ref(tensor))
        return tensor

    return refs, saved_tensors_hooks(pack, lambda tensor: tensor)


def vectors_fn(loss_func):
    strategy = loss_strategy(loss_func)

    def vectors(X, y, output, f_flat, y_flat):
        return strategy.row_gradients(f_flat.detach(), y_flat).unsqueeze(0)

    return strategy, vectors


@pytest.mark.parametrize("max_columns", [1, 16])
def test_call_pass_keeps_no_outputs_and_frees_the_graph(max_columns):
    """After a batch's backward, no layer output and no saved tensor of the graph is alive.

    The old pass kept every output (and a copy for the next layer) in its uses, which also
    kept the graph with all its saved activations alive while the factors were computed.
    """
    model, (X, y) = cnn(), cnn_data()
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    kfac = KFACLinearOperator(
        model, loss_func, list(model.parameters()), [(X, y)], check_deterministic=False
    )
    strategy, vectors = vectors_fn(loss_func)
    call_pass = CallPass(model, kfac._units, strategy.to_rows, strategy.flatten_labels, max_columns)
    outputs = output_tracker(model)
    saved, hooks = saved_tracker()
    with hooks:
        batches = call_pass.run_calls([(X, y)], vectors)
        batch = next(batches)
    gc.collect()
    assert batch.backpropagated
    assert all(use.output is None for uses in batch.uses.values() for use in uses)
    assert len(outputs) == 3 and all(ref() is None for ref in outputs)
    # the graph is freed: of the tensors autograd saved, only parameters and the input
    # (held here) are alive (e.g. not the ReLU output, which the old pass kept alive)
    held = {p.data_ptr() for p in model.parameters()} | {X.data_ptr()}
    alive = [ref() for ref in saved if ref() is not None]
    assert len(saved) > 3
    assert all(t.data_ptr() in held for t in alive), [tuple(t.shape) for t in alive]
    batches.close()


def test_layer_pass_keeps_no_outputs():
    """The layer pass (EKFAC, exact diagonals) keeps gradient edges, not layer outputs."""
    model, (X, y) = cnn(), cnn_data()
    loss_func = nn.CrossEntropyLoss(reduction="sum")
    strategy, vectors = vectors_fn(loss_func)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    layer_pass = LayerPass(model, layers, strategy.to_rows, strategy.flatten_labels, 16)
    outputs = output_tracker(model)
    batches = layer_pass.run([(X, y)], list(layers), lambda name, x: x, vectors)
    batch = next(batches)
    gc.collect()
    assert set(batch.grads) == set(layers)
    assert len(outputs) == 3 and all(ref() is None for ref in outputs)
    batches.close()


def test_in_place_activation_without_output_copy():
    """In-place activations after a layer: same factors as out-of-place ones (no copy needed)."""
    X, y = cnn_data()
    factors = []
    for inplace in (False, True):
        model = cnn(inplace)
        kfac = KFACLinearOperator(
            model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)], fisher_type="type-2"
        )
        kfac.compute_kronecker_factors()
        G = {f"G {name}": value for name, value in kfac._gradient_covariances.items()}
        factors.append({**kfac._input_covariances, **G})
    for key in factors[0]:
        torch.testing.assert_close(factors[0][key], factors[1][key], rtol=1e-12, atol=1e-14)


def test_output_node_of_tensor_without_graph():
    """Tensors without a gradient edge stay themselves (forward-only and constant outputs)."""
    t = torch.ones(2)
    assert OutputNode.of(t) is t
    leaf = torch.ones(2, requires_grad=True)
    assert OutputNode.of(leaf) is leaf
    node = OutputNode.of(leaf * 2)
    assert isinstance(node, OutputNode) and node.shape == (2,)


def test_conv_factors_without_transposing_copies():
    """Conv input and gradient factors allocate less than one more copy of patches/gradients.

    The old code copied all patches into ``[d, B L]`` and the gradients twice (rows, then a
    concatenation of the single use).
    """
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1).to(DT)
    x = torch.randn(32, 8, 16, 16, dtype=DT)
    patches_bytes = 32 * (8 * 9) * (16 * 16) * 8
    factor_bytes = (8 * 9) ** 2 * 8
    peak, A = peak_allocated_bytes(lambda: input_factor(conv, x, False, False, 32))
    assert peak <= patches_bytes * (1 + 0.3) + 2 * factor_bytes, peak / patches_bytes
    U = torch.nn.functional.unfold(x, 3, padding=1)
    rows = U.transpose(1, 2).reshape(-1, 8 * 9)
    torch.testing.assert_close(A, rows.T @ rows / (32 * 256), rtol=1e-12, atol=1e-14)

    g = torch.randn(1, 32, 16, 16, 16, dtype=DT)  # [V, B, C, H, W]
    g_rows = output_gradient_rows(conv, g)
    peak, G = peak_allocated_bytes(lambda: rows_gram(g_rows))
    assert peak <= 0.3 * g.numel() * 8 + 2 * 16 * 16 * 8, peak / (g.numel() * 8)
    flat = g.movedim(2, -1).reshape(-1, 16)
    torch.testing.assert_close(G, flat.T @ flat, rtol=1e-12, atol=1e-12)


def test_unit_gradient_factor_of_several_uses_without_concatenation():
    """A unit used twice: the sum of both uses' Gramians (no copy of all rows)."""
    model, (X, y) = cnn(), cnn_data()
    kfac = KFACLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)], check_deterministic=False
    )
    unit = kfac._units["0"]

    class FakeUse:
        def __init__(self, grad):
            self.grad, self.weight, self.bias, self.batch_first = grad, True, True, True

    torch.manual_seed(3)
    grads = [torch.randn(2, 4, 4, 6, 6, dtype=DT) for _ in range(2)]
    G = unit_gradient_factor(unit, [FakeUse(g) for g in grads], False, False)
    flat = torch.cat([g.movedim(2, -1).reshape(-1, 4) for g in grads])
    torch.testing.assert_close(G, flat.T @ flat, rtol=1e-12, atol=1e-12)
    G_reduce = unit_gradient_factor(unit, [FakeUse(g) for g in grads], True, False)
    summed = sum(g.flatten(3).sum(3) for g in grads).reshape(-1, 4)
    torch.testing.assert_close(G_reduce, summed.T @ summed, rtol=1e-12, atol=1e-12)


def test_cholesky_inverse_holds_two_matrices():
    """The damped Cholesky inverse allocates at most about two matrices of the factor's size.

    The old code built an identity, the damped sum, the Cholesky factor and the inverse
    (four matrices alive at once).
    """
    torch.manual_seed(4)
    n = 200
    M = torch.randn(n, n, dtype=DT)
    M = M @ M.T
    peak, inverse = peak_allocated_bytes(lambda: damped_spd_inverse(M, 0.5, "factor", True))
    assert peak <= 2.2 * n * n * 8, peak / (n * n * 8)
    torch.testing.assert_close(inverse, torch.linalg.inv(M + 0.5 * torch.eye(n, dtype=DT)))


def test_exact_inverse_unchanged():
    """The exactly damped KFAC inverse is still ``(K + delta I)^{-1}``."""
    model, (X, y) = cnn(), cnn_data()
    params = list(model.parameters())
    kfac = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], fisher_type="type-2")
    eye = torch.eye(kfac.shape[1], dtype=DT)
    dense = kfac @ eye
    inverse = KFACInverseLinearOperator(kfac, damping=0.1, use_exact_damping=True)
    # (K + delta I)^{-1} K = I - delta (K + delta I)^{-1}
    expected = eye - 0.1 * torch.linalg.inv(dense + 0.1 * eye)
    torch.testing.assert_close(inverse @ dense, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cholesky_inverse_refuses_non_finite_factor(bad):
    """The finiteness check without a copy of the Cholesky factor still catches NaN/inf."""
    M = torch.eye(4, dtype=DT)
    M[1, 2] = M[2, 1] = bad
    with pytest.raises(RuntimeError):
        damped_spd_inverse(M, 0.1, "factor", False)


def test_chunked_backward_writes_into_one_result():
    """Vectors backpropagated in several chunks give the factors of one chunk."""
    model, (X, y) = cnn(), cnn_data()
    factors = []
    for max_columns in (16, 2):
        kfac = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            list(model.parameters()),
            [(X, y)],
            fisher_type="type-2",  # 3 vectors per row: 2 chunks with max_columns=2
            check_deterministic=False,
        )
        kfac.MAX_COLUMNS_PER_CHUNK = max_columns
        kfac.compute_kronecker_factors()
        factors.append(dict(kfac._gradient_covariances))
    for name in factors[0]:
        torch.testing.assert_close(factors[0][name], factors[1][name], rtol=1e-12, atol=1e-14)
