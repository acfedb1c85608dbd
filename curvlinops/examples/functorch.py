r"""Dense reference matrices of curvature quantities, built with ``torch.func``/autograd.

These functions materialise curvature matrices explicitly and are meant for testing and
for small problems. All batches of ``data`` are concatenated into one big batch
:math:`(\mathbf{X}, \mathbf{y})` on the parameters' device, and the loss
:math:`L(\boldsymbol{\theta}) = \ell(f(\mathbf{X}, \boldsymbol{\theta}), \mathbf{y})` is
evaluated with the loss function's own reduction (so ``"mean"`` averages over all data).
:math:`\boldsymbol{\theta} \in \mathbb{R}^D` is the concatenation of the flattened
``params`` (row-major, in list order); rows and columns of the returned matrices follow
this order.

- Hessian: :math:`\nabla^2_{\boldsymbol{\theta}} L`, computed by double backward (row
  :math:`d` is :math:`\nabla_{\boldsymbol{\theta}} [\nabla_{\boldsymbol{\theta}} L]_d`).
- GGN: :math:`\mathbf{J}^\top (\nabla^2_{\mathbf{f}} \ell) \mathbf{J}` with
  :math:`\mathbf{J} = \partial \mathbf{f} / \partial \boldsymbol{\theta}` the Jacobian of
  all output entries, i.e. the Hessian of the loss of the model linearised at
  :math:`\boldsymbol{\theta}`.
- Empirical Fisher: :math:`\frac{1}{c} \sum_r \mathbf{g}_r \mathbf{g}_r^\top` over the rows
  :math:`r` of the flattened 2-d output view, with :math:`\mathbf{g}_r` the gradient of the
  sum-reduced loss of row :math:`r` (divided by :math:`\sqrt{C}` for mean-reduced
  ``MSELoss``/``BCEWithLogitsLoss``) and :math:`c` the number of rows (mean) or 1 (sum).
- Jacobian: :math:`\partial \mathbf{f} / \partial \boldsymbol{\theta}` with rows ordered by
  data point, then output entry (row-major).

Note:
    Second derivatives are computed with reverse-over-reverse autograd (double backward of
    ``torch.autograd.grad``), not with ``torch.func.hessian``; the tests check them against
    finite differences (see the documentation for the torch versions this matters for).
"""

from collections.abc import Callable, Iterable, MutableMapping
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import jacrev
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops._autodiff import make_functional_model, second_order_context
from curvlinops._losses import check_reduction, loss_strategy

_CHUNK_SIZE = 256


def _resolve_parameters(model_func: nn.Module, params: List[Tensor]) -> List[Tensor]:
    """The parameters of ``model_func`` that ``params`` stand for.

    Parameters are identified by object identity, as in every operator; at this boundary a
    ``.data`` view of a parameter (same storage, not the object itself) is resolved to its
    parameter once, so that the references accept both.

    Args:
        model_func: The model.
        params: Parameters of ``model_func`` or ``.data`` views of them.

    Returns:
        The parameter objects, in ``params`` order.

    Raises:
        ValueError: If a tensor neither is nor shares its storage with a parameter.
    """
    own = list(model_func.parameters())
    by_id = {id(p): p for p in own}
    by_storage = {}
    for p in own:
        by_storage.setdefault((p.data_ptr(), p.shape, p.stride()), p)
    resolved = []
    for i, p in enumerate(params):
        match = by_id.get(id(p))
        if match is None:
            match = by_storage.get((p.data_ptr(), p.shape, p.stride()))
        if match is None:
            raise ValueError(
                f"params[{i}] is not a parameter of model_func and does not share its storage "
                "with one. Pass tensors from model_func.parameters()."
            )
        resolved.append(match)
    return resolved


def _concatenate_data(
    data: Iterable, input_key: Optional[str], device: torch.device
) -> Tuple[Union[Tensor, Dict[str, Tensor]], Tensor]:
    """Concatenate all batches into one batch on the given device.

    Args:
        data: Iterable of ``(X, y)`` batches.
        input_key: Key of the model input if ``X`` is dict-like.
        device: Target device.

    Returns:
        The concatenated input (a tensor, or ``{input_key: tensor}`` for dict-like inputs)
        and the concatenated labels.

    Raises:
        ValueError: If ``X`` is dict-like and ``input_key`` is missing, or if ``data`` is
            empty.
    """
    Xs, ys, is_dict = [], [], False
    for X, y in data:
        if isinstance(X, MutableMapping):
            if input_key is None:
                raise ValueError("input_key is required for dict-like inputs X.")
            if input_key not in X:
                raise ValueError(f"input_key {input_key!r} not found in X.")
            X, is_dict = X[input_key], True
        Xs.append(X.to(device))
        ys.append(y.to(device))
    if not Xs:
        raise ValueError("data contains no batches.")
    X, y = torch.cat(Xs), torch.cat(ys)
    return ({input_key: X} if is_dict else X), y


def _setup(
    model_func: nn.Module,
    params: List[Tensor],
    data: Iterable,
    input_key: Optional[str],
) -> Tuple[Callable[[Tensor], Tensor], Tensor, Union[Tensor, Dict[str, Tensor]], Tensor]:
    """Build the model output as a function of the flattened parameters.

    Args:
        model_func: The model.
        params: Parameters of ``model_func``.
        data: Iterable of ``(X, y)`` batches.
        input_key: Key of the model input if ``X`` is dict-like.

    Returns:
        ``(output_fn, theta, X, y)``: a function mapping flattened parameters to the model
        output on the concatenated input ``X``, the current flattened parameters (detached)
        and the concatenated data.
    """
    params = _resolve_parameters(model_func, params)
    model = make_functional_model(model_func, params)
    (device,) = {p.device for p in params}
    X, y = _concatenate_data(data, input_key, device)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().flatten() for p in params])

    def output_fn(theta: Tensor) -> Tensor:
        """Evaluate the model with the given flattened parameters.

        Args:
            theta: Flattened parameters ``[D]``.

        Returns:
            The model output on the concatenated input.
        """
        values = [t.reshape(s) for t, s in zip(theta.split(sizes), shapes)]
        return model(values, X)

    return output_fn, theta, X, y


def _hessian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Compute the Hessian of a scalar function of a vector by double backward.

    Args:
        fn: Scalar-valued function of ``x``.
        x: Point ``[n]`` at which the Hessian is evaluated.

    Returns:
        The Hessian ``[n, n]``.
    """
    x = x.detach().requires_grad_(True)
    with second_order_context():
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        if not g.requires_grad:  # gradient independent of x
            return torch.zeros(x.numel(), x.numel(), device=x.device, dtype=x.dtype)
        eye = torch.eye(x.numel(), device=x.device, dtype=x.dtype)
        rows = []
        for start in range(0, x.numel(), _CHUNK_SIZE):
            (rows_chunk,) = torch.autograd.grad(
                g,
                x,
                eye[start : start + _CHUNK_SIZE],
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
                materialize_grads=True,
            )
            rows.append(rows_chunk)
    return torch.cat(rows).detach()


def functorch_hessian(
    model_func: nn.Module,
    loss_func: nn.Module,
    params: List[Tensor],
    data: Iterable,
    input_key: Optional[str] = None,
) -> Tensor:
    r"""Compute the Hessian :math:`\nabla^2_{\boldsymbol{\theta}} L` on all data.

    Args:
        model_func: The model.
        loss_func: The loss function (any reduction-``mean``/``sum`` loss module).
        params: Parameters of ``model_func`` (matched by identity; ``.data`` views are accepted).
        data: Iterable of ``(X, y)`` batches, concatenated into one batch.
        input_key: Key of the model input if ``X`` is dict-like. Default: ``None``.

    Returns:
        The Hessian ``[D, D]``.
    """
    output_fn, theta, _, y = _setup(model_func, params, data, input_key)
    return _hessian(lambda t: loss_func(output_fn(t), y), theta)


def _jacobian(output_fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """Compute the Jacobian of all output entries w.r.t. the flattened parameters.

    Args:
        output_fn: Function mapping flattened parameters to the model output.
        theta: Flattened parameters ``[D]``.

    Returns:
        The Jacobian ``[output.numel(), D]`` (output entries row-major).
    """
    with second_order_context():
        J = jacrev(lambda t: output_fn(t).flatten())(theta.detach())
    return J.detach()


def functorch_ggn(
    model_func: nn.Module,
    loss_func: nn.Module,
    params: List[Tensor],
    data: Iterable,
    input_key: Optional[str] = None,
) -> Tensor:
    r"""Compute the generalised Gauss-Newton matrix on all data.

    :math:`\mathbf{G} = \mathbf{J}^\top (\nabla^2_{\mathbf{f}} \ell) \mathbf{J}`, the Hessian
    of the loss of the model linearised at the current parameters, with the Hessian taken
    w.r.t. *all* entries of the (concatenated) model output.

    Args:
        model_func: The model.
        loss_func: The loss function (any reduction-``mean``/``sum`` loss module).
        params: Parameters of ``model_func`` (matched by identity; ``.data`` views are accepted).
        data: Iterable of ``(X, y)`` batches, concatenated into one batch.
        input_key: Key of the model input if ``X`` is dict-like. Default: ``None``.

    Returns:
        The GGN ``[D, D]``.
    """
    output_fn, theta, _, y = _setup(model_func, params, data, input_key)
    with torch.no_grad():
        output = output_fn(theta)
    J = _jacobian(output_fn, theta)
    H_out = _hessian(lambda f: loss_func(f.reshape(output.shape), y), output.detach().flatten())
    return J.T @ H_out @ J


def functorch_gradient_and_loss(
    model_func: nn.Module,
    loss_func: nn.Module,
    params: List[Tensor],
    data: Iterable,
    input_key: Optional[str] = None,
) -> Tuple[List[Tensor], Tensor]:
    r"""Compute the gradient :math:`\nabla_{\boldsymbol{\theta}} L` and the loss :math:`L`.

    Args:
        model_func: The model.
        loss_func: The loss function.
        params: Parameters of ``model_func`` (matched by identity; ``.data`` views are accepted).
        data: Iterable of ``(X, y)`` batches, concatenated into one batch.
        input_key: Key of the model input if ``X`` is dict-like. Default: ``None``.

    Returns:
        The gradient (a list of tensors shaped like ``params``) and the loss (a scalar).
    """
    output_fn, theta, _, y = _setup(model_func, params, data, input_key)
    theta = theta.requires_grad_(True)
    with torch.enable_grad():
        loss = loss_func(output_fn(theta), y)
        (grad,) = torch.autograd.grad(loss, theta, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(theta)
    grads = [g.reshape(p.shape) for g, p in zip(grad.split([p.numel() for p in params]), params)]
    return grads, loss.detach()


def functorch_empirical_fisher(
    model_func: nn.Module,
    loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
    params: List[Tensor],
    data: Iterable,
    input_key: Optional[str] = None,
) -> Tensor:
    r"""Compute the empirical Fisher on all data.

    With the flattened 2-d view of the output (rows :math:`r`, :math:`C` columns), let
    :math:`\ell_r` be the sum-reduced loss of row :math:`r` (the sum of the elementary
    losses of the row's label entries; CE: one per row) and
    :math:`\mathbf{g}_r = \nabla_{\boldsymbol{\theta}} \ell_r`, divided by :math:`\sqrt{C}`
    for mean-reduced ``MSELoss``/``BCEWithLogitsLoss``. Then

    .. math::
        \mathbf{F} = \frac{1}{R} \sum_{r=1}^R \mathbf{g}_r \mathbf{g}_r^\top
        \quad (\text{mean}), \qquad
        \mathbf{F} = \sum_{r=1}^R \mathbf{g}_r \mathbf{g}_r^\top \quad (\text{sum}).

    Args:
        model_func: The model.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: Parameters of ``model_func`` (matched by identity; ``.data`` views are accepted).
        data: Iterable of ``(X, y)`` batches, concatenated into one batch.
        input_key: Key of the model input if ``X`` is dict-like. Default: ``None``.

    Returns:
        The empirical Fisher ``[D, D]``.

    Raises:
        NotImplementedError: If the loss function is not supported.
        ValueError: If the loss reduction is not ``"mean"`` or ``"sum"``.
    """
    strategy = loss_strategy(loss_func, "functorch_empirical_fisher")
    check_reduction(loss_func)
    output_fn, theta, _, y = _setup(model_func, params, data, input_key)
    y_flat = strategy.flatten_labels(y)

    def row_losses(t: Tensor) -> Tensor:
        """The sum-reduced loss of every row of the flattened output at parameters ``t``."""
        return strategy.row_losses(strategy.to_rows(output_fn(t)), y_flat)

    with second_order_context():
        G = jacrev(row_losses)(theta).detach()  # [R, D]
    if loss_func.reduction == "sum":
        return G.T @ G
    num_classes = strategy.to_rows(output_fn(theta).detach()).shape[1]
    G = G / strategy.mean_correction(num_classes)
    return G.T @ G / G.shape[0]


def functorch_jacobian(
    model_func: nn.Module,
    params: List[Tensor],
    data: Iterable,
    input_key: Optional[str] = None,
) -> Tensor:
    r"""Compute the Jacobian of the model output w.r.t. the parameters on all data.

    Args:
        model_func: The model.
        params: Parameters of ``model_func`` (matched by identity; ``.data`` views are accepted).
        data: Iterable of ``(X, y)`` batches, concatenated into one batch (``y`` unused).
        input_key: Key of the model input if ``X`` is dict-like. Default: ``None``.

    Returns:
        The Jacobian ``[N * prod(S), D]`` with rows ordered by data point, then output entry
        (row-major), where ``S`` is the per-datum output shape.
    """
    output_fn, theta, _, _ = _setup(model_func, params, data, input_key)
    return _jacobian(output_fn, theta)


def blocks_to_matrix(blocks: Dict[str, Dict[str, Tensor]]) -> Tensor:
    """Assemble a nested dictionary of blocks into a matrix.

    ``blocks[name_i][name_j]`` is the block of parameters ``i`` and ``j`` (for example as
    returned by ``torch.func.hessian`` for a function of a parameter dictionary, with shape
    ``[*shape_i, *shape_j]``). Block rows and columns are ordered like ``blocks``' keys.

    Args:
        blocks: The nested dictionary of blocks.

    Returns:
        The assembled 2-d matrix.
    """
    names = list(blocks.keys())
    num_rows = {name: int(round(blocks[name][name].numel() ** 0.5)) for name in names}
    block_rows = [
        torch.cat(
            [blocks[name_i][name_j].reshape(num_rows[name_i], -1) for name_j in names],
            dim=1,
        )
        for name_i in names
    ]
    return torch.cat(block_rows, dim=0)
