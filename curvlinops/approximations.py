r"""The function API of ``torch_secorder.approximations``, computed from per-sample gradients.

A user of ``torch_secorder`` switches by changing one import::

    from curvlinops.approximations import empirical_fisher_diagonal  # was torch_secorder...

Names, parameters and return types are those of ``torch_secorder``. The numbers follow this
library's definitions, stated in each docstring. In short, with :math:`N` data points,
:math:`C` outputs per data point, per-sample Jacobians :math:`\mathbf{J}_n` and per-sample loss
gradients :math:`\mathbf{g}_n`:

- ``empirical_fisher_diagonal`` / ``_trace``: :math:`\frac{1}{c}\sum_n \mathbf{g}_n^{\odot 2}`
  (and its sum), with :math:`c = N` for mean cross-entropy, :math:`NC` for mean MSE/BCE,
  1 for sum reduction: the diagonal of :class:`~curvlinops.EFLinearOperator`. ``torch_secorder``
  squares the *mini-batch* gradient :math:`(\sum_n \mathbf{g}_n)^{\odot 2}`, which is not a
  Fisher; the trace is exact here, so ``num_samples`` is accepted and unused.
- ``gauss_newton_matrix_approximation``: :math:`\mathrm{diag}(\sum_n \mathbf{J}_n^\top
  \mathbf{J}_n)`, the Gauss-Newton matrix of :math:`\frac{1}{2}\sum_n \|f_n - y_n\|^2` (no
  factor 2 and no mean normalisation, as in ``torch_secorder``), for MSE-type losses only.
- ``generalized_fisher_diagonal`` / ``_trace``: the diagonal of the Fisher of the mean negative
  log-likelihood of a categorical model with logits ``outputs``,
  :math:`\frac{1}{N}\sum_n \mathrm{diag}(\mathbf{J}_n^\top (\mathrm{diag}(\mathbf{p}_n) -
  \mathbf{p}_n\mathbf{p}_n^\top) \mathbf{J}_n)` (exact expectation over the model's labels,
  so ``targets`` only fix the batch size and ``num_samples`` is unused).

All results are exact per-sample computations (no squared mini-batch gradients, no
Hutchinson noise). Parameters are ``[p for p in model.parameters() if p.requires_grad]``; one
that does not influence the output raises a ``ValueError``.
"""

import numbers
from typing import Callable, Iterable, List

import torch
from einops import rearrange
from torch import Tensor, nn

from curvlinops._losses import is_supported_loss, loss_strategy
from curvlinops.diagonal.exact import ef_diagonal, squared_gradient_sum

__all__ = [
    "empirical_fisher_diagonal",
    "empirical_fisher_trace",
    "gauss_newton_matrix_approximation",
    "generalized_fisher_diagonal",
    "generalized_fisher_trace",
]

MAX_ELEMENTS = 2**24


def _trainable(model: nn.Module) -> List[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no parameters that require gradients.")
    return params


def _check_num_samples(num_samples) -> None:
    """``num_samples`` is unused (the traces are exact) but must still be a positive integer."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise ValueError(
            f"num_samples must be a positive integer, got {num_samples!r} "
            f"({type(num_samples).__name__})."
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}.")


def _check_batch(inputs, targets, targets_optional: bool = False) -> None:
    """``inputs`` and ``targets`` must be tensors with the same number of data points.

    ``targets_optional``: ``None`` is accepted for targets the function does not use.
    """
    if targets is None and targets_optional:
        targets = inputs
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
        if value.ndim == 0:
            raise ValueError(f"{name} must have a leading batch axis, got a 0-d tensor.")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"inputs have {inputs.shape[0]} data points but targets {targets.shape[0]}; pass "
            "the targets of exactly these inputs (same first axis)."
        )
    if inputs.shape[0] == 0:
        raise ValueError("inputs and targets are empty (0 data points); pass at least one.")


def _check_reachable(model: nn.Module, outputs: Tensor, params: List[Tensor]):
    """Raise a ``ValueError`` naming the parameters that ``outputs`` do not depend on."""
    if not outputs.requires_grad:
        raise ValueError(
            "outputs do not depend on any model parameter; compute them with gradients enabled."
        )
    grads = torch.autograd.grad(
        outputs, params, torch.ones_like(outputs), retain_graph=True, allow_unused=True
    )
    if any(g is None for g in grads):
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [names.get(id(p), "?") for p, g in zip(params, grads) if g is None]
        raise ValueError(
            f"The parameters {missing} do not influence the model output, so their curvature "
            "is undefined here. Set requires_grad=False on them or remove them from the model."
        )


def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
) -> List[Tensor]:
    r"""Diagonal of the empirical Fisher from per-sample gradients.

    :math:`\frac{1}{c}\sum_n (\nabla_{\boldsymbol{\theta}} \ell_n)^{\odot 2}` with
    :math:`\ell_n` the sum-reduced loss of data point :math:`n` (per loss term for sequence
    outputs) and :math:`c = N` (mean cross-entropy), :math:`NC` (mean MSE/BCE) or 1 (sum).

    Args:
        model: The network.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: Inputs ``[N, ...]``.
        targets: Targets.

    Returns:
        The diagonal, one tensor per trainable parameter.

    Raises:
        ValueError: If a parameter does not influence the output.
        NotImplementedError: For other losses.
    """
    _check_batch(inputs, targets)
    params = _trainable(model)
    with torch.enable_grad():
        _check_reachable(model, model(inputs), params)
    return ef_diagonal(model, loss_fn, params, [(inputs, targets)])


def empirical_fisher_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    num_samples: int = 1,
) -> Tensor:
    """Trace of the empirical Fisher, exactly (the sum of :func:`empirical_fisher_diagonal`).

    Args:
        model: The network.
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
        inputs: Inputs ``[N, ...]``.
        targets: Targets.
        num_samples: Accepted for compatibility; the trace is exact, so it is unused.

    Returns:
        The trace (0-d tensor).

    Raises:
        ValueError: If ``num_samples`` is not positive or a parameter is unreachable.
    """
    _check_num_samples(num_samples)
    return sum(d.sum() for d in empirical_fisher_diagonal(model, loss_fn, inputs, targets))


def gauss_newton_matrix_approximation(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    create_graph: bool = False,
) -> Iterable[Tensor]:
    r"""Diagonal of the Gauss-Newton matrix :math:`\mathbf{J}^\top\mathbf{J}` of least squares.

    :math:`\mathrm{diag}(\sum_n \mathbf{J}_n^\top\mathbf{J}_n)`, the sum of squared Jacobian
    entries per parameter, i.e. the Gauss-Newton matrix of :math:`\frac{1}{2}\sum_n \|f(x_n) -
    y_n\|^2` (no mean normalisation).

    Args:
        model: The network.
        loss_fn: An MSE-type loss (``nn.MSELoss``).
        inputs: Inputs ``[N, ...]``.
        targets: Targets (unused by the Gauss-Newton matrix of least squares).
        create_graph: Keep the result differentiable w.r.t. the parameters.

    Returns:
        The diagonal, one tensor per trainable parameter.

    Raises:
        ValueError: If ``loss_fn`` is not MSE-based or a parameter is unreachable.
    """
    if not (is_supported_loss(loss_fn) and loss_strategy(loss_fn).least_squares):
        raise ValueError(
            f"The Gauss-Newton matrix J^T J is defined for least-squares (MSE) losses, got "
            f"{type(loss_fn).__name__}. Use curvlinops.diagonal.exact.ggn_diagonal for others."
        )
    _check_batch(inputs, targets, targets_optional=True)
    params = _trainable(model)
    with torch.enable_grad():
        outputs = model(inputs)
        _check_reachable(model, outputs, params)
    B, entries = outputs.shape[0], outputs[0].numel()
    eye = torch.eye(entries, dtype=outputs.dtype, device=outputs.device)
    one_hot = eye.reshape(1, entries, 1, *outputs.shape[1:]).expand(B, -1, -1, *outputs.shape[1:])
    return squared_gradient_sum(model, params, inputs, one_hot, detach=not create_graph)


def generalized_fisher_diagonal(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    create_graph: bool = False,
) -> List[Tensor]:
    r"""Diagonal of the Fisher of the mean negative log-likelihood of a categorical model.

    :math:`\frac{1}{N}\sum_n \sum_c (\mathbf{J}_n^\top \mathbf{s}_{n,c})^{\odot 2}` with
    :math:`\mathbf{s}_{n,c}` the columns of :math:`\mathrm{diag}(\sqrt{\mathbf{p}_n}) -
    \mathbf{p}_n\sqrt{\mathbf{p}_n}^\top`, a square root of the softmax cross-entropy Hessian
    (the exact expectation over labels drawn from the model). Per-sample gradients come from
    the graph of ``outputs``, all data points and classes in batched backward passes.

    Args:
        model: The network that produced ``outputs``.
        outputs: Logits ``[N, C]`` (with their graph).
        targets: Class labels ``[N]`` (only checked against ``outputs``).
        loss_type: ``"nll"``.
        create_graph: Keep the result differentiable.

    Returns:
        The diagonal, one tensor per trainable parameter.

    Raises:
        NotImplementedError: For another ``loss_type`` or outputs that are not 2-d.
        ValueError: If ``targets`` do not match ``outputs`` or a parameter is unreachable.
    """
    if loss_type != "nll":
        raise NotImplementedError(f"loss_type {loss_type!r} is not supported; use 'nll'.")
    if not isinstance(outputs, Tensor):
        raise ValueError(f"outputs must be a torch.Tensor of logits, got {type(outputs).__name__}.")
    if outputs.ndim != 2:
        raise NotImplementedError(
            f"Expected logits of shape [N, C], got {list(outputs.shape)}; flatten sequence "
            "outputs into rows first."
        )
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}.")
    if targets.ndim == 0 or targets.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"targets have {targets.shape[0] if targets.ndim else 'no'} entries but outputs "
            f"{outputs.shape[0]} rows; pass the labels of exactly these outputs."
        )
    params = _trainable(model)
    _check_reachable(model, outputs, params)
    N, C = outputs.shape
    # column c of the cross-entropy Hessian square root of datum n, [N, c, C]
    sqrt_columns = loss_strategy(nn.CrossEntropyLoss()).hessian_sqrt_columns(outputs.detach())
    columns = rearrange(sqrt_columns, "c n k -> n c k")
    D = sum(param.numel() for param in params)
    chunk = max(1, MAX_ELEMENTS // D)
    totals = [torch.zeros_like(param) for param in params]
    for start in range(0, N * C, chunk):
        pairs = torch.arange(start, min(N * C, start + chunk), device=columns.device)
        rows, cols = pairs // C, pairs % C  # one backpropagated vector per (datum, column)
        cotangents = torch.zeros(len(pairs), N, C, dtype=columns.dtype, device=columns.device)
        cotangents[torch.arange(len(pairs), device=columns.device), rows] = columns[rows, cols]
        grads = torch.autograd.grad(
            outputs,
            params,
            cotangents,
            retain_graph=True,
            create_graph=create_graph,
            is_grads_batched=True,
        )
        totals = [t + (g**2).sum(0) for t, g in zip(totals, grads)]
    return [t / N for t in totals]


def generalized_fisher_trace(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    num_samples: int = 1,
    create_graph: bool = False,
) -> Tensor:
    """Trace of the generalized Fisher, exactly (the sum of :func:`generalized_fisher_diagonal`).

    Args:
        model: The network that produced ``outputs``.
        outputs: Logits ``[N, C]`` (with their graph).
        targets: Class labels ``[N]``.
        loss_type: ``"nll"``.
        num_samples: Accepted for compatibility; the trace is exact, so it is unused.
        create_graph: Keep the result differentiable.

    Returns:
        The trace (0-d tensor).

    Raises:
        ValueError: If ``num_samples`` is not positive.
    """
    _check_num_samples(num_samples)
    diagonal = generalized_fisher_diagonal(model, outputs, targets, loss_type, create_graph)
    return sum(d.sum() for d in diagonal)
