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
"""

from typing import Union

import torch
from torch import Tensor
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops._losses import check_binary_targets, check_reduction


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
    if not isinstance(loss_func, (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)):
        raise NotImplementedError(
            f"Loss function {loss_func.__class__.__name__} is not supported. Supported: "
            "MSELoss, CrossEntropyLoss, BCEWithLogitsLoss."
        )
    check_reduction(loss_func)

    output = output_one_datum.detach()
    C = output.shape[1]
    # reduction factor of MSE and BCE (mean over the C entries of the single datum)
    c = 1.0 / C if loss_func.reduction == "mean" else 1.0

    if isinstance(loss_func, MSELoss):
        eye = torch.eye(C, device=output.device, dtype=output.dtype)
        return (2.0 * c) ** 0.5 * eye

    if isinstance(loss_func, CrossEntropyLoss):
        p = output.squeeze(0).softmax(dim=0)
        p_sqrt = p.sqrt()
        return p_sqrt.diag() - p.outer(p_sqrt)

    # BCEWithLogitsLoss
    target = target_one_datum.detach()
    check_binary_targets(target, "loss_hessian_matrix_sqrt")
    sigma = output.squeeze(0).sigmoid()
    return (c * sigma * (1.0 - sigma)).sqrt().diag()
