r"""Utilities for Kronecker-factored curvature approximations.

:func:`loss_hessian_matrix_sqrt` returns a symmetric factorisation of the Hessian of a
loss with respect to the model output of one datum. For an output
:math:`\mathbf{f} \in \mathbb{R}^C` and label :math:`\mathbf{y}` it returns
:math:`\mathbf{S} \in \mathbb{R}^{C \times C}` with

.. math::
    \mathbf{S} \mathbf{S}^\top = \nabla^2_{\mathbf{f}} \ell(\mathbf{f}, \mathbf{y}).

With :math:`c = 1` for ``reduction="sum"`` and :math:`c = 1/C` for ``reduction="mean"``:

- ``MSELoss``, :math:`\ell = c \sum_i (f_i - y_i)^2`: the Hessian is
  :math:`2c\,\mathbf{I}`, so :math:`\mathbf{S} = \sqrt{2c}\,\mathbf{I}`.
- ``CrossEntropyLoss``, :math:`\ell = -\log \mathrm{softmax}(\mathbf{f})_y`: the Hessian
  is :math:`\mathrm{diag}(\mathbf{p}) - \mathbf{p}\mathbf{p}^\top` with
  :math:`\mathbf{p} = \mathrm{softmax}(\mathbf{f})`, and
  :math:`\mathbf{S} = \mathrm{diag}(\sqrt{\mathbf{p}}) - \mathbf{p}\sqrt{\mathbf{p}}^\top`
  satisfies :math:`\mathbf{S}\mathbf{S}^\top = \mathrm{diag}(\mathbf{p})
  - 2\mathbf{p}\mathbf{p}^\top + \mathbf{p}(\sqrt{\mathbf{p}}^\top\sqrt{\mathbf{p}})
  \mathbf{p}^\top = \mathrm{diag}(\mathbf{p}) - \mathbf{p}\mathbf{p}^\top` because
  :math:`\sum_i p_i = 1`. (A single datum with ``reduction="mean"`` has the same loss as
  with ``"sum"``, so there is no reduction factor.)
- ``BCEWithLogitsLoss``, :math:`\ell = -c \sum_i [y_i \log \sigma(f_i) + (1 - y_i)
  \log(1 - \sigma(f_i))]`: the Hessian is
  :math:`c\,\mathrm{diag}(\sigma(\mathbf{f}) \odot (1 - \sigma(\mathbf{f})))`, so
  :math:`\mathbf{S} = \mathrm{diag}(\sqrt{c\,\sigma(\mathbf{f})
  \odot (1 - \sigma(\mathbf{f}))})`. Only binary targets are supported.

:func:`extract_patches` and :func:`extract_averaged_patches` turn the input of a convolution
into the rows that KFAC treats like inputs of a linear layer: a convolution with weight
:math:`\mathbf{W}` (``[C_out, C_in/groups, K_1, K_2]``) maps each patch
:math:`\mathbf{x}_o` of the (padded) input to :math:`\mathbf{W}_{\text{flat}}\mathbf{x}_o`
at output location :math:`o`, with patch entries ordered (channel, kernel row, kernel
column) like the flattened weight. For ``groups > 1`` the input channels are first averaged
over the groups (KFAC shares one input factor between the groups).
"""

from math import sqrt
from typing import List, Sequence, Tuple, Union

from torch import Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from torch.nn.functional import pad

from curvlinops._losses import check_reduction, loss_strategy


def loss_hessian_matrix_sqrt(
    output_one_datum: Tensor,
    target_one_datum: Tensor,
    loss_func: Union[MSELoss, CrossEntropyLoss, BCEWithLogitsLoss],
) -> Tensor:
    r"""Compute a matrix square root of the loss Hessian w.r.t. one datum's output.

    Returns :math:`\mathbf{S}` with :math:`\mathbf{S}\mathbf{S}^\top =
    \nabla^2_{\mathbf{f}} \ell(\mathbf{f}, \mathbf{y})` (see the module docstring for the
    formulas).

    Args:
        output_one_datum: Model output for one datum, shape ``[1, C]``.
        target_one_datum: Label for one datum with leading axis of size 1 (``[1]`` for
            ``CrossEntropyLoss``, ``[1, C]`` for ``MSELoss`` / ``BCEWithLogitsLoss``).
        loss_func: The loss function (``MSELoss``, ``CrossEntropyLoss`` or
            ``BCEWithLogitsLoss`` with ``reduction`` ``"mean"`` or ``"sum"``).

    Returns:
        The matrix square root of shape ``[C, C]``, in the output's dtype and device.

    Raises:
        ValueError: If the output is not ``[1, C]``, the target's leading axis is not of
            size 1, or the reduction is not ``"mean"`` or ``"sum"``.
        NotImplementedError: For unsupported losses, and for ``BCEWithLogitsLoss`` with
            targets other than 0 and 1.
    """
    if output_one_datum.ndim != 2 or output_one_datum.shape[0] != 1:
        raise ValueError(
            f"Expected output_one_datum of shape [1, C]. Got {tuple(output_one_datum.shape)}."
        )
    if target_one_datum.ndim == 0 or target_one_datum.shape[0] != 1:
        raise ValueError(
            "Expected target_one_datum with leading axis of size 1. "
            f"Got {tuple(target_one_datum.shape)}."
        )
    strategy = loss_strategy(loss_func, "loss_hessian_matrix_sqrt")
    check_reduction(loss_func)
    output = output_one_datum.detach()
    strategy.check_targets(target_one_datum.detach(), "loss_hessian_matrix_sqrt")
    # one datum has one row: the square root of the row loss Hessian divided by sqrt(c_b)
    columns = strategy.hessian_sqrt_columns(output)[:, 0, :]  # [C (column), C]
    return columns.T / sqrt(strategy.normalization(output))


_IntOrTuple = Union[int, Sequence[int]]


def _as_tuple(value: _IntOrTuple, num_dims: int, name: str, minimum: int = 1) -> Tuple[int, ...]:
    """An int or a sequence of ``num_dims`` ints as a tuple, each at least ``minimum``."""
    as_tuple = (value,) * num_dims if isinstance(value, int) else value
    try:
        as_tuple = tuple(as_tuple)
    except TypeError:
        as_tuple = None
    if (
        as_tuple is None
        or len(as_tuple) != num_dims
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in as_tuple)
        or any(v < minimum for v in as_tuple)
    ):
        raise ValueError(
            f"{name} must be an int >= {minimum} or a tuple of {num_dims} such ints, got {value!r}."
        )
    return as_tuple


def _symmetric_padding(
    padding: Union[str, _IntOrTuple], kernel_size: Tuple[int, ...], dilation: Tuple[int, ...]
) -> Tuple[int, ...]:
    """Integer padding per spatial axis; ``"same"``/``"valid"`` converted."""
    num_dims = len(kernel_size)
    if padding == "valid":
        return (0,) * num_dims
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in totals):
            raise NotImplementedError(
                f"padding='same' with kernel_size {kernel_size} and dilation {dilation} needs "
                "asymmetric padding, which is not supported. Use an odd kernel size or "
                "explicit integer padding."
            )
        return tuple(t // 2 for t in totals)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a tuple, got {padding!r}.")
    return _as_tuple(padding, num_dims, "padding", minimum=0)


def _patch_view(
    x: Tensor,
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple,
    padding: Union[str, _IntOrTuple],
    dilation: _IntOrTuple,
    groups: int,
) -> Tensor:
    """Strided view ``[B, C_in/groups, *O, *K]`` of all patches (group-averaged input)."""
    num_dims = x.ndim - 2
    if num_dims < 1:
        raise ValueError(f"Expected an input [B, C_in, *spatial], got shape {tuple(x.shape)}.")
    kernel_size = _as_tuple(kernel_size, num_dims, "kernel_size")
    stride = _as_tuple(stride, num_dims, "stride")
    dilation = _as_tuple(dilation, num_dims, "dilation")
    padding = _symmetric_padding(padding, kernel_size, dilation)
    B, C_in = x.shape[:2]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}.")
    if C_in % groups != 0:
        raise ValueError(f"C_in ({C_in}) must be divisible by groups ({groups}).")
    if groups > 1:
        x = x.reshape(B, groups, C_in // groups, *x.shape[2:]).mean(1)
    # F.pad takes (last-axis before, after, second-to-last before, after, ...)
    x = pad(x, [p for p in reversed(padding) for _ in range(2)])
    for axis, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        span = d * (k - 1) + 1
        # windows of the whole dilated span along this axis, kernel taps every d-th entry
        x = x.unfold(2 + axis, span, s)[..., ::d]
    return x


def _extract_patches_nd(
    x: Tensor,
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple,
    padding: Union[str, _IntOrTuple],
    dilation: _IntOrTuple,
    groups: int,
) -> Tensor:
    """Patches of a 1-d, 2-d or 3-d convolution input: ``[B, prod(O), (C_in/groups) prod(K)]``."""
    view = _patch_view(x, kernel_size, stride, padding, dilation, groups)
    num_dims = x.ndim - 2
    B, C = view.shape[:2]
    out_axes = list(range(2, 2 + num_dims))
    kernel_axes = list(range(2 + num_dims, 2 + 2 * num_dims))
    patches = view.permute(0, *out_axes, 1, *kernel_axes)
    num_locations = 1
    for size in view.shape[2 : 2 + num_dims]:
        num_locations *= size
    return patches.reshape(B, num_locations, -1)


def _extract_averaged_patches_nd(
    x: Tensor,
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple,
    padding: Union[str, _IntOrTuple],
    dilation: _IntOrTuple,
    groups: int,
) -> Tensor:
    """Mean patch over output locations, ``[B, (C_in/groups) prod(K)]``.

    Reduces the strided patch view directly, so the patches are never materialised.
    """
    view = _patch_view(x, kernel_size, stride, padding, dilation, groups)
    num_dims = x.ndim - 2
    return view.mean(dim=list(range(2, 2 + num_dims))).flatten(start_dim=1)


def extract_patches(
    x: Tensor,
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple,
    padding: Union[str, _IntOrTuple],
    dilation: _IntOrTuple,
    groups: int,
) -> Tensor:
    """Extract the patches of a 2-d convolution's input (group-averaged channels).

    Args:
        x: Input ``[B, C_in, I1, I2]``.
        kernel_size: Kernel size (int or pair).
        stride: Stride (int or pair).
        padding: Padding (int, pair, ``"valid"`` or ``"same"``).
        dilation: Dilation (int or pair).
        groups: Number of channel groups; the input channels are averaged over them.

    Returns:
        Patches ``[B, O1 * O2, (C_in / groups) * K1 * K2]``, output locations row-major, patch
        entries ordered (channel, kernel row, kernel column).

    Raises:
        NotImplementedError: If ``padding="same"`` needs asymmetric padding.
        ValueError: For inputs that are not 4-d or malformed arguments.
    """
    if x.ndim != 4:
        raise ValueError(f"Expected an input [B, C_in, I1, I2], got shape {tuple(x.shape)}.")
    return _extract_patches_nd(x, kernel_size, stride, padding, dilation, groups)


def extract_averaged_patches(
    x: Tensor,
    kernel_size: _IntOrTuple,
    stride: _IntOrTuple,
    padding: Union[str, _IntOrTuple],
    dilation: _IntOrTuple,
    groups: int,
) -> Tensor:
    """Average the patches of a 2-d convolution's input over the output locations.

    Equals ``extract_patches(...).mean(1)`` (zero padding included) without materialising
    the patches.

    Args:
        x: Input ``[B, C_in, I1, I2]``.
        kernel_size: Kernel size (int or pair).
        stride: Stride (int or pair).
        padding: Padding (int, pair, ``"valid"`` or ``"same"``).
        dilation: Dilation (int or pair).
        groups: Number of channel groups; the input channels are averaged over them.

    Returns:
        Averaged patches ``[B, (C_in / groups) * K1 * K2]``.

    Raises:
        NotImplementedError: If ``padding="same"`` needs asymmetric padding.
        ValueError: For inputs that are not 4-d or malformed arguments.
    """
    if x.ndim != 4:
        raise ValueError(f"Expected an input [B, C_in, I1, I2], got shape {tuple(x.shape)}.")
    return _extract_averaged_patches_nd(x, kernel_size, stride, padding, dilation, groups)


__all__: List[str] = ["loss_hessian_matrix_sqrt", "extract_patches", "extract_averaged_patches"]
