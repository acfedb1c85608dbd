r"""Empirical Fisher: the uncentred second moment of the per-term loss gradients.

Each batch output is viewed as :math:`R_b` rows (loss terms) of :math:`C` entries (the
flattened 2-d view: class axis 1 for cross-entropy, last axis for MSE/BCE; see
``curvlinops._losses``). With :math:`\ell_r` the sum-reduced loss of row :math:`r` and
:math:`\mathbf{g}_r = \nabla_{\boldsymbol{\theta}} \ell_r`, the empirical Fisher is

.. math::
    \mathbf{F}_{\mathrm{E}} = \sum_b \frac{w_b}{c_b} \sum_{r \in b}
    \mathbf{g}_r \mathbf{g}_r^\top
    = \sum_b \frac{w_b}{c_b} \mathbf{J}_b^\top \left(\sum_r \mathbf{e}_r\mathbf{e}_r^\top
    \otimes \nabla_{\mathbf{f}_r}\ell_r \nabla_{\mathbf{f}_r}\ell_r^\top\right) \mathbf{J}_b\,,

with :math:`w_b = 1` (sum) or :math:`B_b/N` (mean) and :math:`c_b = 1` (sum), :math:`R_b`
(cross-entropy, mean) or :math:`R_b C` (MSE/BCE, mean). For 2-d outputs this is the usual
per-example gradient outer product, divided by :math:`N` (cross-entropy, mean) or :math:`NC`
(MSE/BCE, mean). The right-hand form is how products are computed: one forward pass, a
Jacobian-vector product, a row-wise rank-one middle factor, and a vector-Jacobian product, so
no per-example gradients are materialised.
"""

from collections.abc import Callable
from functools import cached_property
from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss

from curvlinops._losses import (
    check_supported_loss,
    flatten_output_and_labels,
    from_rows,
    num_terms_normalization,
    row_loss_gradients,
    to_rows,
)
from curvlinops._torch_base import CurvatureLinearOperator
from curvlinops.ggn import make_batch_ggn_type_product, make_functional_ggn_type_product

# ``output_grads(output_flat, y_flat) -> [M, R, C]``: output gradients per row, pre-scaled.
OutputGradients = Callable[[Tensor, Tensor], Tensor]


def apply_gradient_moments(loss_func, grads: Tensor, JM: Tensor) -> Tensor:
    """Apply ``sum_r e_r e_r^T (x) G_r G_r^T`` to ``JM`` (leading column axis).

    Args:
        loss_func: The loss function (decides the 2-d row view).
        grads: Output gradients per row, ``[M, R, C]``.
        JM: Output-shaped columns ``[K, *output.shape]``.

    Returns:
        The result, shaped like ``JM``.
    """
    JM_rows = to_rows(loss_func, JM, num_leading=1)  # [K, R, C]
    coefficients = torch.einsum("mrc,krc->kmr", grads, JM_rows)
    T_rows = torch.einsum("kmr,mrc->krc", coefficients, grads)
    return from_rows(loss_func, T_rows, JM.shape, num_leading=1)


def ef_output_gradients(loss_func, output_flat: Tensor, y_flat: Tensor) -> Tensor:
    """Row gradients scaled by ``c_b^{-1/2}``, ``[1, R, C]``: the EF's output factor."""
    grads = row_loss_gradients(loss_func, output_flat, y_flat)
    scale = num_terms_normalization(loss_func, output_flat) ** -0.5
    return (scale * grads).unsqueeze(0)


def make_batch_gradient_moment_product(
    model_func: nn.Module, loss_func, params: Tuple[Tensor, ...]
) -> Callable[..., Tuple[Tensor, ...]]:
    r"""Build ``(X, y, output_grads, *M) -> J^T (sum_r e_r e_r^T (x) G_r G_r^T) J M``.

    ``G_r`` holds the ``M`` output gradients of row ``r`` returned by ``output_grads``, which
    also carries the normalisation. The empirical and the Monte-Carlo Fisher differ only in
    these gradients.

    Args:
        model_func: The neural network.
        loss_func: The loss function (decides the 2-d row view).
        params: The parameters.

    Returns:
        The batch product in list format (entries ``[*p.shape, K]``), with a keyword
        ``max_columns``. ``output_grads`` is called once per batch.
    """
    product = make_batch_ggn_type_product(model_func, params)

    def middle_of(output_grads: OutputGradients):
        def make_middle(output: Tensor, y: Tensor) -> Callable[[Tensor, bool], Tensor]:
            grads = output_grads(*flatten_output_and_labels(loss_func, output, y))  # once

            def middle(JM: Tensor, batched: bool) -> Tensor:
                T = apply_gradient_moments(loss_func, grads, JM if batched else JM.unsqueeze(0))
                return T if batched else T.squeeze(0)

            return middle

        return make_middle

    def gradient_moment_product(
        X, y: Tensor, output_grads: OutputGradients, *M: Tensor, **kwargs
    ) -> Tuple[Tensor, ...]:
        return product(X, y, middle_of(output_grads), *M, **kwargs)

    gradient_moment_product.prepare = lambda X, y, output_grads: product.prepare(
        X, y, middle_of(output_grads)
    )
    return gradient_moment_product


def make_batch_ef_matrix_product(
    model_func: nn.Module, loss_func, params: Tuple[Tensor, ...]
) -> Callable[..., Tuple[Tensor, ...]]:
    """Build the product of the mini-batch empirical Fisher with a matrix.

    Args:
        model_func: The neural network.
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``.
        params: The parameters.

    Returns:
        ``ef_matrix_product(X, y, *M, max_columns=16)`` in list format (entries
        ``[*p.shape, K]``).
    """
    check_supported_loss(loss_func, "EFLinearOperator")
    product = make_batch_gradient_moment_product(model_func, loss_func, params)

    def loss_gradients(output_flat: Tensor, y_flat: Tensor) -> Tensor:
        return ef_output_gradients(loss_func, output_flat, y_flat)

    def ef_matrix_product(X, y: Tensor, *M: Tensor, **kwargs) -> Tuple[Tensor, ...]:
        return product(X, y, loss_gradients, *M, **kwargs)

    ef_matrix_product.prepare = lambda X, y: product.prepare(X, y, loss_gradients)
    return ef_matrix_product


class EFLinearOperator(CurvatureLinearOperator):
    r"""Linear operator for the empirical Fisher of an empirical risk.

    .. math::
        \mathbf{F}_{\mathrm{E}} = \sum_b \frac{w_b}{c_b} \sum_{r \in b}
        \nabla_{\boldsymbol{\theta}} \ell_r (\nabla_{\boldsymbol{\theta}} \ell_r)^\top

    over the loss terms :math:`r` (rows of the flattened 2-d output view) with
    :math:`w_b = 1` or :math:`B_b/N` and :math:`c_b = 1` (sum), :math:`R_b` (cross-entropy,
    mean) or :math:`R_b C` (MSE/BCE, mean). Supports ``MSELoss``, ``CrossEntropyLoss`` and
    ``BCEWithLogitsLoss``; other losses raise ``NotImplementedError`` at the first product.

    Attributes:
        SELF_ADJOINT: ``True``.
        SUPPORTED_LOSSES: The supported loss classes.
    """

    SELF_ADJOINT: bool = True
    SUPPORTED_LOSSES = (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)

    @cached_property
    def _batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """The mini-batch product, built once."""
        return make_batch_ef_matrix_product(self._model_func, self._loss_func, tuple(self._params))

    @property
    def _functional_batch_product(self) -> Callable[..., Tuple[Tensor, ...]]:
        """The mini-batch product as a ``torch.func`` program (for :meth:`compile`)."""
        loss_func = self._loss_func
        check_supported_loss(loss_func, type(self).__name__)

        def middle(output: Tensor, y: Tensor, JM: Tensor) -> Tensor:
            output_flat, y_flat = flatten_output_and_labels(loss_func, output, y)
            # d(mean-reduced loss)/d(output) * c_b is the per-row gradient, without autograd
            c_b = num_terms_normalization(loss_func, output_flat)
            grads = c_b**0.5 * torch.func.grad(lambda out: loss_func(out, y_flat))(output_flat)
            return apply_gradient_moments(loss_func, grads.unsqueeze(0), JM)

        return make_functional_ggn_type_product(self._model_func, tuple(self._params), middle)
