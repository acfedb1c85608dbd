"""Independent dense references built with plain autograd (no curvlinops code).

All functions take ``(model, loss_func, params, data, batch_size_fn=None)`` and return dense
tensors in the parameters' dtype. Parameters are flattened row-major in ``params`` order.
The risk is L(θ) = Σ_b w_b ℓ_b with w_b = 1 ("sum") or B_b / N ("mean").

``nn.MultiheadAttention`` dispatches to a fused attention kernel without double backward, so every
reference runs under the math SDPA backend (same function, differentiable twice).
"""

import functools
from contextlib import contextmanager
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextmanager
def _math_attention():
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _batch_size(X, batch_size_fn):
    return X.shape[0] if batch_size_fn is None else batch_size_fn(X)


def batch_weights(loss_func, data, batch_size_fn=None, num_data=None) -> List[float]:
    """w_b per batch (section 0 of the contract)."""
    sizes = [_batch_size(X, batch_size_fn) for X, _ in data]
    N = sum(sizes) if num_data is None else num_data
    if loss_func.reduction == "sum":
        return [1.0 for _ in sizes]
    assert loss_func.reduction == "mean"
    return [B / N for B in sizes]


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _grad_flat(out: Tensor, params, create_graph=False) -> Tensor:
    """Flattened gradient of a scalar; keeps the graph (references differentiate repeatedly)."""
    if not out.requires_grad:
        return torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
    grads = torch.autograd.grad(
        out, params, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return _flat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


def risk(model, loss_func, data, batch_size_fn=None, num_data=None) -> Tensor:
    """L(θ) with the autograd graph attached."""
    weights = batch_weights(loss_func, data, batch_size_fn, num_data)
    return sum(w * loss_func(model(X), y) for w, (X, y) in zip(weights, data))


def gradient_and_loss(model, loss_func, params, data, batch_size_fn=None):
    """(∇L as a list shaped like params, L) via autograd."""
    with _math_attention():
        L = risk(model, loss_func, data, batch_size_fn)
        grads = torch.autograd.grad(L, params)
    return [g.detach() for g in grads], L.detach()


def hessian(model, loss_func, params, data, batch_size_fn=None, num_data=None) -> Tensor:
    """Dense Hessian of the risk, row by row with double backward."""
    with _math_attention():
        L = risk(model, loss_func, data, batch_size_fn, num_data)
        g = _grad_flat(L, params, create_graph=True)
        rows = [_grad_flat(g[i], params) for i in range(g.numel())]
    return torch.stack(rows).detach()


def block_diagonal(H: Tensor, params, block_sizes) -> Tensor:
    """Zero all entries of H coupling different consecutive parameter groups."""
    assert sum(block_sizes) == len(params)
    numels = [p.numel() for p in params]
    out = torch.zeros_like(H)
    start_param, start = 0, 0
    for size in block_sizes:
        width = sum(numels[start_param : start_param + size])
        out[start : start + width, start : start + width] = H[
            start : start + width, start : start + width
        ]
        start_param += size
        start += width
    return out


def _jacobian_of_output(f: Tensor, params) -> Tensor:
    """[f.numel(), D] Jacobian, one reverse pass per output entry (row-major output order)."""
    f_flat = f.reshape(-1)
    rows = [_grad_flat(f_flat[i], params) for i in range(f_flat.numel())]
    return torch.stack(rows)


def jacobian(model, params, data) -> Tensor:
    """J of shape [N·∏S, D]: data points in order, then output entries row-major."""
    blocks = []
    with _math_attention():
        for X, _ in data:
            blocks.append(_jacobian_of_output(model(X), params))
    return torch.cat(blocks).detach()


def output_hessian(loss_func, f: Tensor, y: Tensor) -> Tensor:
    """∇²_f ℓ(f, y) for all entries of f, as a [f.numel(), f.numel()] matrix."""
    f0 = f.detach()
    H = torch.autograd.functional.hessian(lambda out: loss_func(out, y), f0)
    return H.reshape(f0.numel(), f0.numel())


def ggn(model, loss_func, params, data, batch_size_fn=None) -> Tensor:
    """Σ_b w_b J_bᵀ (∇²_f ℓ_b) J_b."""
    weights = batch_weights(loss_func, data, batch_size_fn)
    D = sum(p.numel() for p in params)
    G = torch.zeros(D, D, dtype=params[0].dtype)
    with _math_attention():
        for w, (X, y) in zip(weights, data):
            f = model(X)
            J = _jacobian_of_output(f, params)
            G += w * J.T @ output_hessian(loss_func, f, y) @ J
    return G.detach()


def flatten_2d(loss_func, f: Tensor, y: Tensor):
    """The flattened 2-d view of an output and its labels (section 0 of the contract)."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        C = f.shape[1]
        f2 = f.movedim(1, -1).reshape(-1, C)
        if y.dtype.is_floating_point and y.shape == f.shape:  # probability targets
            y2 = y.movedim(1, -1).reshape(-1, C)
        else:
            y2 = y.reshape(-1)
        return f2, y2
    C = f.shape[-1]
    return f.reshape(-1, C), y.reshape(-1, C)


def row_loss(loss_func, f_row: Tensor, y_row: Tensor) -> Tensor:
    """Sum-reduced loss of one row of the flattened 2-d view."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return F.cross_entropy(
            f_row.unsqueeze(0),
            y_row.unsqueeze(0),
            reduction="sum",
            label_smoothing=loss_func.label_smoothing,
        )
    if isinstance(loss_func, nn.MSELoss):
        return ((f_row - y_row) ** 2).sum()
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        return F.binary_cross_entropy_with_logits(f_row, y_row, reduction="sum")
    raise NotImplementedError(type(loss_func))


def empirical_fisher(model, loss_func, params, data, batch_size_fn=None) -> Tensor:
    """Σ_b w_b (1/c_b) Σ_r g_r g_rᵀ over the rows of the flattened 2-d view."""
    weights = batch_weights(loss_func, data, batch_size_fn)
    D = sum(p.numel() for p in params)
    E = torch.zeros(D, D, dtype=params[0].dtype)
    with _math_attention():
        for w, (X, y) in zip(weights, data):
            f2, y2 = flatten_2d(loss_func, model(X), y)
            R, C = f2.shape
            if loss_func.reduction == "sum":
                c = 1.0
            elif isinstance(loss_func, nn.CrossEntropyLoss):
                c = R
            else:
                c = R * C
            G = torch.stack(
                [_grad_flat(row_loss(loss_func, f2[r], y2[r]), params) for r in range(R)]
            )
            E += (w / c) * G.T @ G
    return E.detach()


def finite_difference_hessian(
    model, loss_func, params, data, batch_size_fn=None, eps: float = 1e-5
) -> Tensor:
    """Central finite differences of the autograd gradient (for checking the references)."""
    D = sum(p.numel() for p in params)
    cols = []
    with torch.no_grad():
        theta0 = _flat(params).clone()

    def set_params(theta):
        with torch.no_grad():
            start = 0
            for p in params:
                p.copy_(theta[start : start + p.numel()].reshape(p.shape))
                start += p.numel()

    def grad_at(theta):
        set_params(theta)
        with _math_attention():
            L = risk(model, loss_func, data, batch_size_fn)
            return _grad_flat(L, params).detach()

    try:
        for d in range(D):
            e = torch.zeros_like(theta0)
            e[d] = eps
            cols.append((grad_at(theta0 + e) - grad_at(theta0 - e)) / (2 * eps))
    finally:
        set_params(theta0)
    return torch.stack(cols, dim=1)


def assert_close(
    actual: Tensor,
    expected: Tensor,
    rtol: float = 1e-10,
    atol_scale: float = 1e-12,
    scale: Optional[float] = None,
):
    """Relative comparison: ``rtol`` elementwise plus an absolute floor ``atol_scale · scale``.

    ``scale`` defaults to max|expected| (entries far below the largest one are compared
    absolutely, which is what roundoff in a sum of products allows).
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() > 0 else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol_scale * max(scale, 1e-300))


def rel_fro_error(A: Tensor, B: Tensor) -> float:
    """‖A − B‖_F / ‖B‖_F."""
    return ((A - B).norm() / B.norm()).item()


def assert_list_close(actual, expected, **kwargs):
    """``assert_close`` entry by entry, with the absolute floor set by the whole list."""
    assert isinstance(actual, list), type(actual)
    assert len(actual) == len(expected)
    scale = max(e.abs().max().item() for e in expected if e.numel() > 0)
    for a, e in zip(actual, expected):
        assert_close(a, e, scale=kwargs.pop("scale", scale), **kwargs)


def flatten_list(tensors) -> Tensor:
    return _flat(tensors)


def unflatten(vec: Tensor, shapes, trailing: Optional[int] = None) -> List[Tensor]:
    """Split a flat [D] (or [D, K] with ``trailing=K``) tensor into tensors of the given shapes."""
    out, start = [], 0
    for s in shapes:
        n = int(torch.Size(s).numel())
        chunk = vec[start : start + n]
        out.append(chunk.reshape(tuple(s)) if trailing is None else chunk.reshape(*s, trailing))
        start += n
    return out


def apply_batch_product(fn, shapes, M: Tensor, *args) -> Tensor:
    """Call a ``make_batch_*`` helper's function as ``fn(*args, *M_list)`` on a flat ``[D, K]``
    matrix, check that it returns a tuple of ``[*p.shape, K]`` tensors, and flatten it back."""
    K = M.shape[1]
    out = fn(*args, *unflatten(M, shapes, trailing=K))
    assert isinstance(out, tuple)
    assert [t.shape for t in out] == [torch.Size((*s, K)) for s in shapes]
    return torch.cat([t.reshape(-1, K) for t in out])


def densify(op) -> Tensor:
    """op @ I (the idiom of the contract, section 15)."""
    return op @ torch.eye(op.shape[1], dtype=op.dtype, device=op.device)


@functools.cache
def _cached(kind: str, name: str, reduction: str) -> Tensor:
    from cases import make_case

    c = make_case(name, reduction)
    args = (c.model, c.loss_func, c.params, c.data, c.batch_size_fn)
    if kind == "hessian":
        return hessian(*args)
    if kind == "ggn":
        return ggn(*args)
    if kind == "ef":
        return empirical_fisher(*args)
    if kind == "jacobian":
        return jacobian(c.model, c.params, c.data)
    raise ValueError(kind)


def cached_reference(kind: str, name: str, reduction: str = "mean") -> Tensor:
    """Dense reference ("hessian", "ggn", "ef", "jacobian") of ``make_case(name, reduction)``."""
    return _cached(kind, name, reduction).clone()
