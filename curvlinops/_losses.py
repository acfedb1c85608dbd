r"""Loss-function conventions shared by the operators.

**Reductions.** Every loss-based operator reads the loss's ``reduction``; only ``'mean'`` and
``'sum'`` are supported.

**Flattened 2-d view.** Gradient-outer-product operators (empirical Fisher, Monte-Carlo Fisher,
KFAC) treat each *row* of the flattened output as one independent loss term: for
``CrossEntropyLoss`` the class axis is axis 1, so an output ``[B, C, *S]`` becomes
``[B * prod(S), C]`` (batch outermost, positions row-major) and labels ``[B, *S]`` become
``[B * prod(S)]``; for ``MSELoss`` and ``BCEWithLogitsLoss`` the last axis holds the features,
so ``[B, *S, C]`` becomes ``[B * prod(S), C]`` and labels are flattened alike. With
:math:`R_b` rows of :math:`C` entries, the mini-batch loss is the sum of the row losses divided
by :math:`c_b = 1` (sum), :math:`R_b` (cross-entropy, mean) or :math:`R_b C` (MSE/BCE, mean).

**Sampled output gradients.** For the row loss :math:`\ell_r` (sum-reduced),
:math:`\mathbb{E}[\hat{\mathbf{g}} \hat{\mathbf{g}}^\top] = \nabla^2_{\mathbf{f}_r} \ell_r` with

- MSE: :math:`\tilde{\mathbf{y}} = \mathbf{f} + \sqrt{1/2}\,\boldsymbol{\epsilon}`,
  :math:`\hat{\mathbf{g}} = 2(\mathbf{f} - \tilde{\mathbf{y}}) = -\sqrt{2}\,\boldsymbol{\epsilon}`,
  :math:`\boldsymbol{\epsilon} \sim \mathcal{N}(\mathbf{0}, \mathbf{I})`;
- cross-entropy: :math:`\tilde{y} \sim \mathrm{Categorical}(\mathrm{softmax}(\mathbf{f}))`,
  :math:`\hat{\mathbf{g}} = \mathrm{softmax}(\mathbf{f}) - \mathrm{onehot}(\tilde{y})`;
- BCE: :math:`\tilde{\mathbf{y}} \sim \mathrm{Bernoulli}(\sigma(\mathbf{f}))` entry-wise,
  :math:`\hat{\mathbf{g}} = \sigma(\mathbf{f}) - \tilde{\mathbf{y}}`.

:func:`draw_labels` is the single sampling routine: the Monte-Carlo Fisher and KFAC's
``draw_label`` both use it, so operators built with the same seed see the same samples.
"""

import copy
from math import sqrt
from typing import Optional, Tuple

import torch
from torch import Generator, Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

SUPPORTED_LOSSES = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)


class UnsupportedReductionError(ValueError, KeyError):
    """A loss reduction other than ``'mean'`` or ``'sum'``.

    Derives from ``ValueError`` and from ``KeyError`` (what 3.0.1 raised) so that code
    catching either keeps working.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def check_reduction(loss_func) -> str:
    """Return the loss's reduction after checking that it is ``'mean'`` or ``'sum'``.

    Args:
        loss_func: The loss function.

    Returns:
        The reduction.

    Raises:
        UnsupportedReductionError: If the reduction is missing or unsupported.
    """
    reduction = getattr(loss_func, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise UnsupportedReductionError(
            f"Loss reduction must be 'mean' or 'sum', got {reduction!r} from "
            f"{type(loss_func).__name__}. Construct the loss with reduction='mean' or "
            "'sum' (reduction='none' is not supported)."
        )
    return reduction


def check_supported_loss(loss_func, operator: str):
    """Raise ``NotImplementedError`` unless the loss is MSE, cross-entropy or BCE-with-logits.

    Args:
        loss_func: The loss function.
        operator: Name of the operator, for the message.
    """
    if not isinstance(loss_func, SUPPORTED_LOSSES):
        raise NotImplementedError(
            f"{operator} supports {', '.join(c.__name__ for c in SUPPORTED_LOSSES)}; got "
            f"{type(loss_func).__name__}."
        )


def check_sampling_options(loss_func, operator: str):
    """Reject loss options that the sampled output gradients would silently ignore.

    Args:
        loss_func: The loss function.
        operator: Name of the operator, for the message.

    Raises:
        NotImplementedError: For weighted, label-smoothed or ``ignore_index`` cross-entropy
            and weighted BCE.
    """
    unsupported = []
    if isinstance(loss_func, CrossEntropyLoss):
        if loss_func.weight is not None:
            unsupported.append("weight")
        if loss_func.ignore_index != -100:
            unsupported.append("ignore_index")
        if loss_func.label_smoothing != 0.0:
            unsupported.append("label_smoothing")
    elif isinstance(loss_func, BCEWithLogitsLoss):
        if loss_func.weight is not None:
            unsupported.append("weight")
        if loss_func.pos_weight is not None:
            unsupported.append("pos_weight")
    if unsupported:
        raise NotImplementedError(
            f"{operator} samples from the plain likelihood of {type(loss_func).__name__} "
            f"and cannot honour its {', '.join(unsupported)}; use the loss's defaults."
        )


def _class_axis(loss_func, num_leading: int) -> int:
    """Axis holding the classes/features of an output with ``num_leading`` extra axes."""
    return num_leading + 1 if isinstance(loss_func, CrossEntropyLoss) else -1


def to_rows(loss_func, T: Tensor, num_leading: int = 0) -> Tensor:
    """View an output-shaped tensor as rows of loss terms ``[*leading, R, C]``.

    Args:
        loss_func: The loss function (decides which axis holds the classes/features).
        T: Tensor shaped like a batch output, with ``num_leading`` extra leading axes.
        num_leading: Number of extra leading axes (e.g. a column axis) to keep.

    Returns:
        The rows, batch outermost and positions in row-major order.
    """
    if T.ndim == num_leading + 1:  # scalar outputs [B]: one entry per row
        T = T.unsqueeze(-1)
    axis = _class_axis(loss_func, num_leading)
    moved = T.movedim(axis, -1)
    return moved.reshape(*T.shape[:num_leading], -1, moved.shape[-1])


def from_rows(loss_func, rows: Tensor, shape: torch.Size, num_leading: int = 0) -> Tensor:
    """Inverse of :func:`to_rows`: restore the output shape ``shape`` (incl. leading axes)."""
    axis = _class_axis(loss_func, num_leading)
    moved_shape = list(shape)
    moved_shape.append(moved_shape.pop(axis))
    return rows.reshape(moved_shape).movedim(-1, axis)


def flatten_labels(loss_func, y: Tensor) -> Tensor:
    """Flatten labels like :func:`to_rows` flattens outputs.

    Args:
        loss_func: The loss function.
        y: Labels with leading batch axis.

    Returns:
        ``[R]`` class indices (cross-entropy) or ``[R, C]`` (class probabilities, MSE, BCE).
    """
    if isinstance(loss_func, CrossEntropyLoss) and not y.is_floating_point():
        return y.reshape(-1)
    return to_rows(loss_func, y)


def flatten_output_and_labels(loss_func, output: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """Flatten a batch's output and labels into the 2-d view of loss terms.

    Args:
        loss_func: The loss function (decides which axis holds the classes/features).
        output: The model output with leading batch axis.
        y: The labels.

    Returns:
        Output ``[R, C]`` and labels ``[R]`` (class indices) or ``[R, C]``.
    """
    return to_rows(loss_func, output), flatten_labels(loss_func, y)


def num_terms_normalization(loss_func, output_flat: Tensor) -> float:
    """Divisor ``c_b`` turning the sum of row losses into the mini-batch loss.

    Args:
        loss_func: The loss function.
        output_flat: The flattened output ``[R, C]``.

    Returns:
        1 for sum reduction, ``R`` for mean cross-entropy, ``R * C`` for mean MSE/BCE.
    """
    if check_reduction(loss_func) == "sum":
        return 1.0
    if isinstance(loss_func, CrossEntropyLoss):
        return float(output_flat.shape[0])
    return float(output_flat.numel())


def sum_reduced(loss_func):
    """A copy of the loss with ``reduction='sum'`` (other options kept)."""
    loss_sum = copy.copy(loss_func)
    loss_sum.reduction = "sum"
    return loss_sum


def row_loss_gradients(loss_func, output_flat: Tensor, y_flat: Tensor) -> Tensor:
    """Gradients of each row's sum-reduced loss w.r.t. that row of the output.

    Args:
        loss_func: The loss function.
        output_flat: The flattened output ``[R, C]``.
        y_flat: The flattened labels.

    Returns:
        ``[R, C]`` with row ``r`` equal to the gradient of loss term ``r``.
    """
    f = output_flat.detach().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(sum_reduced(loss_func)(f, y_flat), f)
    return grad


def check_binary_targets(y: Tensor, what: str):
    """Raise ``NotImplementedError`` if BCE targets are not all 0 or 1."""
    if not torch.logical_or(y == 0, y == 1).all():
        raise NotImplementedError(
            f"{what} with BCEWithLogitsLoss requires binary targets (0 or 1); got "
            "non-binary values."
        )


def loss_hessian_sqrt_columns(loss_func, output_flat: Tensor) -> Tensor:
    """Columns of a square root of each row's sum-reduced loss Hessian, ``[C, R, C]``.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        output_flat: The flattened output ``[R, C]``.

    Returns:
        ``S[c, r]`` is column ``c`` of row ``r``'s square root.
    """
    R, C = output_flat.shape
    eye = torch.eye(C, dtype=output_flat.dtype, device=output_flat.device)
    if isinstance(loss_func, MSELoss):
        return sqrt(2.0) * eye.unsqueeze(1).expand(C, R, C)
    if isinstance(loss_func, CrossEntropyLoss):
        p = output_flat.softmax(dim=1)
        # column c of diag(sqrt p) - p sqrt(p)^T is sqrt(p_c) (e_c - p)
        return p.sqrt().T.unsqueeze(-1) * (eye.unsqueeze(1) - p.unsqueeze(0))
    sigma = output_flat.sigmoid()
    return eye.unsqueeze(1) * (sigma * (1 - sigma)).sqrt().unsqueeze(0)


def seeded_generator(generator: Optional[Generator], device: torch.device, seed: int) -> Generator:
    """``generator`` (or a new one if missing or on another device) re-seeded with ``seed``.

    The Monte-Carlo Fisher and KFAC re-seed at the start of every pass over the data, which is
    what couples their samples.
    """
    if generator is None or generator.device != device:
        generator = torch.Generator(device=device)
    return generator.manual_seed(seed)


def draw_labels(
    loss_func, output_flat: Tensor, num_samples: int, generator: Optional[Generator]
) -> Tensor:
    """Sample labels from the likelihood that the loss defines for each output row.

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        output_flat: The flattened output ``[R, C]`` (detached).
        num_samples: Number of samples ``M``.
        generator: Random number generator.

    Returns:
        ``[M, R]`` class indices (cross-entropy) or ``[M, R, C]`` labels.
    """
    if output_flat.ndim != 2:
        raise ValueError(
            f"Expected a 2-d output [rows, classes], got shape {list(output_flat.shape)}."
        )
    if isinstance(loss_func, MSELoss):
        noise = torch.randn(
            (num_samples, *output_flat.shape),
            generator=generator,
            dtype=output_flat.dtype,
            device=output_flat.device,
        )
        return output_flat + sqrt(0.5) * noise
    if isinstance(loss_func, CrossEntropyLoss):
        probs = output_flat.softmax(dim=1)
        return torch.multinomial(probs, num_samples, replacement=True, generator=generator).T
    if isinstance(loss_func, BCEWithLogitsLoss):
        probs = output_flat.sigmoid().expand(num_samples, *output_flat.shape)
        return torch.bernoulli(probs, generator=generator)
    raise NotImplementedError(f"Cannot sample labels for {type(loss_func).__name__}.")


def sample_grad_outputs(
    loss_func, output_flat: Tensor, num_samples: int, generator: Optional[Generator]
) -> Tensor:
    """Sampled gradients of the row losses w.r.t. the output rows (see module docstring).

    Args:
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        output_flat: The flattened output ``[R, C]`` (detached).
        num_samples: Number of samples ``M``.
        generator: Random number generator.

    Returns:
        ``[M, R, C]`` sampled output gradients.
    """
    labels = draw_labels(loss_func, output_flat, num_samples, generator)
    if isinstance(loss_func, MSELoss):
        return 2 * (output_flat - labels)
    if isinstance(loss_func, CrossEntropyLoss):
        onehot = torch.nn.functional.one_hot(labels, output_flat.shape[1])
        return output_flat.softmax(dim=1) - onehot.to(output_flat.dtype)
    return output_flat.sigmoid() - labels
